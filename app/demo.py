"""``anomstream demo``: the whole pipeline on one machine, started and stopped with one command.

It starts a local Kafka broker (unless one is configured), creates the topics, writes the
detector and alerting configurations into its work directory, and runs as subprocesses: the
market and ops generators (replayed faster than real time), detection workers in one consumer
group, the Parquet sink, the alerter (delivering to a webhook receiver that the demo itself runs
and whose messages it prints) and the dashboard. Ctrl-C or SIGTERM (or ``--duration``) stops
everything in order: generators first, then the services, then the broker.

Both feeds share one clock (the same start, interval and replay speed), so the result topic
carries one advancing stream of detection times. The hourly bookstore feed stays out of the live
demo: at its hourly cadence it would need hours of replay to get past the detectors' warm-up;
``anomstream generate bookstore --evaluate`` shows it.

The alert rule pages on the detector's own decision (``anomalyDecision``: the record's score
against the record's threshold) at the upward crossing, once per incident: the detector holds
its score while the anomaly lasts, and the rule resolves after three intervals under 60. The
summary line counts pages per kind of injected anomaly against the labels (``incident_report``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from common.kafka_security import PLAINTEXT, KafkaSecurity, security_flags
from contract.records import (
    DETECTION_PERIOD_START_TIME,
    TIMESERIES_ID,
    format_time,
    parse_time,
    timeseries_id,
)

if TYPE_CHECKING:
    from app.kafka_local import LocalKafka

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = ".anomstream-demo"
INTERVAL_SECONDS = 60

# (detector name, measure, dimensions, match, aggregation) per feed.
DetectorRow = tuple[str, str, tuple[str, ...], dict[str, str], str]
MARKET_DETECTORS: tuple[DetectorRow, ...] = (
    ("market-price", "price", ("instrument",), {}, "last"),
    ("market-volume", "volume", ("instrument",), {}, "sum"),
    ("market-spread", "spread_bps", ("instrument",), {}, "last"),
)
OPS_DETECTORS: tuple[DetectorRow, ...] = (
    ("ops-cpu", "cpu_util", ("host",), {"entity": "host"}, "avg"),
    ("ops-latency", "latency_ms", ("host",), {"entity": "host"}, "avg"),
    ("ops-errors", "error_count", ("host",), {"entity": "host"}, "sum"),
    ("ops-gpu", "gpu_util", ("host", "gpu"), {"entity": "gpu"}, "avg"),
    ("ops-tflops", "effective_tflops", ("job",), {"entity": "job"}, "avg"),
    ("ops-grad-norm", "grad_norm", ("job", "layer"), {"entity": "layer"}, "last"),
)
# Per-detector parameters, as a user would set them for the measure (docs/detector.md, "Tuning
# for your series"): volumes, spreads and latencies have noise proportional to their level, so
# they are modelled in log space; each measure ignores moves its desk or on-call engineer would
# shrug at: 1.5 % on a price, up to 3x the usual volume or spread (a volatile regime alone
# nearly doubles them; bursts and blow-outs are 5-12x), 10 CPU points, 8 errors.
DETECTOR_PARAMS: dict[str, dict[str, Any]] = {
    "market-price": {"ratio_margin": 0.015},
    "market-volume": {"transform": "log", "ratio_margin": 2.0},
    "market-spread": {"transform": "log", "ratio_margin": 2.0},
    "ops-cpu": {"absolute_margin": 10},
    "ops-latency": {"transform": "log", "ratio_margin": 0.5},
    "ops-errors": {"absolute_margin": 8},
    "ops-gpu": {"ratio_margin": 0.3},
    "ops-grad-norm": {"ratio_margin": 0.5},
}
# An incident starts where the score crosses the record's own threshold upward, and the score
# holds while the anomaly lasts: page at the crossing, resolve after 3 intervals under 60.
ALERT_RULE: dict[str, Any] = {
    "name": "demo-anomalies",
    "detectors": ["*"],
    "fire_after": {"m": 1, "n": 1},
    "resolve_after": 3,
    "severity": "warning",
    "repeat_interval": "1d",
}


class DemoError(Exception):
    """The demo cannot start or a service died; the message says which and where its log is."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    workdir: Path
    bootstrap: str | None = None
    duration: float | None = None
    start: float | None = None  # epoch seconds of the first point; None: end at the wall time
    seed: int = 0
    points: int = 3000
    speed: float = 600.0
    instruments: int = 4
    hosts: int = 2
    workers: int = 2
    partitions: int = 2
    dashboard_port: int = 8501
    # How to reach a ``bootstrap`` broker; the demo's own broker is PLAINTEXT.
    security: KafkaSecurity = PLAINTEXT


