"""The dashboard's questions to the lake, as plain functions: DuckDB connection in, DataFrame out.

Every function reads the views of ``sinks.lake.connect`` (``scores``, ``anomalies``, ``series``)
and nothing else, takes its filters as a ``Filters`` value and binds every user-supplied value as
a query parameter; dimension column names are checked against the view's own columns before
they are quoted into SQL. No Streamlit here, so each query is unit-tested and benchmarked alone.

>>> import tempfile
>>> from dashboard.fixtures import build_lake
>>> from sinks.lake import connect
>>> with tempfile.TemporaryDirectory() as lake:
...     _ = build_lake(lake, series=4, intervals=60, seed=3)
...     con = connect(lake)
...     numbers = kpis(con, Filters())
...     (numbers.series, numbers.incidents, numbers.anomalies)
(4, 2, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import pandas as pd

from contract import records as r
from contract.records import DIMENSION_PREFIX
from sinks.lake import quote_identifier

# A column name as an SQL identifier: dimension names come from the records, so anything. One
# helper quotes every identifier the lake's views and the dashboard build.
quote_name = quote_identifier

# The record's fields as SQL identifiers: contract.records spells them, the queries quote them.
_DETECTOR, _MEASURE, _TSID = map(quote_name, (r.DETECTOR_NAME, r.MEASURE, r.TIMESERIES_ID))
_VALUE, _EXPECTED = quote_name(r.AGGREGATED_MEASURE_VALUE), quote_name(r.EXPECTED_VALUE)
_SCORE, _THRESHOLD = quote_name(r.ANOMALY_SCORE), quote_name(r.ANOMALY_DECISION_THRESHOLD)
_DECISION, _CONFIDENCE = quote_name(r.ANOMALY_DECISION), quote_name(r.ANOMALY_CONFIDENCE_SCORE)
_STAGE, _NO_DATA = quote_name(r.MODEL_STAGE), quote_name(r.NO_DATA)
_START = quote_name(r.DETECTION_PERIOD_START_TIME)
_END = quote_name(r.DETECTION_PERIOD_END_TIME)


def quote_text(text: str) -> str:
    """A string as an SQL literal (values are bound as parameters; this is for names only)."""
    return "'" + text.replace("'", "''") + "'"


def label_sql(dimension_columns: list[str]) -> str:
    """SQL for "detector · measure · name=value, name=value", the name of a series on the page.

    Built from the ``dim_*`` columns (NULL where a series lacks that dimension, and skipped by
    ``concat_ws``) rather than from ``dimensionList``: reading the nested list costs more than
    the rest of a catalog query.
    """
    pairs = ", ".join(
        f"CASE WHEN {quote_name(c)} IS NOT NULL "
        f"THEN {quote_text(c.removeprefix(DIMENSION_PREFIX) + '=')} || {quote_name(c)} END"
        for c in dimension_columns
    )
    # A series without dimensions (all NULL here) ends at its measure, without a dangling " · ".
    dims = f" || coalesce(' · ' || nullif(concat_ws(', ', {pairs}), ''), '')" if pairs else ""
    return f"{_DETECTOR} || ' · ' || {_MEASURE}{dims}"


@dataclass(frozen=True)
class Filters:
    """What the desk is looking at. Empty tuples mean "all"; ``start``/``end`` are a half-open
    range on ``detectionPeriodStartTime`` (None: unbounded); ``min_score`` applies to the
    anomalies table only."""

    detectors: tuple[str, ...] = ()
    dimensions: tuple[tuple[str, tuple[str, ...]], ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    min_score: float = 0.0

    def series_sql(self, known_columns: set[str]) -> tuple[str, list[object]]:
        """The detector and dimension predicates (no time), for the series view or scores."""
        clauses: list[str] = []
        params: list[object] = []
        if self.detectors:
            clauses.append(f"{_DETECTOR} IN ({_marks(self.detectors)})")
            params += self.detectors
        for column, values in self.dimensions:
            if not values:
                continue
            if not column.startswith(DIMENSION_PREFIX) or column not in known_columns:
                raise ValueError(f"unknown dimension column {column!r}")
            clauses.append(f"{quote_name(column)} IN ({_marks(values)})")
            params += values
        return " AND ".join(clauses) or "true", params

    def time_sql(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        params: list[object] = []
        if self.start is not None:
            clauses.append(f"{_START} >= ?")
            params.append(self.start)
        if self.end is not None:
            clauses.append(f"{_START} < ?")
            params.append(self.end)
        return " AND ".join(clauses) or "true", params


@dataclass(frozen=True)
class Kpis:
    """What a desk acts on, over the series matching the filters, within the time range."""

    series: int  # series with results in the range
    incidents: int  # runs of flagged intervals in the range
    alerting: int  # series whose latest interval in the range is flagged: an open incident
    silent: int  # series whose latest interval in the range says noData
    anomalies: int  # flagged intervals in the range


@dataclass(frozen=True)
class LakeExtent:
    """How much the lake holds: no rows means an empty (or missing) lake."""

    rows: int
    first: datetime | None
    last: datetime | None
    dimension_columns: list[str] = field(default_factory=list)


def extent(con: duckdb.DuckDBPyConnection) -> LakeExtent:
    # Epoch milliseconds, not TIMESTAMPTZ: DuckDB hands aware datetimes to Python through pytz.
    rows, first, last = _one(
        con,
        f"SELECT count(*), epoch_ms(min({_START})), epoch_ms(max({_START})) FROM scores",
    )
    first_start, last_start = _from_epoch_ms(first), _from_epoch_ms(last)
    return LakeExtent(int(rows), first_start, last_start, dimension_columns(con))


def dimension_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The ``dim_<name>`` columns of the lake, sorted."""
    names = [row[0] for row in con.sql("DESCRIBE scores").fetchall()]
    return sorted(n for n in names if n.startswith(DIMENSION_PREFIX))


