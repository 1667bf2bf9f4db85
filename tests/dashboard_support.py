"""Shared by the dashboard tests: a small fixture lake and independent DuckDB answers over it.

The "independent" answers read the Parquet files directly (``read_parquet``), not through
``sinks.lake`` or ``dashboard.queries``, so a wrong view or a wrong query cannot agree with itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from dashboard.fixtures import LakeSummary, build_lake

# 12 series × 180 one-minute intervals from 22:30: the lake spans two dt= directories.
SERIES = 12
INTERVALS = 180
START = datetime(2026, 11, 20, 22, 30, tzinfo=UTC)
SEED = 11
ANOMALY_RATE = 0.015


def small_lake(directory: Path) -> LakeSummary:
    return build_lake(
        directory, series=SERIES, intervals=INTERVALS, start=START, seed=SEED,
        anomaly_rate=ANOMALY_RATE, intervals_per_file=45,
    )  # fmt: skip


def direct(lake: Path, sql: str, params: list[object] | None = None) -> list[tuple]:
    """Run ``sql`` where ``files`` is every Parquet file of the lake, read directly."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    pattern = str(lake / "dt=*" / "*.parquet").replace("'", "''")
    con.execute(
        f"CREATE VIEW files AS SELECT * FROM read_parquet('{pattern}', union_by_name = true)"
    )
    # Through Arrow: DuckDB's own conversion of aware timestamps needs pytz.
    table = con.sql(sql, params=params or []).to_arrow_table()
    return list(zip(*(column.to_pylist() for column in table.columns), strict=True))


def direct_one(lake: Path, sql: str, params: list[object] | None = None) -> tuple:
    (row,) = direct(lake, sql, params)
    return row


@dataclass(frozen=True)
class LakeTotals:
    """What the KPI row must show for the whole lake, computed straight from the files."""

    series: int
    points: int
    flagged: int
    confidence: float

    def kpis(self) -> dict[str, str]:
        return {
            "Series tracked": f"{self.series:,}",
            "Data points processed": f"{self.points:,}",
            "Anomalies in range": f"{self.flagged:,}",
            "Mean confidence": f"{self.confidence:.1f}",
        }


def lake_totals(lake: Path) -> LakeTotals:
    series, points, flagged = direct_one(
        lake,
        "SELECT count(DISTINCT timeseriesId), sum(p), sum(a) FROM (SELECT timeseriesId, "
        "max(processedDataPoints) p, sum(anomalyDecision) a FROM files GROUP BY ALL)",
    )
    (confidence,) = direct_one(
        lake,
        "SELECT avg(c) FROM (SELECT arg_max(anomalyConfidenceScore, detectionPeriodStartTime) c"
        " FROM files GROUP BY timeseriesId)",
    )
    return LakeTotals(series, points, flagged, confidence)
