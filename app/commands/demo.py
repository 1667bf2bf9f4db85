"""``anomstream demo``: Kafka, generators, detectors, lake, alerts and dashboard in one command."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common.kafka_security import add_security_arguments

HELP = "Run the whole pipeline locally (Kafka, generators, detectors, lake, alerts, dashboard)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("out/demo-run"),
        help="configs, lake, alert state, labels and logs; emptied on start "
        "(default: out/demo-run)",
    )
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("ANOMSTREAM_BOOTSTRAP"),
        help="use this Kafka broker (default: $ANOMSTREAM_BOOTSTRAP; none: start a local one)",
    )
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop by itself after this long"
    )
    parser.add_argument("--seed", type=int, default=0, help="generators' seed (default: 0)")
    parser.add_argument(
        "--points", type=int, default=3000, help="points replayed per series (default: 3000)"
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=600.0,
        help="replay speed: seconds of data per second (default: 600, ten 60 s points a second)",
    )
    parser.add_argument(
        "--start",
        metavar="ISO",
        help="time of the feeds' first point, ISO-8601 (default: so that the replay reaches the "
        "current time as it ends); the feeds' values depend on the time of day",
    )
    parser.add_argument("--instruments", type=int, default=4, help="market instruments (4)")
    parser.add_argument("--hosts", type=int, default=2, help="ops GPU hosts (2)")
    parser.add_argument("--workers", type=int, default=2, help="detection workers (2)")
    parser.add_argument(
        "--dashboard-port", type=int, default=8501, help="dashboard port (default: 8501)"
    )
    add_security_arguments(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    webhook = actions.add_parser(
        "webhook",
        help="only run the demo's alert webhook receiver, printing each alert (docker-compose)",
        description="An HTTP endpoint for the alerter's apprise json:// posts: each alert is "
        "printed on stdout. Point a receiver at json://HOST:PORT/alerts.",
    )
    webhook.add_argument("--host", default="127.0.0.1", help="address (0.0.0.0 in a container)")
    webhook.add_argument("--port", type=int, default=8080, help="port (default: 8080)")


def run(args: argparse.Namespace) -> int:
    import signal

    from rich.console import Console

    from app.cli import CliError
    from app.demo import Demo, DemoError, DemoOptions, serve_webhook, summary
    from app.generators.common import parse_start

    if args.action == "webhook":
        try:
            serve_webhook(args.host, args.port, Console())
        except OSError as error:
            raise CliError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
        return 0
    for name in ("points", "instruments", "hosts", "workers"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1")
    if args.speed <= 0:
        raise CliError("--speed must be positive")
    if args.duration is not None and args.duration <= 0:
        raise CliError("--duration must be positive")
    from common.kafka_security import PLAINTEXT, security_from_args

    try:
        security = security_from_args(args)
    except ValueError as error:
        raise CliError(str(error)) from None
    if security != PLAINTEXT and not args.bootstrap:
        raise CliError("the security flags go with --bootstrap: the demo's own broker is "
                       "PLAINTEXT")
    start = None
    if args.start is not None:
        try:
            start = parse_start(args.start)
        except ValueError as error:
            raise CliError(f"--start: {error}") from None
    options = DemoOptions(
        workdir=args.workdir,
        start=start,
        bootstrap=args.bootstrap,
        duration=args.duration,
        seed=args.seed,
        points=args.points,
        speed=args.speed,
        instruments=args.instruments,
        hosts=args.hosts,
        workers=args.workers,
        dashboard_port=args.dashboard_port,
        security=security,
    )
    console = Console()
    demo = Demo(options, console)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: demo.stop.set())
    try:
        code = demo.run()
    except DemoError as error:
        raise CliError(str(error)) from None
    console.print(summary(options.workdir))
    return code
