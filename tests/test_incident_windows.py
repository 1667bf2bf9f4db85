"""Windows that close on stream time, missing intervals, and the partition clock (pure parts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import Aggregation, DetectorSpec, EmptyIntervals, load_config
from stream.windowing import LateRecord, PartitionClock, SeriesWindows


def windows(empty: EmptyIntervals = EmptyIntervals.MISSING, max_fill: int = 100) -> SeriesWindows:
    return SeriesWindows(interval_ms=1000, delay_ms=500, aggregation=Aggregation.AVG,
                         empty=empty, max_fill=max_fill)


def test_a_silent_series_closes_on_stream_time_and_its_gap_is_missing() -> None:
    w = windows()
    assert w.add(100, (1.0,)) == []
    assert w.add(1100, (3.0,)) == []  # its watermark (600) closes nothing yet
    assert w.next_close_ms() == 1000
    # The series sends nothing more; the stream's time (minus the delay) moves on.
    closed = w.advance(4000)
    assert [(c.start_ms, c.values, c.records, c.last_data_ms) for c in closed] == [
        (0, (1.0,), 1, 100), (1000, (3.0,), 1, 1100),
        (2000, None, 0, 1100), (3000, None, 0, 1100),
    ]
    assert w.next_close_ms() == 5000
    assert w.advance(3500) == []  # the watermark never goes back
    with pytest.raises(LateRecord):  # its window was closed on stream time
        w.add(3900, (2.0,))
    assert w.add(5200, (4.0,)) == []  # its own watermark, 4700, closes nothing
    assert [(c.start_ms, c.values, c.last_data_ms) for c in w.advance(6000)] == [
        (4000, None, 1100), (5000, (4.0,), 5200)
    ]


@pytest.mark.parametrize(
    ("empty", "values"),
    [(EmptyIntervals.ZERO, (0.0,)), (EmptyIntervals.PREVIOUS, (1.0,))],
)
def test_empty_policies_fill_the_intervals_closed_on_stream_time(
    empty: EmptyIntervals, values: tuple[float]
) -> None:
    w = windows(empty)
    w.add(100, (1.0,))
    assert [(c.start_ms, c.values) for c in w.advance(3000)] == [
        (0, (1.0,)), (1000, values), (2000, values)
    ]


def test_skip_closes_only_windows_with_data() -> None:
    w = windows(EmptyIntervals.SKIP)
    w.add(100, (1.0,))
    assert [c.start_ms for c in w.advance(5000)] == [0]
    assert w.next_close_ms() is None


def test_a_series_gone_for_good_stops_after_max_fill_intervals() -> None:
    w = windows(max_fill=3)
    w.add(100, (1.0,))
    assert [c.start_ms for c in w.advance(100_000)] == [0, 1000, 2000, 3000]
    assert w.next_close_ms() is None  # nothing more to schedule until it sends again
    assert w.advance(200_000) == []
    assert [(c.start_ms, c.values) for c in w.add(300_100, (2.0,))] == []
    assert [(c.start_ms, c.values) for c in w.advance(301_000)] == [(300_000, (2.0,))]


def test_windows_round_trip_with_watermark_and_last_data() -> None:
    w = windows()
    w.add(100, (1.0,))
    w.advance(2000)
    copy = windows().restore(w.to_dict())
    assert (copy.watermark_ms, copy.last_data_ms, copy.next_close_ms()) == (2000, 100, 3000)
    assert copy.advance(3000) == w.advance(3000)


def test_snapshot_from_before_the_stream_watermark_restores() -> None:
    legacy = {"open": [[2000, 1.0, 2100.0, 5.0]], "maxEvent": 2100, "nextStart": 2000,
              "previous": [4.0]}
    w = windows().restore(legacy)
    assert w.watermark_ms == 1600  # its own: max event minus the delay
    assert [(c.start_ms, c.values) for c in w.advance(3000)] == [(2000, (5.0,))]


def test_each_input_partition_has_its_own_stream_time() -> None:
    clock = PartitionClock(gap_ms=None)
    assert clock.observe("in/0", 60_000) == 60_000
    # A backlog of input partition 1 passes later; its series are not made late by partition 0.
    assert clock.observe("in/1", 1_000) == 1_000
    assert clock.observe("in/1", 500) is None  # out of order within its input: no move
    clock.schedule("slow", "in/1", 2_000)
    clock.schedule("fast", "in/0", 61_000)
    assert clock.due("in/0", 60_000) == []
    assert clock.due("in/1", clock.observe("in/1", 2_500)) == ["slow"]
    clock.schedule("fast", "in/0", 62_000)  # rescheduled: the earlier entry no longer counts
    assert clock.due("in/0", clock.observe("in/0", 61_500)) == []
    assert clock.due("in/0", clock.observe("in/0", 62_000)) == ["fast"]
    assert clock.due("in/0", clock.observe("in/0", 99_000)) == []


def test_a_pause_of_the_whole_input_does_not_count_as_silence() -> None:
    clock = PartitionClock(gap_ms=600_000)
    clock.observe("in/0", 0)
    clock.observe("in/0", 300_000)
    assert clock.silent_since("in/0", 100_000) == 100_000
    clock.observe("in/0", 300_000 + 3 * 3_600_000)  # three hours without any record
    assert clock.silent_since("in/0", 100_000) == 300_000 + 3 * 3_600_000
    copy = PartitionClock(gap_ms=600_000).restore(clock.to_dict())
    assert copy.to_dict() == clock.to_dict()
    assert copy.silent_since("in/0", 100_000) == clock.silent_since("in/0", 100_000)


def test_detector_spec_defaults_to_missing_and_reads_no_data_after() -> None:
    spec = DetectorSpec.model_validate({"name": "cpu", "input": "m", "measure": "util",
                                        "interval": "60s", "no_data_after": "10m"})
    assert spec.empty is EmptyIntervals.MISSING
    assert spec.no_data_after == 600_000
    plain = DetectorSpec.model_validate({"name": "cpu", "input": "m", "measure": "util",
                                         "interval": "60s"})
    assert plain.no_data_after is None


def test_example_detectors_config_flags_silent_hosts() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "examples" / "detectors.yaml")
    cpu = next(spec for spec in config.detectors if spec.name == "cpu")
    assert (cpu.empty, cpu.no_data_after) == (EmptyIntervals.MISSING, 600_000)
