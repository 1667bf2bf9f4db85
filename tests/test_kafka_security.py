"""The pipeline against a real secured broker: SCRAM-SHA-512 over TLS, and mutual TLS.

One local broker for the module serves both (app/kafka_local.SecuredListeners): a SASL_SSL
listener with a SCRAM user made at format time and an SSL listener that requires a client
certificate, with certificates made for the test (tests/tls_support.py). ``produce``, ``detect``,
``sink parquet`` and ``alert`` run as the operator runs them, as subprocesses configured through
their YAML files and flags, secrets from environment variables and files.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from confluent_kafka import KafkaException, Producer

from app.kafka_local import LocalKafka, SecuredListeners, free_port
from common.kafka_io import consume_all, create_topics, producer_config
from common.kafka_security import KafkaSecurity
from tests.alerting_support import HttpReceiver, wait_until
from tests.detect_support import SMALL_MODEL, WorkerProcess, by_series, point, wait_for
from tests.tls_support import KEYSTORE_PASSWORD, TlsFiles, make_tls_files

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "anomstream", "scram-secret-7d1f"
PASSWORD_ENV = "ANOMSTREAM_TEST_KAFKA_PASSWORD"
HOSTS, POINTS = ("a", "b"), 60


@dataclass
class SecuredBroker:
    kafka: LocalKafka
    tls: TlsFiles
    password_file: Path


@dataclass(frozen=True)
class Setup:
    """How one kind of client reaches the broker: YAML section, flags, admin config."""

    bootstrap: str
    yaml: dict[str, Any]
    flags: list[str]

    @property
    def security(self) -> KafkaSecurity:
        return KafkaSecurity.model_validate(self.yaml)


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    root = tmp_path_factory.mktemp("secured-kafka")
    tls = make_tls_files(root / "tls")
    ports: set[int] = set()
    while len(ports) < 4:
        ports.add(free_port())
    broker, controller, scram, mtls = sorted(ports)
    password_file = root / "kafka-password"
    password_file.write_text(PASSWORD + "\n")
    listeners = SecuredListeners(scram, mtls, tls.broker_keystore, KEYSTORE_PASSWORD, tls.ca,
                                 ((USER, PASSWORD),))
    with LocalKafka(root / "data", broker, controller, secured=listeners) as kafka:
        yield SecuredBroker(kafka, tls, password_file)


def scram_setup(broker: SecuredBroker) -> Setup:
    return Setup(
        broker.kafka.scram_bootstrap,
        {"protocol": "SASL_SSL",
         "sasl": {"username": USER, "password_env": PASSWORD_ENV},
         "tls": {"ca_file": str(broker.tls.ca)}},
        ["--security-protocol", "SASL_SSL", "--sasl-username", USER,
         "--sasl-password-file", str(broker.password_file), "--tls-ca-file", str(broker.tls.ca)],
    )


def mtls_setup(broker: SecuredBroker) -> Setup:
    tls = broker.tls
    return Setup(
        broker.kafka.mtls_bootstrap,
        {"protocol": "SSL",
         "tls": {"ca_file": str(tls.ca), "cert_file": str(tls.client_cert),
                 "key_file": str(tls.client_key),
                 "key_password_file": str(tls.client_key_passphrase)}},
        ["--security-protocol", "SSL", "--tls-ca-file", str(tls.ca),
         "--tls-cert-file", str(tls.client_cert), "--tls-key-file", str(tls.client_key),
         "--tls-key-password-file", str(tls.client_key_passphrase)],
    )


def anomstream(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, PASSWORD_ENV: PASSWORD}, stdin=subprocess.DEVNULL,
    )


def detect_config(setup: Setup, topics: dict[str, str], group: str) -> str:
    """A worker's YAML on the secured listener of ``setup``: one small 1 s detector."""
    return yaml.safe_dump({
        "kafka": {"bootstrap": setup.bootstrap, "group_id": group, "session_timeout": 6000,
                  "transaction_timeout": 10000, "security": setup.yaml},
        "topics": {"output": topics["output"], "dead_letter": topics["dlq"],
                   "repartition": topics["repart"], "state": topics["state"], "partitions": 2,
                   "replication": 1, "min_insync_replicas": 1},
        "worker": {"snapshot_interval": "1s", "commit_interval": "100ms"},
        "detectors": [{"name": "cpu", "input": topics["input"], "measure": "value",
                       "dimensions": ["host"], "aggregation": "last", "interval": "1s",
                       "params": SMALL_MODEL}],
    })


