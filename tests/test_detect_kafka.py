"""``anomstream detect`` against the real local broker: scores, dead letters, kill -9, rebalances.

Workers run as real processes (``python -m app.cli detect``) so a kill -9 is a real one.
Each test uses its own topics and consumer groups. Detectors are small (10 trees, 64 samples,
warm-up 16) to keep the suite quick; the logic under test does not depend on the model size.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from common.kafka_io import create_topics
from contract.records import timeseries_id
from detectors import DetectorConfig, RcfDetector
from tests.detect_support import (
    ROOT,
    SMALL_MODEL,
    WorkerProcess,
    by_series,
    names,
    point,
    produce,
    read_topic,
    results,
    wait_for,
    wait_for_results,
    write_config,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def signal_value(host_index: int, i: int) -> float:
    """A periodic series per host, with an obvious spike now and then."""
    base = 10.0 + host_index + math.sin(i / (4.0 + host_index)) * 2.0
    return base + (25.0 if i % 97 == 60 else 0.0)


def test_replayed_file_scores_equal_backtest(kafka_bootstrap: str, tmp_path: Path) -> None:
    rows = 240
    start_s = 1_704_067_200  # 2024-01-01T00:00:00Z; one row a minute
    csv_path = tmp_path / "series.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        for i in range(rows):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start_s + 60 * i))
            writer.writerow([stamp, repr(signal_value(0, i))])
    out_path = tmp_path / "backtest.csv"
    params = [f"--param={k}={v}" for k, v in SMALL_MODEL.items()]
    subprocess.run(
        [sys.executable, "-m", "app.cli", "backtest", str(csv_path), "--out", str(out_path),
         "--no-progress", *params],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )
    with out_path.open() as handle:
        expected = list(csv.DictReader(handle))

    input_topic = f"replay-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic])
    with csv_path.open() as handle:
        produce(kafka_bootstrap, input_topic, [
            ("feed", json.dumps({"timestamp": r["timestamp"], "value": float(r["value"]),
                                 "feed": "replay"}).encode())
            for r in csv.DictReader(handle)
        ])
    topics = names("replay")
    config = write_config(
        tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic, **topics,
        detectors=[{"name": "replay", "input": input_topic, "measure": "value",
                    "dimensions": ["feed"], "aggregation": "last", "interval": "60s",
                    "params": SMALL_MODEL}],
    )
    worker = WorkerProcess(config, "replay-0", tmp_path)
    try:
        worker.wait_ready()
        # The last row's window stays open: nothing later moves the watermark past its end.
        records = wait_for_results(kafka_bootstrap, topics["output"], rows - 1, 120, [worker])
    finally:
        assert worker.stop() == 0, worker.log()
    (series,) = by_series(records).values()
    assert len(series) == rows - 1
    for row, record in zip(expected, series, strict=False):
        assert record["detectionPeriodStartTime"] == row["timestamp"].replace("Z", ".000Z")
        assert record["aggregatedMeasureValue"] == float(row["value"])
        assert record["anomalyScore"] == pytest.approx(float(row["anomalyScore"]), abs=1e-9)
        assert record["anomalyDecision"] == int(row["anomalyDecision"])
        assert record["modelStage"] == row["modelStage"]
        assert record["anomalyConfidenceScore"] == pytest.approx(
            float(row["anomalyConfidenceScore"]), abs=1e-9)
        assert record["expectedValue"] == pytest.approx(float(row["expectedValue"]), abs=1e-9)
    # Not a trivial comparison: both stages occur and the scores vary.
    assert {r["modelStage"] for r in series} == {"LEARNING", "INFERENCE"}
    assert len({r["anomalyScore"] for r in series if r["anomalyScore"] > 0}) > 20


def reference_scores(points: dict[str, list[tuple[int, float]]]) -> dict[str, list[float]]:
    """What an undisturbed detector scores per host when each record is one window."""
    scores = {}
    for host, items in points.items():
        detector = RcfDetector(DetectorConfig.from_dict(SMALL_MODEL))
        scores[host] = [detector.update(t / 1000, v).anomaly_score for t, v in items[:-1]]
    return scores


def test_bad_and_late_records_are_dead_lettered(kafka_bootstrap: str, tmp_path: Path) -> None:
    input_topic = f"dirty-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=2)
    hosts = ["a", "b", "c"]
    good: dict[str, list[tuple[int, float]]] = {h: [] for h in hosts}
    records: list[tuple[str | None, bytes]] = []
    bad: dict[bytes, str] = {}

    def add_bad(payload: bytes, reason: str) -> None:
        bad[payload] = reason
        records.append(("a", payload))

    def cpu(payload: dict[str, Any]) -> bytes:
        return json.dumps({**payload, "kind": "cpu"}).encode()

    for i in range(120):
        for k, host in enumerate(hosts):
            good[host].append((i * 1000, signal_value(k, i)))
            records.append((host, cpu({"timestamp": i * 1000, "value": signal_value(k, i),
                                       "host": host})))
        if i == 30:
            add_bad(b"\x00not json at all", "not_json")
            add_bad(b'"just a string"', "not_object")
            add_bad(cpu({"timestamp": 30000, "host": "a"}), "missing_field")
            add_bad(cpu({"timestamp": 30000, "value": "12", "host": "a"}), "bad_type")
            add_bad(b'{"timestamp": 30000, "value": NaN, "host": "a", "kind": "cpu"}',
                    "non_finite")
            add_bad(b'{"timestamp": 30000, "value": -Infinity, "host": "b", "kind": "cpu"}',
                    "non_finite")
            add_bad(cpu({"timestamp": "noon", "value": 1, "host": "b"}), "bad_timestamp")
            add_bad(b'{"timestamp": 30000, "value": 1, "host": "a", "kind": "gpu"}',
                    "no_detector")
        if i == 50:
            # Ten seconds behind host a's watermark: late, whatever its value.
            add_bad(cpu({"timestamp": 40_000, "value": 99.0, "host": "a"}), "late")
    produce(kafka_bootstrap, input_topic, records)
    topics = names("dirty")
    config = write_config(
        tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic, **topics,
        # Two live models for three series: evictions and reloads happen all the time.
        worker={"max_live_models": 2},
        detectors=[{"name": "cpu", "input": input_topic, "measure": "value",
                    "dimensions": ["host"], "aggregation": "last", "interval": "1s",
                    "match": {"kind": "cpu"}, "params": SMALL_MODEL}],
    )
    worker = WorkerProcess(config, "dirty-0", tmp_path)
    try:
        worker.wait_ready()
        out = wait_for_results(kafka_bootstrap, topics["output"], 3 * 119, 120, [worker])
        wait_for(lambda: len(read_topic(kafka_bootstrap, topics["dead_letter"])) >= len(bad), 60,
                 "dead letters")
        assert worker.metric("anomstream_dead_letters_total", reason="non_finite") == 2
        assert worker.metric("anomstream_dead_letters_total", reason="late") == 1
        assert worker.metric("anomstream_evictions_total") > 0
        assert worker.metric("anomstream_live_series") <= 2
        assert worker.get("/healthz")[0] == 200
        assert worker.get("/readyz")[0] == 200
        assert worker.metric("anomstream_windows_closed_total", detector="cpu") == 3 * 119
        # Scoring latency has sub-millisecond buckets.
        assert worker.metric("anomstream_scoring_seconds_bucket", le="0.0005") > 0
        wait_for(lambda: 'anomstream_consumer_lag{' in worker.get("/metrics")[1], 20,
                 "consumer lag from librdkafka statistics")
    finally:
        assert worker.stop() == 0, worker.log()
    letters = read_topic(kafka_bootstrap, topics["dead_letter"])
    got = {m.value(): dict(m.headers() or []) for m in letters}
    assert len(letters) == len(bad)
    assert {payload: headers["reason"].decode() for payload, headers in got.items()} == bad
    for headers in got.values():
        assert headers["source_topic"].decode() == input_topic
        assert int(headers["source_offset"]) >= 0
        assert headers["detail"]
    # The good records' results are those of an undisturbed detector per host.
    expected = reference_scores(good)
    series = by_series(out)
    for host in hosts:
        tsid = timeseries_id("cpu", "value", {"host": host})
        assert [r["anomalyScore"] for r in series[tsid]] == pytest.approx(expected[host])


def test_series_beyond_max_live_models_wait_on_disk_and_restore_exactly(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    hosts = [f"d{k}" for k in range(6)]
    input_topic = f"spilled-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=2)
    good = {h: [(i * 1000, signal_value(k, i)) for i in range(120)] for k, h in enumerate(hosts)}

    def feed(steps: range) -> None:
        produce(kafka_bootstrap, input_topic,
                [point(h, *good[h][i]) for i in steps for h in hosts])

    topics = names("spilled")
    spill = tmp_path / "spill"
    config = write_config(
        tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic, **topics,
        # Two live models for six series: four wait as snapshots in the spill store.
        worker={"max_live_models": 2, "spill_dir": str(spill)},
    )

    def stored_rows() -> int:
        (path,) = spill.glob("*.sqlite")
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM snapshot").fetchone()[0])

    feed(range(60))
    worker = WorkerProcess(config, "spilled-0", tmp_path)
    worker.wait_ready()
    wait_for_results(kafka_bootstrap, topics["output"], 6 * 59, 120, [worker])
    wait_for(lambda: worker.metric("anomstream_stored_series") == 4, 20, "4 series stored")
    assert worker.metric("anomstream_live_series") == 2
    assert stored_rows() == 4  # on disk, not in the worker's memory
    worker.kill()
    feed(range(60, 120))
    worker = WorkerProcess(config, "spilled-0", tmp_path)
    try:
        worker.wait_ready()
        out = wait_for_results(kafka_bootstrap, topics["output"], 6 * 119, 120, [worker])
        # The store left by the killed worker was replaced by one rebuilt from the state topic.
        wait_for(lambda: worker.metric("anomstream_stored_series") == 4, 20, "4 series stored")
        assert stored_rows() == 4
        time.sleep(1.0)  # anything extra (a duplicate) would show up now
        out = results(kafka_bootstrap, topics["output"])
    finally:
        assert worker.stop() == 0, worker.log()
    assert not list(spill.glob("*.sqlite"))  # a cache: removed when the worker ends
    assert len(out) == 6 * 119
    expected = reference_scores(good)
    series = by_series(out)
    for host in hosts:
        tsid = timeseries_id("cpu", "value", {"host": host})
        assert [r["anomalyScore"] for r in series[tsid]] == pytest.approx(expected[host])


class PacedFeed:
    """Produces one point per host every ``pause_s`` (keyed by host) until stopped.

    It runs as long as the scenario needs, however slow the machine: the kills and the
    rebalances then always happen while records are flowing. ``steps`` is the number of points
    per host produced in the end (bounded by ``max_steps``).
    """

    def __init__(self, bootstrap: str, topic: str, hosts: list[str], pause_s: float = 0.08,
                 max_steps: int = 3000) -> None:
        self.bootstrap, self.topic, self.hosts = bootstrap, topic, hosts
        self.pause_s, self.max_steps = pause_s, max_steps
        self.steps = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
            while not self.done.is_set() and self.steps < self.max_steps:
                for k, host in enumerate(self.hosts):
                    producer.produce(self.topic, point(host, self.steps * 1000,
                                                       signal_value(k, self.steps))[1], host)
                self.steps += 1
                producer.poll(0)
                time.sleep(self.pause_s)
            assert producer.flush(30) == 0
        except BaseException as error:
            self.error = error

    def __enter__(self) -> PacedFeed:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(60)
        assert self.error is None, self.error

    @property
    def expected_results(self) -> int:
        """The last point of each host leaves its window open."""
        return len(self.hosts) * (self.steps - 1)


def uninterrupted_run(bootstrap: str, tmp_path: Path, input_topic: str, partitions: int,
                      count: int) -> list[dict[str, Any]]:
    topics = names("reference")
    config = write_config(tmp_path / "reference.yaml", bootstrap, input_topic=input_topic,
                          partitions=partitions, **topics)
    worker = WorkerProcess(config, "reference", tmp_path)
    try:
        worker.wait_ready()
        return wait_for_results(bootstrap, topics["output"], count, 120, [worker])
    finally:
        assert worker.stop() == 0, worker.log()


def assert_same_output(got: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    got_series, want_series = by_series(got), by_series(reference)
    assert len(got) == len(reference)
    assert got_series.keys() == want_series.keys()
    for tsid, want in want_series.items():
        assert got_series[tsid] == want, f"series {tsid} differs"


def assert_never_back_to_learning(records: list[dict[str, Any]]) -> None:
    for tsid, items in by_series(records).items():
        stages = [r["modelStage"] for r in items]
        first = stages.index("INFERENCE")
        assert set(stages[first:]) == {"INFERENCE"}, f"series {tsid} went back to LEARNING"


# One snapshot per commit: checkpoints span several transactions, kills land inside them.
# Four live models for six series: evictions (snapshots newer than the checkpoint) too. The
# default snapshot_min_changes leaves these few-window series out of the checkpoint rounds (the
# marker stays behind, the replay is long); 3 snapshots some series of a round and leaves others
# out, so markers fall between rounds and snapshots newer than them mix on restore. With a count
# no series reaches and no evictions, only the rule for replayed series moves the marker while
# the feed runs (without it every restart would replay everything again).
@pytest.mark.parametrize(
    "settings",
    [
        {"max_live_models": 4},
        {"max_live_models": 4, "snapshot_min_changes": 3},
        {"snapshot_min_changes": 1_000_000},
    ],
    ids=["default-min-changes", "min-changes-3", "replayed-series-only"],
)
def test_kill_9_five_times_loses_and_duplicates_nothing(
    kafka_bootstrap: str, tmp_path: Path, settings: dict[str, Any]
) -> None:
    hosts = [f"h{k}" for k in range(6)]
    input_topic = f"killed-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=3)
    topics = names("killed")
    worker_settings = {"snapshots_per_commit": 1, **settings}
    config = write_config(tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic,
                          partitions=3, worker=worker_settings, **topics)
    rng = random.Random()
    kills = []
    with PacedFeed(kafka_bootstrap, input_topic, hosts) as feed:
        for attempt in range(5):
            worker = WorkerProcess(config, "killed-0", tmp_path)
            worker.wait_ready()
            # Mid-batch, mid-transaction or mid-checkpoint: wherever the moment falls; but one
            # life lasts through a checkpoint round (snapshot_interval 1 s, paced over half of
            # it), so that the last restart resumes from snapshots, which the test asserts.
            delay = 4.0 if attempt == 3 else rng.uniform(0.2, 2.5)
            time.sleep(delay)
            seen = len(results(kafka_bootstrap, topics["output"]))
            worker.kill()
            kills.append((attempt, round(delay, 2), seen))
        time.sleep(1.0)
    print("kills (attempt, seconds after ready, results seen before):", kills)
    assert any(seen > 0 for _, _, seen in kills), f"no kill came after the first results: {kills}"
    expected = feed.expected_results
    assert expected > 0
    worker = WorkerProcess(config, "killed-0", tmp_path)
    try:
        worker.wait_ready()
        got = wait_for_results(kafka_bootstrap, topics["output"], expected, 120, [worker])
        time.sleep(1.0)  # anything extra (a duplicate) would show up now
        got = results(kafka_bootstrap, topics["output"])
        # After the restarts the worker resumed from snapshots, not from scratch.
        assert worker.metric("anomstream_records_in_total", stage="score") < len(hosts) * feed.steps
    finally:
        assert worker.stop() == 0, worker.log()
    reference = uninterrupted_run(kafka_bootstrap, tmp_path, input_topic, 3, expected)
    assert_same_output(got, reference)
    assert_never_back_to_learning(got)


def test_workers_split_partitions_and_hand_over_state(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    hosts = [f"s{k}" for k in range(8)]
    input_topic = f"scaled-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=4)
    topics = names("scaled")
    config = write_config(tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic,
                          partitions=4, **topics)
    scored = "anomstream_records_in_total"
    with PacedFeed(kafka_bootstrap, input_topic, hosts) as feed:
        first, second = (WorkerProcess(config, f"scaled-{n}", tmp_path) for n in (1, 2))
        third = None
        try:
            first.wait_ready()
            second.wait_ready()
            wait_for(lambda: first.metric(scored, stage="score") > 0
                     and second.metric(scored, stage="score") > 0, 30, "both workers scoring")
            third = WorkerProcess(config, "scaled-3", tmp_path)
            third.wait_ready()
            wait_for(lambda: third.metric(scored, stage="score") > 0, 30, "the third scoring")
            assert second.stop() == 0, second.log()  # leaves; its partitions move on
            # Records keep flowing until the survivors have taken over (session timeout).
            time.sleep(8.0)
            feed.done.set()
            feed.thread.join(60)
            expected = feed.expected_results
            got = wait_for_results(kafka_bootstrap, topics["output"], expected, 150,
                                   [first, third])
            time.sleep(1.0)
            got = results(kafka_bootstrap, topics["output"])
        finally:
            for worker in (first, second, third):
                if worker is not None:
                    assert worker.stop() == 0, worker.log()
    reference = uninterrupted_run(kafka_bootstrap, tmp_path, input_topic, 4, expected)
    assert_same_output(got, reference)
    assert_never_back_to_learning(got)


def test_route_and_score_stages_in_separate_processes(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    hosts = ["p", "q"]
    input_topic = f"staged-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=2)
    good = {h: [(i * 1000, signal_value(k, i)) for i in range(80)] for k, h in enumerate(hosts)}
    produce(kafka_bootstrap, input_topic,
            [point(h, t, v) for i in range(80) for h in hosts for t, v in [good[h][i]]])
    topics = names("staged")
    config = write_config(tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic,
                          **topics)
    route = WorkerProcess(config, "staged", tmp_path, stages="route")
    score = WorkerProcess(config, "staged", tmp_path, stages="score")
    try:
        route.wait_ready()
        score.wait_ready()
        out = wait_for_results(kafka_bootstrap, topics["output"], 2 * 79, 120, [route, score])
        assert route.metric("anomstream_records_in_total", stage="score") == 0
        assert score.metric("anomstream_records_in_total", stage="route") == 0
    finally:
        assert route.stop() == 0, route.log()
        assert score.stop() == 0, score.log()
    expected = reference_scores(good)
    series = by_series(out)
    for host in hosts:
        tsid = timeseries_id("cpu", "value", {"host": host})
        assert [r["anomalyScore"] for r in series[tsid]] == pytest.approx(expected[host])


def test_a_feed_that_pauses_between_bursts_is_checkpointed_once_it_stops(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Bars: every series' record of an interval arrives in one burst, 3 s apart, against
    checkpoint rounds every second. Those pauses are the feed's rhythm, not quiet: the rounds
    leave the series (8 windows each, under snapshot_min_changes) to later, instead of
    snapshotting every series after every burst. Once the feed stops for longer than its
    pauses, the checkpoint catches up with the end of the input all the same."""
    hosts = [f"b{k}" for k in range(6)]
    bursts = 8
    input_topic = f"bars-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=2)
    topics = names("bars")
    config = write_config(tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic,
                          **topics)
    worker = WorkerProcess(config, "bars", tmp_path)
    try:
        worker.wait_ready()
        for step in range(bursts):
            produce(kafka_bootstrap, input_topic,
                    [point(h, step * 1000, signal_value(k, step)) for k, h in enumerate(hosts)])
            time.sleep(3.0)
        wait_for_results(kafka_bootstrap, topics["output"], len(hosts) * (bursts - 1), 60,
                         [worker])
        wait_for(lambda: worker.metric("anomstream_snapshot_age_seconds") == 0, 60,
                 "the checkpoint at the end of the input")
        snapshots = worker.metric("anomstream_snapshots_total", cause="checkpoint")
    finally:
        assert worker.stop() == 0, worker.log()
    # At most the round before the feed's first pause was known, and the one at its end; a
    # round per burst would be about bursts x hosts.
    assert len(hosts) <= snapshots <= 2 * len(hosts)


