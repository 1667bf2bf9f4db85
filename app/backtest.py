"""Backtest: run one detector over a recorded series (CSV or Parquet) and write its verdicts.

The file is streamed: rows are parsed, scored and written one at a time, so memory stays flat
whatever the file's length (only ``--plot`` keeps compact per-row arrays for the figure).
Every input row yields exactly one output row, in input order: missing values (empty, NaN)
are handed to the detector as missing data, and repeated or backward timestamps are processed
in file order, because dropping or re-ordering rows would make the output impossible to line up
with the input.

Timestamps are read by ``contract.records.parse_timestamp`` (ISO-8601 or epoch numbers).

>>> parse_value(" 3.5 "), parse_value("")
(3.5, nan)
"""

from __future__ import annotations

import csv
import math
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.progress import progress_bar
from contract import records as r
from contract.records import epoch_seconds, parse_timestamp
from detectors.config import DetectorConfig
from detectors.rcf import RcfDetector
from detectors.result import ModelStage, Result

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")

# Texts that mean "no value" in the CSV files people export from spreadsheets and pandas.
_MISSING_TEXTS = frozenset({"", "nan", "na", "n/a", "null", "none"})
_PROGRESS_EVERY = 512
_PARQUET_BATCH_ROWS = 8192


class BacktestError(Exception):
    """Bad input or options; the message says what to fix (file, line, column, text)."""


@dataclass(frozen=True, slots=True)
class InputRow:
    """One parsed input row.

    ``line`` is the CSV line number (1-based, the header being line 1) or, for Parquet, the
    1-based data row. ``timestamp_raw`` is the timestamp exactly as given, echoed to the output
    so rows line up; ``values`` holds NaN where a value is missing.
    """

    line: int
    timestamp_raw: Any
    timestamp: float
    values: tuple[float, ...]


@dataclass(slots=True)
class BacktestSummary:
    rows: int = 0
    missing: int = 0
    anomalies: int = 0
    learning: int = 0
    output: Path | None = None
    plot: Path | None = None


@dataclass(slots=True)
class _PlotData:
    """Compact columns kept only when a plot is asked for."""

    timestamps: array[float] = field(default_factory=lambda: array("d"))
    values: list[array[float]] = field(default_factory=list)
    expected: list[array[float]] = field(default_factory=list)
    scores: array[float] = field(default_factory=lambda: array("d"))
    decisions: array[int] = field(default_factory=lambda: array("b"))
    learning: array[int] = field(default_factory=lambda: array("b"))


def parse_value(text: str) -> float:
    """A float, or NaN for a missing value (empty, NaN, NA, null, none). ``ValueError`` else."""
    try:
        return float(text)
    except ValueError:
        if text.strip().lower() in _MISSING_TEXTS:
            return math.nan
        raise


def input_format(path: Path) -> str:
    """``"csv"`` or ``"parquet"`` from the file name's extension."""
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    known = ", ".join(CSV_SUFFIXES + PARQUET_SUFFIXES)
    raise BacktestError(f"{path}: unknown file type {suffix or '(none)'!r}; use one of {known}")


def count_rows(path: Path) -> int:
    """Number of data rows (what ``read_rows`` will yield), for the progress bar's total."""
    if input_format(path) == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return sum(1 for fields in reader if not _blank(fields))


def read_rows(
    path: Path, timestamp_column: str, value_columns: Sequence[str]
) -> Iterator[InputRow]:
    """Parsed rows of a CSV or Parquet file, streamed in file order.

    Raises ``BacktestError`` naming the file, line and column for a missing column or an
    unparsable timestamp or number.
    """
    if not path.is_file():
        raise BacktestError(f"{path}: no such file")
    if input_format(path) == "parquet":
        return _read_parquet(path, timestamp_column, value_columns)
    return _read_csv(path, timestamp_column, value_columns)


def _blank(fields: list[str]) -> bool:
    return all(not item.strip() for item in fields)


def _column_indexes(path: Path, present: Sequence[str], wanted: Sequence[str]) -> list[int]:
    indexes = []
    for name in wanted:
        if name not in present:
            raise BacktestError(
                f"{path}: no column {name!r}; columns present: "
                f"{', '.join(repr(p) for p in present) or '(none)'}"
            )
        indexes.append(list(present).index(name))
    return indexes


