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
        anomaly_rate=ANOMALY_RATE, intervals_per_file=45, silent_series=1,
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
    alerting: int
    silent: int
    incidents: int
    flagged: int

    def kpis(self) -> dict[str, str]:
        return {
            "Series in range": f"{self.series:,}",
            "Alerting now": f"{self.alerting:,}",
            "Silent now": f"{self.silent:,}",
            "Incidents in range": f"{self.incidents:,}",
            "Flagged intervals": f"{self.flagged:,}",
        }


def lake_totals(lake: Path) -> LakeTotals:
    series, alerting, silent, flagged = direct_one(
        lake,
        "SELECT count(*), sum(a), sum(s), sum(f) FROM (SELECT timeseriesId,"
        " arg_max(anomalyDecision, detectionPeriodStartTime) a,"
        " arg_max(noData, detectionPeriodStartTime) s, sum(anomalyDecision) f"
        " FROM files GROUP BY ALL)",
    )
    return LakeTotals(int(series), int(alerting), int(silent), runs(lake, "anomalyDecision"),
                      int(flagged))


def runs(lake: Path, flag: str, timeseries_id: str | None = None) -> int:
    """Runs of consecutive intervals of one series (or of all) where ``flag`` is 1: incidents
    for ``anomalyDecision``, silences for ``noData``. Counted in Python over the rows."""
    rows = direct(
        lake,
        f"SELECT timeseriesId, {flag} FROM files WHERE ? IS NULL OR timeseriesId = ?"
        " ORDER BY timeseriesId, detectionPeriodStartTime",
        [timeseries_id, timeseries_id],
    )
    # A run starts where a series' flag goes from 0 (or its first interval) to 1.
    return sum(
        1 for i, (tsid, on) in enumerate(rows)
        if on == 1 and (i == 0 or rows[i - 1][0] != tsid or rows[i - 1][1] == 0)
    )