def series_catalog(con: duckdb.DuckDBPyConnection, filters: Filters) -> pd.DataFrame:
    """One row per series matching the detector and dimension filters: ``timeseriesId``,
    ``label``, ``detectorName``, ``measure``, the ``dim_*`` columns, ``modelStage`` and
    ``anomalyConfidenceScore`` (latest), ``points``, ``anomalies``; sorted by label.
    The source of the filter options and of the series picker.

    Aggregates ``scores`` itself instead of reading the ``series`` view: detector, measure and
    dimensions are fixed per ``timeseriesId`` (it hashes them), so ``any_value`` does, where the
    view's ``arg_max`` of ``dimensionList`` costs several times the whole query.
    """
    dims = dimension_columns(con)
    where, params = filters.series_sql(set(dims))
    dim_select = "".join(f", any_value({quote_name(d)}) AS {quote_name(d)}" for d in dims)
    return _frame(
        con,
        f"""SELECT {_TSID}, {label_sql(dims)} AS label, * EXCLUDE ({_TSID})
        FROM (
            SELECT {_TSID}, any_value({_DETECTOR}) AS {_DETECTOR},
                   any_value({_MEASURE}) AS {_MEASURE}{dim_select},
                   CAST(arg_max({_STAGE}, {_START}) AS VARCHAR) AS {_STAGE},
                   arg_max({_CONFIDENCE}, {_START})
                       AS {_CONFIDENCE},
                   count(*) AS points, CAST(sum({_DECISION}) AS BIGINT) AS anomalies
            FROM scores WHERE {where} GROUP BY {_TSID}
        ) ORDER BY label""",
        params,
    )