def _read_csv(
    path: Path, timestamp_column: str, value_columns: Sequence[str]
) -> Iterator[InputRow]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise BacktestError(f"{path}: empty file, expected a header line")
        names = [name.strip() for name in header]
        ts_index, *value_indexes = _column_indexes(path, names, [timestamp_column, *value_columns])
        width = max(ts_index, *value_indexes) + 1
        for fields in reader:
            if _blank(fields):
                continue
            line = reader.line_num
            if len(fields) < width:
                short = [
                    name
                    for name, index in zip(
                        [timestamp_column, *value_columns],
                        [ts_index, *value_indexes],
                        strict=True,
                    )
                    if index >= len(fields)
                ]
                raise BacktestError(
                    f"{path}, line {line}, column {short[0]!r}: missing field "
                    f"(the row has {len(fields)} of {len(names)} fields)"
                )
            raw = fields[ts_index]
            try:
                timestamp = parse_timestamp(raw)
            except ValueError:
                raise BacktestError(
                    f"{path}, line {line}, column {timestamp_column!r}: "
                    f"cannot parse timestamp {raw!r} (expected YYYY-mm-dd HH:MM:SS, "
                    "ISO-8601 or epoch seconds/milliseconds)"
                ) from None
            values = []
            for name, index in zip(value_columns, value_indexes, strict=True):
                text = fields[index]
                try:
                    values.append(parse_value(text))
                except ValueError:
                    raise BacktestError(
                        f"{path}, line {line}, column {name!r}: not a number: {text!r}"
                    ) from None
            yield InputRow(line, raw, timestamp, tuple(values))


def _read_parquet(
    path: Path, timestamp_column: str, value_columns: Sequence[str]
) -> Iterator[InputRow]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    _column_indexes(path, names, [timestamp_column, *value_columns])
    wanted = list(dict.fromkeys([timestamp_column, *value_columns]))
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted):
        ts = batch.column(timestamp_column)
        raws = ts.to_pylist()
        epochs: list[float | None]
        if pa.types.is_timestamp(ts.type):
            per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[ts.type.unit]
            epochs = [
                None if v is None else v / per_second for v in pc.cast(ts, pa.int64()).to_pylist()
            ]
        elif pa.types.is_date32(ts.type):
            epochs = [
                None if v is None else v * 86400.0 for v in pc.cast(ts, pa.int32()).to_pylist()
            ]
        elif pa.types.is_integer(ts.type) or pa.types.is_floating(ts.type):
            epochs = [
                epoch_seconds(v) if v is not None and math.isfinite(v) else None for v in raws
            ]
        elif pa.types.is_string(ts.type) or pa.types.is_large_string(ts.type):
            epochs = []
            for offset, text in enumerate(raws):
                try:
                    epochs.append(None if text is None else parse_timestamp(text))
                except ValueError:
                    raise BacktestError(
                        f"{path}, row {row + offset + 1}, column {timestamp_column!r}: "
                        f"cannot parse timestamp {text!r}"
                    ) from None
        else:
            raise BacktestError(
                f"{path}, column {timestamp_column!r}: unsupported timestamp type {ts.type}"
            )
        columns = [_parquet_values(path, batch.column(name), name, row) for name in value_columns]
        for offset, (raw, epoch) in enumerate(zip(raws, epochs, strict=True)):
            if epoch is None:
                raise BacktestError(
                    f"{path}, row {row + offset + 1}, column {timestamp_column!r}: "
                    f"missing timestamp {raw!r}"
                )
            yield InputRow(
                row + offset + 1, raw, epoch, tuple(column[offset] for column in columns)
            )
        row += batch.num_rows


def _parquet_values(path: Path, column: Any, name: str, first_row: int) -> list[float]:
    import pyarrow as pa

    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return [math.nan if v is None else float(v) for v in column.to_pylist()]
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        out = []
        for offset, text in enumerate(column.to_pylist()):
            try:
                out.append(math.nan if text is None else parse_value(text))
            except ValueError:
                raise BacktestError(
                    f"{path}, row {first_row + offset + 1}, column {name!r}: not a number: {text!r}"
                ) from None
        return out
    raise BacktestError(f"{path}, column {name!r}: unsupported value type {column.type}")


def output_columns(value_columns: Sequence[str]) -> list[str]:
    """The output header: univariate names are plain, multivariate ones carry the column.

    >>> output_columns(["value"])
    ['timestamp', 'value', 'anomalyScore', 'anomalyDecision', 'modelStage', \
'anomalyConfidenceScore', 'expectedValue']
    >>> output_columns(["a", "b"])[-4:]
    ['expectedValue_a', 'expectedValue_b', 'attribution_a', 'attribution_b']
    """
    verdict = [r.ANOMALY_SCORE, r.ANOMALY_DECISION, r.MODEL_STAGE, r.ANOMALY_CONFIDENCE_SCORE]
    if len(value_columns) == 1:
        return ["timestamp", "value", *verdict, r.EXPECTED_VALUE]
    return [
        "timestamp",
        *(f"value_{c}" for c in value_columns),
        *verdict,
        *(f"{r.EXPECTED_VALUE}_{c}" for c in value_columns),
        *(f"attribution_{c}" for c in value_columns),
    ]


def _output_row(row: InputRow, result: Result, multivariate: bool) -> list[Any]:
    cells: list[Any] = [
        row.timestamp_raw,
        *row.values,
        result.anomaly_score,
        result.anomaly_decision,
        str(result.model_stage),
        result.confidence,
        *result.expected_values,
    ]
    if multivariate:
        attribution = result.attribution or (None,) * len(row.values)
        cells.extend(attribution)
    return cells


