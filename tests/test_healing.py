"""Processes that heal themselves, against real brokers: a broker stopped and a broker killed
under two workers and the sink, fenced clients, and records no rule foresaw.

The broker-outage test starts a broker of its own (the session's broker serves other tests and
must not go away); the others use the session broker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from app.kafka_local import LocalKafka, free_port
from common.kafka_io import consumer_config, create_topics, producer_config
from contract.records import timeseries_id
from detectors import DetectorConfig, RcfDetector
from stream.config import load_config
from stream.metrics import WorkerMetrics
from stream.worker import RouteStage, Worker
from tests.detect_support import (
    ROOT,
    SMALL_MODEL,
    WorkerProcess,
    by_series,
    names,
    point,
    read_topic,
    results,
    wait_for,
    wait_for_results,
    write_config,
)
from tests.test_parquet_sink import assert_lake_equals_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]


def value_of(host_index: int, step: int) -> float:
    return 20.0 + host_index + (step % 7) * 0.5 + (30.0 if step % 41 == 40 else 0.0)


def send_steps(producer: Producer, topic: str, hosts: list[str], steps: range) -> None:
    for step in steps:
        for k, host in enumerate(hosts):
            key, payload = point(host, step * 1000, value_of(k, step))
            producer.produce(topic, payload, key)
        producer.poll(0)


def expected_scores(hosts: list[str], steps: int) -> dict[str, list[float]]:
    """What an undisturbed detector scores per host (the last point leaves its window open)."""
    scores = {}
    for k, host in enumerate(hosts):
        detector = RcfDetector(DetectorConfig.from_dict(SMALL_MODEL))
        scores[host] = [
            detector.update(step, value_of(k, step)).anomaly_score for step in range(steps - 1)
        ]
    return scores


def assert_exactly_the_undisturbed_results(
    got: list[dict[str, Any]], hosts: list[str], steps: int
) -> None:
    series = by_series(got)  # asserts one result per series and period
    assert len(got) == len(hosts) * (steps - 1)
    for host, scores in expected_scores(hosts, steps).items():
        tsid = timeseries_id("cpu", "value", {"host": host})
        assert [r["anomalyScore"] for r in series[tsid]] == pytest.approx(scores)


class SinkProcess:
    """``anomstream sink parquet`` in a subprocess."""

    def __init__(self, bootstrap: str, topic: str, lake: Path, log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "sink", "parquet", "--out", str(lake),
                 "--topic", topic, "--bootstrap", bootstrap, "--group", f"sink-{topic}",
                 "--max-records", "100", "--idle-flush", "0.5"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.mark.timeout(1200)
def test_workers_and_sink_ride_out_a_broker_stop_and_a_broker_kill_9(tmp_path: Path) -> None:
    broker_port, controller_port = free_port(), free_port()
    while controller_port == broker_port:
        controller_port = free_port()
    kafka = LocalKafka(tmp_path / "kafka", port=broker_port, controller_port=controller_port)
    kafka.start()
    bootstrap = kafka.bootstrap
    workers: list[WorkerProcess] = []
    sink: SinkProcess | None = None
    try:
        hosts = [f"h{k}" for k in range(6)]
        steps = 90
        input_topic = f"outage-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, [input_topic], partitions=2)
        topics = names("outage")
        config = write_config(tmp_path / "detect.yaml", bootstrap, input_topic=input_topic,
                              **topics)
        workers = [WorkerProcess(config, f"w{n}", tmp_path) for n in range(2)]
        for worker in workers:
            worker.wait_ready()
        # The sink reads the result topic, which the workers created.
        sink = SinkProcess(bootstrap, topics["output"], tmp_path / "lake", tmp_path / "sink.log")
        producer = Producer(producer_config(bootstrap))

        send_steps(producer, input_topic, hosts, range(0, 30))
        assert producer.flush(30) == 0
        wait_for_results(bootstrap, topics["output"], len(hosts) * 10, 120, workers)

        # A clean stop and start (same data dir and ports) while the next records flow.
        send_steps(producer, input_topic, hosts, range(30, 60))
        kafka.stop()
        time.sleep(3)
        kafka.start()
        assert producer.flush(120) == 0
        # Bounds are generous: on a loaded machine the fenced clients' replacement after the
        # stop takes minutes (seen at load average 12 on 2 cores); a quiet one takes seconds.
        before_kill = len(wait_for_results(bootstrap, topics["output"], len(hosts) * 40, 300,
                                           workers))

        # kill -9 while records flow.
        send_steps(producer, input_topic, hosts, range(60, steps))
        pid = kafka.running_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: kafka.running_pid() is None, 30, "the killed broker to be gone")
        time.sleep(3)
        kafka.start()
        assert producer.flush(120) == 0

        expected = len(hosts) * (steps - 1)
        assert before_kill < expected, "the kill came after all results: nothing was in flight"
        wait_for_results(bootstrap, topics["output"], expected, 300, workers)
        time.sleep(2.0)  # a duplicate would show up now
        got = results(bootstrap, topics["output"])
        # Every process lived through both outages.
        for worker in workers:
            assert worker.process.poll() is None, worker.log()
        assert sink.process.poll() is None, sink.log()
        assert_exactly_the_undisturbed_results(got, hosts, steps)

        wait_for(lambda: lake_rows(tmp_path / "lake") >= expected, 120, "the lake to catch up")
        sink.process.send_signal(signal.SIGTERM)
        assert sink.process.wait(60) == 0, sink.log()
        assert assert_lake_equals_topic(tmp_path / "lake", bootstrap, topics["output"]) == expected
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(30)
        if sink is not None and sink.process.poll() is None:
            sink.process.kill()
            sink.process.wait(30)
        kafka.stop()


def lake_rows(lake: Path) -> int:
    from sinks import lake as lake_module

    return int(lake_module.query(lake, "SELECT count(*) AS n FROM scores").to_pylist()[0]["n"])


def test_a_fenced_worker_rejoins_and_finishes_its_input(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    hosts = [f"f{k}" for k in range(4)]
    steps = 80
    input_topic = f"fenced-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=2)
    topics = names("fenced")
    config = write_config(tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic,
                          **topics)
    worker = WorkerProcess(config, "fenced-0", tmp_path)
    try:
        worker.wait_ready()
        producer = Producer(producer_config(kafka_bootstrap))
        send_steps(producer, input_topic, hosts, range(0, 30))
        assert producer.flush(30) == 0
        wait_for_results(kafka_bootstrap, topics["output"], len(hosts) * 10, 120, [worker])

        # A second producer with the score stage's transactional.id fences the worker's.
        intruder = Producer(producer_config(
            kafka_bootstrap, **{"transactional.id": f"{topics['group']}.fenced-0.score"}
        ))
        intruder.init_transactions(30)
        # A second consumer with the route stage's static member id fences the worker's
        # consumer (the worker sees a _FATAL consume error).
        rival = Consumer(consumer_config(kafka_bootstrap, topics["group"], **{
            "group.instance.id": "fenced-0.route", "session.timeout.ms": 6000,
        }))
        rival.subscribe([input_topic])
        deadline = time.monotonic() + 30
        while not rival.assignment() and time.monotonic() < deadline:
            rival.poll(0.2)
        assert rival.assignment(), "the rival consumer never joined"
        rival.close()
        send_steps(producer, input_topic, hosts, range(30, steps))
        assert producer.flush(30) == 0

        wait_for(
            lambda: worker.metric("anomstream_client_rebuilds_total", stage="route") >= 1
            and worker.metric("anomstream_client_rebuilds_total", stage="score") >= 1,
            30, "both stages to replace their fenced clients",
        )
        got = wait_for_results(kafka_bootstrap, topics["output"], len(hosts) * (steps - 1), 120,
                               [worker])
        time.sleep(1.0)
        got = results(kafka_bootstrap, topics["output"])
        assert worker.process.poll() is None, worker.log()
        assert_exactly_the_undisturbed_results(got, hosts, steps)
        assert worker.get("/healthz")[0] == 200
    finally:
        assert worker.stop() == 0, worker.log()


def test_400_digit_values_are_non_finite_dead_letters_with_one_summary_line(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    input_topic = f"huge-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=1)
    topics = names("huge")
    config = write_config(tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic,
                          partitions=1, **topics)
    huge = int("9" * 400)
    bad = [json.dumps({"timestamp": i * 1000, "value": huge, "host": "x"}).encode()
           for i in range(300)]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i, payload in enumerate(bad):
        producer.produce(input_topic, payload, "x")
        good_key, good = point("y", i * 1000, 1.0 + i % 3)
        producer.produce(input_topic, good, good_key)
    assert producer.flush(30) == 0
    worker = WorkerProcess(config, "huge-0", tmp_path)
    try:
        worker.wait_ready()
        wait_for(lambda: len(read_topic(kafka_bootstrap, topics["dead_letter"])) >= len(bad), 120,
                 "the dead letters")
        wait_for_results(kafka_bootstrap, topics["output"], len(bad) - 1, 120, [worker])
    finally:
        assert worker.stop() == 0, worker.log()
    letters = read_topic(kafka_bootstrap, topics["dead_letter"])
    assert sorted(m.value() for m in letters) == sorted(bad)
    for message in letters:
        headers = {k: v.decode() for k, v in message.headers()}
        assert headers["reason"] == "non_finite", headers
        assert "400 digits" in headers["detail"]
    log = worker.log_path.read_text()
    assert "Traceback" not in log
    summaries = re.findall(r"route: dead-lettered (\d+) records: non_finite \((\d+)\)$", log,
                           re.MULTILINE)
    assert summaries, log[-2000:]
    assert sum(int(total) for total, _ in summaries) == len(bad)
    assert len(summaries) < len(bad) // 10  # lines per interval, not per record


def test_healthz_fails_when_a_stage_has_lag_and_makes_no_progress(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topics = names("stall")
    config_path = write_config(tmp_path / "detect.yaml", kafka_bootstrap,
                               input_topic=f"stall-in-{uuid.uuid4().hex[:8]}",
                               worker={"stall_timeout": "30s"}, **topics)
    config = load_config(config_path)
    worker = Worker(config, "stall-0", ("route",))
    stage = RouteStage(config, "stall-0", worker.metrics, worker.stop)
    worker.stages.append(stage)
    try:
        assert worker.healthy()
        # Nothing to do is no stall, however long it lasts.
        stage.last_progress -= 60
        worker.metrics.stage_lag["route"] = 0
        assert worker.healthy()
        # Records waiting and nothing consumed or committed for longer than stall_timeout.
        worker.metrics.stage_lag["route"] = 5
        assert not worker.healthy()
        stage.last_progress = time.monotonic()
        assert worker.healthy()
    finally:
        stage.consumer.close()


def test_lag_per_stage_comes_from_the_client_statistics() -> None:
    metrics = WorkerMetrics()
    stats = {"topics": {"in": {"partitions": {
        "0": {"app_offset": 10, "ls_offset": 15, "hi_offset": 15},
        "1": {"app_offset": 3, "ls_offset": 3, "hi_offset": 4},
        "2": {"app_offset": -1001, "ls_offset": 50, "hi_offset": 50},  # not assigned
        "-1": {"app_offset": -1001},
    }}}}
    metrics.observe_stats("route", json.dumps(stats))
    assert metrics.stage_lag == {"route": 5}
