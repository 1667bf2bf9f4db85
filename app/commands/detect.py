"""``anomstream detect --config detectors.yaml``: run a detection worker in a consumer group."""

from __future__ import annotations

import argparse

from common.kafka_security import add_security_arguments

HELP = "run a streaming detection worker (Kafka in, per-series detectors, results out)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="detectors YAML file")
    parser.add_argument(
        "--instance-id",
        help="stable id of this worker (default: kafka.instance_id, else the host name); a "
        "restarted worker must reuse it, two live workers must not share it",
    )
    parser.add_argument(
        "--stages", default="route,score",
        help="stages to run in this process: route,score (default), route or score; two "
        "processes (one per stage, same instance id) use two cores",
    )
    parser.add_argument("--bootstrap", help="override kafka.bootstrap")
    parser.add_argument("--metrics-port", type=int, help="override worker.metrics_port")
    parser.add_argument("--metrics-host",
                        help="override worker.metrics_host (0.0.0.0 to be scraped in a container)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    add_security_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import sys

    from app.cli import CliError
    from common.kafka_io import KafkaUnavailable, check_connection
    from common.kafka_security import security_from_args
    from stream.config import ConfigError, load_config
    from stream.metrics import HealthServer
    from stream.worker import Worker, WorkerError

    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
    except ConfigError as error:
        raise CliError(str(error)) from None
    try:
        security = security_from_args(args, config.kafka.security)
    except ValueError as error:
        raise CliError(str(error)) from None
    config = config.model_copy(update={"kafka": config.kafka.model_copy(update={
        "bootstrap": args.bootstrap or config.kafka.bootstrap, "security": security,
    })})
    metrics = {"metrics_port": args.metrics_port, "metrics_host": args.metrics_host}
    metrics = {key: value for key, value in metrics.items() if value is not None}
    if metrics:
        config = config.model_copy(
            update={"worker": config.worker.model_copy(update=metrics)}
        )
    try:
        # One line and exit 2 for a cluster we cannot use, before the worker's clients would
        # retry it for minutes.
        check_connection(config.kafka.bootstrap, config.kafka.security)
    except KafkaUnavailable as error:
        raise CliError(str(error)) from None
    try:
        worker = Worker(config, args.instance_id,
                        tuple(name.strip() for name in args.stages.split(",") if name.strip()))
    except WorkerError as error:
        raise CliError(str(error)) from None
    server = None
    if config.worker.metrics_port is not None:
        try:
            server = HealthServer(
                config.worker.metrics_port, worker.metrics, worker.healthy, worker.ready,
                host=config.worker.metrics_host,
            ).start()
        except OSError as error:
            raise CliError(f"cannot serve metrics on port {config.worker.metrics_port}: "
                           f"{error.strerror or error}") from None
    # SIGTERM (and Ctrl-C) stop gracefully: commit, checkpoint, leave the group.
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop.set())
    try:
        worker.start()
    except (WorkerError, Exception) as error:
        raise CliError(f"cannot start: {str(error) or type(error).__name__}") from None
    logging.getLogger("anomstream.worker").info(
        "worker %s running: %d detector(s) on %s", worker.instance_id, len(config.detectors),
        ", ".join(config.input_topics),
    )
    while not worker.wait(0.5):
        pass
    if server is not None:
        server.stop()
    if worker.errors:
        print(f"anomstream detect: error: {worker.errors[0]}", file=sys.stderr)
        return 1
    return 0
