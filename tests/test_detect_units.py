"""Kafka-free parts of ``anomstream detect``: windows, aggregation, routing, config, snapshots."""

from __future__ import annotations

import gc
import json
import math
import re
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from contract.records import timeseries_id
from detectors import ModelStage
from stream.config import (
    Aggregation,
    ConfigError,
    DetectorSpec,
    EmptyIntervals,
    load_config,
    parse_duration_ms,
)
from stream.routing import Router, parse_event_ms
from stream.state import Series, Snapshot, decode_snapshot, encode_snapshot, snapshot_header
from stream.windowing import LateRecord, SeriesWindows
from stream.worker.errors import TransactionLost, WorkerError
from stream.worker.spill import SpillStore
from stream.worker.transaction import Stage


def windows(aggregation: Aggregation = Aggregation.AVG, delay_ms: int = 0,
            empty: EmptyIntervals = EmptyIntervals.SKIP) -> SeriesWindows:
    return SeriesWindows(interval_ms=1000, delay_ms=delay_ms, aggregation=aggregation,
                         empty=empty)


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        (Aggregation.SUM, 6.0),
        (Aggregation.AVG, 2.0),
        (Aggregation.MIN, 1.0),
        (Aggregation.MAX, 3.0),
        (Aggregation.COUNT, 3.0),
        # 'last' is by event time, not arrival: the record at 900 ms wins over the one at 500 ms.
        (Aggregation.LAST, 3.0),
    ],
)
def test_aggregations(aggregation: Aggregation, expected: float) -> None:
    w = windows(aggregation, delay_ms=500)
    assert w.add(100, (2.0,)) == []
    assert w.add(900, (3.0,)) == []
    assert w.add(500, (1.0,)) == []
    closed = w.add(1500, (7.0,))
    assert [(c.start_ms, c.end_ms, c.values, c.records) for c in closed] == [
        (0, 1000, (expected,), 3)
    ]


def test_multivariate_windows_aggregate_each_measure() -> None:
    w = windows(Aggregation.MAX)
    w.add(0, (1.0, 10.0))
    w.add(10, (2.0, 5.0))
    assert w.add(1000, (0.0, 0.0))[0].values == (2.0, 10.0)


def test_delay_keeps_windows_open_and_late_is_older_than_watermark() -> None:
    w = windows(Aggregation.SUM, delay_ms=1500)
    assert w.add(100, (1.0,)) == []
    assert w.add(2000, (1.0,)) == []  # watermark 500: window [0, 1000) still open
    assert w.add(600, (1.0,)) == []  # out of order but not older than the watermark: counted
    closed = w.add(2600, (1.0,))  # watermark 1100 closes [0, 1000)
    assert [(c.start_ms, c.values) for c in closed] == [(0, (2.0,))]
    with pytest.raises(LateRecord):
        w.add(1099, (1.0,))
    assert w.add(1100, (1.0,)) == []  # exactly at the watermark is on time


def test_upcoming_is_the_next_window_to_close_while_it_is_open() -> None:
    """What the score stage scores ahead: the open window that closes next, its aggregate so
    far and its records; nothing when an empty interval closes first."""
    w = windows(Aggregation.AVG, delay_ms=1500)
    assert w.upcoming() is None
    w.add(100, (1.0,))
    w.add(1200, (7.0,))
    w.add(300, (3.0,))
    assert w.upcoming() == (0, (2.0,), 2)  # [0, 1000) before [1000, 2000)
    closed = w.add(2600, (5.0,))  # watermark 1100 closes [0, 1000)
    assert [(c.start_ms, c.values) for c in closed] == [(0, (2.0,))]
    assert w.upcoming() == (1000, (7.0,), 1)
    missing = windows(Aggregation.SUM, empty=EmptyIntervals.MISSING)
    missing.add(0, (5.0,))
    missing.add(3500, (1.0,))  # closes [0, 1000) and the empty [1000, 3000)
    assert missing.upcoming() == (3000, (1.0,), 1)
    missing.advance(4000)  # [3000, 4000) closed; [4000, 5000) is empty
    missing.add(5100, (2.0,))  # the empty [4000, 5000) closes first
    assert missing.upcoming() is None