class _CsvWriter:
    def __init__(self, path: Path, header: list[str]) -> None:
        self._handle = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.writer(self._handle)
        self._writer.writerow(header)

    def write(self, cells: list[Any]) -> None:
        # Missing numbers are written as empty fields: the CSV convention for "no value".
        self._writer.writerow(
            "" if c is None or (isinstance(c, float) and math.isnan(c)) else c for c in cells
        )

    def close(self) -> None:
        self._handle.close()


class _ParquetWriter:
    def __init__(self, path: Path, header: list[str], timestamp_type: Any) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {
            "timestamp": timestamp_type,
            r.ANOMALY_DECISION: pa.int8(),
            r.MODEL_STAGE: pa.string(),
        }
        self._schema = pa.schema([(name, types.get(name, pa.float64())) for name in header])
        self._writer = pq.ParquetWriter(path, self._schema)
        self._rows: list[list[Any]] = []

    def write(self, cells: list[Any]) -> None:
        self._rows.append(cells)
        if len(self._rows) >= _PARQUET_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._rows:
            return
        columns = list(zip(*self._rows, strict=True))
        arrays = [
            pa.array(column, type=f.type, from_pandas=True)
            for column, f in zip(columns, self._schema, strict=True)
        ]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self._schema))
        self._rows.clear()

    def close(self) -> None:
        self._flush()
        self._writer.close()


def _input_timestamp_type(path: Path, timestamp_column: str) -> Any:
    """Parquet in keeps its timestamp column's type; text timestamps stay text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if input_format(path) == "parquet":
        return pq.ParquetFile(path).schema_arrow.field(timestamp_column).type
    return pa.string()


def run_backtest(
    input_path: Path,
    output_path: Path,
    *,
    timestamp_column: str = "timestamp",
    value_columns: Sequence[str] = ("value",),
    config: DetectorConfig | None = None,
    plot_path: Path | None = None,
    progress: bool = True,
) -> BacktestSummary:
    """Score every row of ``input_path`` and write one result row per input row.

    The output is written to a temporary file beside ``output_path`` and renamed on success,
    so bad input never leaves a truncated result file behind.
    """
    if not value_columns:
        raise BacktestError("at least one value column is needed")
    output_format = input_format(output_path)
    rows = read_rows(input_path, timestamp_column, value_columns)
    total = count_rows(input_path)
    detector = RcfDetector(config or DetectorConfig(), dimensions=len(value_columns))
    multivariate = len(value_columns) > 1
    header = output_columns(value_columns)
    plot_data = _PlotData() if plot_path is not None else None
    if plot_data is not None:
        plot_data.values = [array("d") for _ in value_columns]
        plot_data.expected = [array("d") for _ in value_columns]

    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(f".{output_path.name}.partial-{os.getpid()}")
    writer: _CsvWriter | _ParquetWriter
    if output_format == "csv":
        writer = _CsvWriter(partial, header)
    else:
        writer = _ParquetWriter(
            partial, header, _input_timestamp_type(input_path, timestamp_column)
        )
    summary = BacktestSummary(output=output_path, plot=plot_path)
    try:
        with progress_bar(f"backtest {input_path.name}", total, "rows", progress) as advance:
            for row in rows:
                value: float | tuple[float, ...] = row.values if multivariate else row.values[0]
                result = detector.update(row.timestamp, value)
                writer.write(_output_row(row, result, multivariate))
                summary.rows += 1
                summary.missing += result.missing
                summary.anomalies += result.anomaly_decision
                summary.learning += result.model_stage is ModelStage.LEARNING
                if plot_data is not None:
                    _keep_for_plot(plot_data, row, result)
                if summary.rows % _PROGRESS_EVERY == 0:
                    advance(_PROGRESS_EVERY)
            advance(summary.rows % _PROGRESS_EVERY)
        writer.close()
        os.replace(partial, output_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    if plot_path is not None and plot_data is not None:
        from app.backtest_plot import plot_backtest

        plot_backtest(
            plot_path,
            title=f"{input_path.name}: {summary.anomalies} anomalies in {summary.rows} rows",
            timestamps=plot_data.timestamps,
            value_columns=list(value_columns),
            values=plot_data.values,
            expected=plot_data.expected,
            scores=plot_data.scores,
            decisions=plot_data.decisions,
            learning=plot_data.learning,
            threshold=detector.config.threshold,
        )
    return summary


def _keep_for_plot(data: _PlotData, row: InputRow, result: Result) -> None:
    data.timestamps.append(row.timestamp)
    for column, value in zip(data.values, row.values, strict=True):
        column.append(value)
    for column, value in zip(data.expected, result.expected_values, strict=True):
        column.append(value)
    data.scores.append(result.anomaly_score)
    data.decisions.append(result.anomaly_decision)
    data.learning.append(result.model_stage is ModelStage.LEARNING)
