"""The score stage of one worker in several processes, so that it uses several cores
(``anomstream detect --score-processes N``, docs/decisions/0011-score-processes.md).

The worker's process (the parent) runs the route stage and starts N children, each a score
stage under its own instance id derived from the worker's (``score_instance_ids``): its own
transactional id, static group member, spill file and metrics. The children are N members of the
score consumer group, which splits the repartition partitions between them exactly as it does
between workers; exactly-once is the score stage's own, unchanged.

The parent supervises: a child that ends while the worker runs ends the worker, non-zero, with
the child's reason; /healthz and /readyz pass only when they pass in every child; /metrics
carries the children's metrics too, labelled with the process (``worker_process``). Children
die with the parent, also on a ``kill -9`` of it (``PR_SET_PDEATHSIG``), so a restarted worker
never meets a score process of its predecessor except as a fenced transactional id.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from stream.config import DetectConfig
from stream.metrics import HealthServer
from stream.worker.errors import WorkerError
from stream.worker.supervision import Worker

log = logging.getLogger("anomstream.worker")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PROBE_TIMEOUT_S = 2.0
# The label that tells the processes' samples apart on the parent's /metrics.
PROCESS_LABEL = "worker_process"


def score_instance_ids(instance_id: str, count: int) -> list[str]:
    """The children's instance ids: the same for a restarted worker (its score processes fence
    their predecessors' transactions at once), distinct from any other worker's."""
    return [f"{instance_id}.score-{i}" for i in range(count)]


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when the parent dies, whatever kills it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request: it would never fire
        os._exit(1)


def _score_process(
    config: DetectConfig, instance_id: str, log_level: str, parent_pid: int, report: Connection,
) -> None:
    """A child: one score stage, its probes and metrics on a port of its own (sent to the
    parent), its failure's reason sent to the parent before it exits non-zero."""
    _die_with_parent(parent_pid)
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s [{instance_id}]: %(message)s",
    )
    # Ctrl-C reaches the whole process group; the parent stops its children itself (SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = Worker(config, instance_id, ("score",))
        signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
        server = HealthServer(0, worker.metrics, worker.healthy, worker.ready).start()
        report.send(("port", server.port))
        worker.start()
    except Exception as error:
        report.send(("error", f"cannot start: {str(error) or type(error).__name__}"))
        sys.exit(1)
    while not worker.wait(0.5):
        pass
    server.stop()
    if worker.errors:
        report.send(("error", str(worker.errors[0])))
        sys.exit(1)


class _Child:
    def __init__(self, instance_id: str, process: SpawnProcess, report: Connection) -> None:
        self.instance_id = instance_id
        self.process = process
        self.report = report
        self.port: int | None = None
        self.reason: str | None = None

    def receive(self) -> None:
        try:
            while self.report.poll():
                kind, value = self.report.recv()
                if kind == "port":
                    self.port = value
                else:
                    self.reason = value
        except (EOFError, OSError):  # the child is gone; its exit code tells the rest
            pass

    def get(self, path: str) -> tuple[int, str]:
        if self.port is None:
            return 0, ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=PROBE_TIMEOUT_S) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""
        except OSError:
            return 0, ""


class ScoreProcesses:
    """N score stages in child processes of this one; see the module's docstring."""

    def __init__(
        self, config: DetectConfig, instance_id: str, count: int, log_level: str = "INFO",
    ) -> None:
        if not sys.platform.startswith("linux"):
            raise WorkerError("score processes need Linux (children die with the worker "
                              "through prctl(PR_SET_PDEATHSIG))")
        # Each child serves its own probes on a free port; the configured one is the parent's.
        config = config.model_copy(
            update={"worker": config.worker.model_copy(update={"metrics_port": None})}
        )
        context = multiprocessing.get_context("spawn")  # no fork of a process with Kafka threads
        self.children: list[_Child] = []
        for child_id in score_instance_ids(instance_id, count):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_score_process, args=(config, child_id, log_level, os.getpid(), send),
                name=child_id, daemon=True,
            )
            self.children.append(_Child(child_id, process, receive))
        self.stopping = False
        # The pipes and exit codes are read from the main loop and from the probes' threads.
        self._lock = threading.Lock()

    def start(self) -> None:
        for child in self.children:
            child.process.start()

    def failure(self) -> str | None:
        """Why a child ended, if one did: before the worker was stopped, any end is a
        failure; after, a non-zero exit is."""
        with self._lock:
            return self._failure()

    def _failure(self) -> str | None:
        for child in self.children:
            child.receive()
            code = child.process.exitcode
            # A child stopped before it installed its SIGTERM handler ends by the signal.
            if code is None or (self.stopping and code in (0, -signal.SIGTERM)):
                continue
            if child.reason is not None:
                return f"score process {child.instance_id}: {child.reason}"
            if code < 0:
                return (f"score process {child.instance_id} was killed by "
                        f"{signal.Signals(-code).name}")
            return f"score process {child.instance_id} exited with code {code}"
        return None

    def healthy(self) -> bool:
        return self.failure() is None and all(
            child.get("/healthz")[0] == 200 for child in self.children
        )

    def ready(self) -> bool:
        return self.failure() is None and all(
            child.get("/readyz")[0] == 200 for child in self.children
        )

    def stop(self) -> None:
        """SIGTERM to every child still running: each commits, checkpoints and leaves."""
        with self._lock:
            self.stopping = True
            for child in self.children:
                if child.process.exitcode is None and child.process.pid is not None:
                    os.kill(child.process.pid, signal.SIGTERM)

    def join(self, timeout_s: float) -> None:
        for child in self.children:
            child.process.join(timeout_s)
            if child.process.exitcode is None:
                log.warning("score process %s ignored SIGTERM for %.0f s; killing it",
                            child.instance_id, timeout_s)
                child.process.kill()
                child.process.join()

    def families(self) -> Iterator[Metric]:
        """The children's metric families, each sample labelled with its process."""
        for child in self.children:
            status, text = child.get("/metrics")
            if status == 200:
                yield from process_families(text, child.instance_id)


def process_families(text: str, process: str) -> Iterator[Metric]:
    """The metric families of one process's /metrics text, labelled with the process."""
    return _labelled(text_string_to_metric_families(text), process)


def _labelled(families: Iterable[Metric], process: str) -> Iterator[Metric]:
    """``families`` with each sample labelled with ``process``, without the ``_created``
    samples: parsed back from text they are families of their own, which would not merge with
    the samples of the same name inside the parent's counters."""
    for family in families:
        if family.name.endswith("_created"):
            continue
        family.samples = [
            Sample(s.name, {**s.labels, PROCESS_LABEL: process}, s.value, s.timestamp,
                   s.exemplar)
            for s in family.samples if not s.name.endswith("_created")
        ]
        yield family


class MergedMetrics(Collector):
    """A registry for the parent's /metrics: its own metrics and its children's, merged by
    metric family (the same name twice in one exposition is invalid)."""

    def __init__(
        self, own: CollectorRegistry, own_name: str,
        children: Callable[[], Iterable[Metric]],
    ) -> None:
        self.own = own
        self.own_name = own_name
        self.children = children  # the children's families, labelled (ScoreProcesses.families)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for family in [*_labelled(self.own.collect(), self.own_name),
                       *self.children()]:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = family
            else:
                into.samples.extend(family.samples)
        yield from merged.values()
