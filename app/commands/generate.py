"""``anomstream generate market|ops|bookstore``: synthetic feeds with labelled anomalies.

Writes the records to a Kafka topic (``--topic``) or a file (``--out``), the labels alongside,
and with ``--evaluate`` scores the default detector against the labels.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.kafka_security import add_security_arguments

if TYPE_CHECKING:
    from app.generators import Feed

HELP = "Generate a synthetic market, ops or bookstore feed with labelled anomalies."

FEED_NAMES = ("market", "ops", "bookstore")
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "feed",
        choices=(*FEED_NAMES, "all"),
        help="which feed; 'all' (every feed) only with --evaluate and no output",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--topic", help="produce the records to this Kafka topic")
    target.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the records to FILE.csv, FILE.parquet or FILE.jsonl (labels: FILE.labels.json)",
    )
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("ANOMSTREAM_BOOTSTRAP", DEFAULT_BOOTSTRAP),
        help="Kafka bootstrap servers (default: $ANOMSTREAM_BOOTSTRAP or %(default)s)",
    )
    parser.add_argument(
        "--partitions", type=int, default=4, help="partitions if the topic is created (default: 4)"
    )
    parser.add_argument(
        "--labels", type=Path, metavar="PATH", help="write the labels here (with --topic)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--start",
        metavar="ISO",
        help="time of the first point, ISO-8601, UTC unless an offset is given "
        "(default: 2026-01-05T00:00:00Z; 'now' for the current minute)",
    )
    parser.add_argument(
        "--interval",
        metavar="DURATION",
        help="time between points, e.g. 60s, 5m, 1h (default: 60s; bookstore 1h)",
    )
    parser.add_argument(
        "--points", type=int, default=3000, help="points per series (default: %(default)s)"
    )
    entities = parser.add_mutually_exclusive_group()
    entities.add_argument("--instruments", type=int, metavar="N", help="market: instruments (6)")
    entities.add_argument("--hosts", type=int, metavar="N", help="ops: GPU hosts (4)")
    parser.add_argument(
        "--speed",
        type=float,
        default=0.0,
        metavar="FACTOR",
        help="with --topic: replay FACTOR times faster than real time (e.g. 60: one minute "
        "of data per second); 0 (the default) produces as fast as possible",
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="run the default detector over every series and print precision and recall",
    )
    parser.add_argument(
        "--detect-config",
        type=Path,
        metavar="DETECT.yaml",
        help="with --evaluate: take each measure's detector parameters and threshold from this "
        "`anomstream detect` configuration (e.g. examples/docker/detect.yaml, the demo's)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="with --evaluate: the report as JSON, on stdout instead of the table, or to PATH",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="with --evaluate: save one figure per feed, DIR/evaluation-<feed>.png",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE.md",
        help="with --evaluate: write the table to FILE.md, replacing only the part between "
        "its evaluation markers if it has them (docs/evaluation-generators.md does)",
    )
    parser.add_argument(
        "--tolerance",
        type=int,
        default=3,
        metavar="N",
        help="with --evaluate: intervals after a labelled window in which a decision still "
        "counts as found, and the gap that splits alert events (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_security_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from app.cli import CliError
    from app.generators import DEFAULT_INTERVALS, FeedSpec, generate_feed
    from app.generators.common import (
        OUTPUT_SUFFIXES,
        labels_path_for,
        parse_interval,
        write_labels,
        write_records,
    )

    feeds = list(FEED_NAMES) if args.feed == "all" else [args.feed]
    if args.feed == "all" and (args.topic or args.out):
        raise CliError("'all' only evaluates; generate one feed at a time to --topic or --out")
    if not (args.topic or args.out or args.evaluate):
        raise CliError("say where the records go: --topic TOPIC or --out FILE (or --evaluate)")
    if args.out is not None and args.out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise CliError(f"--out {args.out}: use a {', '.join(OUTPUT_SUFFIXES)} file")
    if args.labels is not None and not args.topic:
        raise CliError("--labels goes with --topic; with --out the labels go to FILE.labels.json")
    if (args.json or args.plot or args.markdown or args.detect_config) and not args.evaluate:
        raise CliError(
            "--json, --plot, --markdown and --detect-config go with an evaluation; add --evaluate"
        )
    if args.instruments is not None and args.feed not in ("market", "all"):
        raise CliError("--instruments is for the market feed")
    if args.hosts is not None and args.feed not in ("ops", "all"):
        raise CliError("--hosts is for the ops feed")
    if args.speed < 0:
        raise CliError(f"--speed must be 0 (as fast as possible) or positive, got {args.speed}")
    if args.tolerance < 0:
        raise CliError(f"--tolerance must be 0 or more, got {args.tolerance}")
    try:
        start = None if args.start is None else _start(args.start)
        interval = None if args.interval is None else parse_interval(args.interval)
    except ValueError as error:
        raise CliError(str(error)) from None

    generated = []
    for name in feeds:
        entities = args.instruments if name == "market" else args.hosts if name == "ops" else None
        try:
            spec = FeedSpec(
                seed=args.seed,
                interval=interval or DEFAULT_INTERVALS[name],
                points=args.points,
                entities=entities,
                **({} if start is None else {"start": start}),
            )
        except ValueError as error:
            raise CliError(str(error)) from None
        generated.append(generate_feed(name, spec))

    if args.out is not None:
        feed = generated[0]
        try:
            count = write_records(feed, args.out)
        except OSError as error:
            raise CliError(f"{args.out}: cannot write: {error.strerror or error}") from None
        labels_path = labels_path_for(args.out)
        write_labels(feed, labels_path)
        print(f"{count} records of {len(feed.series)} series -> {args.out}")
        print(f"{len(feed.labels)} labelled anomalies -> {labels_path}")
    elif args.topic:
        feed = generated[0]
        if args.labels is not None:
            write_labels(feed, args.labels)
        count = _produce(feed, args)
        print(f"{count} records of {len(feed.series)} series -> topic {args.topic}")
        if args.labels is not None:
            print(f"{len(feed.labels)} labelled anomalies -> {args.labels}")

    if args.evaluate:
        measure_params = None if args.detect_config is None else _measure_params(args.detect_config)
        _evaluate(generated, args, measure_params)
    return 0


def _measure_params(path: Path) -> dict[str, dict[str, Any]]:
    """Each measure's detector parameters (threshold included) from a detect configuration."""
    from app.cli import CliError
    from stream.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as error:
        raise CliError(str(error)) from None
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}
    for spec in config.detectors:
        params = {**spec.params, "threshold": spec.threshold}
        for measure in spec.measures:
            if measure in chosen and chosen[measure][1] != params:
                raise CliError(
                    f"{path}: detectors {chosen[measure][0]!r} and {spec.name!r} both read "
                    f"{measure!r} with different parameters; the evaluation needs one per measure"
                )
            chosen[measure] = (spec.name, params)
    return {measure: params for measure, (_, params) in chosen.items()}


