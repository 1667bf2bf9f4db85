"""DuckDB over the Parquet lake: the analysts' and the dashboard's read API.

Stable API
----------
``connect(lake_dir) -> duckdb.DuckDBPyConnection``
    An in-memory DuckDB connection with three views over the lake as it is *now*:

    ``scores``
        One row per result record: every result field in camelCase (``detectorName``,
        ``measure``, ``timeseriesId``, ``dimensionList`` STRUCT(name, value)[],
        ``aggregatedMeasureValue``, ``anomalyScore``, ``anomalyDecisionThreshold`` DOUBLE,
        ``anomalyDecision`` TINYINT, ``anomalyConfidenceScore`` DOUBLE, ``modelStage`` VARCHAR,
        ``expectedValue`` DOUBLE, ``processedDataPoints`` BIGINT, ``detectionPeriodStartTime``,
        ``detectionPeriodEndTime`` TIMESTAMP WITH TIME ZONE), any extra result fields (NULL in
        files written before they existed), one ``dim_<name>`` VARCHAR per dimension,
        ``kafkaPartition`` INTEGER, ``kafkaOffset`` BIGINT and the Hive partition ``dt`` DATE
        (UTC date of ``detectionPeriodStartTime``).
    ``anomalies``
        ``scores`` where ``anomalyDecision = 1``.
    ``series``
        One row per ``timeseriesId``: ``detectorName``, ``measure``, ``dimensionList``, the
        ``dim_*`` columns, ``modelStage`` and ``anomalyConfidenceScore`` of the latest period,
        ``points`` (rows), ``anomalies`` (sum of decisions), ``firstDetectionPeriodStartTime`` and
        ``lastDetectionPeriodStartTime``.

    An empty or missing lake gives the same views, empty, with the base columns.

``refresh(connection, lake_dir)``
    Re-create the views so that files published since ``connect`` become visible.

``query(lake_dir, sql) -> pyarrow.Table``
    Run one SQL statement over a fresh snapshot of the lake.

Consistency: the views read an explicit list of files taken from one consistent listing of the
lake (``sinks.lake_files``), never a partial file (those are named ``.*.tmp``) and never both a
compacted file and the small files it replaced. The compactor deletes replaced files only after a
grace period (default 30 s), so a query that starts within that grace period after ``connect``
reads a complete snapshot; ``query`` takes a new snapshot and retries if a file vanished.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as empty:
...     query(empty, "SELECT count(*) AS n FROM scores").to_pylist()
[{'n': 0}]
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from common.retry import Backoff, retry
from contract.records import (
    ANOMALY_CONFIDENCE_SCORE,
    ANOMALY_DECISION,
    DAY_PARTITION,
    DETECTION_PERIOD_START_TIME,
    DETECTOR_NAME,
    DIMENSION_LIST,
    DIMENSION_PREFIX,
    KAFKA_OFFSET,
    KAFKA_PARTITION,
    MEASURE,
    MODEL_STAGE,
    PROVENANCE_SCHEMA,
    RESULT_SCHEMA,
    TIMESERIES_ID,
)
from sinks.lake_files import list_files, visible_files

DEFAULT_LAKE = "lake"

# The DuckDB types of the base columns as read from the lake's Parquet files; the empty lake's
# views use them so that a dashboard sees the same columns with or without data.


def duckdb_type(kind: pa.DataType) -> str:
    """The DuckDB type of an Arrow column as DuckDB reads it from a Parquet file.

    >>> duckdb_type(RESULT_SCHEMA.field(DIMENSION_LIST).type)
    'STRUCT(name VARCHAR, value VARCHAR)[]'
    """
    if pa.types.is_dictionary(kind):
        return duckdb_type(kind.value_type)
    if pa.types.is_list(kind):
        return duckdb_type(kind.value_type) + "[]"
    if pa.types.is_struct(kind):
        inner = ", ".join(f"{item.name} {duckdb_type(item.type)}" for item in kind)
        return f"STRUCT({inner})"
    if pa.types.is_timestamp(kind):
        return "TIMESTAMP WITH TIME ZONE" if kind.tz else "TIMESTAMP"
    return _DUCKDB_TYPES[kind]


_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.float64(): "DOUBLE",
    pa.int8(): "TINYINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
}
BASE_COLUMNS: tuple[tuple[str, str], ...] = (
    *((item.name, duckdb_type(item.type)) for item in RESULT_SCHEMA),
    *((item.name, duckdb_type(item.type)) for item in PROVENANCE_SCHEMA),
    (DAY_PARTITION, "DATE"),
)
# A file compacted away between the listing and the read is gone for good; listing again
# (a new snapshot) cures it within a moment.
_VANISHED_FILE = Backoff(first_s=0.1, max_s=0.5, give_up_s=3.0)


def visible_paths(lake_dir: str | Path) -> list[Path]:
    """The Parquet files that make up the lake right now (one consistent snapshot)."""
    return [item.path for item in visible_files(list_files(Path(lake_dir)))]


def connect(lake_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views ``scores``, ``anomalies`` and ``series``."""
    connection = duckdb.connect()
    # Results are UTC; without this, timestamps come back in the machine's zone.
    connection.execute("SET TimeZone = 'UTC'")
    try:
        refresh(connection, lake_dir)
    except BaseException:
        connection.close()
        raise
    return connection


