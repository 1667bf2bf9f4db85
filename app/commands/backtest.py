"""``anomstream backtest INPUT --out OUT``: replay a recorded series through one detector."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Run a detector over a CSV or Parquet series; write one result row per input row."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="the series: .csv or .parquet")
    parser.add_argument("--out", required=True, type=Path, help="results file: .csv or .parquet")
    parser.add_argument(
        "--timestamp-column", default="timestamp", help="timestamp column (default: timestamp)"
    )
    parser.add_argument(
        "--value-column",
        action="append",
        dest="value_columns",
        metavar="COLUMN",
        help="value column; repeat for a multivariate series (default: value)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="detector parameter override, e.g. num_trees=50 (repeatable)",
    )
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="also save a figure")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from app.backtest import BacktestError, run_backtest
    from app.cli import CliError
    from app.params import parse_params

    config = parse_params(args.param)

    try:
        summary = run_backtest(
            args.input,
            args.out,
            timestamp_column=args.timestamp_column,
            value_columns=args.value_columns or ["value"],
            config=config,
            plot_path=args.plot,
            progress=not args.no_progress,
        )
    except BacktestError as error:
        raise CliError(str(error)) from None
    print(
        f"{summary.rows} rows scored ({summary.missing} missing, {summary.learning} while "
        f"LEARNING), {summary.anomalies} anomalies -> {summary.output}"
    )
    if summary.plot is not None:
        print(f"plot -> {summary.plot}")
    return 0