def test_restored_series_take_up_a_changed_threshold_and_keep_their_model(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """An operator raises a detector's threshold and its forest size, then restarts the worker:
    the restored series report by the new threshold at once, keep the forest they learned (and
    say so once in the log), and none goes back to LEARNING."""
    hosts = ["p", "q"]
    input_topic = f"retuned-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=2)
    topics = names("retuned")
    steps = 400  # the restart at 300; the signal's spike at 351 scores between 70 and 90
    points = {h: [(i * 1000, signal_value(k, i)) for i in range(steps)]
              for k, h in enumerate(hosts)}
    reference = reference_scores(points)
    assert any(70 <= score < 90 for h in hosts for score in reference[h][300:])  # a test case

    def detector(threshold: float, num_trees: int) -> dict[str, Any]:
        return {"name": "cpu", "input": input_topic, "measure": "value", "dimensions": ["host"],
                "aggregation": "last", "interval": "1s", "threshold": threshold,
                "params": {**SMALL_MODEL, "num_trees": num_trees}}

    def feed(part: slice) -> None:  # in time order, as a live feed comes
        produce(kafka_bootstrap, input_topic, [
            point(h, *points[h][i]) for i in range(steps)[part] for h in hosts
        ])

    path = tmp_path / "detect.yaml"
    write_config(path, kafka_bootstrap, input_topic=input_topic,
                 detectors=[detector(70.0, SMALL_MODEL["num_trees"])], **topics)
    feed(slice(0, 300))
    first = WorkerProcess(path, "retuned", tmp_path)
    try:
        first.wait_ready()
        wait_for_results(kafka_bootstrap, topics["output"], 2 * 299, 120, [first])
    finally:
        assert first.stop() == 0, first.log()
    write_config(path, kafka_bootstrap, input_topic=input_topic,
                 detectors=[detector(90.0, SMALL_MODEL["num_trees"] + 2)], **topics)
    feed(slice(300, steps))
    second = WorkerProcess(path, "retuned", tmp_path)
    try:
        second.wait_ready()
        got = wait_for_results(kafka_bootstrap, topics["output"], 2 * (steps - 1), 120, [second])
        # Restored from the snapshots written at the stop, not replayed from the start.
        assert second.metric("anomstream_records_in_total", stage="score") <= 2 * 100
    finally:
        assert second.stop() == 0, second.log()
    for host, items in zip(hosts, (by_series(got)[timeseries_id("cpu", "value", {"host": h})]
                                   for h in hosts), strict=True):
        # Up to the restart exactly as an undisturbed detector; after it, the threshold also
        # decides which points hold the expectation (incidents), so the scores may part.
        assert [r["anomalyScore"] for r in items[:299]] == pytest.approx(reference[host][:299])
        assert {r["anomalyDecisionThreshold"] for r in items[:299]} == {70.0}
        assert {r["anomalyDecisionThreshold"] for r in items[299:]} == {90.0}
        assert [r["anomalyDecision"] for r in items[299:]] == [
            int(r["anomalyScore"] >= 90.0) for r in items[299:]
        ]
    assert_never_back_to_learning(got)
    log = second.log_path.read_text(errors="replace")
    notes = [line for line in log.splitlines() if "restored series keep" in line]
    assert len(notes) == 1 and f"num_trees={SMALL_MODEL['num_trees']}" in notes[0], notes


def both_scoring(worker: WorkerProcess) -> bool:
    return all(worker.metric("anomstream_records_in_total", stage="score",
                             worker_process=f"{worker.instance}.score-{i}") > 0 for i in (0, 1))


def all_gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_score_processes_kill_9_loses_and_duplicates_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """One worker, its score stage in two processes: they split the partitions, a kill -9 of
    the worker takes them down with it, and the restarted worker's results are those of one
    uninterrupted worker, each once."""
    hosts = [f"h{k}" for k in range(8)]
    input_topic = f"procs-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=4)
    topics = names("procs")
    config = write_config(tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic,
                          partitions=4, worker={"snapshots_per_commit": 1}, **topics)
    kills = []
    with PacedFeed(kafka_bootstrap, input_topic, hosts) as feed:
        for attempt in range(3):
            worker = WorkerProcess(config, "procs", tmp_path, score_processes=2)
            worker.wait_ready()
            children = worker.children()
            if attempt == 0:
                # Both score processes own partitions and score; /metrics carries both.
                wait_for(partial(both_scoring, worker), 30, "both score processes scoring")
            # The second life lasts through a checkpoint round, so that restores resume from
            # snapshots as well as from the start.
            delay = 4.0 if attempt == 1 else random.uniform(0.2, 2.5)
            time.sleep(delay)
            seen = len(results(kafka_bootstrap, topics["output"]))
            worker.kill()
            kills.append((attempt, round(delay, 2), seen))
            # The kernel ends the children with the worker (PR_SET_PDEATHSIG).
            wait_for(partial(all_gone, children), 10, "the score processes to die with the worker")
        time.sleep(1.0)
    print("kills (attempt, seconds after ready, results seen before):", kills)
    assert any(seen > 0 for _, _, seen in kills), f"no kill came after the first results: {kills}"
    expected = feed.expected_results
    worker = WorkerProcess(config, "procs", tmp_path, score_processes=2)
    try:
        worker.wait_ready()
        assert worker.get("/healthz")[0] == 200
        got = wait_for_results(kafka_bootstrap, topics["output"], expected, 120, [worker])
        time.sleep(1.0)  # anything extra (a duplicate) would show up now
        got = results(kafka_bootstrap, topics["output"])
    finally:
        children = worker.children()
        assert worker.stop() == 0, worker.log()
    wait_for(partial(all_gone, children), 10, "the score processes to end with the worker")
    reference = uninterrupted_run(kafka_bootstrap, tmp_path, input_topic, 4, expected)
    assert_same_output(got, reference)
    assert_never_back_to_learning(got)


@pytest.mark.parametrize("failure", ["kill-9", "spill-dir"])
def test_a_failing_score_process_stops_the_worker(
    kafka_bootstrap: str, tmp_path: Path, failure: str
) -> None:
    """A score process that dies (kill -9) or fails (its spill store cannot be made) ends the
    worker non-zero with the reason, instead of leaving it idle and healthy."""
    input_topic = f"procfail-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [input_topic], partitions=2)
    topics = names("procfail")
    spill = tmp_path / "spill"
    if failure == "spill-dir":
        spill.write_text("a file where the spill directory should be")
    config = write_config(tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic,
                          worker={"spill_dir": str(spill)}, **topics)
    worker = WorkerProcess(config, "procfail", tmp_path, score_processes=2)
    try:
        if failure == "kill-9":
            worker.wait_ready()
            os.kill(worker.score_processes()[0], signal.SIGKILL)
            reason = "was killed by SIGKILL"
        else:
            reason = "the spill store"
        assert worker.process.wait(60) == 1, worker.log()
    finally:
        if worker.process.poll() is None:
            worker.kill()
    log = worker.log()
    assert "error: score process procfail.score-" in log and reason in log, log
