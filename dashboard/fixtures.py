"""Synthetic result lakes for the dashboard's tests, demo and benchmark.

``build_lake`` writes N series × M intervals of result records through the lake's own file
writer (``sinks.lake_files.publish_sink_file``, so the layout is the sink's), deterministic for
a seed: the same arguments give the same rows, so tests can compare what the page shows with an
independent DuckDB count over the same files.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as lake:
...     summary = build_lake(lake, series=8, intervals=30, seed=1)
...     (summary.rows, summary.series, summary.files > 0)
(240, 8, True)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from contract import records as r
from sinks.lake_files import publish_sink_file

TOPIC = "anomstream.results"
THRESHOLD = 70.0
DEFAULT_START = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    measure: str
    primary: str  # dimension unique to each series of the detector
    primary_values: tuple[str, ...]
    secondary: str  # dimension shared by several series, the natural filter
    secondary_values: tuple[str, ...]
    level: float
    swing: float


DETECTORS: tuple[Detector, ...] = (
    Detector(
        "fx-spread", "spread_bps", "pair",
        ("EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCHF", "USDCAD", "NZDUSD", "EURGBP"),
        "venue", ("EBS", "Reuters", "LMAX", "Currenex"), 1.2, 0.4,
    ),
    Detector(
        "equity-price", "last_price", "ticker",
        ("AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "JPM", "XOM", "UNH"),
        "exchange", ("XNAS", "XNYS", "BATS"), 180.0, 3.0,
    ),
    Detector(
        "cpu-utilisation", "cpu_util_pct", "host", ("web", "api", "db", "cache"),
        "region", ("eu-west-1", "us-east-1", "ap-south-1"), 55.0, 20.0,
    ),
    Detector(
        "api-latency", "p99_latency_ms", "service", ("orders", "quotes", "auth", "risk", "fills"),
        "region", ("eu-west-1", "us-east-1", "ap-south-1"), 120.0, 30.0,
    ),
)


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    detector: Detector
    dimensions: dict[str, str]

    @property
    def timeseries_id(self) -> str:
        return r.timeseries_id(self.detector.name, self.detector.measure, self.dimensions)


@dataclass(frozen=True, slots=True)
class LakeSummary:
    lake_dir: Path
    rows: int
    series: int
    anomalies: int
    files: int
    first_start: datetime
    last_start: datetime


def series_specs(count: int) -> list[SeriesSpec]:
    """``count`` distinct series spread round-robin over the detectors."""
    specs = []
    for index in range(count):
        detector = DETECTORS[index % len(DETECTORS)]
        member = index // len(DETECTORS)
        base = detector.primary_values[member % len(detector.primary_values)]
        lap = member // len(detector.primary_values)
        primary = base if lap == 0 else f"{base}-{lap:02d}"
        secondary = detector.secondary_values[member % len(detector.secondary_values)]
        dimensions = {detector.primary: primary, detector.secondary: secondary}
        specs.append(SeriesSpec(detector, dimensions))
    return specs


def _schema(dimension_names: list[str]) -> pa.Schema:
    fields = [*r.RESULT_SCHEMA, pa.field(r.NO_DATA, pa.int8())]
    fields += [pa.field(r.DIMENSION_PREFIX + name, pa.string()) for name in dimension_names]
    fields += list(r.PROVENANCE_SCHEMA)
    return pa.schema(fields)


def build_lake(
    lake_dir: str | Path,
    *,
    series: int,
    intervals: int,
    start: datetime = DEFAULT_START,
    interval: timedelta = timedelta(minutes=1),
    seed: int = 0,
    anomaly_rate: float = 0.004,
    partitions: int = 4,
    intervals_per_file: int = 60,
    silent_series: int = 0,
) -> LakeSummary:
    """Write ``series`` × ``intervals`` result records and return what was written.

    Each series is a daily sine around its detector's level plus noise; the model learns for the
    first few intervals (score 0, stage LEARNING, confidence rising), then spikes injected at
    ``anomaly_rate`` (five times as often on every 17th series, the "hot" ones) score above the
    threshold of 70 and are flagged. The last ``silent_series`` series stop reporting for the
    last sixth of the intervals: no value, score 0, and ``noData`` from their third silent
    interval on (as a detector with ``no_data_after`` of two intervals would say).
    """
    lake = Path(lake_dir)
    rng = np.random.default_rng(seed)
    specs = series_specs(series)
    learning = max(1, min(30, intervals // 5))

    step = np.arange(intervals)[:, None]
    level = np.array([s.detector.level for s in specs]) * rng.uniform(0.8, 1.2, series)
    swing = np.array([s.detector.swing for s in specs]) * rng.uniform(0.5, 1.5, series)
    phase = rng.uniform(0, 2 * np.pi, series)
    period = timedelta(days=1) / interval
    noise_scale = swing * 0.08
    expected = level + swing * np.sin(2 * np.pi * step / period + phase)
    noise = rng.normal(0.0, 1.0, (intervals, series))
    rate = np.where(np.arange(series) % 17 == 0, anomaly_rate * 5, anomaly_rate)
    spike = (rng.random((intervals, series)) < rate) & (step >= learning)
    jump = rng.choice([-1.0, 1.0], (intervals, series)) * rng.uniform(6, 12, (intervals, series))
    noise = np.where(spike, jump, noise)
    value = expected + noise * noise_scale
    score = np.round(100 * (1 - np.exp(-np.abs(noise) / 2.9)), 2)
    score = np.where(step < learning, 0.0, score)
    decision = ((score >= THRESHOLD) & (step >= learning)).astype(np.int8)
    seen = np.broadcast_to(step + 1, (intervals, series))
    confidence = np.round(100 * (1 - np.exp(-seen / (2 * learning))), 2)
    learning_stage = np.broadcast_to(step < learning, (intervals, series))
    silent = np.zeros((intervals, series), dtype=bool)
    if silent_series:
        silent[intervals - max(3, intervals // 6) :, series - silent_series :] = True
    no_data = (silent & np.roll(silent, 2, axis=0)).astype(np.int8)
    value = np.where(silent, np.nan, value)
    score = np.where(silent, 0.0, score)
    decision = np.where(silent, 0, decision).astype(np.int8)

    dimension_names = sorted({name for s in specs for name in s.dimensions})
    schema = _schema(dimension_names)
    grid = _Grid(
        specs=specs,
        dimension_names=dimension_names,
        start_ms=int(start.timestamp() * 1000),
        step_ms=int(interval.total_seconds() * 1000),
        value=value,
        expected=expected,
        score=score,
        decision=decision,
        confidence=confidence,
        learning=learning_stage,
        seen=seen,
        no_data=no_data,
    )
    partition_of = np.array([int(s.timeseries_id, 16) % partitions for s in specs])

    day_of_step = [(start + interval * k).date() for k in range(intervals)]
    offsets = [0] * partitions
    files = 0
    for first in range(0, intervals, intervals_per_file):
        block = range(first, min(first + intervals_per_file, intervals))
        for day in sorted({day_of_step[k] for k in block}):
            steps = np.array([k for k in block if day_of_step[k] == day])
            for partition in range(partitions):
                members = np.flatnonzero(partition_of == partition)
                if members.size == 0:
                    continue
                # Offset order: interval by interval, the partition's series within each.
                rows_step = np.repeat(steps, members.size)
                rows_series = np.tile(members, steps.size)
                table = grid.table(schema, rows_step, rows_series, partition, offsets[partition])
                publish_sink_file(lake, TOPIC, partition, day.isoformat(), table)
                offsets[partition] += table.num_rows
                files += 1
    return LakeSummary(
        lake_dir=lake,
        rows=series * intervals,
        series=series,
        anomalies=int(decision.sum()),
        files=files,
        first_start=start,
        last_start=start + interval * (intervals - 1),
    )


@dataclass(frozen=True, eq=False)
class _Grid:
    """The generated (interval × series) arrays, sliced into Arrow tables file by file."""

    specs: list[SeriesSpec]
    dimension_names: list[str]
    start_ms: int
    step_ms: int
    value: np.ndarray
    expected: np.ndarray
    score: np.ndarray
    decision: np.ndarray
    confidence: np.ndarray
    learning: np.ndarray
    seen: np.ndarray
    no_data: np.ndarray

    @functools.cache  # noqa: B019 - one grid per build_lake call, dropped with it
    def per_series(self, schema: pa.Schema) -> dict[str, pa.Array]:
        """The columns that depend only on the series, one entry per series."""
        specs = self.specs
        columns = {
            r.DETECTOR_NAME: pa.array([s.detector.name for s in specs]),
            r.MEASURE: pa.array([s.detector.measure for s in specs]),
            r.TIMESERIES_ID: pa.array([s.timeseries_id for s in specs]),
            r.DIMENSION_LIST: pa.array(
                [r.dimension_list(s.dimensions) for s in specs],
                type=schema.field(r.DIMENSION_LIST).type,
            ),
        }
        for name in self.dimension_names:
            columns[r.DIMENSION_PREFIX + name] = pa.array(
                [s.dimensions.get(name) for s in specs], type=pa.string()
            )
        return columns

    def table(
        self,
        schema: pa.Schema,
        rows_step: np.ndarray,
        rows_series: np.ndarray,
        partition: int,
        first_offset: int,
    ) -> pa.Table:
        per_series = self.per_series(schema)
        take = pa.array(rows_series)
        at = (rows_step, rows_series)
        starts = self.start_ms + rows_step.astype(np.int64) * self.step_ms
        stage = pa.DictionaryArray.from_arrays(
            pa.array(np.where(self.learning[at], 0, 1).astype(np.int8)),
            pa.array(["LEARNING", "INFERENCE"]),
        )
        columns: dict[str, pa.Array] = {
            name: per_series[name].take(take)
            for name in (r.DETECTOR_NAME, r.MEASURE, r.TIMESERIES_ID, r.DIMENSION_LIST)
        }
        columns |= {
            # NaN (a silent interval) becomes null, as the worker writes it.
            r.AGGREGATED_MEASURE_VALUE: pa.array(np.round(self.value[at], 4), from_pandas=True),
            r.ANOMALY_SCORE: pa.array(self.score[at]),
            r.ANOMALY_DECISION_THRESHOLD: pa.array(np.full(rows_step.size, THRESHOLD)),
            r.ANOMALY_DECISION: pa.array(self.decision[at]),
            r.ANOMALY_CONFIDENCE_SCORE: pa.array(self.confidence[at]),
            r.MODEL_STAGE: stage,
            r.EXPECTED_VALUE: pa.array(np.round(self.expected[at], 4)),
            r.PROCESSED_DATA_POINTS: pa.array(self.seen[at].astype(np.int64)),
            r.DETECTION_PERIOD_START_TIME: pa.array(starts, type=r.TIME_TYPE),
            r.DETECTION_PERIOD_END_TIME: pa.array(starts + self.step_ms, type=r.TIME_TYPE),
            r.NO_DATA: pa.array(self.no_data[at]),
        }
        for name in self.dimension_names:
            column = r.DIMENSION_PREFIX + name
            columns[column] = per_series[column].take(take)
        columns[r.KAFKA_PARTITION] = pa.array(np.full(rows_step.size, partition, dtype=np.int32))
        columns[r.KAFKA_OFFSET] = pa.array(first_offset + np.arange(rows_step.size, dtype=np.int64))
        return pa.Table.from_pydict(columns, schema=schema)
