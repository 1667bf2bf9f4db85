"""``anomstream alert``: page on-call through apprise; ``alert silence`` mutes matching alerts."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from app.cli import CliError
from common.kafka_security import add_security_arguments

if TYPE_CHECKING:
    from sinks.alerting.config import AlertConfig

HELP = "Notify on-call (apprise) about anomalous series; 'alert silence' mutes matching alerts."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=False, help="alerts YAML (see examples/alerts.yaml)")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides the config)")
    parser.add_argument("--topic", help="result topic (overrides the config)")
    parser.add_argument(
        "--until-idle",
        type=float,
        metavar="SECONDS",
        help="stop once no record arrived and nothing was pending for this long (batch runs)",
    )
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus /metrics on this port (overrides metrics_port)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of /metrics (default 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_security_arguments(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    silence = actions.add_parser(
        "silence",
        help="silence alerts matching labels for a while (a running alerter honours it at once)",
        description="Matchers are label=glob; labels: detector, measure, series, rule, severity "
        "and any dimension name.",
    )
    silence.add_argument("--config", default=argparse.SUPPRESS, help="alerts YAML")
    silence.add_argument(
        "--match", action="append", default=[], metavar="LABEL=GLOB", help="repeatable"
    )
    silence.add_argument("--for", dest="duration", default="1h", help="e.g. 30m, 2h, 1d")
    silence.add_argument("--comment", default="", help="why, for the next person")
    silence.add_argument("--list", action="store_true", help="list the silences in force")
    silence.add_argument("--expire", metavar="ID", help="lift a silence made here, by its id")


def _load(args: argparse.Namespace) -> AlertConfig:
    from sinks.alerting.config import ConfigError, load_config

    if not args.config:
        raise CliError("--config is required (an alerts YAML, see examples/alerts.yaml)")
    overrides: dict[str, Any] = {}
    if getattr(args, "bootstrap", None):
        overrides["bootstrap_servers"] = args.bootstrap
    if getattr(args, "topic", None):
        overrides["result_topic"] = args.topic
    if getattr(args, "metrics_port", None) is not None:
        overrides["metrics_port"] = args.metrics_port
    from common.kafka_security import security_from_args

    try:
        config = load_config(args.config, overrides)
        security = security_from_args(args, config.kafka_security)
    except (ConfigError, ValueError) as error:
        raise CliError(str(error)) from None
    return config.model_copy(update={"kafka_security": security})


def _silence(args: argparse.Namespace) -> int:
    from sinks.alerting.config import parse_duration
    from sinks.alerting.silences import Silence, parse_matchers, write_silence

    config = _load(args)
    if args.list:
        return _list_silences(config)
    if args.expire:
        target = config.silences_dir / f"{args.expire}.json"
        if not args.expire.replace("-", "").replace("_", "").isalnum() or not target.is_file():
            raise CliError(f"no silence {args.expire!r} in {config.silences_dir}")
        target.unlink()
        print(f"silence {args.expire} lifted")
        return 0
    try:
        matchers = parse_matchers(args.match)
        seconds = parse_duration(args.duration)
    except ValueError as error:
        raise CliError(str(error)) from None
    now = time.time()
    path = write_silence(config.silences_dir, Silence(matchers, now, now + seconds, args.comment))
    shown = ", ".join(f"{k}={v}" for k, v in matchers.items())
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + seconds))
    print(f"silenced {shown} until {until} (id {path.stem}, in {path.parent})")
    return 0


def _list_silences(config: AlertConfig) -> int:
    from sinks.alerting.silences import Silence, SilenceSet

    silences = SilenceSet(
        [Silence.from_spec(s, i) for i, s in enumerate(config.silences)], config.silences_dir
    )
    silences.refresh()
    now = time.time()

    def when(moment: float | None) -> str:
        return "-" if moment is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))

    active = [s for s in silences.all if s.active(now)]
    for silence in active:
        shown = ", ".join(f"{k}={v}" for k, v in silence.matchers.items())
        print(f"{silence.id}\t{shown}\tuntil {when(silence.ends_at)}\t{silence.comment}")
    if not active:
        print("no silence in force")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "silence":
        return _silence(args)

    import logging
    import signal
    import threading

    from sinks.alerting.redact import Redactor, install_logging

    config = _load(args)
    redactor = Redactor(r.resolved_url() for r in config.receivers)
    install_logging(redactor, logging.DEBUG if args.verbose else logging.INFO)

    from common.kafka_io import KafkaUnavailable, check_connection
    from sinks.alerting.service import Alerter

    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, addr=args.metrics_host)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        alerter = Alerter(config, redactor)
    except ValueError as error:
        raise CliError(redactor(str(error))) from None
    try:
        # After the receivers are checked, before the consumer, which would retry an unusable
        # cluster for ever.
        check_connection(config.bootstrap_servers, config.kafka_security)
    except KafkaUnavailable as error:
        raise CliError(redactor(str(error))) from None
    alerter.run(stop, until_idle=args.until_idle)
    return 0
