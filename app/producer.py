"""Replay a CSV or Parquet file into a Kafka topic as JSON records (``anomstream produce``).

Each row becomes one JSON object: the row's time as ISO-8601 UTC under ``timestamp``, one field
per value column (empty or NaN as ``null``: the detector worker decides what a missing value
means), then dimensions from columns and constants::

    {"timestamp": "2014-04-01T00:00:00Z", "value": 12.3, "host": "a"}

The whole file is read and checked before the first record is sent, so a bad file sends nothing
and the error names the file, line and column.

>>> spec = ReplaySpec(value_columns=("cpu",), dimension_constants={"dc": "eu"})
>>> table = pd.DataFrame({"timestamp": ["2014-04-01 00:00:00"], "cpu": ["12.5"]})
>>> [r.payload for r in build_records(table, spec, "inline.csv")]
[b'{"timestamp":"2014-04-01T00:00:00Z","cpu":12.5,"dc":"eu"}']
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.kafka_security import PLAINTEXT, KafkaSecurity

TIMESTAMP_FIELD = "timestamp"
# Spellings of "no value" in CSV files; sent as JSON null.
# One encoder for all rows: json.dumps would rebuild it per call.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
MISSING_TOKENS = frozenset({"", "nan", "NaN", "NAN", "null", "NULL", "None", "NA", "N/A", "n/a"})


class InputError(ValueError):
    """The input file cannot be replayed; the message names file, line and column."""


@dataclass(frozen=True)
class ReplaySpec:
    """Which columns become which JSON fields."""

    timestamp_column: str = "timestamp"
    value_columns: tuple[str, ...] = ("value",)
    # Value column -> JSON field name; columns not listed keep their own name.
    measure_names: Mapping[str, str] = field(default_factory=dict)
    dimension_columns: tuple[str, ...] = ()
    dimension_constants: Mapping[str, str] = field(default_factory=dict)
    key_field: str | None = None

    def field_names(self) -> list[str]:
        return [
            TIMESTAMP_FIELD,
            *(self.measure_names.get(c, c) for c in self.value_columns),
            *self.dimension_columns,
            *self.dimension_constants,
        ]

    def check(self) -> None:
        """Reject specs that would write one JSON field twice or key on a field that is absent."""
        names = self.field_names()
        if not self.value_columns:
            raise InputError("at least one value column is needed")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InputError(f"JSON field(s) {duplicates} would be written twice; "
                             "rename with --measure-name or drop the duplicate option")
        if self.key_field is not None and self.key_field not in names:
            raise InputError(f"--key-field {self.key_field!r} is not one of the record's fields "
                             f"{names}")


@dataclass(frozen=True)
class ReplayRecord:
    """One Kafka record to send, with its event time for paced replay."""

    epoch_ms: int
    key: bytes | None
    payload: bytes


def read_table(path: Path) -> pd.DataFrame:
    """CSV (all cells read as text, blank lines kept so row i is line i + 2) or Parquet."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    kind = "Parquet" if is_parquet(path) else "CSV"
    try:
        if kind == "Parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (ValueError, OSError, pd.errors.ParserError) as error:
        raise InputError(f"{path}: cannot read as {kind}: {error}") from error


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in {".parquet", ".pq"}


