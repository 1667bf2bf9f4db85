"""The Parquet sink against the real broker: the lake holds exactly the committed records of the
topic, across kill -9s of the sink, a compaction running beside it and readers querying it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from common.kafka_io import consume_all, consumer_config, producer_config
from contract import records
from sinks import lake
from sinks.compact import compact
from sinks.lake_files import list_files, sink_file_name
from sinks.parquet import ParquetSink, RotationPolicy, SinkConfig
from tests.lake_data import DAY0, result_record

pytestmark = pytest.mark.kafka

COMPARED = (
    "detectorName",
    "measure",
    "timeseriesId",
    "dimensionList",
    "anomalyScore",
    "anomalyDecision",
    "anomalyConfidenceScore",
    "modelStage",
    "processedDataPoints",
    "aggregatedMeasureValue",
    "rawScore",
)


def produce_transactions(
    bootstrap: str,
    topic: str,
    batches: Iterable[list[bytes]],
    *,
    abort_every: int = 0,
    pause_s: float = 0.0,
) -> None:
    """Each batch in its own transaction; every ``abort_every``-th one is aborted."""
    producer = Producer(producer_config(bootstrap, **{"transactional.id": f"t-{topic}"}))
    producer.init_transactions(30)
    for number, batch in enumerate(batches, start=1):
        producer.begin_transaction()
        for payload in batch:
            producer.produce(topic, key=series_key(payload), value=payload)
        if abort_every and number % abort_every == 0:
            # Records still in flight when the abort goes out sometimes make the broker answer
            # INVALID_TXN_STATE, fatal for the producer (librdkafka issue 4849): deliver them
            # first, so the aborted records really sit in the log for the sink to skip.
            assert producer.flush(30) == 0
            producer.abort_transaction(30)
        else:
            producer.commit_transaction(30)
        time.sleep(pause_s)


def series_key(payload: bytes) -> bytes | None:
    """Result records are keyed by timeseriesId (bad records get no key)."""
    try:
        return str(records.decode(payload)["timeseriesId"]).encode()
    except (ValueError, KeyError):
        return None


def payloads(series: int, ticks: range, start: int, extra_from: int | None = None) -> list[bytes]:
    out = []
    for tick in ticks:
        for index in range(series):
            extra = (
                {"rawScore": tick / 10} if extra_from is not None and tick >= extra_from else None
            )
            out.append(records.encode(result_record(index, tick, start=start, extra=extra)))
    return out


def chunks(items: list[bytes], size: int) -> list[list[bytes]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def assert_lake_equals_topic(lake_dir: Path, bootstrap: str, topic: str) -> int:
    """Every committed, valid record of ``topic`` is exactly one lake row with its content."""
    expected: dict[tuple[int, int], dict[str, Any]] = {}
    for message in consume_all(bootstrap, topic):
        try:
            record = records.decode(message.value() or b"")
        except ValueError:
            continue
        if "detectionPeriodStartTime" in record:
            expected[(int(message.partition() or 0), int(message.offset() or 0))] = record
    rows = lake.query(lake_dir, "SELECT * FROM scores").to_pylist()
    keys = [(row["kafkaPartition"], row["kafkaOffset"]) for row in rows]
    assert len(keys) == len(set(keys)), "a record is in the lake twice"
    assert set(keys) == set(expected), (
        f"missing {len(set(expected) - set(keys))}, unexpected {len(set(keys) - set(expected))}"
    )
    for row in rows:
        record = expected[(row["kafkaPartition"], row["kafkaOffset"])]
        for name in COMPARED:
            assert row.get(name) == record.get(name), (name, row, record)
        start = records.parse_time(record["detectionPeriodStartTime"])
        assert row["detectionPeriodStartTime"] == start
        assert str(row["dt"]) == start.date().isoformat()
        dims = records.dimensions_of(record)
        assert {k[4:]: v for k, v in row.items() if k.startswith("dim_") and v is not None} == dims
    return len(rows)


def test_sink_writes_each_committed_record_once_and_resumes_from_the_lake(
    kafka_bootstrap: str, topic_factory: Any, tmp_path: Path
) -> None:
    topic = topic_factory("results", partitions=2)
    # 23:00 -> 01:30: files must split at midnight; rawScore appears half-way (schema evolution).
    good = payloads(6, range(150), DAY0 + 23 * 3600, extra_from=75)
    bad = [b"{not json", records.encode({"detectorName": "x"})]
    batches = [*chunks(good[:450], 90), bad, *chunks(good[450:], 90)]
    produce_transactions(kafka_bootstrap, topic, batches, abort_every=4)

    def run_sink(group: str) -> ParquetSink:
        sink = ParquetSink(
            SinkConfig(
                lake=tmp_path,
                topic=topic,
                bootstrap=kafka_bootstrap,
                group=group,
                policy=RotationPolicy(max_records=100, max_span_ms=30 * 60_000),
                idle_flush_s=0.5,
                stop_after_idle_s=2.0,
            )
        )
        sink.run()
        return sink

    first = run_sink("sink-a")
    rows = assert_lake_equals_topic(tmp_path, kafka_bootstrap, topic)
    assert rows == first.stats.rows and first.stats.rejected == 2
    assert 0 < rows < len(good)  # aborted transactions are not in the lake
    assert {f.day for f in list_files(tmp_path)} == {"2026-11-20", "2026-11-21"}
    dead = consume_all(kafka_bootstrap, f"{topic}-parquet-dlq")
    assert sorted(m.value() or b"" for m in dead) == sorted(bad)
    assert all(dict(m.headers() or [])["error"] for m in dead)
    evolved = lake.query(
        tmp_path,
        "SELECT count(rawScore) AS n, count(*) FILTER (rawScore IS NULL) AS old FROM scores",
    ).to_pylist()[0]
    assert evolved["n"] > 0 and evolved["old"] > 0

    names = sorted(f.path.name for f in list_files(tmp_path))
    # Same group: nothing new. New group (no committed offsets, like a kill between rename and
    # commit): it resumes after the lake's last offsets and writes nothing either.
    assert run_sink("sink-a").stats.rows == 0
    assert run_sink("sink-b").stats.rows == 0
    assert sorted(f.path.name for f in list_files(tmp_path)) == names
    assert assert_lake_equals_topic(tmp_path, kafka_bootstrap, topic) == rows


def test_lake_equals_topic_across_kill_9s_with_compaction_and_readers(
    kafka_bootstrap: str, topic_factory: Any, tmp_path: Path
) -> None:
    topic = topic_factory("results", partitions=3)
    lake_dir = tmp_path / "lake"
    logs = tmp_path / "sink.log"
    rng = random.Random(4)
    # 20:00 on day one to 06:00 on day two: the first day closes while the sink writes.
    produced = payloads(40, range(600), DAY0 + 20 * 3600, extra_from=300)
    producer = threading.Thread(
        target=produce_transactions,
        args=(kafka_bootstrap, topic, chunks(produced, 400)),
        kwargs={"abort_every": 5, "pause_s": 0.25},
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def guarded(loop: Any) -> Any:
        def body() -> None:
            try:
                while not stop.is_set():
                    loop()
            except BaseException as error:  # reported by the test thread
                errors.append(error)

        return body

    def read_once() -> None:
        row = lake.query(
            lake_dir,
            "SELECT count(*) AS n, count(DISTINCT (kafkaPartition, kafkaOffset)) AS d FROM scores",
        ).to_pylist()[0]
        assert row["n"] == row["d"], f"duplicate rows visible: {row}"
        assert not seen or row["n"] >= seen[-1], f"rows vanished: {seen[-1]} -> {row['n']}"
        seen.append(row["n"])
        time.sleep(0.2)

    compactions: list[int] = []

    def compact_once() -> None:
        if lake_dir.exists():
            compactions.append(compact(lake_dir, grace_s=0.5).files_out)
        time.sleep(1.0)

    sink_command = [
        sys.executable,
        "-m",
        "app.cli",
        "sink",
        "parquet",
        "--out",
        str(lake_dir),
        "--topic",
        topic,
        "--bootstrap",
        kafka_bootstrap,
        "--group",
        f"g-{topic}",
        "--max-records",
        "250",
        "--max-span",
        "20m",
        "--idle-flush",
        "0.5",
    ]

    def start_sink(*extra: str) -> subprocess.Popen[bytes]:
        with open(logs, "ab") as log:
            return subprocess.Popen(
                [*sink_command, *extra], stdout=log, stderr=log, cwd=Path(__file__).parent.parent
            )

    readers = [
        threading.Thread(target=guarded(read_once)),
        threading.Thread(target=guarded(compact_once)),
    ]
    producer.start()
    for thread in readers:
        thread.start()
    kills = 0
    sink = start_sink()
    try:
        deadline = time.monotonic() + 240
        while (kills < 6 or producer.is_alive()) and time.monotonic() < deadline:
            time.sleep(rng.uniform(1.0, 3.0))
            os.kill(sink.pid, signal.SIGKILL)
            sink.wait(10)
            kills += 1
            sink = start_sink()
        producer.join(60)
        os.kill(sink.pid, signal.SIGKILL)
        sink.wait(10)
        final = start_sink("--stop-after-idle", "3")
        assert final.wait(120) == 0, logs.read_text()[-3000:]
    finally:
        stop.set()
        for thread in readers:
            thread.join(60)
        for process in (sink,):
            if process.poll() is None:
                process.kill()
    assert not errors, errors
    assert kills >= 5
    assert len(seen) > 10 and sum(compactions) > 0

    rows = assert_lake_equals_topic(lake_dir, kafka_bootstrap, topic)
    compact(lake_dir, grace_s=0)
    assert assert_lake_equals_topic(lake_dir, kafka_bootstrap, topic) == rows
    assert len([f for f in list_files(lake_dir) if f.day == "2026-11-20"]) == 3
    committed = [records.decode(m.value() or b"") for m in consume_all(kafka_bootstrap, topic)]
    counts = lake.query(
        lake_dir,
        "SELECT (SELECT count(*) FROM scores) AS scores, (SELECT count(*) FROM anomalies) AS "
        "anomalies, (SELECT count(*) FROM series) AS series, (SELECT sum(points) FROM series) "
        "AS points",
    ).to_pylist()[0]
    assert counts == {
        "scores": len(committed),
        "anomalies": sum(r["anomalyDecision"] for r in committed),
        "series": len({r["timeseriesId"] for r in committed}),
        "points": len(committed),
    }


def test_a_crash_between_two_files_of_one_batch_never_commits_past_the_lake(
    kafka_bootstrap: str, topic_factory: Any, tmp_path: Path
) -> None:
    topic = topic_factory("results", partitions=1)
    produce_transactions(kafka_bootstrap, topic, [payloads(5, range(100), DAY0)])  # offsets 0-499
    # A directory where the second file (offsets 100-199) must go makes its rename fail: the
    # sink dies after publishing the first file of the batch, as a kill -9 there would.
    obstacle = tmp_path / "dt=2026-11-20" / sink_file_name(topic, 0, 100)
    (obstacle / "blocker").mkdir(parents=True)
    config = SinkConfig(
        lake=tmp_path,
        topic=topic,
        bootstrap=kafka_bootstrap,
        group="crash",
        policy=RotationPolicy(max_records=100, max_span_ms=86_400_000),
        idle_flush_s=0.5,
        stop_after_idle_s=2.0,
    )
    with pytest.raises(OSError):
        ParquetSink(config).run()
    consumer = Consumer(consumer_config(kafka_bootstrap, group_id="crash"))
    try:
        committed = consumer.committed([TopicPartition(topic, 0)], timeout=30)[0].offset
    finally:
        consumer.close()
    assert committed == 100  # after the published file, not after the rows still in memory
    (obstacle / "blocker").rmdir()
    obstacle.rmdir()
    ParquetSink(config).run()
    assert assert_lake_equals_topic(tmp_path, kafka_bootstrap, topic) == 500


def test_dimension_names_with_quotes_and_sql_are_stored_and_queried_as_names(
    kafka_bootstrap: str, topic_factory: Any, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    # Each name closes a quoted identifier or literal and appends SQL that reads a local file.
    evil = [
        f'x" , (SELECT content FROM read_text(\'{secret}\')) AS "leak',
        f"y' || (SELECT content FROM read_text('{secret}')) || '",
        'z""; DROP VIEW scores; --',
    ]
    produced = []
    for index, name in enumerate(evil):
        record = result_record(index, 0)
        record["dimensionList"] = [{"name": name, "value": f"value-{index}"}]
        record["timeseriesId"] = records.timeseries_id(
            record["detectorName"], "value", {name: f"value-{index}"}
        )
        produced.append(records.encode(record))
    produced += payloads(3, range(2), DAY0)  # ordinary series beside them
    topic = topic_factory("results", partitions=1)
    produce_transactions(kafka_bootstrap, topic, [produced])
    lake_dir = tmp_path / "lake"
    ParquetSink(SinkConfig(lake=lake_dir, topic=topic, bootstrap=kafka_bootstrap,
                           group=f"g-{topic}", idle_flush_s=0.5, stop_after_idle_s=2.0)).run()
    assert assert_lake_equals_topic(lake_dir, kafka_bootstrap, topic) == len(produced)

    def query(sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "query", sql, "--lake", str(lake_dir),
             "--format", "json"],
            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120,
        )

    done = query("SELECT * FROM series")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert "TOP-SECRET-CONTENT" not in done.stdout
    assert len(rows) == len(evil) + 3
    for index, name in enumerate(evil):
        assert [row[f"dim_{name}"] for row in rows if row[f"dim_{name}"] is not None] == [
            f"value-{index}"
        ]
    counts = query("SELECT (SELECT count(*) FROM scores) AS scores, "
                   "(SELECT count(*) FROM series) AS series")
    assert counts.returncode == 0, counts.stderr
    assert json.loads(counts.stdout) == [{"scores": len(produced), "series": len(evil) + 3}]
