"""``anomstream produce INPUT --topic T``: replay a CSV/Parquet file into Kafka as JSON records."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from common.kafka_security import add_security_arguments

if TYPE_CHECKING:
    from common.kafka_security import KafkaSecurity

HELP = "Replay a CSV or Parquet file into a Kafka topic as JSON records (optionally paced)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="CSV or Parquet (.parquet/.pq) file")
    parser.add_argument("--topic", required=True, help="Kafka topic to write to")
    parser.add_argument("--timestamp-column", default="timestamp",
                        help="column with the event time: ISO-8601 (no zone = UTC) or epoch "
                        "seconds/ms (default: timestamp)")
    parser.add_argument("--value-column", action="append", dest="value_columns", metavar="COL",
                        help="numeric column to send; repeatable (default: value)")
    parser.add_argument("--measure-name", action="append", dest="measure_names", metavar="NAME",
                        help="JSON field name for the value column at the same position; "
                        "repeatable (default: the column's name)")
    parser.add_argument("--dimension-column", action="append", dest="dimension_columns",
                        default=[], metavar="COL", help="column copied as a dimension; repeatable")
    parser.add_argument("--dimension", action="append", dest="dimensions", default=[],
                        metavar="NAME=VALUE", help="constant dimension on every record; repeatable")
    parser.add_argument("--key-field", default=None,
                        help="record field whose value becomes the Kafka key (default: no key, "
                        "records spread over partitions)")
    parser.add_argument("--speed", type=float, default=0.0,
                        help="replay FACTOR times faster than the timestamps' gaps; 0 = as fast "
                        "as possible (default)")
    parser.add_argument("--partitions", type=int, default=1,
                        help="partitions if the topic has to be created (default 1; an existing "
                        "topic is left as it is)")
    parser.add_argument("--bootstrap", default=None,
                        help="Kafka bootstrap servers (default: $ANOMSTREAM_BOOTSTRAP or "
                        "127.0.0.1:9092)")
    add_security_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from app.cli import CliError
    from app.producer import (
        InputError,
        ReplaySpec,
        build_records,
        paced,
        read_table,
        send_records,
    )
    from app.progress import progress_bar
    from common.kafka_security import security_from_args

    if args.partitions < 1:
        raise CliError(f"--partitions must be at least 1, not {args.partitions}")
    if args.speed < 0:
        raise CliError(f"--speed must be 0 (no pacing) or positive, not {args.speed}")
    value_columns = tuple(args.value_columns or ["value"])
    measure_names = list(args.measure_names or [])
    if measure_names and len(measure_names) != len(value_columns):
        raise CliError(f"{len(measure_names)} --measure-name for {len(value_columns)} value "
                       f"column(s) {list(value_columns)}; give one per --value-column")
    bootstrap = args.bootstrap or os.environ.get("ANOMSTREAM_BOOTSTRAP") or "127.0.0.1:9092"
    try:
        security = security_from_args(args)
    except ValueError as error:
        raise CliError(str(error)) from None
    try:
        spec = ReplaySpec(
            timestamp_column=args.timestamp_column,
            value_columns=value_columns,
            measure_names=dict(zip(value_columns, measure_names, strict=False)),
            dimension_columns=tuple(args.dimension_columns),
            dimension_constants=_constants(args.dimensions),
            key_field=args.key_field,
        )
        spec.check()
        records = build_records(read_table(args.input), spec, str(args.input))
        _prepare_topic(bootstrap, security, args.topic, args.partitions)
        label = f"{args.input.name} -> {args.topic}"
        with progress_bar(label, len(records)) as advance:
            report = send_records(bootstrap, args.topic, paced(records, args.speed),
                                  on_sent=advance, security=security)
    except InputError as error:
        raise CliError(str(error)) from error
    if report.failed:
        raise CliError(f"{report.failed} of {len(records)} record(s) not delivered to "
                       f"{args.topic!r} on {bootstrap}: {report.first_error}")
    print(f"produced {report.delivered} record(s) from {args.input} to {args.topic!r} "
          f"on {bootstrap}")
    return 0


def _constants(pairs: list[str]) -> dict[str, str]:
    from app.cli import CliError

    constants: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--dimension {pair!r}: expected NAME=VALUE")
        constants[name.strip()] = value
    return constants


def _prepare_topic(bootstrap: str, security: KafkaSecurity, topic: str, partitions: int) -> None:
    """Fail in seconds on an unusable cluster (instead of queueing records into it until the
    delivery timeout), and create the topic if it is missing rather than rely on auto-creation."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from app.cli import CliError
    from common.kafka_io import KafkaUnavailable, check_connection, client_config, create_topics

    try:
        check_connection(bootstrap, security)
        metadata = AdminClient(client_config(bootstrap, security)).list_topics(timeout=10)
    except (KafkaUnavailable, KafkaException) as error:
        raise CliError(f"{error}; start one with `anomstream kafka up` or pass --bootstrap"
                       ) from None
    # Only a missing topic is created: a user allowed to write a topic may not create one.
    if topic not in metadata.topics:
        try:
            create_topics(bootstrap, [topic], partitions=partitions, security=security,
                          timeout_s=30)
        except Exception as error:  # KafkaException, TimeoutError: both mean "cannot create"
            raise CliError(f"cannot create topic {topic!r} on {bootstrap}: {error}") from error