def build_records(table: pd.DataFrame, spec: ReplaySpec, source: str) -> list[ReplayRecord]:
    """Check and convert every row; the first bad cell raises ``InputError``."""
    spec.check()
    is_csv = not is_parquet(Path(source))

    def where(row: int) -> str:
        # CSV: header is line 1, so data row i sits on line i + 2; Parquet has rows, not lines.
        return f"line {row + 2}" if is_csv else f"row {row + 1}"

    needed = [spec.timestamp_column, *spec.value_columns, *spec.dimension_columns]
    missing = [c for c in dict.fromkeys(needed) if c not in table.columns]
    if missing:
        raise InputError(f"{source}: line 1: column(s) {missing} not found; the file has "
                         f"{[str(c) for c in table.columns]}")
    if is_csv:
        # Blank lines are layout, not data (they were kept only so line numbers stay true).
        table = table[(table != "").any(axis=1)]

    epoch_ms = _parse_timestamps(table[spec.timestamp_column], source, where)
    values = {
        column: _parse_values(table[column], source, where) for column in spec.value_columns
    }
    dimensions = {column: _text_cells(table[column]) for column in spec.dimension_columns}
    measure_fields = [spec.measure_names.get(c, c) for c in spec.value_columns]

    names = [TIMESTAMP_FIELD, *measure_fields, *spec.dimension_columns]
    columns = [
        format_timestamps(epoch_ms),
        *(values[c] for c in spec.value_columns),
        *(dimensions[c] for c in spec.dimension_columns),
    ]
    records = []
    for millis, row in zip(epoch_ms.tolist(), zip(*columns, strict=True), strict=True):
        record: dict[str, Any] = dict(zip(names, row, strict=True))
        record.update(spec.dimension_constants)
        key = None
        if spec.key_field is not None and record[spec.key_field] is not None:
            key = str(record[spec.key_field]).encode()
        records.append(ReplayRecord(millis, key, _JSON.encode(record).encode()))
    return records


def format_timestamps(epoch_ms: np.ndarray) -> list[str]:
    """ISO-8601 UTC for a column of epoch milliseconds; milliseconds only where a time has them.

    >>> format_timestamps(np.array([0, 1500]))
    ['1970-01-01T00:00:00Z', '1970-01-01T00:00:01.500Z']
    """
    text = np.datetime_as_string(epoch_ms.astype("datetime64[ms]"), unit="ms")
    whole = epoch_ms % 1000 == 0
    return [f"{t[:-4]}Z" if w else f"{t}Z" for t, w in zip(text.tolist(), whole.tolist(),
                                                           strict=True)]


