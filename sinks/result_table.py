"""Result records (JSON bytes) -> the lake's Arrow table: typed, flattened, with provenance.

Columns, in order: the ``RESULT_FIELDS`` (camelCase, typed as ``RESULT_SCHEMA``), then any extra
fields of the records (scalars in their natural type, nested values as JSON strings), then one
``dim_<name>`` string column per dimension, then ``kafkaPartition`` (int32) and ``kafkaOffset``
(int64).

Parsing uses Arrow's JSON reader (C++, one pass over the whole batch); only when a batch fails to
parse are records parsed one by one, so that bad ones can be named and set aside.

>>> from contract import records as r
>>> rec = {r.DETECTOR_NAME: "cpu", r.MEASURE: "util", r.TIMESERIES_ID: "t",
...        r.DIMENSION_LIST: r.dimension_list({"host": "a"}), r.ANOMALY_SCORE: 12.5,
...        r.ANOMALY_DECISION: 0, r.MODEL_STAGE: "INFERENCE",
...        r.DETECTION_PERIOD_START_TIME: "2026-11-21T10:00:00.000Z", r.RAW_SCORE: 0.8}
>>> batch = parse_results([r.encode(rec)], partition=0, offsets=[7])
>>> batch.rejected
[]
>>> row = batch.table.to_pylist()[0]
>>> row["dim_host"], row[r.RAW_SCORE], row[r.KAFKA_OFFSET], row[r.ANOMALY_DECISION]
('a', 0.8, 7, 0)
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from contract.records import (
    DETECTION_PERIOD_START_TIME,
    DIMENSION_LIST,
    DIMENSION_PREFIX,
    KAFKA_OFFSET,
    KAFKA_PARTITION,
    MODEL_STAGE,
    PROVENANCE_SCHEMA,
    RESULT_FIELDS,
    RESULT_SCHEMA,
)

MS_PER_DAY = 86_400_000

# The JSON reader converts strings to dictionaries poorly; parse the stage as a string first.
_PARSE_SCHEMA = RESULT_SCHEMA.set(
    RESULT_FIELDS.index(MODEL_STAGE), pa.field(MODEL_STAGE, pa.string())
)
_PARSE_OPTIONS = pj.ParseOptions(explicit_schema=_PARSE_SCHEMA, unexpected_field_behavior="infer")


@dataclass
class ParsedBatch:
    """The rows that parsed (in input order) and the input positions that did not, with why."""

    table: pa.Table
    rejected: list[tuple[int, str]] = field(default_factory=list)


def empty_table() -> pa.Table:
    return pa.unify_schemas([RESULT_SCHEMA, PROVENANCE_SCHEMA]).empty_table()


def parse_results(
    payloads: Sequence[bytes | None], partition: int, offsets: Sequence[int]
) -> ParsedBatch:
    """Parse result records; rows keep the order of ``payloads``."""
    if not payloads:
        return ParsedBatch(empty_table())
    try:
        raw = _read_json([p for p in payloads if p is not None]) if None not in payloads else None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raw = None
    if raw is not None and raw.num_rows == len(payloads):
        good = list(range(len(payloads)))
        rejected: list[tuple[int, str]] = []
    else:
        raw, good, rejected = _parse_one_by_one(payloads)
    if raw.num_rows and raw.column(DETECTION_PERIOD_START_TIME).null_count:
        missing_time = (
            pc.is_null(raw.column(DETECTION_PERIOD_START_TIME))
            .combine_chunks()
            .to_numpy(zero_copy_only=False)
        )
        if missing_time.any():
            rejected += [
                (good[i], f"no {DETECTION_PERIOD_START_TIME}") for i in np.flatnonzero(missing_time)
            ]
            raw = raw.filter(pa.array(~missing_time))
            good = [g for g, bad in zip(good, missing_time, strict=True) if not bad]
    rejected.sort()
    if len(good) == len(offsets):
        kept_offsets = pa.array(offsets, pa.int64())
    else:
        kept_offsets = pa.array([offsets[i] for i in good], pa.int64())
    return ParsedBatch(_finish(raw, partition, kept_offsets), rejected)


def _read_json(payloads: Sequence[bytes]) -> pa.Table:
    data = b"\n".join(payloads)
    if data.count(b"\n") != len(payloads) - 1 or b"\r" in data:
        # A raw newline can only be whitespace between JSON tokens (inside strings it is
        # escaped), so flattening each record to one line keeps its meaning.
        data = b"\n".join(p.replace(b"\n", b" ").replace(b"\r", b" ") for p in payloads)
    block = max(1 << 20, 2 * max(map(len, payloads)) + 2)
    return pj.read_json(
        io.BytesIO(data),
        read_options=pj.ReadOptions(block_size=block),
        parse_options=_PARSE_OPTIONS,
    )


def _parse_one_by_one(
    payloads: Sequence[bytes | None],
) -> tuple[pa.Table, list[int], list[tuple[int, str]]]:
    tables: list[pa.Table] = []
    good: list[int] = []
    rejected: list[tuple[int, str]] = []
    for index, payload in enumerate(payloads):
        if payload is None:
            rejected.append((index, "empty record (tombstone)"))
            continue
        try:
            json.loads(payload)
            table = _read_json([payload])
        except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            rejected.append((index, f"not a result record: {str(error).splitlines()[0][:200]}"))
            continue
        if table.num_rows != 1:
            rejected.append((index, "not a JSON object"))
            continue
        tables.append(table)
        good.append(index)
    if not tables:
        return _PARSE_SCHEMA.empty_table(), good, rejected
    try:
        return pa.concat_tables(tables, promote_options="permissive"), good, rejected
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Records disagree on the type of an extra field: keep every extra field as JSON text.
        as_text = [_extras_as_json(t, every=True) for t in tables]
        return pa.concat_tables(as_text, promote_options="permissive"), good, rejected


def _is_nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind)


def _extras_as_json(table: pa.Table, every: bool = False) -> pa.Table:
    for name in table.column_names:
        if (
            name in RESULT_FIELDS
            or name in PROVENANCE_SCHEMA.names
            or name.startswith(DIMENSION_PREFIX)
        ):
            continue
        column = table.column(name)
        if every or _is_nested(column.type):
            text = [
                v if v is None or isinstance(v, str) else json.dumps(v, default=str)
                for v in column.to_pylist()
            ]
            table = table.set_column(
                table.column_names.index(name), name, pa.array(text, pa.string())
            )
    return table


def _finish(raw: pa.Table, partition: int, offsets: pa.Array) -> pa.Table:
    n = raw.num_rows
    columns: list[pa.ChunkedArray | pa.Array] = []
    names: list[str] = []
    for item in RESULT_SCHEMA:
        if item.name in raw.column_names:
            column = raw.column(item.name)
            columns.append(column if column.type == item.type else column.cast(item.type))
        else:
            columns.append(pa.nulls(n, item.type))
        names.append(item.name)
    raw = _extras_as_json(raw)
    for name in sorted(set(raw.column_names) - set(RESULT_FIELDS)):
        column = raw.column(name)
        if column.null_count == n:
            continue  # no value in this batch: readers get NULL from union_by_name anyway
        columns.append(column)
        names.append(name)
    for name, values in _dimension_columns(
        raw.column(DIMENSION_LIST) if DIMENSION_LIST in raw.column_names else None, n
    ):
        columns.append(values)
        names.append(DIMENSION_PREFIX + name)
    columns.append(pa.array(np.full(n, partition, np.int32)))
    names.append(KAFKA_PARTITION)
    columns.append(offsets)
    names.append(KAFKA_OFFSET)
    return pa.table(columns, names=names)


def _dimension_columns(
    dimension_lists: pa.ChunkedArray | None, n: int
) -> list[tuple[str, pa.Array]]:
    """One string column per dimension name, aligned with the rows (null where absent)."""
    if dimension_lists is None or n == 0:
        return []
    lists = dimension_lists.combine_chunks()
    flat = pc.list_flatten(lists)
    if len(flat) == 0:
        return []
    rows = pc.list_parent_indices(lists).to_numpy()
    dim_names = pc.struct_field(flat, [0])
    dim_values = pc.struct_field(flat, [1])
    out = []
    for name in sorted(v for v in pc.unique(dim_names).to_pylist() if v is not None):
        selected = pc.equal(dim_names, name).to_numpy(zero_copy_only=False)
        positions = np.full(n, -1, np.int64)
        positions[rows[selected]] = np.arange(int(selected.sum()))
        take = pa.array(positions, mask=positions < 0)
        out.append((name, pc.take(dim_values.filter(pa.array(selected)), take)))
    return out


def epoch_millis(table: pa.Table) -> np.ndarray:
    column = table.column(DETECTION_PERIOD_START_TIME).cast(pa.int64()).combine_chunks()
    return column.to_numpy(zero_copy_only=False)


def day_name(day_number: int) -> str:
    """``YYYY-MM-DD`` of a day number.

    >>> day_name(20778)
    '2026-11-21'
    """
    return str(np.datetime64(int(day_number), "D"))


def concat(tables: Sequence[pa.Table]) -> pa.Table:
    """Rows of ``tables`` in order, columns united by name in the lake's column order.

    Columns missing from a table read as nulls; an extra field whose type differs between tables
    (a producer changed it) is kept as text rather than refusing the rows.
    """
    try:
        merged = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        merged = pa.concat_tables(
            [_extras_as_json(t, every=True) for t in tables], promote_options="permissive"
        )
    return canonical_order(merged)


def canonical_order(table: pa.Table) -> pa.Table:
    """Base fields, extra fields (sorted), ``dim_*`` (sorted), then the provenance columns."""
    names = table.column_names
    provenance = [n for n in PROVENANCE_SCHEMA.names if n in names]
    dims = sorted(n for n in names if n.startswith(DIMENSION_PREFIX))
    extras = sorted(
        n for n in names if n not in RESULT_FIELDS and n not in provenance and n not in dims
    )
    base = [n for n in RESULT_FIELDS if n in names]
    return table.select(base + extras + dims + provenance)