@pytest.mark.parametrize(
    ("empty", "expected"),
    [
        (EmptyIntervals.SKIP, [(0, (5.0,))]),
        (EmptyIntervals.ZERO, [(0, (5.0,)), (1000, (0.0,)), (2000, (0.0,))]),
        (EmptyIntervals.PREVIOUS, [(0, (5.0,)), (1000, (5.0,)), (2000, (5.0,))]),
    ],
)
def test_empty_intervals(empty: EmptyIntervals, expected: list[tuple[int, tuple[float]]]) -> None:
    w = windows(Aggregation.SUM, empty=empty)
    w.add(0, (5.0,))
    closed = w.add(3500, (1.0,))
    assert [(c.start_ms, c.values) for c in closed] == expected
    assert all(c.records == 0 for c in closed[1:])


def test_windows_round_trip_through_a_dict() -> None:
    w = windows(Aggregation.AVG, delay_ms=2000, empty=EmptyIntervals.PREVIOUS)
    for t, v in [(0, 1.0), (500, 3.0), (1500, 4.0), (2600, 2.0)]:
        w.add(t, (v,))
    copy = windows(Aggregation.AVG, delay_ms=2000, empty=EmptyIntervals.PREVIOUS)
    copy.restore(json.loads(json.dumps(w.to_dict())))
    follow = [(5200, 1.0), (9000, 2.0)]
    assert [w.add(t, (v,)) for t, v in follow] == [copy.add(t, (v,)) for t, v in follow]


SPEC = DetectorSpec(name="cpu", input="metrics", measures=("util",), dimensions=("host", "dc"),
                    interval="60s")


def test_route_valid_record_to_its_series() -> None:
    router = Router([SPEC])
    payload = b'{"timestamp": "2024-01-01T00:00:30Z", "util": 3, "host": "a", "dc": 7}'
    points, rejections = router.route("metrics", payload)
    assert rejections == []
    (point,) = points
    assert point.event_ms == 1704067230000
    assert point.values == (3.0,)
    assert point.dimensions == {"host": "a", "dc": "7"}
    assert point.timeseries_id == timeseries_id("cpu", "util", {"dc": "7", "host": "a"})


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (b"[" * 100_000, "not_json"),
        (b'{"util": 1, "host": "a", "dc": "x"}', "missing_field"),
        (b'{"timestamp": 1, "host": "a", "dc": "x"}', "missing_field"),
        (b'{"timestamp": 1, "util": 1, "dc": "x"}', "missing_field"),
        (b'{"timestamp": 1, "util": "7", "host": "a", "dc": "x"}', "bad_type"),
        (b'{"timestamp": 1, "util": true, "host": "a", "dc": "x"}', "bad_type"),
        (b'{"timestamp": 1, "util": 1, "host": null, "dc": "x"}', "bad_type"),
        (b'{"timestamp": 1, "util": NaN, "host": "a", "dc": "x"}', "non_finite"),
        (b'{"timestamp": 1, "util": Infinity, "host": "a", "dc": "x"}', "non_finite"),
        (b'{"timestamp": "yesterday", "util": 1, "host": "a", "dc": "x"}', "bad_timestamp"),
        (b'{"timestamp": -5, "util": 1, "host": "a", "dc": "x"}', "bad_timestamp"),
    ],
)
def test_bad_records_get_a_reason(payload: bytes, reason: str) -> None:
    points, rejections = Router([SPEC]).route("metrics", payload)
    assert points == []
    assert [r.reason for r in rejections] == [reason]
    assert rejections[0].detail


def test_one_record_feeds_several_detectors_and_match_filters() -> None:
    specs = [
        SPEC,
        DetectorSpec(name="both", input="metrics", measures=("util", "mem"), interval=1,
                     aggregation=Aggregation.MAX),
        DetectorSpec(name="gpu-only", input="metrics", measures=("util",), interval=1,
                     match={"kind": "gpu"}),
    ]
    router = Router(specs)
    payload = b'{"timestamp": 0, "util": 1.5, "mem": 2, "host": "a", "dc": "x", "kind": "cpu"}'
    points, rejections = router.route("metrics", payload)
    assert [specs[p.detector].name for p in points] == ["cpu", "both"]
    assert points[1].values == (1.5, 2.0)
    assert rejections == []
    # Matches no detector at all: a topic nobody reads, or no 'match' fits.
    assert [r.reason for r in router.route("other", payload)[1]] == ["no_detector"]
    only_gpu = Router(specs[2:])
    assert [r.reason for r in only_gpu.route("metrics", payload)[1]] == ["no_detector"]