def _parse_timestamps(
    cells: pd.Series, source: str, where: Callable[[int], str]
) -> np.ndarray:
    """Epoch milliseconds. Text without a zone is read as UTC; numbers are epoch seconds,
    or epoch milliseconds when too large to be seconds (after year 5138)."""
    column = str(cells.name)
    if pd.api.types.is_datetime64_any_dtype(cells):
        parsed = _to_utc(cells)
    elif pd.api.types.is_numeric_dtype(cells):
        numbers = cells.astype("float64")
        unit = "ms" if numbers.abs().max() > 1e11 else "s"
        parsed = pd.to_datetime(numbers, unit=unit, utc=True)
    else:
        text = cells.astype("string").str.strip()
        parsed = pd.to_datetime(text, utc=True, errors="coerce")
        retry = parsed.isna() & text.notna() & (text != "")
        if retry.any():
            # Inference from the first row fails on mixed layouts; parse those rows one by one.
            parsed[retry] = pd.to_datetime(text[retry], utc=True, errors="coerce",
                                           format="mixed")
    bad = parsed.isna().to_numpy().nonzero()[0]
    if len(bad):
        row = int(bad[0])
        raw = cells.iloc[row]
        reason = "empty timestamp" if _is_missing(raw) else f"cannot parse timestamp {raw!r}"
        raise InputError(f"{source}: {where(_row_number(cells, row))}, column {column!r}: "
                         f"{reason} (expected ISO-8601 or epoch seconds/milliseconds)")
    return (parsed.astype("datetime64[ns, UTC]").astype("int64") // 1_000_000).to_numpy()


def _to_utc(cells: pd.Series) -> pd.Series:
    if getattr(cells.dt, "tz", None) is None:
        return cells.dt.tz_localize("UTC")
    return cells.dt.tz_convert("UTC")


def _parse_values(cells: pd.Series, source: str, where: Callable[[int], str]) -> list[Any]:
    """Floats (or None for missing); a cell that is present but not a number is an error."""
    if pd.api.types.is_bool_dtype(cells):
        raise InputError(f"{source}: column {str(cells.name)!r} holds booleans, not numbers")
    if pd.api.types.is_numeric_dtype(cells):
        numbers = cells.astype("float64")
    else:
        text = cells.astype("string").str.strip()
        missing = text.isna() | text.isin(MISSING_TOKENS)
        numbers = pd.to_numeric(text.mask(missing), errors="coerce")
        bad = (numbers.isna() & ~missing).to_numpy().nonzero()[0]
        if len(bad):
            row = int(bad[0])
            raise InputError(f"{source}: {where(_row_number(cells, row))}, column "
                             f"{str(cells.name)!r}: {cells.iloc[row]!r} is not a number")
    array = numbers.to_numpy(dtype="float64")
    # Infinity is not JSON; like NaN it means "no usable value here".
    return [None if not np.isfinite(x) else float(x) for x in array]


def _text_cells(cells: pd.Series) -> list[str | None]:
    return [None if _is_missing(v) else str(v) for v in cells.tolist()]


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() in MISSING_TOKENS
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _row_number(cells: pd.Series, position: int) -> int:
    """The row's position in the file (the index survives the blank-line filter)."""
    return int(cells.index[position])


def paced(
    records: Iterable[ReplayRecord], speed: float, clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[ReplayRecord]:
    """Yield records, sleeping so event-time gaps pass ``speed`` times faster (0: no pacing).

    Out-of-order times never make us wait: a record is due at the latest event time seen so far.
    """
    if speed <= 0:
        yield from records
        return
    started = clock()
    first_ms: int | None = None
    latest_ms = 0
    for record in records:
        if first_ms is None:
            first_ms = latest_ms = record.epoch_ms
        latest_ms = max(latest_ms, record.epoch_ms)
        due = started + (latest_ms - first_ms) / 1000.0 / speed
        delay = due - clock()
        if delay > 0:
            sleep(delay)
        yield record


@dataclass
class DeliveryReport:
    """What the broker acknowledged: every record is either delivered or counted as failed."""

    delivered: int = 0
    failed: int = 0
    first_error: str | None = None

    def on_delivery(self, error: Any, _message: Any) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        if self.first_error is None:
            self.first_error = str(error)


def send_records(
    bootstrap: str,
    topic: str,
    records: Iterable[ReplayRecord],
    *,
    on_sent: Callable[[int], None] = lambda _n: None,
    flush_timeout_s: float = 60.0,
    security: KafkaSecurity = PLAINTEXT,
) -> DeliveryReport:
    """Produce ``records`` in order (idempotent producer, acks=all) and wait for every ack.

    ``on_sent(n)`` is called as records are handed to the client (for progress bars).
    """
    from confluent_kafka import KafkaException, Producer

    from common.kafka_io import produce_when_room, producer_config

    report = DeliveryReport()
    producer = Producer(producer_config(bootstrap, security=security))
    unreported, reported_at = 0, time.monotonic()
    try:
        for record in records:
            # No event time as Kafka timestamp: years-old times would fall under the broker's
            # time-based retention. The event time is in the JSON.
            produce_when_room(producer, topic, value=record.payload, key=record.key,
                              on_delivery=report.on_delivery, wait_s=0.1)
            producer.poll(0)
            unreported += 1
            # Progress bars need ~10 updates a second, not one per record.
            if time.monotonic() - reported_at >= 0.1:
                on_sent(unreported)
                unreported, reported_at = 0, time.monotonic()
        on_sent(unreported)
        remaining = producer.flush(flush_timeout_s)
    except KafkaException as error:
        raise InputError(f"producing to {topic!r} on {bootstrap} failed: {error}") from error
    if remaining:
        report.failed += remaining
        report.first_error = report.first_error or (
            f"{remaining} record(s) still unacknowledged after {flush_timeout_s:.0f} s"
        )
    return report