def write_feed(path: Path) -> Path:
    """Two hosts, one point a second, a spike near the end."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value", "host"])
        for second in range(POINTS):
            for index, host in enumerate(HOSTS):
                value = 50.0 + index + (second % 5) + (400.0 if second == POINTS - 5 else 0.0)
                writer.writerow([f"2026-01-05T00:{second // 60:02d}:{second % 60:02d}Z", value,
                                 host])
    return path


@pytest.mark.parametrize("make_setup", [scram_setup, mtls_setup], ids=["scram-tls", "mtls"])
def test_produce_detect_sink_and_alert_run_end_to_end_against_the_secured_broker(
    secured_broker: SecuredBroker, make_setup: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup: Setup = make_setup(secured_broker)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)  # for this process's own reads of the topics
    run = uuid.uuid4().hex[:8]
    topics = {name: f"{name}-{run}" for name in ("input", "output", "dlq", "repart", "state")}

    produced = anomstream("produce", str(write_feed(tmp_path / "feed.csv")),
                          "--topic", topics["input"], "--dimension-column", "host",
                          "--bootstrap", setup.bootstrap, *setup.flags)
    assert produced.returncode == 0, produced.stderr
    assert f"produced {POINTS * len(HOSTS)} record(s)" in produced.stdout

    detect_yaml = tmp_path / "detect.yaml"
    detect_yaml.write_text(detect_config(setup, topics, f"detect-{run}"))
    log_path = tmp_path / "detect.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "detect", "--config", str(detect_yaml),
             "--instance-id", f"w-{run}"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, PASSWORD_ENV: PASSWORD},
        )
    # Every interval but each host's last (still open: no later record closes it).
    expected = (POINTS - 1) * len(HOSTS)
    try:
        def results_done() -> bool:
            assert worker.poll() is None, log_path.read_text()
            try:
                output = consume_all(setup.bootstrap, topics["output"], security=setup.security)
            except KafkaException:  # the worker has not created the output topic yet
                return False
            return len(output) >= expected

        wait_until(results_done, timeout=180, what="detect's results on the secured broker")
    finally:
        worker.terminate()
        assert worker.wait(60) == 0, log_path.read_text()
    results = [json.loads(m.value()) for m in
               consume_all(setup.bootstrap, topics["output"], security=setup.security)]
    assert len(results) == expected
    assert {r["detectorName"] for r in results} == {"cpu"}
    assert {d["value"] for r in results for d in r["dimensionList"]} == set(HOSTS)

    lake = tmp_path / "lake"
    sunk = anomstream("sink", "parquet", "--out", str(lake), "--topic", topics["output"],
                      "--group", f"sink-{run}", "--stop-after-idle", "3",
                      "--bootstrap", setup.bootstrap, *setup.flags)
    assert sunk.returncode == 0, sunk.stderr
    rows = sum(pq.read_table(path).num_rows for path in lake.rglob("*.parquet"))
    assert rows == expected

    alert_yaml = tmp_path / "alerts.yaml"
    with HttpReceiver("hook", "hook-pw") as receiver:
        alert_yaml.write_text(yaml.safe_dump({
            "bootstrap_servers": setup.bootstrap,
            "kafka_security": setup.yaml,
            "result_topic": topics["output"],
            "group_id": f"alert-{run}",
            "instance_id": f"alert-{run}",
            "auto_offset_reset": "earliest",
            "state_dir": str(tmp_path / "alert-state"),
            "receivers": [{"name": "hook", "url": receiver.url("hook", "hook-pw", "alerts"),
                           "tags": ["warning"]}],
            # Every result pages: the test is about reaching the secured topic, not scoring.
            "rules": [{"name": "every-result", "enter_threshold": 0, "skip_learning": False}],
            "grouping": {"window": "1s"},
        }))
        alerted = anomstream("alert", "--config", str(alert_yaml), "--until-idle", "3")
        assert alerted.returncode == 0, alerted.stderr
        assert receiver.received(), alerted.stderr


def test_a_wrong_password_is_one_line_naming_the_broker_and_exit_2(
    secured_broker: SecuredBroker, tmp_path: Path
) -> None:
    setup = scram_setup(secured_broker)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    flags = [str(wrong) if part == str(secured_broker.password_file) else part
             for part in setup.flags]
    began = time.monotonic()
    result = anomstream("produce", str(write_feed(tmp_path / "feed.csv")), "--topic", "never",
                        "--bootstrap", setup.bootstrap, *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert setup.bootstrap in lines[0]
    assert "Authentication failed" in lines[0]
    assert "not-the-password" not in result.stderr + result.stdout
    # A refusal is final: no waiting out the connect timeout.
    assert time.monotonic() - began < 30


def test_a_detect_config_with_a_wrong_password_fails_in_one_line(
    secured_broker: SecuredBroker, tmp_path: Path
) -> None:
    setup = scram_setup(secured_broker)
    config = tmp_path / "detect.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap": setup.bootstrap,
                  "security": {**setup.yaml, "sasl": {"username": USER,
                                                      "password_env": "WRONG_PASSWORD"}}},
        "topics": {"output": "out"},
        "detectors": [{"name": "cpu", "input": "in", "measure": "v", "interval": "1s"}],
    }))
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "detect", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "WRONG_PASSWORD": "guess-1234"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert setup.bootstrap in lines[0] and "Authentication failed" in lines[0]
    assert "guess-1234" not in result.stderr


def test_a_broker_certificate_from_another_ca_is_one_line_and_exit_2(
    secured_broker: SecuredBroker, tmp_path: Path
) -> None:
    setup = mtls_setup(secured_broker)
    flags = [str(secured_broker.tls.other_ca) if part == str(secured_broker.tls.ca) else part
             for part in setup.flags]
    result = anomstream("sink", "parquet", "--out", str(tmp_path / "lake"), "--topic", "t",
                        "--bootstrap", setup.bootstrap, *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert setup.bootstrap in lines[0] and "certificate verify failed" in lines[0]


def test_a_client_without_certificate_is_refused_by_the_mtls_listener(
    secured_broker: SecuredBroker,
) -> None:
    from common.kafka_io import KafkaUnavailable, check_connection

    no_cert = KafkaSecurity.model_validate(
        {"protocol": "SSL", "tls": {"ca_file": str(secured_broker.tls.ca)}}
    )
    with pytest.raises(KafkaUnavailable, match="bad certificate"):
        check_connection(secured_broker.kafka.mtls_bootstrap, no_cert, timeout_s=5)
    check_connection(secured_broker.kafka.mtls_bootstrap, mtls_setup(secured_broker).security)


def test_replication_beyond_the_brokers_is_a_clear_error(
    secured_broker: SecuredBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.kafka_io import ReplicationError

    setup = scram_setup(secured_broker)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with pytest.raises(ReplicationError, match=r"replication factor 3: .* has 1 broker"):
        create_topics(setup.bootstrap, ["never-created"], replication_factor=3,
                      security=setup.security)


def test_detect_with_more_replicas_than_brokers_stops_in_one_line(
    secured_broker: SecuredBroker, tmp_path: Path
) -> None:
    config = tmp_path / "detect.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap": secured_broker.kafka.bootstrap},
        "topics": {"output": f"out-{uuid.uuid4().hex[:8]}", "replication": 3,
                   "min_insync_replicas": 2},
        "detectors": [{"name": "cpu", "input": "in", "measure": "v", "interval": "1s"}],
    }))
    result = anomstream("detect", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "replication factor 3" in lines[0] and "has 1 broker(s)" in lines[0]


def test_a_fenced_worker_rebuilds_its_clients_with_the_security_settings(
    secured_broker: SecuredBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage whose producer is fenced replaces its clients; the new ones must reach the
    secured listener as the first ones did, or the stage never finishes its input."""
    setup = scram_setup(secured_broker)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)  # the worker and this process read it
    run = uuid.uuid4().hex[:8]
    topics = {name: f"{name}-{run}" for name in ("input", "output", "dlq", "repart", "state")}
    group, instance = f"detect-{run}", f"fenced-{run}"
    create_topics(setup.bootstrap, [topics["input"]], partitions=2, security=setup.security)
    detect_yaml = tmp_path / "detect.yaml"
    detect_yaml.write_text(detect_config(setup, topics, group))
    steps = 60

    def output() -> list[dict[str, Any]]:
        try:
            return [json.loads(m.value()) for m in
                    consume_all(setup.bootstrap, topics["output"], security=setup.security)]
        except KafkaException:  # the worker has not created the output topic yet
            return []

    def send(producer: Producer, steps_to_send: range) -> None:
        for step in steps_to_send:
            for index, host in enumerate(HOSTS):
                key, payload = point(host, step * 1000, 50.0 + index + step % 5)
                producer.produce(topics["input"], payload, key)
        assert producer.flush(30) == 0

    worker = WorkerProcess(detect_yaml, instance, tmp_path)
    try:
        worker.wait_ready(180)
        producer = Producer(producer_config(setup.bootstrap, security=setup.security))
        send(producer, range(0, 20))
        wait_for(lambda: len(output()) >= len(HOSTS) * 10, 120, "the first results")

        # The score stage's transactional.id on a second producer fences the worker's.
        intruder = Producer(producer_config(
            setup.bootstrap, security=setup.security,
            **{"transactional.id": f"{group}.{instance}.score"},
        ))
        intruder.init_transactions(30)
        send(producer, range(20, steps))

        wait_for(lambda: worker.metric("anomstream_client_rebuilds_total", stage="score") >= 1,
                 60, "the score stage to replace its fenced clients")
        # Every interval but each host's last (still open), each exactly once.
        expected = len(HOSTS) * (steps - 1)
        wait_for(lambda: len(output()) >= expected or worker.process.poll() is not None, 180,
                 "the results after the rebuild")
        assert worker.process.poll() is None, worker.log()
        got = output()
        assert len(got) == expected, worker.log()
        by_series(got)  # asserts one result per series and period
        assert worker.get("/healthz")[0] == 200
    finally:
        assert worker.stop() == 0, worker.log()