def refresh(connection: duckdb.DuckDBPyConnection, lake_dir: str | Path) -> None:
    """(Re-)create the views over a new snapshot of the lake."""
    # Creating the views reads the files' schemas; one may have been compacted away and deleted
    # between the listing and the read: list again.
    retry(lambda: _create_views(connection, visible_paths(lake_dir)),
          f"reading the lake {lake_dir}", transient=_vanished, backoff=_VANISHED_FILE)


def _vanished(error: BaseException) -> bool:
    return isinstance(error, duckdb.IOException)


def _create_views(connection: duckdb.DuckDBPyConnection, paths: list[Path]) -> None:
    if paths:
        listing = ", ".join(_quote(str(p.absolute())) for p in paths)
        scores = (
            f"SELECT * FROM read_parquet([{listing}], hive_partitioning = true, "
            "union_by_name = true, hive_types = {'dt': DATE})"
        )
    else:
        typed_nulls = ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in BASE_COLUMNS)
        scores = f"SELECT {typed_nulls} WHERE false"
    connection.execute(f"CREATE OR REPLACE VIEW scores AS {scores}")
    decision = quote_identifier(ANOMALY_DECISION)
    connection.execute(
        f"CREATE OR REPLACE VIEW anomalies AS SELECT * FROM scores WHERE {decision} = 1"
    )
    columns = [row[0] for row in connection.execute("DESCRIBE scores").fetchall()]
    latest = [
        DETECTOR_NAME,
        MEASURE,
        DIMENSION_LIST,
        *sorted(c for c in columns if c.startswith(DIMENSION_PREFIX)),
        MODEL_STAGE,
        ANOMALY_CONFIDENCE_SCORE,
    ]
    # Dimension names come from the records: any text, quotes and SQL included.
    tsid = quote_identifier(TIMESERIES_ID)
    start = quote_identifier(DETECTION_PERIOD_START_TIME)
    partition, offset = quote_identifier(KAFKA_PARTITION), quote_identifier(KAFKA_OFFSET)
    picks = ", ".join(f"l.{quote_identifier(c)}" for c in latest)
    # The latest row of each series joined to the per-series aggregates: several times faster
    # than arg_max over the nested dimensionList (bench/sink.py). Ties on the latest period
    # (a re-emitted result) are broken by the newest Kafka position.
    connection.execute(
        f"""CREATE OR REPLACE VIEW series AS
WITH per_series AS (
  SELECT {tsid},
    count(*) AS points,
    CAST(coalesce(sum({decision}), 0) AS BIGINT) AS anomalies,
    min({start}) AS firstDetectionPeriodStartTime,
    max({start}) AS lastDetectionPeriodStartTime
  FROM scores
  GROUP BY {tsid}
), latest AS (
  SELECT s.*
  FROM scores AS s
  JOIN per_series AS p
    ON s.{tsid} = p.{tsid}
   AND s.{start} = p.lastDetectionPeriodStartTime
  QUALIFY row_number() OVER (
    PARTITION BY s.{tsid} ORDER BY s.{partition} DESC, s.{offset} DESC) = 1
)
SELECT p.{tsid}, {picks}, p.points, p.anomalies,
  p.firstDetectionPeriodStartTime, p.lastDetectionPeriodStartTime
FROM per_series AS p JOIN latest AS l ON l.{tsid} = p.{tsid}"""
    )


def query(lake_dir: str | Path, sql: str) -> pa.Table:
    """Run ``sql`` against the views over a fresh snapshot of the lake."""

    def attempt() -> pa.Table:
        connection = duckdb.connect()
        try:
            connection.execute("SET TimeZone = 'UTC'")
            refresh(connection, lake_dir)
            relation = connection.sql(sql)
            return relation.to_arrow_table() if relation is not None else pa.table({})
        finally:
            connection.close()

    # A file of the snapshot compacted away and deleted meanwhile: take a new snapshot.
    return retry(attempt, f"querying the lake {lake_dir}", transient=_vanished,
                 backoff=_VANISHED_FILE)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def quote_identifier(name: str) -> str:
    """``name`` as a DuckDB identifier, whatever it contains.

    >>> print(quote_identifier('dim_a" FROM x; --'))
    "dim_a"" FROM x; --"
    """
    return '"' + name.replace('"', '""') + '"'

