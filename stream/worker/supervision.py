"""The worker: its stages, one thread each, and whether it is healthy and ready (``/healthz``,
``/readyz``)."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time

from stream.config import DetectConfig
from stream.metrics import WorkerMetrics
from stream.worker.errors import WorkerError
from stream.worker.route import RouteStage
from stream.worker.score import ScoreStage
from stream.worker.topics import ensure_topics
from stream.worker.transaction import Stage

log = logging.getLogger("anomstream.worker")

def resolve_instance_id(config: DetectConfig, instance_id: str | None = None) -> str:
    """The worker's instance id: the one given, else ``kafka.instance_id``, else the host name."""
    return instance_id or config.kafka.instance_id or socket.gethostname()


# The cyclic collector's full passes scan every object of every live model (about 80 ms a pass
# at 10,000 series) and found 6 objects to collect in a whole run: they took 7-8 % of a score
# process's CPU (bench/pipeline.py, 10,000 series, 2 score processes). The worker runs one
# after 1,000 passes of the middle generation instead of 10; the young ones are unchanged.
FULL_COLLECTION_AFTER = 1000


def relax_full_collections() -> None:
    """Make the cyclic collector's full passes rare in this process (``FULL_COLLECTION_AFTER``)."""
    young, middle, _full = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)


STAGES: dict[str, type[RouteStage] | type[ScoreStage]] = {
    RouteStage.name: RouteStage,
    ScoreStage.name: ScoreStage,
}


def check_stages(stages: tuple[str, ...]) -> tuple[str, ...]:
    """The stage names, each once; ``WorkerError`` for none or an unknown one."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise WorkerError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    return tuple(dict.fromkeys(stages))


class Worker:
    """The stages of one worker instance (both by default), one thread each.

    Both stages in one process share one interpreter lock; running ``stages=("route",)`` and
    ``stages=("score",)`` as two processes lets them use two cores.
    """

    def __init__(
        self,
        config: DetectConfig,
        instance_id: str | None = None,
        stages: tuple[str, ...] = tuple(STAGES),
    ) -> None:
        self.stage_names = check_stages(stages)
        self.config = config
        self.instance_id = resolve_instance_id(config, instance_id)
        self.metrics = WorkerMetrics()
        self.stop = threading.Event()
        self.stages: list[Stage] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def healthy(self) -> bool:
        """No stage failed, every loop turns, and none sits on lag without making progress."""
        return not self.errors and all(
            stage.heartbeat.alive() and not stage.stalled() for stage in self.stages
        )

    def ready(self) -> bool:
        return len(self.stages) == len(self.stage_names) and all(
            stage.ready for stage in self.stages
        )

    def start(self) -> None:
        relax_full_collections()
        ensure_topics(self.config)
        for stage_class in (STAGES[name] for name in self.stage_names):
            thread = threading.Thread(target=self._run_stage, args=(stage_class,),
                                      name=stage_class.name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run_stage(self, stage_class: type[RouteStage] | type[ScoreStage]) -> None:
        try:
            stage = stage_class(self.config, self.instance_id, self.metrics, self.stop)
            self.stages.append(stage)
            stage.run()
        except BaseException as error:  # one failed stage stops the worker, with the reason
            log.exception("%s stage failed", stage_class.name)
            self.errors.append(error)
            self.stop.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until both stages end; True if they did."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(thread.is_alive() for thread in self._threads)
