"""``anomstream kafka up|down|status``: the local single-node Kafka broker (app.kafka_local)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from app.kafka_local import LocalKafka

HELP = "Start, stop or inspect the local Kafka broker (KRaft, jars fetched with mvn)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from app import kafka_local as kl  # light: stdlib only at import time

    parser.add_argument(
        "action", choices=["up", "down", "status"],
        help="up: fetch jars if needed and start; down: stop; status: running or not, ports",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="broker config, logs, pid file "
        "(default $ANOMSTREAM_CACHE/kafka-data or ~/.cache/anomstream/kafka-data)",
    )
    parser.add_argument("--port", type=int, default=kl.DEFAULT_PORT,
                        help=f"client (PLAINTEXT) port on 127.0.0.1 (default {kl.DEFAULT_PORT})")
    parser.add_argument("--controller-port", type=int, default=kl.DEFAULT_CONTROLLER_PORT,
                        help=f"KRaft controller port (default {kl.DEFAULT_CONTROLLER_PORT})")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the broker to serve (up; default "
                        f"${kl.START_TIMEOUT_ENV} or {kl.DEFAULT_START_TIMEOUT_S:.0f}) or to exit "
                        f"(down; default {kl.DEFAULT_STOP_TIMEOUT_S:.0f})")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from app import kafka_local as kl
    from app.cli import CliError

    console = Console(soft_wrap=True)
    data_dir: Path = args.data_dir or kl.default_data_dir()
    existing = kl.LocalKafka.from_data_dir(data_dir)
    try:
        if args.action == "status":
            return _status(console, existing, data_dir)
        if args.action == "down":
            if existing is None or not existing.stop(
                timeout_s=args.timeout or kl.DEFAULT_STOP_TIMEOUT_S
            ):
                console.print(f"kafka: not running (data dir {data_dir})")
            else:
                console.print(f"kafka: stopped (data dir {data_dir})")
            return 0
        if existing is not None and existing.running_pid() is not None:
            console.print(f"kafka: already running on {existing.bootstrap} "
                          f"(pid {existing.running_pid()}, data dir {data_dir})")
            return 0
        kafka = kl.LocalKafka(data_dir, port=args.port, controller_port=args.controller_port,
                              start_timeout_s=args.timeout, detach=True,
                              progress=lambda line: console.print(f"kafka: {line}"))
        started = time.monotonic()
        with console.status(f"fetching Kafka {kafka.version} jars with mvn (cached after once)"):
            libs = kl.ensure_jars(kafka.version)
        fetched = time.monotonic()
        with console.status(f"starting Kafka on {kafka.bootstrap}"):
            kafka.start()
        ready = time.monotonic()
    except kl.KafkaError as error:
        raise CliError(str(error)) from error
    console.print(
        f"kafka: running on {kafka.bootstrap} (controller {kafka.config.controller_port}, "
        f"pid {kafka.running_pid()})\n"
        f"  jars {libs} ready in {fetched - started:.1f} s, broker serving after "
        f"{ready - fetched:.1f} s\n"
        f"  data dir {data_dir}, log {kafka.log_path}\n"
        f"  clients: --bootstrap {kafka.bootstrap}  or  "
        f"export ANOMSTREAM_BOOTSTRAP={kafka.bootstrap}"
    )
    return 0


def _status(console: Console, kafka: LocalKafka | None, data_dir: Path) -> int:
    if kafka is None or (pid := kafka.running_pid()) is None:
        console.print(f"kafka: not running (data dir {data_dir})")
        return 1
    serving = _serves(kafka.bootstrap)
    console.print(
        f"kafka: running on {kafka.bootstrap} (controller {kafka.config.controller_port}, "
        f"pid {pid}, {'serving' if serving else 'NOT answering yet'}, data dir {data_dir})"
    )
    return 0 if serving else 1


def _serves(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=5)
    except Exception:  # any client error means: not serving
        return False
    return True

