"""``anomstream detect --config detectors.yaml``: run a detection worker in a consumer group."""

from __future__ import annotations

import argparse
import threading
from typing import TYPE_CHECKING

from common.kafka_security import add_security_arguments

if TYPE_CHECKING:
    from stream.worker import Worker
    from stream.worker.processes import ScoreProcesses

HELP = "run a streaming detection worker (Kafka in, per-series detectors, results out)"
# How long each score process may take to commit, checkpoint and leave after SIGTERM.
STOP_TIMEOUT_S = 120.0


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
    parser.add_argument(
        "--score-processes", type=int, metavar="N",
        help="override worker.score_processes: run the score stage in N child processes (N "
        "cores), each a member of the score group under an instance id derived from this "
        "worker's; the route stage stays in this process",
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
    from stream.metrics import HasRegistry, HealthServer, WorkerMetrics
    from stream.worker import Worker, WorkerError, resolve_instance_id
    from stream.worker.processes import MergedMetrics, ScoreProcesses
    from stream.worker.supervision import check_stages

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
    overrides = {"metrics_port": args.metrics_port, "metrics_host": args.metrics_host,
                 "score_processes": args.score_processes}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.score_processes is not None and args.score_processes < 1:
        raise CliError(f"--score-processes must be 1 or more, got {args.score_processes}")
    if overrides:
        config = config.model_copy(
            update={"worker": config.worker.model_copy(update=overrides)}
        )
    try:
        # One line and exit 2 for a cluster we cannot use, before the worker's clients would
        # retry it for minutes.
        check_connection(config.kafka.bootstrap, config.kafka.security)
    except KafkaUnavailable as error:
        raise CliError(str(error)) from None
    try:
        stages = check_stages(
            tuple(name.strip() for name in args.stages.split(",") if name.strip()))
        instance_id = resolve_instance_id(config, args.instance_id)
        children = None
        if config.worker.score_processes > 1 and "score" in stages:
            children = ScoreProcesses(config, instance_id, config.worker.score_processes,
                                      args.log_level)
            stages = tuple(name for name in stages if name != "score")
        worker = Worker(config, instance_id, stages) if stages else None
    except WorkerError as error:
        raise CliError(str(error)) from None
    metrics: HasRegistry = WorkerMetrics() if worker is None else worker.metrics
    if children is not None:
        metrics = MergedMetrics(metrics.registry, instance_id, children.families)

    def healthy() -> bool:
        return ((worker is None or worker.healthy())
                and (children is None or children.healthy()))

    def ready() -> bool:
        return (worker is None or worker.ready()) and (children is None or children.ready())

    server = None
    if config.worker.metrics_port is not None:
        try:
            server = HealthServer(
                config.worker.metrics_port, metrics, healthy, ready,
                host=config.worker.metrics_host,
            ).start()
        except OSError as error:
            raise CliError(f"cannot serve metrics on port {config.worker.metrics_port}: "
                           f"{error.strerror or error}") from None
    # SIGTERM (and Ctrl-C) stop gracefully: commit, checkpoint, leave the group. The handler
    # only flags it: the main loop stops the children (the handler could interrupt it while it
    # holds their lock).
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if children is not None:
            children.start()  # from the main thread: PR_SET_PDEATHSIG follows the thread
        if worker is not None:
            worker.start()
    except (WorkerError, Exception) as error:
        raise CliError(f"cannot start: {str(error) or type(error).__name__}") from None
    logging.getLogger("anomstream.worker").info(
        "worker %s running: %d detector(s) on %s%s", instance_id, len(config.detectors),
        ", ".join(config.input_topics),
        "" if children is None else f", score stage in {len(children.children)} processes",
    )
    errors = run_until_stopped(worker, children, stop)
    if server is not None:
        server.stop()
    if errors:
        print(f"anomstream detect: error: {errors[0]}", file=sys.stderr)
        return 1
    return 0


def run_until_stopped(worker: Worker | None, children: ScoreProcesses | None,
                      stop: threading.Event) -> list[str]:
    """Run until ``stop`` is set or a stage or child fails; then stop all of them and return
    why it failed (nothing for a clean stop). A child that fails stops the worker: a worker
    that sits idle while reporting healthy would hide that it scores nothing."""
    errors: list[str] = []
    while True:
        # Without stages of its own (``--stages score``) only a stop or a child ends the worker.
        done = worker is not None and worker.wait(0.5)
        if worker is None:
            stop.wait(0.5)
        failure = None if children is None else children.failure()
        if failure is not None and not errors:
            errors.append(failure)
        if stop.is_set() or done or errors:
            break
    if worker is not None:
        worker.stop.set()
    if children is not None:
        children.stop()
        children.join(STOP_TIMEOUT_S)
        failure = children.failure()
        if failure is not None and not errors:
            errors.append(failure)
    if worker is not None:
        worker.wait()
        errors[:0] = [str(error) for error in worker.errors]
    return errors