@dataclass(frozen=True, slots=True)
class Topics:
    market: str
    ops: str
    results: str
    dead_letter: str
    repartition: str
    state: str

    @classmethod
    def named(cls, suffix: str) -> Topics:
        return cls(
            *(
                f"demo-{name}{suffix}"
                for name in ("market", "ops", "results", "dead-letter", "repartition", "state")
            )
        )


def _security_section(security: KafkaSecurity) -> dict[str, Any]:
    """The YAML form of ``security``: secrets stay references (variable names, file paths)."""
    return security.model_dump(mode="json", exclude_none=True)


def detect_config(
    bootstrap: str,
    topics: Topics,
    group: str,
    partitions: int,
    security: KafkaSecurity = PLAINTEXT,
) -> dict[str, Any]:
    """The detection workers' configuration: one detector per measure of each feed."""
    detectors = []
    for topic, table in ((topics.market, MARKET_DETECTORS), (topics.ops, OPS_DETECTORS)):
        for name, measure, dimensions, match, aggregation in table:
            spec: dict[str, Any] = {
                "name": name,
                "input": topic,
                "measure": measure,
                "dimensions": list(dimensions),
                "aggregation": aggregation,
                "interval": f"{INTERVAL_SECONDS}s",
            }
            if match:
                spec["match"] = dict(match)
            if name in DETECTOR_PARAMS:
                spec["params"] = dict(DETECTOR_PARAMS[name])
            detectors.append(spec)
    return {
        "kafka": {
            "bootstrap": bootstrap,
            "group_id": group,
            **({"security": _security_section(security)} if security != PLAINTEXT else {}),
        },
        "topics": {
            "output": topics.results,
            "dead_letter": topics.dead_letter,
            "repartition": topics.repartition,
            "state": topics.state,
            "partitions": partitions,
        },
        "worker": {"snapshot_interval": "10s"},
        "detectors": detectors,
    }


def alert_config(
    bootstrap: str,
    topics: Topics,
    group: str,
    webhook_url: str,
    state_dir: Path,
    dashboard: str,
    security: KafkaSecurity = PLAINTEXT,
) -> dict[str, Any]:
    return {
        "bootstrap_servers": bootstrap,
        **({"kafka_security": _security_section(security)} if security != PLAINTEXT else {}),
        "result_topic": topics.results,
        "group_id": group,
        "instance_id": f"{group}-0",
        # The demo's topics are new: read them from the start so no early alert is missed.
        "auto_offset_reset": "earliest",
        "state_dir": str(state_dir),
        "dashboard_url": dashboard,
        "receivers": [{"name": "demo-webhook", "url": webhook_url, "tags": ["demo"]}],
        "routes": {"warning": ["demo"], "critical": ["demo"]},
        "rules": [ALERT_RULE],
        "grouping": {"window": "1m", "by": ["rule", "detector"]},
        "delivery": {"initial_backoff": "1s", "max_backoff": "10s", "timeout": "5s"},
    }


