"""``anomstream query "SQL"``: DuckDB over the Parquet lake (views scores, anomalies, series)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from app.cli import CliError

HELP = "Run SQL over the Parquet lake: views scores, anomalies (decision = 1) and series."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sql", help='e.g. "SELECT * FROM anomalies ORDER BY anomalyScore DESC LIMIT 20"'
    )
    parser.add_argument(
        "--lake", default="lake", metavar="DIR", help="lake directory (default: lake)"
    )
    parser.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import duckdb

    from sinks import lake

    if not Path(args.lake).is_dir():
        print(
            f"anomstream query: note: {args.lake} does not exist; the views are empty",
            file=sys.stderr,
        )
    try:
        table = lake.query(args.lake, args.sql)
    except duckdb.Error as error:
        raise CliError(f"{type(error).__name__}: {error}") from None
    rows = table.to_pylist()
    names = table.column_names
    if args.format == "json":
        import json

        print(json.dumps(rows, default=_text, ensure_ascii=False, indent=1))
    elif args.format == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(names)
        for row in rows:
            writer.writerow(["" if row[n] is None else _text(row[n]) for n in names])
    else:
        from rich.console import Console
        from rich.table import Table

        shown = Table(show_lines=False, caption=f"{len(rows)} rows")
        for name in names:
            shown.add_column(name, overflow="fold")
        for row in rows:
            shown.add_row(*("" if row[n] is None else _text(row[n]) for n in names))
        Console().print(shown)
    return 0


def _text(value: Any) -> str:
    """Timestamps as ISO-8601 UTC (``...Z``), nested values as JSON, the rest as str()."""
    import datetime
    import json

    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value.isoformat(timespec="milliseconds") + "Z"
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=_text, ensure_ascii=False)
    return str(value)
