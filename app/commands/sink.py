"""``anomstream sink parquet`` (result topic -> Parquet lake) and ``anomstream sink compact``."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from app.cli import CliError
from common.durations import parse_duration_ms
from common.kafka_security import add_security_arguments

HELP = "Write the result topic into a date-partitioned Parquet lake, exactly once; compact it."

def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sink = actions.add_parser(
        "parquet",
        help="consume the result topic (read_committed) into DIR/dt=YYYY-MM-DD/*.parquet",
        description="Files are named <topic>+<partition>+<firstOffset>.parquet, written "
        "atomically, and offsets are committed only after the file is durable; a restart "
        "resumes after the last offset in the lake (docs/decisions/0003).",
    )
    sink.add_argument("--out", required=True, metavar="DIR", help="lake directory")
    sink.add_argument("--topic", default="results", help="result topic (default: results)")
    sink.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    sink.add_argument(
        "--group", default=None, help="consumer group (default: anomstream-parquet-sink)"
    )
    sink.add_argument(
        "--instance-id",
        default=None,
        help="static group member id (default: <group>-<hostname>); one per running sink",
    )
    sink.add_argument(
        "--max-records", type=int, default=100_000, metavar="N", help="rows per file at most"
    )
    sink.add_argument(
        "--max-span",
        default="1h",
        help="detection-time span of one file at most, e.g. 15m, 1h (never wall-clock)",
    )
    sink.add_argument(
        "--idle-flush",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="publish buffered rows when no record arrived for this long (default 5)",
    )
    sink.add_argument(
        "--stop-after-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after publishing once no record arrived for this long (tests, demos)",
    )
    sink.add_argument(
        "--dead-letter-topic",
        default=None,
        help="for unparseable records (default: <topic>-parquet-dlq)",
    )
    sink.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_security_arguments(sink)

    compact = actions.add_parser(
        "compact",
        help="merge the small files of closed days into one file per day and partition",
        description="Safe while the sink writes and readers read: the merged file is published "
        "atomically and hides its inputs, which are deleted after a grace period.",
    )
    compact.add_argument("lake", metavar="DIR", help="lake directory")
    compact.add_argument(
        "--before",
        default=None,
        metavar="YYYY-MM-DD",
        help="compact days before this one (default: every day older than the newest)",
    )
    compact.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait this long before deleting merged inputs, for readers still on them",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.action == "parquet":
        return _sink(args)
    return _compact(args)


def _sink(args: argparse.Namespace) -> int:
    from pathlib import Path

    from common.kafka_io import KafkaUnavailable, check_connection
    from common.kafka_security import security_from_args
    from sinks.parquet import (
        DEFAULT_GROUP,
        ParquetSink,
        RotationPolicy,
        SinkConfig,
        install_signal_handlers,
    )

    try:
        span_ms = parse_duration_ms(args.max_span)
    except ValueError as error:
        raise CliError(f"--max-span: {error}") from None
    try:
        policy = RotationPolicy(args.max_records, span_ms)
    except ValueError as error:
        raise CliError(f"--max-records/--max-span: {error}") from None
    if "+" in args.topic or "/" in args.topic:
        raise CliError(f"--topic {args.topic!r}: '+' and '/' cannot appear in lake file names")
    try:
        security = security_from_args(args)
        check_connection(args.bootstrap, security)
    except (ValueError, KafkaUnavailable) as error:
        raise CliError(str(error)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    sink = ParquetSink(
        SinkConfig(
            lake=out,
            topic=args.topic,
            bootstrap=args.bootstrap,
            group=args.group or DEFAULT_GROUP,
            policy=policy,
            idle_flush_s=args.idle_flush,
            stop_after_idle_s=args.stop_after_idle,
            dead_letter_topic=args.dead_letter_topic,
            instance_id=args.instance_id,
            security=security,
        )
    )
    install_signal_handlers(sink)
    sink.run()
    return 0


def _compact(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sinks.compact import compact

    lake = Path(args.lake)
    if not lake.is_dir():
        raise CliError(f"{lake}: no such lake directory")
    if args.before is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.before):
        raise CliError(f"--before {args.before!r}: expected YYYY-MM-DD")
    try:
        report = compact(lake, before=args.before, grace_s=args.grace)
    except RuntimeError as error:
        raise CliError(str(error)) from None
    print(
        f"compacted days={','.join(report.merged_days) or '-'} files_in={report.files_in} "
        f"files_out={report.files_out} rows={report.rows} deleted={report.deleted}"
    )
    return 0