def matching(catalog: pd.DataFrame, filters: Filters) -> pd.DataFrame:
    """The rows of a ``series_catalog`` that the detector and dimension filters keep: the same
    answer as ``series_catalog(con, filters)`` without another pass over the lake."""
    keep = pd.Series(True, index=catalog.index)
    if filters.detectors:
        keep &= catalog[r.DETECTOR_NAME].isin(filters.detectors)
    for column, values in filters.dimensions:
        if values:
            keep &= catalog[column].isin(values)
    return catalog[keep]


def kpis(con: duckdb.DuckDBPyConnection, filters: Filters) -> Kpis:
    """The KPI row: every number follows the filters and the time range (see ``Kpis``).

    An incident is a run of consecutive flagged intervals of one series (it starts at the upward
    crossing); one already under way when the range starts counts as one in the range.
    """
    where, params = filters.series_sql(set(dimension_columns(con)))
    when, when_params = filters.time_sql()
    series, alerting, silent, anomalies = _one(
        con,
        f"""SELECT count(*), coalesce(sum(alerting), 0), coalesce(sum(silent), 0),
                   coalesce(sum(anomalies), 0)
        FROM (
            SELECT arg_max({_DECISION}, {_START}) AS alerting,
                   arg_max({_no_data_sql(con)}, {_START}) AS silent,
                   sum({_DECISION}) AS anomalies
            FROM scores WHERE {where} AND {when} GROUP BY {_TSID}
        )""",
        params + when_params,
    )
    # Incident starts: flagged intervals that no flagged interval of the series ends at. Only
    # flagged rows are read, once; a window over every row (lag) cost ten times the KPI row and
    # a correlated NOT EXISTS four times.
    (incidents,) = _one(
        con,
        f"""WITH flagged AS MATERIALIZED (
            SELECT {_TSID}, {_START} AS start_time,
                   {_END} AS end_time
            FROM anomalies WHERE {where} AND {when}
        )
        SELECT count(*) FROM flagged ANTI JOIN flagged AS before
            ON before.{_TSID} = flagged.{_TSID}
            AND before.end_time = flagged.start_time""",
        params + when_params,
    )
    return Kpis(
        series=int(series),
        incidents=int(incidents),
        alerting=int(alerting),
        silent=int(silent),
        anomalies=int(anomalies),
    )


def _no_data_sql(con: duckdb.DuckDBPyConnection) -> str:
    """``noData`` as 0/1; 0 for a lake written before results carried it."""
    names = {row[0] for row in con.sql("DESCRIBE scores").fetchall()}
    return f"coalesce(CAST({_NO_DATA} AS INTEGER), 0)" if r.NO_DATA in names else "0"


ANOMALY_COLUMNS = (
    r.DETECTION_PERIOD_START_TIME,
    "label",
    r.AGGREGATED_MEASURE_VALUE,
    r.EXPECTED_VALUE,
    r.ANOMALY_SCORE,
    r.ANOMALY_CONFIDENCE_SCORE,
    r.DETECTOR_NAME,
    r.MEASURE,
    r.TIMESERIES_ID,
)


@dataclass(frozen=True)
class AnomalyPage:
    """The newest flagged intervals (``rows``, columns ``ANOMALY_COLUMNS``) and how many match
    in all (``total``): the table shows at most its limit."""

    rows: pd.DataFrame
    total: int


def anomalies(con: duckdb.DuckDBPyConnection, filters: Filters, limit: int) -> AnomalyPage:
    """Flagged intervals matching every filter (including ``min_score``), newest first, at most
    ``limit`` of them, with the count of all that match (one scan, not two)."""
    dims = dimension_columns(con)
    where, params = filters.series_sql(set(dims))
    when, when_params = filters.time_sql()
    frame = _frame(
        con,
        f"""SELECT {_START}, {label_sql(dims)} AS label, {_VALUE},
               {_EXPECTED}, {_SCORE}, {_CONFIDENCE}, {_DETECTOR}, {_MEASURE},
               {_TSID}, count(*) OVER () AS total
        FROM anomalies WHERE {where} AND {when} AND {_SCORE} >= ?
        ORDER BY {_START} DESC, {_SCORE} DESC, {_TSID}
        LIMIT {int(limit)}""",
        [*params, *when_params, filters.min_score],
    )
    total = int(frame["total"].iloc[0]) if len(frame) else 0
    return AnomalyPage(frame.drop(columns="total"), total)