def test_record_rejected_by_one_detector_still_feeds_the_other() -> None:
    specs = [SPEC, DetectorSpec(name="mem", input="metrics", measures=("mem",), interval=1)]
    points, rejections = Router(specs).route(
        "metrics", b'{"timestamp": 0, "util": 1, "host": "a", "dc": "x"}'
    )
    assert [specs[p.detector].name for p in points] == ["cpu"]
    assert [(r.reason, r.detector) for r in rejections] == [("missing_field", "mem")]


def test_timestamps() -> None:
    assert parse_event_ms("2024-01-01T00:00:00+01:00") == 1704063600000
    assert parse_event_ms("2024-01-01 00:00:00") == 1704067200000
    assert parse_event_ms(1704067200000.4) == 1704067200000
    assert parse_duration_ms("1.5s") == 1500


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "detectors.yaml"
    path.write_text(text)
    return path


GOOD = """
kafka: {bootstrap: "127.0.0.1:9092"}
topics: {output: results}
detectors:
  - name: cpu
    input: metrics
    measure: util
    dimensions: [host]
    aggregation: max
    interval: 60s
    delay: 5s
    empty: previous
    threshold: 80
    params: {num_trees: 10}
"""


def test_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    spec = config.detectors[0]
    assert (spec.interval_ms, spec.delay_ms, spec.aggregation, spec.empty) == (
        60_000, 5_000, Aggregation.MAX, EmptyIntervals.PREVIOUS
    )
    assert spec.detector_config().num_trees == 10
    assert spec.detector_config().threshold == 80
    assert config.input_topics == ["metrics"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("interval: 60s", "interval: soon"),
         "line 10, detectors[0].interval: expected a duration"),
        (("aggregation: max", "aggregation: median"), "detectors[0].aggregation"),
        (("num_trees: 10", "num_tree: 10"), "unknown detector parameter(s) num_tree"),
        (("num_trees: 10", "num_trees: 0"), "num_trees=0"),
        (("empty: previous", "empty: fill"), "detectors[0].empty"),
        (("threshold: 80", "threshold: 180"), "detectors[0].threshold"),
        (("    delay: 5s", "    delay: 5s\n    color: red"), "detectors[0].color: Extra"),
        (("output: results", "output: metrics"), "which the worker writes"),
        (("measure: util", "measures: []"), "detectors[0].measures"),
    ],
)
def test_config_errors_name_file_and_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_config_yaml_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "  - name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_config(path)


def test_series_snapshot_restores_exactly() -> None:
    spec = DetectorSpec(name="cpu", input="m", measures=("util",), interval=1,
                        params={"num_trees": 10, "sample_size": 64, "warmup": 16})
    series = Series("id", spec, {"host": "a"}, 0, 100)
    for i in range(80):
        for window in series.windows.add(i * 1000, (math.sin(i / 3),)):
            series.detector.update(window.start_ms / 1000, window.values)
    payload = series.snapshot(offset=42)
    assert snapshot_header(payload)["offset"] == 42  # readable without decoding the model
    snapshot = decode_snapshot(payload)
    assert encode_snapshot(snapshot) == payload
    copy = Series.from_snapshot(snapshot, "id", spec, 0, 100)
    for i in range(80, 120):
        a = [series.detector.update(w.start_ms / 1000, w.values)
             for w in series.windows.add(i * 1000, (math.cos(i),))]
        b = [copy.detector.update(w.start_ms / 1000, w.values)
             for w in copy.windows.add(i * 1000, (math.cos(i),))]
        assert a == b
    assert a[-1].model_stage is ModelStage.INFERENCE


