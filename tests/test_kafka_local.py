"""The local broker and the shared Kafka helpers, against the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from app import kafka_local
from app.kafka_local import KafkaError, LocalKafka, free_port
from common.kafka_io import consume_all, create_topics, producer_config


def _transactional_producer(bootstrap: str) -> Producer:
    producer = Producer(
        producer_config(bootstrap, **{"transactional.id": f"test-{free_port()}"})
    )
    producer.init_transactions(30)
    return producer


@pytest.mark.kafka
def test_committed_transactions_are_read_back_and_aborted_ones_are_not(
    kafka_bootstrap: str, topic_factory
) -> None:
    topic = topic_factory()
    producer = _transactional_producer(kafka_bootstrap)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, key=b"k", value=f"committed-{i}".encode())
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"aborted")
    producer.flush(30)
    producer.abort_transaction(30)

    committed = consume_all(kafka_bootstrap, topic)
    everything = consume_all(kafka_bootstrap, topic, read_committed=False)

    assert [m.value() for m in committed] == [b"committed-0", b"committed-1", b"committed-2"]
    # The aborted record did reach the log: only the isolation level hides it.
    assert [m.value() for m in everything][-1] == b"aborted"


@pytest.mark.kafka
def test_consume_all_reads_every_partition_in_offset_order(
    kafka_bootstrap: str, topic_factory
) -> None:
    topic = topic_factory(partitions=3)
    producer = Producer(producer_config(kafka_bootstrap))
    for i in range(30):
        producer.produce(topic, value=str(i).encode(), partition=i % 3)
    producer.flush(30)

    messages = consume_all(kafka_bootstrap, topic)

    assert sorted(int(m.value() or b"") for m in messages) == list(range(30))
    keys = [(m.partition(), m.offset()) for m in messages]
    assert keys == sorted(keys)
    assert {m.partition() for m in messages} == {0, 1, 2}


@pytest.mark.kafka
def test_consume_all_returns_what_was_committed_before_it_while_a_writer_keeps_writing(
    kafka_bootstrap: str, topic_factory
) -> None:
    topic = topic_factory()
    transactional = _transactional_producer(kafka_bootstrap)
    transactional.begin_transaction()
    for i in range(3):
        transactional.produce(topic, value=f"committed-{i}".encode())
    transactional.commit_transaction(30)  # offsets 0-2 records, 3 the commit marker: end 4
    stop = threading.Event()

    def keep_writing() -> None:
        producer = Producer(producer_config(kafka_bootstrap, **{"linger.ms": 0}))
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            producer.produce(topic, value=b"later")
            producer.poll(0.001)
        producer.flush(30)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        # No record sits at end - 1 (the marker does): the first record past it ends the read,
        # without waiting for the partition's end, which a busy writer may never let it reach
        # (whether a fetch catches up with the writer is a race, so only the result is checked).
        messages = consume_all(kafka_bootstrap, topic, timeout_s=20)
    finally:
        stop.set()
        writer.join(60)

    assert [m.value() for m in messages] == [b"committed-0", b"committed-1", b"committed-2"]


@pytest.mark.kafka
def test_consume_all_of_an_empty_topic_returns_nothing(kafka_bootstrap: str, topic_factory) -> None:
    assert consume_all(kafka_bootstrap, topic_factory(partitions=2)) == []


@pytest.mark.kafka
def test_create_topics_is_idempotent_and_sets_compaction(
    kafka_bootstrap: str, topic_factory
) -> None:
    topic = topic_factory("state", partitions=4, compacted=True)
    create_topics(kafka_bootstrap, [topic], partitions=4, compacted=True)

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 4
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    assert configs["cleanup.policy"].value == "compact"


@pytest.mark.kafka
@pytest.mark.slow
def test_second_broker_restarts_with_its_topics_and_stops_cleanly(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path / "data", port=free_port(), controller_port=free_port())
    with kafka:
        pid = kafka.running_pid()
        assert pid is not None
        assert (tmp_path / "data" / "kafka.pid").read_text().strip() == str(pid)
        create_topics(kafka.bootstrap, ["kept"])
        with pytest.raises(KafkaError, match="already runs"):
            kafka.start()
    assert kafka.running_pid() is None
    assert not Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "data" / "kafka.pid").exists()

    # A fresh object on the same data dir: no re-format, the topic is still there.
    with LocalKafka(tmp_path / "data", port=kafka.config.port,
                    controller_port=kafka.config.controller_port) as again:
        topics = AdminClient({"bootstrap.servers": again.bootstrap}).list_topics(timeout=10).topics
        assert "kept" in topics
        # The first clean stop left a class-data archive (if none existed); this start maps it.
        cmdline = Path(f"/proc/{again.running_pid()}/cmdline").read_bytes().split(b"\0")
        assert any(arg.startswith(b"-XX:SharedArchiveFile=") for arg in cmdline)


def test_start_refuses_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(KafkaError, match=f"port {port}"):
            LocalKafka(tmp_path, port=port, controller_port=free_port()).start()


@pytest.mark.slow
def test_two_processes_fetching_at_once_both_get_the_complete_jars(tmp_path: Path) -> None:
    script = (
        "from app.kafka_local import ensure_jars; "
        "print(sorted(p.name for p in ensure_jars().glob('*.jar')))"
    )
    env = {**os.environ, "ANOMSTREAM_CACHE": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                             stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]

    assert [run.returncode for run in runs] == [0, 0]
    expected = str(sorted(p.name for p in kafka_local.ensure_jars().glob("*.jar")))
    assert [out.strip() for out in outputs] == [expected, expected]
    assert f"kafka_2.13-{kafka_local.KAFKA_VERSION}.jar" in expected
    # Only the finished directory and the lock remain: no half-written work dirs.
    version_dir = tmp_path / "kafka" / kafka_local.KAFKA_VERSION
    assert sorted(p.name for p in version_dir.iterdir()) == ["fetch.lock", "libs"]


@pytest.mark.kafka
@pytest.mark.slow
def test_broker_stops_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    script = (
        "import sys, time; from app.kafka_local import LocalKafka, free_port; "
        "k = LocalKafka(sys.argv[1], port=free_port(), controller_port=free_port()); "
        "k.start(); print(k.running_pid(), flush=True); time.sleep(300)"
    )
    starter = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert starter.stdout is not None
    broker_pid = int(starter.stdout.readline())
    assert Path(f"/proc/{broker_pid}").exists()

    starter.kill()  # SIGKILL: no teardown code runs in the starter
    starter.wait(timeout=30)

    kafka = LocalKafka(tmp_path)
    for _ in range(600):  # bounded: at most ~60 s for the JVM's own shutdown
        if kafka_local._pid_alive(broker_pid) is False:
            break
        time.sleep(0.1)
    else:
        kafka.stop()
        pytest.fail("the orphaned broker kept running after its starter was killed")


@pytest.mark.kafka
@pytest.mark.slow
def test_a_start_reports_progress_and_a_timeout_says_why_with_the_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = (free_port(), free_port())
    lines: list[str] = []
    first = LocalKafka(tmp_path / "data", *ports, progress=lines.append)
    with first:
        pass
    assert any(line.startswith("formatting the broker's storage") for line in lines), lines
    assert any(line.startswith("started the broker's JVM") for line in lines), lines

    # Formatted already, so the whole second a slow machine gets goes to the wait for the JVM,
    # which needs longer than that; a progress line every 0.2 s says what it waits for.
    monkeypatch.setattr(kafka_local, "PROGRESS_EVERY_S", 0.2)
    lines.clear()
    second = LocalKafka(tmp_path / "data", *ports, start_timeout_s=1.0, progress=lines.append)
    with pytest.raises(KafkaError) as raised:
        second.start()

    message = str(raised.value)
    assert f"did not serve on {second.bootstrap} within 1 s" in message
    assert "ANOMSTREAM_KAFKA_START_TIMEOUT" in message
    assert str(second.log_path) in message
    # The log's tail follows (or a note that the JVM had logged nothing yet): never empty.
    assert message.split(f"log {second.log_path}:\n", 1)[1].strip()
    assert any(line.startswith(f"still waiting for the broker to serve on {second.bootstrap}")
               for line in lines), lines
    assert second.running_pid() is None


def test_the_start_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kafka_local.START_TIMEOUT_ENV, "900")
    assert LocalKafka("/tmp/unused", free_port(), free_port()).start_timeout_s == 900.0
    monkeypatch.setenv(kafka_local.START_TIMEOUT_ENV, "soon")
    with pytest.raises(KafkaError, match="ANOMSTREAM_KAFKA_START_TIMEOUT='soon': expected seconds"):
        LocalKafka("/tmp/unused", free_port(), free_port())
    monkeypatch.delenv(kafka_local.START_TIMEOUT_ENV)
    assert kafka_local.configured_start_timeout_s() == kafka_local.DEFAULT_START_TIMEOUT_S


def test_a_secured_broker_config_keeps_its_plaintext_port_readable(tmp_path: Path) -> None:
    secured = kafka_local.SecuredListeners(
        scram_port=9101, mtls_port=9102, keystore=tmp_path / "b.p12", keystore_password="pw",
        truststore=tmp_path / "ca.pem", scram_users=(("alice", "pw1"),),
    )
    config = kafka_local.BrokerConfig(9100, 9103, tmp_path / "kraft", secured)
    path = tmp_path / "server.properties"
    path.write_text(config.render())
    text = path.read_text()

    assert "advertised.listeners=PLAINTEXT://127.0.0.1:9100,SCRAM://127.0.0.1:9101," \
           "MTLS://127.0.0.1:9102" in text
    assert "listener.name.mtls.ssl.client.auth=required" in text
    assert kafka_local.BrokerConfig.read(path).port == 9100
    assert secured.format_arguments() == ["--add-scram", "SCRAM-SHA-512=[name=alice,password=pw1]"]
    with pytest.raises(KafkaError, match="cannot contain"):
        kafka_local.SecuredListeners(1, 2, path, "pw", path, (("bob", "a,b"),)).format_arguments()