def heatmap(con: duckdb.DuckDBPyConnection, filters: Filters, top: int) -> pd.DataFrame:
    """Maximum score per series per hour (UTC) within the time range, for the ``top`` series
    with the highest maximum (ties: more anomalies first): ``timeseriesId``, ``label``,
    ``hour``, ``maxScore``, ``anomalies``, ``rank`` (1 = hottest)."""
    dims = dimension_columns(con)
    where, params = filters.series_sql(set(dims))
    when, when_params = filters.time_sql()
    # Two passes: rank the series on a cheap per-series aggregate, then bucket only the top
    # ones' rows by hour (time_bucket works on the UTC epoch: cheaper than ICU's date_trunc).
    return _frame(
        con,
        f"""WITH top AS (
            SELECT {_TSID},
                   row_number() OVER (ORDER BY max({_SCORE}) DESC,
                                      sum({_DECISION}) DESC, {_TSID}) AS rank
            FROM scores WHERE {where} AND {when}
            GROUP BY {_TSID}
            QUALIFY rank <= {int(top)}
        )
        SELECT {_TSID}, any_value({label_sql(dims)}) AS label,
               time_bucket(INTERVAL 1 HOUR, {_START}) AS hour,
               max({_SCORE}) AS maxScore, CAST(sum({_DECISION}) AS BIGINT) AS anomalies,
               any_value(rank) AS rank
        FROM scores JOIN top USING ({_TSID})
        WHERE {where} AND {when}
        GROUP BY {_TSID}, hour
        ORDER BY rank, hour""",
        params + when_params + params + when_params,
    )


def series_points(
    con: duckdb.DuckDBPyConnection, timeseries_id: str, filters: Filters
) -> pd.DataFrame:
    """Every interval of one series within the time range, oldest first: ``time``, ``end``,
    ``value`` (null for an interval without data), ``expected``, ``score``, ``threshold``,
    ``anomaly`` (0/1), ``no_data`` (0/1), ``confidence``, ``stage``."""
    when, when_params = filters.time_sql()
    return _frame(
        con,
        f"""SELECT {_START} AS time, {_END} AS "end",
               {_VALUE} AS value,
               {_EXPECTED} AS expected, {_SCORE} AS score,
               {_THRESHOLD} AS threshold, {_DECISION} AS anomaly,
               {_no_data_sql(con)} AS no_data,
               {_CONFIDENCE} AS confidence, CAST({_STAGE} AS VARCHAR) AS stage
        FROM scores WHERE {_TSID} = ? AND {when}
        ORDER BY time""",
        [timeseries_id, *when_params],
    )


def series_label(con: duckdb.DuckDBPyConnection, timeseries_id: str) -> str | None:
    """The label of one series, or None if the lake does not hold it."""
    rows = con.sql(
        f"SELECT {label_sql(dimension_columns(con))} FROM scores WHERE {_TSID} = ? LIMIT 1",
        params=[timeseries_id],
    ).fetchall()
    return str(rows[0][0]) if rows else None


def _from_epoch_ms(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value / 1000, tz=UTC)


def _marks(values: tuple[str, ...]) -> str:
    return ", ".join("?" for _ in values)


def _frame(con: duckdb.DuckDBPyConnection, sql: str, params: list[object]) -> pd.DataFrame:
    # Through Arrow: timestamps arrive as aware UTC pandas columns, with no pytz involved.
    return con.sql(sql, params=params).to_arrow_table().to_pandas()


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None) -> tuple:
    (row,) = con.sql(sql, params=params or []).fetchall()  # an aggregate: exactly one row
    return tuple(row)
