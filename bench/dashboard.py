"""Dashboard benchmark: the time of each interaction's queries over a day of 1,000 series.

Run from the repository root::

    .venv/bin/python bench/dashboard.py                 # 1,000 series × 1,440 minutes = 1.44 M rows
    .venv/bin/python bench/dashboard.py --quick         # 100 series × 360 minutes, seconds

It builds a fixture lake with ``dashboard.fixtures.build_lake`` (the sink's own file writer),
opens it the way the page does (``dashboard.app.LakeReader``: the views of ``sinks.lake.connect``
and one cursor per page run with the page's settings, but not the page's result cache, so every
number is a cache miss, as after the sink publishes a file) and times the queries behind each
thing a desk does on the page, with the page's default filters (last 24
hours) unless the interaction says otherwise. Each interaction runs once cold (first touch of the
files since the build) and then ``--repeats`` times; the median and the worst repeat are reported
against the 1 s budget. Results print as a rich table and are saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import duckdb
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's directory comes first on sys.path, and this file's name would
# shadow the ``dashboard`` package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

from streamlit.logger import set_log_level  # noqa: E402

# The page's module declares its caches at import; outside a server Streamlit warns about it.
set_log_level("error")

from dashboard import queries  # noqa: E402
from dashboard.app import DEFAULT_TOP, EXPORT_ROWS, TABLE_ROWS, LakeReader  # noqa: E402
from dashboard.fixtures import build_lake  # noqa: E402
from dashboard.queries import Filters  # noqa: E402

BUDGET_SECONDS = 1.0


@dataclass(frozen=True)
class Interaction:
    name: str
    what: str
    run: Callable[[duckdb.DuckDBPyConnection], Any]


def interactions(con: duckdb.DuckDBPyConnection) -> list[Interaction]:
    lake = queries.extent(con)
    assert lake.last is not None
    end = lake.last + timedelta(microseconds=1)
    day = Filters(start=end - timedelta(hours=24), end=end)
    catalog = queries.series_catalog(con, Filters())
    hottest = catalog.sort_values(["anomalies", "timeseriesId"], ascending=[False, True])
    series_id = str(hottest["timeseriesId"].iloc[0])
    narrowed = replace(
        day,
        detectors=("fx-spread",),
        dimensions=(("dim_venue", ("EBS",)),),
        start=end - timedelta(hours=6),
        min_score=90.0,
    )

    def kpis(c: duckdb.DuckDBPyConnection) -> Any:
        return queries.extent(c), queries.kpis(c, day)

    def table(c: duckdb.DuckDBPyConnection, f: Filters = day) -> Any:
        return queries.anomalies(c, f, TABLE_ROWS)

    def chart(c: duckdb.DuckDBPyConnection) -> Any:
        return queries.series_points(c, series_id, day)

    def link(c: duckdb.DuckDBPyConnection) -> Any:
        return queries.series_label(c, series_id), queries.series_points(c, series_id, day)

    def heat(c: duckdb.DuckDBPyConnection) -> Any:
        return queries.heatmap(c, day, DEFAULT_TOP)

    def picker(c: duckdb.DuckDBPyConnection) -> Any:
        # The page lists every series once and narrows the list in memory (queries.matching).
        return queries.series_catalog(c, Filters())

    def tick(c: duckdb.DuckDBPyConnection) -> Any:
        return kpis(c), chart(c), table(c), heat(c)

    def page(c: duckdb.DuckDBPyConnection) -> Any:
        return picker(c), tick(c)

    def export(c: duckdb.DuckDBPyConnection) -> Any:
        return queries.anomalies(c, day, EXPORT_ROWS).rows.to_csv(index=False)

    return [
        Interaction("KPIs", "lake extent + KPI row, last 24 h", kpis),
        Interaction("anomalies table", "newest 500 of the last 24 h + total count", table),
        Interaction(
            "anomalies table, filtered",
            "detector + dimension + last 6 h + min score 90",
            lambda c: table(c, narrowed),
        ),
        Interaction("heat map", f"max score per hour, top {DEFAULT_TOP} series, 24 h", heat),
        Interaction("series chart", "one series' 1,440 points", chart),
        Interaction("series link (?series=)", "label lookup + the series' points", link),
        Interaction("series picker list", "catalog of every series (filter options)", picker),
        Interaction("live refresh tick", "KPIs + chart + table + heat map", tick),
        Interaction("page open / filter change", "picker list + a whole tick", page),
        Interaction("CSV export", f"up to {EXPORT_ROWS:,} anomalies as CSV", export),
    ]


def measure(reader: LakeReader, interaction: Interaction, repeats: int) -> dict[str, Any]:
    times = []
    for _ in range(repeats + 1):
        cursor = reader.snapshot().con  # the page's own cursor set-up, without its result cache
        started = time.perf_counter()
        interaction.run(cursor)
        times.append(time.perf_counter() - started)
        cursor.close()
    cold, warm = times[0], times[1:]
    return {
        "interaction": interaction.name,
        "what": interaction.what,
        "cold_s": round(cold, 4),
        "median_s": round(statistics.median(warm), 4),
        "max_s": round(max(warm), 4),
        "under_budget": max(warm) < BUDGET_SECONDS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--intervals", type=int, default=1440, help="1-minute intervals")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 series × 360 intervals")
    parser.add_argument("--lake", type=Path, help="build the lake here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "dashboard.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.series, args.intervals, args.repeats = 100, 360, 3
    console = Console(width=140)
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as scratch:
        lake_dir = args.lake or Path(scratch) / "lake"
        rows = args.series * args.intervals
        with console.status(f"building a lake of {rows:,} rows in {lake_dir}"):
            started = time.perf_counter()
            summary = build_lake(
                lake_dir, series=args.series, intervals=args.intervals,
                start=datetime(2026, 11, 20, tzinfo=UTC), seed=1,
            )  # fmt: skip
            build_s = time.perf_counter() - started
        started = time.perf_counter()
        reader = LakeReader(lake_dir, relist_seconds=3600)
        connect_s = time.perf_counter() - started
        console.print(
            f"lake: {summary.rows:,} rows, {summary.series:,} series, {summary.anomalies:,} "
            f"anomalies, {summary.files} files; built in {build_s:.1f} s, views in "
            f"{connect_s * 1000:.0f} ms"
        )
        results = []
        for interaction in interactions(reader.snapshot().con):
            with console.status(f"timing {interaction.name}"):
                results.append(measure(reader, interaction, args.repeats))

    table = Table(title=f"dashboard interactions over {rows:,} rows (budget {BUDGET_SECONDS} s)")
    for column in ("interaction", "what", "cold s", "median s", "max s", "< 1 s"):
        table.add_column(column, justify="left" if column in ("interaction", "what") else "right")
    for r in results:
        table.add_row(
            r["interaction"], r["what"], f"{r['cold_s']:.3f}", f"{r['median_s']:.3f}",
            f"{r['max_s']:.3f}", "yes" if r["under_budget"] else "NO",
        )  # fmt: skip
    console.print(table)
    report = {
        "benchmark": "dashboard",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "duckdb": version("duckdb"),
            "streamlit": version("streamlit"),
            "note": "shared machine: other work runs at the same time",
        },
        "lake": {
            "series": summary.series,
            "intervals": args.intervals,
            "rows": summary.rows,
            "anomalies": summary.anomalies,
            "files": summary.files,
            "build_s": round(build_s, 2),
            "connect_s": round(connect_s, 4),
        },
        "repeats": args.repeats,
        "budget_s": BUDGET_SECONDS,
        "interactions": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"saved {args.out}")
    return 0 if all(r["under_budget"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