def test_detect_command_reports_config_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main

    path = write(tmp_path, GOOD.replace("aggregation: max", "aggregation: median"))
    assert main(["detect", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"{path}: line 9, detectors[0].aggregation" in error
    assert "Traceback" not in error


def snapshot_of(host: str, offset: int, model: bytes = b"model") -> bytes:
    return encode_snapshot(Snapshot("cpu", {"host": host}, {}, model, offset))


def test_spill_store_keeps_the_latest_snapshot_per_series_by_partition(tmp_path: Path) -> None:
    store = SpillStore(tmp_path / "spill" / "score.sqlite")
    store.put(0, "a", snapshot_of("a", 1))
    store.put(0, "a", snapshot_of("a", 2))
    store.put(0, "b", snapshot_of("b", 3))
    store.put(1, "c", snapshot_of("c", 4))
    assert (store.count(), store.count(0), store.count(1)) == (3, 2, 1)
    assert decode_snapshot(store.get("a") or b"").offset == 2
    assert sorted(json.loads(header)["offset"] for _tsid, header in store.headers(0)) == [2, 3]
    assert store.take("b") == snapshot_of("b", 3)
    assert store.take("b") is None
    store.drop_partition(0)
    assert (store.count(), store.get("a")) == (1, None)
    store.close()
    assert not (tmp_path / "spill" / "score.sqlite").exists()


def test_spill_store_failures_stop_the_worker_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "score.sqlite"
    with pytest.raises(WorkerError, match=re.escape(str(path))):
        SpillStore(path)
    full = tmp_path / "full.sqlite"
    store = SpillStore(full)
    # A disk with room for a few pages only: the write fails as on a full disk.
    store.db.execute("PRAGMA max_page_count = 8")
    with pytest.raises(WorkerError, match=re.escape(str(full)) + ".*full"):
        store.put(0, "a", snapshot_of("a", 1, model=bytes(range(256)) * 400))


def test_a_stage_drops_a_failure_and_what_its_frames_held_once_it_has_recovered() -> None:
    """Stage.run replaces the clients after a lost transaction and loops again; the failed
    batch's objects (here one model) must not stay alive through the failure's traceback until
    the next failure (they did: memory grew at each client rebuild of a 100,000-series run)."""
    class Model:
        pass

    class FakeStage(Stage):  # the real run loop; no clients
        name = "score"

        def __init__(self) -> None:
            self.stop = threading.Event()
            self.rebuilds = 0
            self.alive_after_recovery: bool | None = None
            self.held: weakref.ref[Model] | None = None

        def _loop(self) -> None:
            if self.held is None:
                model = Model()  # what a failed batch's frame holds
                self.held = weakref.ref(model)
                raise TransactionLost("outlived transaction.timeout.ms")
            gc.collect()
            self.alive_after_recovery = self.held() is not None

        def _rebuild(self, error: Exception) -> None:
            self.rebuilds += 1

    stage = FakeStage()
    stage.run()
    assert stage.rebuilds == 1
    assert stage.alive_after_recovery is False


def test_score_processes_below_one_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main

    assert main(["detect", "--config", str(write(tmp_path, GOOD)), "--score-processes", "0"]) == 2
    assert "--score-processes must be 1 or more, got 0" in capsys.readouterr().err
    path = write(tmp_path, GOOD + "worker: {score_processes: 0}\n")
    assert main(["detect", "--config", str(path)]) == 2
    assert "worker.score_processes: Input should be greater than or equal to 1" in (
        capsys.readouterr().err)


def test_merged_metrics_of_score_processes_are_one_valid_exposition() -> None:
    """The worker's /metrics with score processes: each metric family once, every process's
    samples in it, labelled with the process."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from stream.metrics import WorkerMetrics
    from stream.worker.processes import MergedMetrics, process_families

    own = WorkerMetrics()
    own.records_in.labels("route", "in").inc(7)
    children = []
    for i in range(2):
        child = WorkerMetrics()
        child.records_in.labels("score", "rep").inc(5 + i)
        child.scoring_seconds.observe(0.001)
        children.append(generate_latest(child.registry).decode())

    def families() -> list[Any]:
        return [family for i, text in enumerate(children)
                for family in process_families(text, f"w.score-{i}")]

    text = generate_latest(MergedMetrics(own.registry, "w", families).registry).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }
    assert samples[("anomstream_records_in_total", (
        ("stage", "route"), ("topic", "in"), ("worker_process", "w")))] == 7
    for i in range(2):
        assert samples[("anomstream_records_in_total", (
            ("stage", "score"), ("topic", "rep"), ("worker_process", f"w.score-{i}")))] == 5 + i
        assert samples[("anomstream_scoring_seconds_count",
                        (("worker_process", f"w.score-{i}"),))] == 1


def test_a_worker_of_score_processes_only_runs_until_stopped() -> None:
    """``--stages score --score-processes N``: the parent runs no stage of its own, so it waits
    for a stop (or a child's failure) before it stops its children."""
    from app.commands.detect import run_until_stopped

    class Children:
        stopped_with_stop_set: bool | None = None

        def failure(self) -> str | None:
            return None

        def stop(self) -> None:
            self.stopped_with_stop_set = stop.is_set()

        def join(self, timeout_s: float) -> None:
            pass

    stop = threading.Event()
    children = Children()
    timer = threading.Timer(1.2, stop.set)
    timer.start()
    assert run_until_stopped(None, children, stop) == []  # type: ignore[arg-type]
    timer.cancel()
    assert children.stopped_with_stop_set is True
