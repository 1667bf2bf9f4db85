"""Helpers of the ``anomstream detect`` integration tests: configs, worker processes, topics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from app.kafka_local import free_port
from common.kafka_io import consumer_config
from common.retry import Backoff, retry

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"num_trees": 10, "sample_size": 64, "warmup": 16}


def write_config(
    path: Path,
    bootstrap: str,
    *,
    group: str,
    input_topic: str,
    output: str,
    dead_letter: str,
    repartition: str,
    state: str,
    partitions: int = 2,
    worker: Mapping[str, Any] | None = None,
    detectors: list[dict[str, Any]] | None = None,
) -> Path:
    config = {
        "kafka": {
            "bootstrap": bootstrap,
            "group_id": group,
            "session_timeout": 6000,
            "transaction_timeout": 10000,
        },
        "topics": {
            "output": output,
            "dead_letter": dead_letter,
            "repartition": repartition,
            "state": state,
            "partitions": partitions,
        },
        # The spill store in the test's directory: a killed worker's file goes with it.
        "worker": {"snapshot_interval": "1s", "commit_interval": "100ms",
                   "spill_dir": str(path.parent / "spill"), **(worker or {})},
        "detectors": detectors
        or [
            {
                "name": "cpu",
                "input": input_topic,
                "measure": "value",
                "dimensions": ["host"],
                "aggregation": "last",
                "interval": "1s",
                "params": SMALL_MODEL,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class WorkerProcess:
    """``python -m app.cli detect`` in a subprocess, with its log and metrics port."""

    def __init__(self, config: Path, instance: str, log_dir: Path,
                 stages: str = "route,score", score_processes: int = 1) -> None:
        self.instance = instance
        self.port = free_port()
        self.log_path = log_dir / f"worker-{instance}-{stages.replace(',', '-')}.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "detect", "--config", str(config),
             "--instance-id", instance, "--metrics-port", str(self.port), "--stages", stages,
             "--score-processes", str(score_processes)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""
        except OSError:
            return 0, ""

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        _status, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def wait_ready(self, timeout_s: float = 90) -> None:
        wait_for(lambda: self.get("/readyz")[0] == 200 or self.process.poll() is not None,
                 timeout_s, f"worker {self.instance} ready")
        assert self.process.poll() is None, self.log()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            raise AssertionError(f"worker {self.instance} ignored SIGTERM\n{self.log()}") from None

    def children(self) -> list[int]:
        """The pids of the worker's child processes: its score processes and multiprocessing's
        resource tracker."""
        pids = []
        for task in Path(f"/proc/{self.process.pid}/task").glob("*"):
            with contextlib.suppress(OSError):  # the thread or the process ended meanwhile
                pids.extend(int(pid) for pid in (task / "children").read_text().split())
        return pids

    def score_processes(self) -> list[int]:
        """The pids of the worker's score processes (multiprocessing's spawned children)."""
        return [pid for pid in self.children()
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def produce(bootstrap: str, topic: str, records: Iterable[tuple[str | None, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value in records:
        producer.produce(topic, value, key)
        producer.poll(0)
    assert producer.flush(30) == 0


def point(host: str, t_ms: int, value: float) -> tuple[str, bytes]:
    return host, json.dumps({"timestamp": t_ms, "value": value, "host": host}).encode()


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60) -> list[Any]:
    """Committed records of ``topic`` up to its end as of the call; none if it does not exist.

    The end is the last stable offset; a partition is done once the reader's position reaches
    it (a transaction marker may be the last offset, so no record need sit at ``end - 1``),
    which also holds while workers keep writing past it.
    """
    consumer = Consumer(consumer_config(bootstrap))
    try:
        metadata = consumer.list_topics(topic, timeout=30).topics[topic]
        if metadata.error is not None:
            if metadata.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return []
            raise KafkaException(metadata.error)
        ends = {}
        for partition in metadata.partitions:
            # Just after a broker restart its partitions answer NOT_LEADER for a moment.
            low, high = retry(
                lambda p=partition: consumer.get_watermark_offsets(
                    TopicPartition(topic, p), 30, False
                ),
                f"reading the end offset of {topic}[{partition}]",
                backoff=Backoff(first_s=0.1, max_s=1.0, give_up_s=30.0),
            )
            if high > low:
                ends[partition] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        messages: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise AssertionError(f"reading {topic} to its end took over {timeout_s} s")
            for message in consumer.consume(500, 0.2):
                if message.error() is not None:
                    raise KafkaException(message.error())
                if message.offset() < ends.get(message.partition(), -1):
                    messages.append(message)
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
        return messages
    finally:
        consumer.close()


def results(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """The result records of ``topic`` (read_committed), as dicts."""
    return [json.loads(m.value()) for m in read_topic(bootstrap, topic)]


def by_series(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records per timeseriesId in period order; asserts there is one record per period."""
    series: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        series.setdefault(record["timeseriesId"], []).append(record)
    for tsid, items in series.items():
        starts = [r["detectionPeriodStartTime"] for r in items]
        assert len(starts) == len(set(starts)), f"duplicate results for {tsid}"
        items.sort(key=lambda r: r["detectionPeriodStartTime"])
    return series


def wait_for_results(bootstrap: str, topic: str, count: int, timeout_s: float,
                     workers: Iterable[WorkerProcess] = ()) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = results(bootstrap, topic)
        if len(records) >= count:
            return records
        if time.monotonic() > deadline:
            logs = "\n".join(w.log() for w in workers)
            raise AssertionError(f"{len(records)} of {count} results after {timeout_s} s\n{logs}")
        time.sleep(0.5)


def names(prefix: str) -> dict[str, str]:
    """Fresh group and topic names for one test's worker configuration."""
    tag = uuid.uuid4().hex[:8]
    return {
        "group": f"{prefix}-{tag}",
        "output": f"{prefix}-out-{tag}",
        "dead_letter": f"{prefix}-dlq-{tag}",
        "repartition": f"{prefix}-rep-{tag}",
        "state": f"{prefix}-state-{tag}",
    }