class WebhookReceiver:
    """An HTTP endpoint for apprise ``json://`` posts: prints each alert, appends it to a file."""

    def __init__(
        self,
        log_path: Path | None,
        show: Callable[[str, str], None],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.log_path = log_path
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                try:
                    payload = json.loads(self.rfile.read(length))
                    title, body = str(payload["title"]), str(payload["message"])
                except (ValueError, KeyError, TypeError):
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                receiver._record(title, body)
                show(title, body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/alerts"

    def _record(self, title: str, body: str) -> None:
        entry = {"received": format_time(time.time()), "title": title, "message": body}
        with self._lock:
            self.messages.append(entry)
            if self.log_path is not None:
                with self.log_path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(entry) + "\n")

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def start(self) -> None:
        self._thread.start()

    def serve(self, stop: threading.Event) -> None:
        """Serve in the calling thread's stead until ``stop`` is set."""
        self._thread.start()
        stop.wait()
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass(frozen=True)
class RestartPolicy:
    """When a service that exited is started again: after ``first_delay_s``, doubling up to
    ``max_delay_s``, at most ``max_restarts`` times (a service that keeps failing is a fault to
    show, not to hide behind restarts).

    >>> policy = RestartPolicy(max_restarts=3, first_delay_s=1.0, max_delay_s=3.0)
    >>> [policy.delay(n) for n in range(4)]
    [1.0, 2.0, 3.0, None]
    """

    max_restarts: int = 5
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay(self, restarts: int) -> float | None:
        """Seconds to wait before restart number ``restarts + 1``; None: give up."""
        if restarts >= self.max_restarts:
            return None
        return min(self.first_delay_s * 2**restarts, self.max_delay_s)


@dataclass
class Child:
    """One service of the demo: an ``anomstream`` sub-command in its own process."""

    name: str
    args: list[str]
    log_path: Path
    finishes: bool = False  # a generator ends by itself; a service must not
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    restart_at: float | None = None  # when an exited service is due to start again
    env: dict[str, str] = field(default_factory=dict, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        if self._log is not None:
            self._log.close()
        self.env = env
        self._log = self.log_path.open("ab")
        command = [
            sys.executable,
            "-c",
            "import sys; from app.cli import main; sys.exit(main())",
        ]
        # Own session: a Ctrl-C in the terminal reaches the demo only, which stops the
        # services in order instead of all at once.
        self.process = subprocess.Popen(
            [*command, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def show_alert(console: Any, title: str, body: str) -> None:
    from rich.panel import Panel

    style = "green" if title.startswith("[RESOLVED]") else "red"
    console.print(Panel(body, title=f"webhook received: {title}", border_style=style))


def serve_webhook(host: str, port: int, console: Any) -> None:
    """Run only the webhook receiver (the docker-compose ``webhook`` service) until SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    receiver = WebhookReceiver(
        None, lambda title, body: show_alert(console, title, body), host, port
    )
    console.print(f"webhook: printing alerts posted to json://{host}:{receiver.port}/alerts")
    receiver.serve(stop)


def prepare_workdir(workdir: Path) -> Path:
    """An empty work directory: created, or emptied when an earlier demo made it."""
    workdir = workdir.expanduser().absolute()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise DemoError(
                f"{workdir} exists and was not made by the demo; choose another --workdir"
            )
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by anomstream demo; emptied by the next run\n")
    return workdir


def dashboard_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class Demo:
    def __init__(self, options: DemoOptions, console: Any,
                 restarts: RestartPolicy = RestartPolicy()) -> None:
        self.options = options
        self.console = console
        self.restarts = restarts
        self.stop = threading.Event()
        self.children: list[Child] = []
        self.kafka: LocalKafka | None = None
        self.metrics_ports: list[int] = []
        self.webhook: WebhookReceiver | None = None

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def show_alert(self, title: str, body: str) -> None:
        show_alert(self.console, title, body)

    def run(self) -> int:
        options = self.options
        workdir = prepare_workdir(options.workdir)
        try:
            bootstrap = self._broker(workdir)
            # A broker we did not start may hold an earlier demo's topics: use fresh names.
            suffix = "" if self.kafka is not None else f"-{uuid.uuid4().hex[:8]}"
            topics = Topics.named(suffix)
            self._create_topics(bootstrap, topics)
            self.webhook = WebhookReceiver(workdir / "alerts.jsonl", self.show_alert)
            self.webhook.start()
            self._start_children(workdir, bootstrap, topics, suffix)
            self._print_urls(workdir, bootstrap, topics)
            return self._supervise(workdir)
        finally:
            self._shutdown()

    def _broker(self, workdir: Path) -> str:
        if self.options.bootstrap:
            from common.kafka_io import KafkaUnavailable, check_connection

            try:
                check_connection(self.options.bootstrap, self.options.security)
            except KafkaUnavailable as error:
                raise DemoError(str(error)) from None
            self.say(f"kafka: using the configured broker {self.options.bootstrap}")
            return self.options.bootstrap
        from app.kafka_local import KafkaError, LocalKafka, free_port

        broker_port = free_port()
        controller_port = free_port()
        while controller_port == broker_port:
            controller_port = free_port()
        kafka = LocalKafka(workdir / "kafka", port=broker_port, controller_port=controller_port,
                           progress=lambda line: self.say(f"kafka: {line}"))
        self.kafka = kafka
        with self.console.status("starting the local Kafka broker (jars fetched once with mvn)"):
            try:
                kafka.start()
            except KafkaError as error:
                raise DemoError(f"cannot start the local Kafka broker: {error}") from None
        self.say(f"kafka: local broker on {kafka.bootstrap} (data in {workdir / 'kafka'})")
        return kafka.bootstrap

    def _create_topics(self, bootstrap: str, topics: Topics) -> None:
        from confluent_kafka import KafkaException

        from common.kafka_io import create_topics

        try:
            create_topics(
                bootstrap,
                [topics.market, topics.ops, topics.results],
                partitions=self.options.partitions,
                security=self.options.security,
                timeout_s=30.0,
            )
        except (KafkaException, TimeoutError) as error:
            raise DemoError(f"cannot create the demo topics on {bootstrap}: {error}") from None

    def _start_children(self, workdir: Path, bootstrap: str, topics: Topics, suffix: str) -> None:
        from app.kafka_local import free_port

        options = self.options
        logs = workdir / "logs"
        lake = workdir / "lake"
        dashboard_url = f"http://127.0.0.1:{options.dashboard_port}"
        assert self.webhook is not None
        detect_yaml = workdir / "detect.yaml"
        detect_yaml.write_text(
            yaml.safe_dump(
                detect_config(bootstrap, topics, f"demo-detect{suffix}", options.partitions,
                              options.security),
                sort_keys=False,
            )
        )
        alerts_yaml = workdir / "alerts.yaml"
        alerts_yaml.write_text(
            yaml.safe_dump(
                alert_config(
                    bootstrap,
                    topics,
                    f"demo-alerter{suffix}",
                    self.webhook.url,
                    workdir / "alert-state",
                    dashboard_url,
                    options.security,
                ),
                sort_keys=False,
            )
        )
        self.metrics_ports = [free_port() for _ in range(options.workers)]
        for index, port in enumerate(self.metrics_ports, start=1):
            self.children.append(
                Child(
                    f"detect-{index}",
                    [
                        "detect",
                        "--config",
                        str(detect_yaml),
                        "--instance-id",
                        f"demo-worker-{index}{suffix}",
                        "--metrics-port",
                        str(port),
                    ],
                    logs / f"detect-{index}.log",
                )
            )
        self.children.append(
            Child(
                "sink",
                [
                    "sink",
                    "parquet",
                    "--out",
                    str(lake),
                    "--topic",
                    topics.results,
                    "--bootstrap",
                    bootstrap,
                    "--group",
                    f"demo-sink{suffix}",
                    "--instance-id",
                    f"demo-sink{suffix}",
                    "--max-span",
                    "6h",
                    "--idle-flush",
                    "2",
                    *security_flags(options.security),
                ],
                logs / "sink.log",
            )
        )
        self.children.append(
            Child("alert", ["alert", "--config", str(alerts_yaml)], logs / "alert.log")
        )
        self.children.append(
            Child(
                "dashboard",
                [
                    "dashboard",
                    "--lake",
                    str(lake),
                    "--port",
                    str(options.dashboard_port),
                    "--refresh-seconds",
                    "5",
                ],
                logs / "dashboard.log",
            )
        )
        # One clock for both feeds, set so that the last point's time is the wall time at which
        # the replay reaches it.
        span = options.points * INTERVAL_SECONDS
        first = options.start
        if first is None:
            first = (time.time() + span / options.speed - span) // 60 * 60
        start = format_time(first)
        for feed, topic, sizing in (
            ("market", topics.market, ["--instruments", str(options.instruments)]),
            ("ops", topics.ops, ["--hosts", str(options.hosts)]),
        ):
            self.children.append(
                Child(
                    f"generate-{feed}",
                    [
                        "generate",
                        feed,
                        "--topic",
                        topic,
                        "--bootstrap",
                        bootstrap,
                        "--partitions",
                        str(options.partitions),
                        "--labels",
                        str(workdir / f"{feed}.labels.json"),
                        "--seed",
                        str(options.seed),
                        "--start",
                        start,
                        "--interval",
                        f"{INTERVAL_SECONDS}s",
                        "--points",
                        str(options.points),
                        "--speed",
                        str(options.speed),
                        "--no-progress",
                        *sizing,
                        *security_flags(options.security),
                    ],
                    logs / f"generate-{feed}.log",
                    finishes=True,
                )
            )
        env = dict(os.environ)
        # The children import this checkout, whatever the state of the installed package.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        for child in self.children:
            child.start(env)

    def _print_urls(self, workdir: Path, bootstrap: str, topics: Topics) -> None:
        from rich.table import Table

        assert self.webhook is not None
        table = Table(title="anomstream demo", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("dashboard", f"http://127.0.0.1:{self.options.dashboard_port}/")
        table.add_row(
            "alert webhook", f"http://127.0.0.1:{self.webhook.port}/alerts (printed here)"
        )
        for index, port in enumerate(self.metrics_ports, start=1):
            table.add_row(f"detect-{index} metrics", f"http://127.0.0.1:{port}/metrics")
        table.add_row(
            "kafka", f"{bootstrap}  topics {topics.market}, {topics.ops} -> {topics.results}"
        )
        table.add_row("lake", str(workdir / "lake"))
        table.add_row("labels", f"{workdir / 'market.labels.json'}, {workdir / 'ops.labels.json'}")
        table.add_row("logs", str(workdir / "logs"))
        stop = (
            f"after {self.options.duration:g} s or Ctrl-C"
            if self.options.duration is not None
            else "Ctrl-C"
        )
        table.add_row("stop", stop)
        self.console.print(table)

    def _supervise(self, workdir: Path) -> int:
        began = time.monotonic()
        deadline = None if self.options.duration is None else began + self.options.duration
        next_status = began + 15.0
        dashboard_up = False
        finished: set[str] = set()
        while not self.stop.wait(0.5):
            now = time.monotonic()
            for child in self.children:
                code = child.exit_code()
                if code is None or child.name in finished:
                    continue
                if child.finishes:
                    finished.add(child.name)
                    if code == 0:
                        self.say(f"{child.name}: done (replayed {self.options.points} points)")
                        continue
                    # Not restarted: a generator started again would replay its feed from the
                    # beginning, duplicating the records it sent.
                    raise DemoError(
                        f"{child.name} exited with code {code}; its log ({child.log_path}) "
                        f"ends:\n{child.log_tail()}"
                    )
                self._restart(child, code, now)
            if not dashboard_up and dashboard_ready(self.options.dashboard_port):
                dashboard_up = True
                self.say(f"dashboard: serving on http://127.0.0.1:{self.options.dashboard_port}/")
            if now >= next_status:
                next_status = now + 15.0
                self.say(self._status_line(workdir, now - began))
            if deadline is not None and now >= deadline:
                self.say(f"demo: {self.options.duration:g} s are up, stopping")
                break
        return 0

    def _restart(self, child: Child, code: int, now: float) -> None:
        """A service exited: schedule its restart, start it when due, or give up."""
        from rich.markup import escape

        if child.restart_at is None:
            delay = self.restarts.delay(child.restarts)
            if delay is None:
                raise DemoError(
                    f"{child.name} exited with code {code} after {child.restarts} restart(s); "
                    f"its log ({child.log_path}) ends:\n{child.log_tail()}"
                )
            child.restart_at = now + delay
            self.say(
                f"[yellow]{child.name} exited with code {code}; restarting it in {delay:g} s "
                f"(restart {child.restarts + 1} of {self.restarts.max_restarts}); its log "
                f"({child.log_path}) ends:[/yellow]\n{escape(child.log_tail(5))}"
            )
        elif now >= child.restart_at:
            child.restarts += 1
            child.restart_at = None
            child.start(child.env)
            self.say(f"{child.name}: restarted")

    def _status_line(self, workdir: Path, elapsed: float) -> str:
        assert self.webhook is not None
        files = len(list((workdir / "lake").glob("dt=*/*.parquet")))
        return (
            f"[dim]t+{elapsed:.0f}s: lake {files} file(s), {self.webhook.count()} alert "
            "message(s) received[/dim]"
        )

    def _shutdown(self) -> None:
        generators = [child for child in self.children if child.finishes]
        services = [child for child in self.children if not child.finishes]
        for group in (generators, services):
            running = [child for child in group if child.exit_code() is None]
            if running:
                self.say(f"stopping {', '.join(child.name for child in running)}")
            for child in group:
                child.terminate()
            deadline = time.monotonic() + 30.0
            for child in group:
                child.wait(deadline)
        if self.webhook is not None:
            self.webhook.stop()
        if self.kafka is not None:
            self.say("stopping the local Kafka broker")
            self.kafka.stop()


# A label that began this close to the run's end can go unpaged without a miss: a frozen value
# needs up to 10 intervals of repeats to be told from a pause, and the alerter, stopped with the
# sink, may be some seconds (tens of intervals at the replay speed) behind the lake's newest row.
TOO_LATE_INTERVALS = 30


@dataclass(slots=True)
class KindTally:
    """Of one kind of injected anomaly: labels that began inside the run, how many of them were
    paged, how many of the others had their page still in the alerter's outbox when the demo
    stopped, began while an incident of their series was still open (one page per incident: the
    alerter does not page again) or too late in the run to tell (``TOO_LATE_INTERVALS``), and
    how many were declared RESOLVED before the label ended."""

    labelled: int = 0
    paged: int = 0
    queued: int = 0
    too_late: int = 0
    in_open_incident: int = 0
    resolved_early: int = 0

    def __str__(self) -> str:
        notes = [
            f"{count} {what}"
            for count, what in (
                (self.queued, "still queued when the demo stopped"),
                (self.in_open_incident, "inside an open incident"),
                (self.too_late, "too late to tell"),
            )
            if count
        ]
        return f"{self.paged}/{self.labelled}" + (f" ({', '.join(notes)})" if notes else "")


@dataclass(frozen=True, slots=True)
class Notified:
    """One series of one alert message: its id, the message's interval, its incident's start."""

    kind: str  # FIRING, STILL FIRING, RESOLVED
    series_id: str
    start: float
    incident_start: float


def notified(title: str, body: str) -> list[Notified]:
    """The series an alert message lists (``sinks.alerting.messages``), in order.

    >>> body = ("- ops-gpu / gpu_util: gpu=0, host=a\\n  value 0\\n"
    ...         "  interval 2026-01-01T00:05:00.000Z - 2026-01-01T00:06:00.000Z\\n"
    ...         "  incident since 2026-01-01T00:01:00.000Z, 5 min so far\\n"
    ...         "  http://x/?series=abc")
    >>> [(n.kind, n.series_id, n.start - n.incident_start) for n in notified("[FIRING] r", body)]
    [('FIRING', 'abc', 240.0)]
    """
    kind = title.split("]", 1)[0].lstrip("[")
    found: list[Notified] = []
    start = incident = 0.0
    for line in body.splitlines():
        text = line.strip()
        if text.startswith("interval "):
            start = parse_time(text.removeprefix("interval ").split(" - ")[0]).timestamp()
        elif text.startswith("incident "):
            first = text.removeprefix("incident ").removeprefix("since ")
            incident = parse_time(first.split(" ")[0].rstrip(",")).timestamp()
        elif "?series=" in text:
            found.append(Notified(kind, text.split("?series=", 1)[1], start, incident))
    return found


def _open_at(items: list[Notified], moment: float) -> bool:
    """Whether one series' alert messages show an incident paged before ``moment`` and not
    resolved before it."""
    resolved: dict[float, float] = {}
    for n in items:
        if n.kind == "RESOLVED":
            resolved[n.incident_start] = min(n.start, resolved.get(n.incident_start, math.inf))
    return any(
        n.kind == "FIRING" and n.start < moment <= resolved.get(n.incident_start, math.inf)
        for n in items
    )


def incident_report(
    labels: list[dict[str, Any]], messages: list[dict[str, str]], run_end: float,
    queued: list[dict[str, str]] | None = None,
) -> tuple[dict[str, KindTally], int]:
    """Pages per kind of anomaly against the labels, and pages on anomaly-free series.

    ``labels`` are the feeds' label documents; ``messages`` the alert messages received (title,
    message); ``run_end`` the start of the newest result, so a label that began later is not
    counted. A label is paged when a FIRING of its series starts inside it (or within three
    intervals after its last point: a score needs the point to be seen); one that is not is
    still queued if such a FIRING is among ``queued`` (the alerter's outbox, not delivered when
    the demo stopped), else, if it began while an incident of its series was open (paged at its
    start, not yet resolved), inside an open incident; else, if it began within
    ``TOO_LATE_INTERVALS`` of ``run_end``, too late to tell. It was resolved early when the
    RESOLVED of an incident that began inside it came before its last point.
    """
    tables = {row[1]: row for row in (*MARKET_DETECTORS, *OPS_DETECTORS)}
    grace = 3 * INTERVAL_SECONDS
    by_series: dict[str, list[Notified]] = {}
    for message in messages:
        for item in notified(message["title"], message["message"]):
            by_series.setdefault(item.series_id, []).append(item)
    waiting: dict[str, list[Notified]] = {}
    for message in queued or []:
        for item in notified(message["title"], message["message"]):
            waiting.setdefault(item.series_id, []).append(item)
    tallies: dict[str, KindTally] = {}
    labelled_series: set[str] = set()
    for document in labels:
        for label in document["labels"]:
            name, measure, dims, _match, _aggregation = tables[label["measure"]]
            series_id = timeseries_id(name, measure, {d: label["dimensions"][d] for d in dims})
            labelled_series.add(series_id)
            first = parse_time(label["start"]).timestamp()
            last = parse_time(label["end"]).timestamp()
            if first > run_end:
                continue
            tally = tallies.setdefault(label["kind"], KindTally())
            tally.labelled += 1
            items = by_series.get(series_id, [])
            if any(n.kind == "FIRING" and first <= n.start <= last + grace for n in items):
                tally.paged += 1
            elif any(n.kind == "FIRING" and first <= n.start <= last + grace
                     for n in waiting.get(series_id, [])):
                tally.queued += 1
            elif _open_at(items, first):
                tally.in_open_incident += 1
            elif first > run_end - TOO_LATE_INTERVALS * INTERVAL_SECONDS:
                tally.too_late += 1
            if any(
                n.kind == "RESOLVED" and first <= n.incident_start <= last and n.start <= last
                for n in items
            ):
                tally.resolved_early += 1
    quiet_pages = sum(
        1 for series_id, items in by_series.items() if series_id not in labelled_series
        for n in items if n.kind == "FIRING"
    )
    return tallies, quiet_pages


def queued_messages(workdir: Path) -> list[dict[str, str]]:
    """The notifications still in the alerter's outbox (saved with its state) when the demo
    stopped: the alerter delivers them at its next start."""
    from sinks.alerting.store import load

    path = workdir / "alert-state" / "alerter-state.json"
    if not path.exists():
        return []
    return [{"title": e["title"], "message": e["body"]} for e in load(path).outbox]


def summary(workdir: Path) -> str:
    """What the run left behind: series and rows in the lake, labels, alert messages, and the
    pages per kind of injected anomaly."""
    from sinks.lake import query

    workdir = workdir.expanduser().absolute()
    lake = workdir / "lake"
    counts = query(
        lake,
        f'SELECT count(*) AS n, count(DISTINCT "{TIMESERIES_ID}") AS s,'
        f' epoch(max("{DETECTION_PERIOD_START_TIME}")) AS newest FROM scores',
    )
    row = counts.to_pylist()[0]
    documents = []
    for feed in ("market", "ops"):
        path = workdir / f"{feed}.labels.json"
        if path.exists():
            documents.append(json.loads(path.read_text(encoding="utf-8")))
    labels = sum(len(document["labels"]) for document in documents)
    series = sum(len(document["series"]) for document in documents)
    alerts_path = workdir / "alerts.jsonl"
    messages = (
        [json.loads(line) for line in alerts_path.read_text().splitlines()]
        if alerts_path.exists() else []
    )
    tallies, quiet_pages = incident_report(
        documents, messages, row["newest"] or 0.0, queued_messages(workdir)
    )
    per_kind = ", ".join(f"{kind} {tally}" for kind, tally in sorted(tallies.items()))
    early = sum(tally.resolved_early for tally in tallies.values())
    return (
        f"demo: lake {lake} holds {row['n']} results of {row['s']} series "
        f"({series} generated); {labels} anomalies injected (labels in {workdir}); "
        f"{len(messages)} alert message(s) received ({alerts_path})\n"
        f"demo: pages per kind of anomaly (paged/labelled in the run): {per_kind or 'none'}; "
        f"{quiet_pages} page(s) on anomaly-free series; {early} RESOLVED before the label ended"
    )