def _start(text: str) -> float:
    """Epoch seconds of ``--start``: ISO-8601, or ``now`` (the current minute)."""
    import time

    from app.generators.common import parse_start

    if text.strip().lower() == "now":
        return float(int(time.time()) // 60 * 60)
    return parse_start(text)


def _produce(feed: Feed, args: argparse.Namespace) -> int:
    """Produce the feed's records to ``args.topic``, paced by ``args.speed``; returns the count."""
    import json
    import time

    from confluent_kafka import KafkaException, Producer

    from app.cli import CliError
    from app.progress import progress_bar
    from common.kafka_io import (
        KafkaUnavailable,
        check_connection,
        create_topics,
        produce_when_room,
        producer_config,
    )
    from common.kafka_security import security_from_args

    try:
        security = security_from_args(args)
        check_connection(args.bootstrap, security)
    except (ValueError, KafkaUnavailable) as error:
        raise CliError(str(error)) from None
    try:
        create_topics(args.bootstrap, [args.topic], partitions=args.partitions,
                      security=security, timeout_s=20.0)
    except (KafkaException, TimeoutError) as error:
        reason = str(error) or type(error).__name__
        raise CliError(f"cannot create topic {args.topic!r} on {args.bootstrap}: {reason}"
                       ) from None
    producer = Producer(producer_config(args.bootstrap, security=security))
    failures: list[str] = []

    def delivered(error: object, _message: object) -> None:
        if error is not None:
            failures.append(str(error))

    entities = len(feed.entities())
    dimension_names = {name for series in feed.series for name in series.dimensions}
    began = time.monotonic()
    count = 0
    label = f"{feed.name} -> {args.topic}"
    with progress_bar(label, feed.spec.points, "points", not args.no_progress, True) as advance:
        for count, record in enumerate(feed.records(), start=1):
            step = (count - 1) // entities
            if args.speed > 0 and (count - 1) % entities == 0:
                # Real-time replay: point ``step`` is due ``step * interval / speed`` seconds in.
                delay = began + step * feed.spec.interval / args.speed - time.monotonic()
                if delay > 0:
                    producer.flush(delay)
                    remaining = began + step * feed.spec.interval / args.speed - time.monotonic()
                    if remaining > 0:
                        time.sleep(remaining)
            # Keyed by the entity: its records stay in order on one partition.
            key = "|".join(f"{k}={v}" for k, v in record.items() if k in dimension_names)
            payload = json.dumps(record, separators=(",", ":")).encode("utf-8")
            produce_when_room(producer, args.topic, payload, key.encode("utf-8"),
                              on_delivery=delivered, wait_s=0.1)
            producer.poll(0)
            if count % entities == 0:
                advance(1)
            if failures:
                break
    remaining_messages = producer.flush(30.0)
    if failures:
        raise CliError(f"producing to {args.topic!r} failed: {failures[0]}")
    if remaining_messages:
        raise CliError(f"{remaining_messages} records not acknowledged by {args.bootstrap} in 30 s")
    return count


def _evaluate(
    feeds: list[Feed],
    args: argparse.Namespace,
    measure_params: dict[str, dict[str, Any]] | None,
) -> None:
    import json
    import sys

    from rich.console import Console

    from app.generators.evaluate import (
        evaluate_feed,
        plot_evaluation,
        render_table,
        write_markdown,
    )
    from app.progress import progress_bar

    evaluations = []
    for feed in feeds:
        label = f"evaluating {feed.name}"
        with progress_bar(label, len(feed.series), "series", not args.no_progress, True) as step:
            evaluations.append(
                evaluate_feed(
                    feed,
                    tolerance=args.tolerance,
                    advance=lambda: step(1),
                    measure_params=measure_params,
                )
            )
    report = {"seed": args.seed, "feeds": [evaluation.to_json() for evaluation in evaluations]}
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        # Piped output gets room for the whole table instead of rich's 80-column default.
        Console(width=None if sys.stdout.isatty() else 140).print(render_table(evaluations))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            print(f"evaluation -> {args.json}")
    if args.markdown is not None:
        write_markdown(args.markdown, evaluations, _provenance(args))
        print(f"table -> {args.markdown}", file=sys.stderr if args.json == "-" else sys.stdout)
    if args.plot is not None:
        for evaluation in evaluations:
            path = args.plot / f"evaluation-{evaluation.feed}.png"
            plot_evaluation(evaluation, path)
            print(f"plot -> {path}", file=sys.stderr if args.json == "-" else sys.stdout)


def _provenance(args: argparse.Namespace) -> str:
    """Which run made the numbers: date, command, the detectors' last commit and parameters."""
    import subprocess
    from datetime import UTC, datetime

    from detectors import DetectorConfig

    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%h %s", "--", "detectors"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    dirty = ""
    if commit:
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "detectors"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        dirty = " (plus uncommitted changes)" if status.strip() else ""
    command = (
        f"anomstream generate {args.feed} --evaluate --seed {args.seed} --points {args.points}"
        f" --tolerance {args.tolerance}"
        + ("" if args.detect_config is None else f" --detect-config {args.detect_config}")
    )
    params = ", ".join(f"{k}={v}" for k, v in DetectorConfig().to_dict().items())
    return (
        f"Run {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC: `{command}`.  \n"
        f"Detector: `detectors/` at `{commit or 'unknown commit'}`{dirty}; default "
        f"`DetectorConfig({params})`."
    )
