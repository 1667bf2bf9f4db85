"""What every synthetic feed shares: the spec, series, anomaly labels, window placement and
record emission.

A feed is a set of series on one shared clock. Each series is one measure of one entity (its
dimensions); the series of one entity travel together in one input record per timestamp::

    {"timestamp": "2026-01-05T00:01:00.000Z", "instrument": "ACME", "price": 101.25, ...}

Every injected anomaly is recorded as a ``Label`` naming the series (dimensions and measure),
the first and last affected timestamps and its kind, so that a detector can be scored against
the ground truth.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.durations import parse_duration
from common.files import write_text_atomically
from contract.records import format_time, parse_time

DEFAULT_START = "2026-01-05T00:00:00Z"

#: The first anomaly starts after this many points, so that the detector has learnt the series.
QUIET_START = 400

#: Anomalies of one series keep at least this many points apart, so each stands on its own.
MIN_GAP = 40

OUTPUT_SUFFIXES = (".csv", ".parquet", ".jsonl")


@dataclass(frozen=True, slots=True)
class FeedSpec:
    """How much of a feed to generate, from when, and from which seed."""

    seed: int = 0
    start: float = parse_time(DEFAULT_START).timestamp()
    interval: float = 60.0
    points: int = 3000
    entities: int | None = None

    def __post_init__(self) -> None:
        if self.points < 1:
            raise ValueError(f"points must be at least 1, got {self.points}")
        if not self.interval > 0:
            raise ValueError(f"interval must be positive, got {self.interval}")
        if self.entities is not None and self.entities < 1:
            raise ValueError(
                f"the number of instruments/hosts must be at least 1, got {self.entities}"
            )

    def timestamps(self) -> np.ndarray:
        return self.start + self.interval * np.arange(self.points, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Label:
    """One injected anomaly: series ``dimensions`` + ``measure``, points ``first``..``last``."""

    dimensions: dict[str, str]
    measure: str
    first: int
    last: int
    kind: str

    def to_json(self, spec: FeedSpec) -> dict[str, Any]:
        return {
            "dimensions": dict(self.dimensions),
            "measure": self.measure,
            "start": format_time(spec.start + self.first * spec.interval),
            "end": format_time(spec.start + self.last * spec.interval),
            "kind": self.kind,
        }


@dataclass(slots=True)
class Series:
    """One measure of one entity over the feed's clock, rounded as it is emitted.

    ``tags`` are constant fields emitted in the entity's records that are not dimensions (the
    ops feed's ``entity``, which lets detectors ``match`` one kind of entity in a mixed topic).
    """

    dimensions: dict[str, str]
    measure: str
    values: np.ndarray
    decimals: int = 2
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.round(np.asarray(self.values, dtype=np.float64), self.decimals)

    @property
    def key(self) -> tuple[tuple[tuple[str, str], ...], str]:
        return tuple(sorted(self.dimensions.items())), self.measure


@dataclass(slots=True)
class Feed:
    """A generated feed: its series on one clock and the labels of every injected anomaly."""

    name: str
    spec: FeedSpec
    series: list[Series]
    labels: list[Label] = field(default_factory=list)

    def anomalous_keys(self) -> set[tuple[tuple[tuple[str, str], ...], str]]:
        return {(tuple(sorted(label.dimensions.items())), label.measure) for label in self.labels}

    def entities(self) -> list[tuple[dict[str, str], list[Series]]]:
        """Series grouped by their dimensions, in the order the generator created them; the
        mapping holds the tags and the dimensions, as they appear in the records."""
        groups: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], list[Series]]] = {}
        for series in self.series:
            fields = {**series.tags, **series.dimensions}
            groups.setdefault(series.key[0], (fields, []))[1].append(series)
        return list(groups.values())

    def records(self) -> Iterator[dict[str, Any]]:
        """Input records in time order: one per entity per timestamp."""
        entities = self.entities()
        for index, moment in enumerate(self.spec.timestamps()):
            stamp = format_time(float(moment))
            for fields, members in entities:
                record: dict[str, Any] = {"timestamp": stamp, **fields}
                for series in members:
                    value = float(series.values[index])
                    record[series.measure] = int(value) if series.decimals == 0 else value
                yield record

    def labels_document(self) -> dict[str, Any]:
        """The labels file: the feed, every series (anomalous or not) and every anomaly."""
        anomalous = self.anomalous_keys()
        return {
            "feed": self.name,
            "seed": self.spec.seed,
            "start": format_time(self.spec.start),
            "interval_seconds": self.spec.interval,
            "points": self.spec.points,
            "series": [
                {
                    "dimensions": dict(series.dimensions),
                    "measure": series.measure,
                    "anomalous": series.key in anomalous,
                }
                for series in self.series
            ],
            "labels": [label.to_json(self.spec) for label in self.labels],
        }


def series_rng(seed: int, *names: str) -> np.random.Generator:
    """A generator for one series, stable across runs and independent of the other series."""
    salt = zlib.crc32("/".join(names).encode("utf-8"))
    return np.random.default_rng([seed, salt])


def clean_count(entities: int) -> int:
    """How many entities of a feed stay anomaly-free: a quarter, at least one when there are two."""
    return 0 if entities < 2 else max(1, entities // 4)


def place_windows(
    rng: np.random.Generator, points: int, lengths: Sequence[int], start: int | None = None
) -> list[tuple[int, int] | None]:
    """Non-overlapping windows ``(first, last)`` for anomalies of the given lengths.

    Windows start after ``QUIET_START`` points (fewer on short feeds) and keep ``MIN_GAP`` points
    apart; a window that does not fit is ``None`` and its anomaly is not injected.
    """
    earliest = min(QUIET_START, points // 3) if start is None else start
    taken: list[tuple[int, int]] = []
    placed: list[tuple[int, int] | None] = []
    for length in lengths:
        window: tuple[int, int] | None = None
        latest = points - length - 2
        for _ in range(200):
            if latest <= earliest:
                break
            first = int(rng.integers(earliest, latest))
            last = first + length - 1
            if all(last + MIN_GAP < a or first > b + MIN_GAP for a, b in taken):
                window = (first, last)
                taken.append(window)
                break
        placed.append(window)
    return placed


def anomaly_count(points: int, per_points: int) -> int:
    """One anomaly of a kind per ``per_points`` points of a series, at least one."""
    return max(1, round(points / per_points))


def daily_phase(spec: FeedSpec) -> np.ndarray:
    """Time of day of every point as a fraction of the UTC day, in [0, 1)."""
    return np.mod(spec.timestamps(), 86400.0) / 86400.0


def parse_interval(text: str) -> float:
    """Seconds between points: a duration (``common.durations``) that must be positive.

    >>> parse_interval("60s"), parse_interval("5m"), parse_interval("90")
    (60.0, 300.0, 90.0)
    """
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"an interval must be positive: {text!r}")
    return seconds


def parse_start(text: str) -> float:
    """Epoch seconds of an ISO-8601 time; a time without zone is taken as UTC."""
    try:
        return parse_time(text).timestamp()
    except ValueError:
        raise ValueError(f"not an ISO-8601 time: {text!r} (e.g. 2026-01-05T00:00:00Z)") from None


def labels_path_for(out: Path) -> Path:
    """``data/market.csv`` -> ``data/market.labels.json``."""
    return out.with_suffix(".labels.json")


def write_labels(feed: Feed, path: Path) -> None:
    """Written atomically: a reader (the demo, its test) never sees half a file."""
    write_text_atomically(path, json.dumps(feed.labels_document(), indent=1) + "\n")


def write_records(feed: Feed, path: Path) -> int:
    """Write the feed's records to ``.csv``, ``.parquet`` or ``.jsonl``; returns the count.

    CSV and Parquet columns are the union of the record fields (empty where an entity has no
    such field); times stay ISO-8601 strings, as in the stream.
    """
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"{path}: unknown output format; use one of {', '.join(OUTPUT_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    records = feed.records()
    count = 0
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
                count += 1
        return count
    columns = record_columns(feed)
    if suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=columns)
            writer.writeheader()
            for record in records:
                writer.writerow(record)
                count += 1
        return count
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(records)
    dimension_names = {name for fields, _ in feed.entities() for name in fields}
    schema = pa.schema(
        [
            (
                name,
                pa.string()
                if name == "timestamp" or name in dimension_names
                else _arrow_type(feed, name),
            )
            for name in columns
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return len(rows)


def _arrow_type(feed: Feed, measure: str) -> Any:
    import pyarrow as pa

    decimals = {series.decimals for series in feed.series if series.measure == measure}
    return pa.int64() if decimals == {0} else pa.float64()


def record_columns(feed: Feed) -> list[str]:
    """``timestamp``, then tags and dimension names, then measures, in first-seen order."""
    dimensions: list[str] = []
    measures: list[str] = []
    for series in feed.series:
        for name in [*series.tags, *series.dimensions]:
            if name not in dimensions:
                dimensions.append(name)
        if series.measure not in measures:
            measures.append(series.measure)
    return ["timestamp", *dimensions, *measures]


def lognormal_noise(rng: np.random.Generator, sigma: float, size: int) -> np.ndarray:
    """Multiplicative noise with mean 1."""
    return np.asarray(rng.lognormal(-0.5 * sigma * sigma, sigma, size))


def u_shape(phase: np.ndarray, depth: float) -> np.ndarray:
    """A U over the day: 1 + ``depth`` at open and close, 1 at midday.

    >>> [float(v) for v in u_shape(np.array([0.0, 0.5, 1.0]), 2.0)]
    [3.0, 1.0, 3.0]
    """
    return 1.0 + depth * (2.0 * phase - 1.0) ** 2


def sine_day(phase: np.ndarray, peak_hour: float) -> np.ndarray:
    """A daily sine in [-1, 1] that peaks at ``peak_hour`` UTC."""
    return np.cos(2.0 * math.pi * (phase - peak_hour / 24.0))
