"""The score stage: per series event-time windows and a detector; each closed window yields one
result record (``contract.records``), produced in the order the batch closed them."""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from contract.records import encode_head, encode_result
from stream.config import DetectConfig
from stream.metrics import WorkerMetrics
from stream.routing import (
    LATE,
    NO_DETECTOR,
    UNEXPECTED,
    InvalidRecord,
    Router,
    load_object,
)
from stream.state import (
    Series,
    decode_snapshot,
    snapshot_header,
)
from stream.windowing import ClosedWindow, LateRecord
from stream.worker.checkpoint import CheckpointedStage, Partition
from stream.worker.errors import WorkerError
from stream.worker.topics import EVENT, H_DETECTOR, H_EVENT, H_SOURCE_PARTITION, H_SOURCE_TOPIC
from stream.worker.transaction import Headers

if TYPE_CHECKING:
    from detectors.protocol import Result

log = logging.getLogger("anomstream.worker")

# How long an idle turn of the loop spends teaching the models the windows they have scored
# (``ScoreStage.tick``): a record that arrives meanwhile waits at most this long.
LEARN_BUDGET_S = 0.02

class _Due:
    """A closed window waiting for its series' detector (``ScoreStage._flush``)."""

    __slots__ = ("error", "headers", "message", "no_data", "result", "series", "window")

    def __init__(
        self, series: Series, window: ClosedWindow, message: Any, headers: Headers,
        no_data: bool,
    ) -> None:
        self.series = series
        self.window = window
        self.message = message  # the record that closed it, and its headers: for a dead letter
        self.headers = headers
        self.no_data = no_data  # the series had been silent for its no_data_after by the end
        self.result: Result | None = None
        self.error: str | None = None


# A record to produce: topic, value, key, headers.
_Output = tuple[str, bytes | None, str | None, Headers]



class ScoreStage(CheckpointedStage):
    name = "score"

    def __init__(
        self, config: DetectConfig, instance_id: str, metrics: WorkerMetrics,
        stop: threading.Event,
    ) -> None:
        super().__init__(config, instance_id, metrics, stop, f"{config.kafka.group_id}.score",
                         [config.topics.repartition])
        self.router = Router(config.detectors)
        self.max_live = config.worker.max_live_models
        self._kept_noted: set[str] = set()  # detectors whose kept parameters were logged
        self._last_gauges = 0.0
        self._in = metrics.records_in.labels(self.name, config.topics.repartition)
        self._results = metrics.records_out.labels("result")
        self._windows = {spec.name: metrics.windows_closed.labels(spec.name)
                         for spec in config.detectors}
        self._anomalies = {spec.name: metrics.anomalies.labels(spec.name)
                           for spec in config.detectors}
        self._scoring = metrics.scoring_seconds
        # Closed windows not yet scored, by series, and what the batch produces, in order:
        # result records (their windows) and dead letters.
        self._due: dict[Series, list[_Due]] = {}
        self._due_windows = 0  # windows in _due
        self._outbox: list[_Due | _Output] = []
        self.slice_windows = config.worker.score_slice_windows
        # Series whose model has scored windows it has not learned yet (``learn_pending``), and
        # series whose open window got records, to score ahead (``prepare``) once it looks
        # complete: both wait for an idle turn of the loop, one that closed no window.
        self._unlearned: dict[Series, None] = {}
        self._upcoming: dict[Series, None] = {}
        self._closed_windows = False  # in this turn of the loop
        self._caught_up = False  # the last batch was not a full one: no backlog
        self._max_batch = config.worker.max_batch

    # -- processing ---------------------------------------------------------------------------

    def process(self, messages: list[Any]) -> None:
        """Window the batch's records in offset order, then score the windows they closed.

        Scoring is grouped by series (each series' windows consecutively, in closing order):
        its forest then stays in the CPU caches across its windows, where record order would
        touch every forest of the batch once per window. A series' results depend only on its
        own windows, so the grouping changes no result; what the batch yields is produced in
        the order it arose, so the output topics are the same as with record-order scoring.
        """
        consumed = False
        ticks = 0
        slice_windows = self.slice_windows
        self._caught_up = len(messages) < self._max_batch
        for message in messages:
            if message.error() is not None:
                self.consumer_error(message)
                continue
            consumed = True
            part = self.partitions.get(message.partition())
            if part is None:  # a record fetched just before its partition was revoked
                continue
            offset = message.offset()
            live_output = offset >= part.committed
            headers = message.headers() or []
            event = headers[H_EVENT][1]
            event_ms: int = EVENT.unpack_from(event)[0]
            source = (headers[H_SOURCE_TOPIC][1] + b"/" + headers[H_SOURCE_PARTITION][1]).decode()
            if headers[H_DETECTOR][1]:
                self._apply(part, message, headers, event, event_ms, source, live_output)
            else:  # a tick of the input's time (RouteStage._tick)
                ticks += 1
            # Every record moves its input's stream time, also one skipped or late: the clock is
            # a function of the partition's records, so a replay closes the same windows.
            self._advance_clock(part, source, event_ms, message, headers, live_output)
            part.next_offset = offset + 1
            if self._due_windows >= slice_windows:
                # A slice: its results go out, and are committed (with the offsets up to this
                # record, whose windows are all scored) once the commit interval has passed.
                self._flush()
                if (self.in_transaction and time.monotonic() - self.transaction_began
                        >= self.commit_interval_s and not self.commit()):
                    break  # aborted and rewound: the rest of the batch is fetched again
        self._flush()
        if not self.in_transaction and any(
            p.next_offset > p.committed for p in self.partitions.values()
        ):
            self.begin()  # offsets advanced (even without output): commit them on schedule
        # Input records only: ticks are the route stage's bookkeeping, not records consumed.
        self._in.inc(len(messages) - ticks)
        if consumed:
            self.last_progress = time.monotonic()

    def _apply(
        self, part: Partition, message: Any, headers: Headers, event: bytes, event_ms: int,
        source: str, live_output: bool,
    ) -> None:
        """Window one record into its series."""
        tsid = message.key().decode()
        series = self._series(part, tsid, headers, message.value(), live_output)
        if series is None or message.offset() < series.skip_below:
            return
        values = _values_struct(len(series.spec.measures)).unpack_from(event, 8)
        try:
            closed = series.windows.add(event_ms, values)
        except LateRecord as late:
            if live_output:
                self._dead_letter(message, headers, LATE, str(late))
            return
        if not series.dirty:
            series.dirty = True
            series.unsaved_from = message.offset()
        series.source = source
        self._upcoming[series] = None
        self._closed(part, series, closed, message, headers, live_output)

    def _advance_clock(
        self, part: Partition, source: str, event_ms: int, message: Any, headers: Headers,
        live_output: bool,
    ) -> None:
        """Close the windows that the stream time of ``source`` has passed, in every series
        of that input partition, whether it sent anything lately or not."""
        clock = part.clock
        for tsid in clock.due(source, clock.observe(source, event_ms)):
            series = self.lru.get(tsid) or self._stored_series(part, tsid)
            if series is None:  # its detector was removed from the configuration
                continue
            closed = series.windows.advance(clock.times[source] - series.spec.delay_ms)
            if not series.dirty:
                series.dirty = True
                series.unsaved_from = message.offset()
            self._closed(part, series, closed, message, headers, live_output)

    def _closed(
        self, part: Partition, series: Series, closed: list[ClosedWindow], message: Any,
        headers: Headers, live_output: bool,
    ) -> None:
        """Queue the windows that closed for scoring; schedule the series' next close."""
        spec = series.spec
        if closed:
            series.changes += len(closed)
            self._due_windows += len(closed)
            no_data_after = spec.no_data_after
            if no_data_after is None:
                due = [_Due(series, window, message, headers, False) for window in closed]
            else:
                since = part.clock.silent_since
                due = [
                    _Due(
                        series, window, message, headers,
                        window.records == 0 and window.end_ms
                        - since(series.source, window.last_data_ms) >= no_data_after,
                    )
                    for window in closed
                ]
            pending = self._due.get(series)
            if pending is None:
                self._due[series] = due
            else:
                pending.extend(due)
            if live_output:
                self._outbox.extend(due)
        next_close = series.windows.next_close_ms()
        part.clock.schedule(
            series.timeseries_id, series.source,
            None if next_close is None else next_close + spec.delay_ms,
        )

    def _flush(self) -> None:
        """Score the pending windows series by series; produce the outbox in its order.

        A caught-up stage leaves the learning of each model's last window for an idle turn
        (``tick``), so the results of a burst of windows closing together go out first.
        """
        perf = time.perf_counter
        observe = self._scoring.observe
        scored = 0
        traced = False
        unlearned = self._unlearned
        if self._due:
            self._closed_windows = True
        # Under a backlog results wait anyway, and a model learns best right after it scored
        # (its forest is in the caches): only a caught-up stage leaves the learning for later.
        learn_now = not self._caught_up
        for series, windows in self._due.items():
            detector = series.detector
            for due in windows:
                window = due.window
                if window.records:
                    series.window_records = window.records
                began = perf()
                try:
                    due.result = detector.update(window.start_ms / 1000, window.values)
                except Exception as error:  # deterministic, so a replay fails the same way
                    if not traced and not self.dead_letter_log.counts[UNEXPECTED]:
                        traced = True  # one traceback per summary interval, not per window
                        log.exception("score: series %s, window %d", series.timeseries_id,
                                      window.start_ms)
                    due.error = f"{type(error).__name__}: {error}"
                    continue
                observe(perf() - began)
                scored += 1
            if learn_now:
                detector.learn_pending()
            else:
                unlearned[series] = None
            self._windows[series.spec.name].inc(len(windows))
        self._due.clear()
        self._due_windows = 0
        if self._outbox:
            self.begin()  # once for the batch, not per record
        output = self.config.topics.output
        send = self.producer.produce
        anomalies: dict[str, int] = {}
        for entry in self._outbox:
            if isinstance(entry, tuple):  # a dead letter
                self.produce(*entry)
            elif entry.result is not None:
                series = entry.series
                value = _result_record(series, entry.window, entry.result, entry.no_data)
                try:
                    send(output, value, series.timeseries_id)
                except BufferError:  # local queue full: ``produce`` waits for room
                    self.produce(output, value, series.timeseries_id)
                if entry.result.anomaly_decision:
                    name = series.spec.name
                    anomalies[name] = anomalies.get(name, 0) + 1
            else:
                self.produce(*self._dead_letter_args(entry.message.value(), entry.headers,
                                                     UNEXPECTED, entry.error or ""))
        self._outbox.clear()
        self._results.inc(scored)
        for name, count in anomalies.items():
            self._anomalies[name].inc(count)

    def _series(
        self, part: Partition, tsid: str, headers: Headers, value: bytes | None,
        live_output: bool,
    ) -> Series | None:
        series = self.lru.get(tsid)
        if series is not None:
            self.lru.move_to_end(tsid)
            return series
        detector_name = headers[H_DETECTOR][1].decode()
        index = self.spec_index.get(detector_name)
        if index is None:  # the detector was removed from the configuration
            if live_output:
                self._dead_letter_raw(value, headers, NO_DETECTOR,
                                      f"detector {detector_name!r} is no longer configured")
            return None
        spec = self.config.detectors[index]
        payload = self.spill.take(tsid)
        if payload is not None:
            return self._load(part, tsid, payload, index)
        try:
            dimensions = self.router.point(index, load_object(value)).dimensions
        except InvalidRecord as error:  # the route stage validated it; a config change?
            if live_output:
                self._dead_letter_raw(value, headers, error.reason, error.detail)
            return None
        return self._live(part, Series(tsid, spec, dimensions, part.number, self.max_fill))

    def _stored_series(self, part: Partition, tsid: str) -> Series | None:
        """A series not in memory, loaded from its snapshot; None if its detector is gone."""
        payload = self.spill.get(tsid)
        if payload is None:
            return None
        index = self.spec_index.get(snapshot_header(payload)["detector"])
        if index is None:
            return None
        self.spill.delete(tsid)
        return self._load(part, tsid, payload, index)

    def _load(self, part: Partition, tsid: str, payload: bytes, index: int) -> Series:
        try:
            snapshot = decode_snapshot(payload)
            series = Series.from_snapshot(
                snapshot, tsid, self.config.detectors[index], part.number, self.max_fill
            )
        except Exception as error:
            # Starting the series afresh would silently send it back to LEARNING.
            raise WorkerError(
                f"the snapshot of series {tsid} ({self.config.topics.state} partition "
                f"{part.number}) cannot be restored: {error}"
            ) from error
        series.skip_below = snapshot.offset
        self._note_kept_parameters(series)
        return self._live(part, series)

    def _note_kept_parameters(self, series: Series) -> None:
        """Say once per detector when restored series keep learned parameters that the
        configuration has changed since (their models were made with them)."""
        spec = series.spec
        if spec.name in self._kept_noted:
            return
        kept = series.detector.config.learned_differences(spec.detector_config())
        if kept:
            self._kept_noted.add(spec.name)
            shown = ", ".join(f"{name}={getattr(series.detector.config, name)!r}" for name in kept)
            log.warning(
                "detector %r: restored series keep %s, which their models were learned with; "
                "series started from now on use the configured values", spec.name, shown,
            )

    def _live(self, part: Partition, series: Series) -> Series:
        tsid = series.timeseries_id
        series.record_prefix = _record_prefix(series)
        part.live[tsid] = series
        self.lru[tsid] = series
        while len(self.lru) > self.max_live:
            self._evict(next(iter(self.lru.values())))
        return series

    def _evict(self, series: Series) -> None:
        if series in self._due:  # its snapshot must hold every window it closed
            self._flush()
        part = self.partitions[series.partition]
        payload = (
            self._snapshot(part, series, "eviction") if series.dirty
            else series.snapshot(part.next_offset)
        )
        self.spill.put(part.number, series.timeseries_id, payload)
        del part.live[series.timeseries_id]
        del self.lru[series.timeseries_id]
        self._unlearned.pop(series, None)  # its snapshot has learned everything
        self._upcoming.pop(series, None)
        self.metrics.evictions.inc()

    def _dead_letter(
        self, message: Any, headers: Headers, reason: str, detail: str
    ) -> None:
        self._dead_letter_raw(message.value(), headers, reason, detail)

    def _dead_letter_raw(
        self, value: bytes | None, headers: Headers, reason: str, detail: str
    ) -> None:
        """Queue a dead letter; ``_flush`` produces it in order with the batch's results."""
        self._outbox.append(self._dead_letter_args(value, headers, reason, detail))

    def _dead_letter_args(
        self, value: bytes | None, headers: Headers, reason: str, detail: str
    ) -> _Output:
        out: Headers = [("reason", reason), ("detail", detail)]
        out.extend(headers[H_SOURCE_TOPIC:])
        out.append(headers[H_DETECTOR])
        self.metrics.dead_letters.labels(reason).inc()
        self.dead_letter_log.count(reason)
        return (self.config.topics.dead_letter, value, None, out)

    def tick(self) -> None:
        if (self._unlearned or self._upcoming) and not self._closed_windows:
            self._learn_pending()
        self._closed_windows = False  # a turn that closes none is idle
        now = time.monotonic()
        if now - self._last_gauges < 1.0:
            return
        self._last_gauges = now
        unsaved = [p for p in self.partitions.values() if p.next_offset > p.checkpoint_offset]
        if any(now - p.checkpointed_at >= self.snapshot_interval_s for p in unsaved):
            self.commit()  # a quiet partition still gets (and finishes) its checkpoint on time
        self.metrics.live_series.set(len(self.lru))
        self.metrics.stored_series.set(self.spill.count())
        # How old the state a restore would start from is: 0 when the checkpoint is current.
        self.metrics.snapshot_age.set(
            max((now - p.checkpoint_time for p in unsaved), default=0.0)
        )

    def bursting(self) -> bool:
        return self._caught_up and self._closed_windows

    def poll_timeout_s(self) -> float:
        # Idle with models left to learn: learn (``tick``) between polls that do not wait.
        busy = self._closed_windows
        return 0.0 if (self._unlearned or self._upcoming) and not busy else 0.05

    def _learn_pending(self) -> None:
        """Let the models learn their scored windows and score their open ones ahead, for up to
        ``LEARN_BUDGET_S``.

        A model left out learns before it is next used or saved, and scores its next window
        when it closes; doing it now, while the stage has nothing else to do, takes that work
        off the next burst of windows.
        """
        unlearned, upcoming = self._unlearned, self._upcoming
        deadline = time.monotonic() + LEARN_BUDGET_S
        while (upcoming or unlearned) and time.monotonic() < deadline:
            for _ in range(32):  # popitem takes from the end: O(1), and order is irrelevant
                if upcoming:
                    series, _none = upcoming.popitem()
                    unlearned.pop(series, None)  # prepare learns first
                    window = series.windows.upcoming()
                    if window is None or window[2] < series.window_records:
                        series.detector.learn_pending()
                    else:
                        series.detector.prepare(window[0] / 1000, window[1])
                elif unlearned:
                    series, _none = unlearned.popitem()
                    series.detector.learn_pending()
                else:
                    break

    # -- rebalances ----------------------------------------------------------------------------

    def _drop(self, numbers: Iterable[int]) -> None:
        dropped = set(numbers)
        super()._drop(dropped)
        self._unlearned = {s: None for s in self._unlearned if s.partition not in dropped}
        self._upcoming = {s: None for s in self._upcoming if s.partition not in dropped}

    def forget(self) -> None:
        self._drop(list(self.partitions))
        self._due.clear()
        self._due_windows = 0
        self._outbox.clear()


@functools.cache
def _values_struct(count: int) -> struct.Struct:
    """The packed values of a repartitioned record (after its event time)."""
    return struct.Struct(f">{count}d")


def _record_prefix(series: Series) -> bytes:
    """The constant fields of a series' result records, encoded once."""
    spec = series.spec
    return encode_head(
        spec.name, spec.measure, series.timeseries_id, series.dimensions, spec.threshold
    )


def _result_record(series: Series, window: ClosedWindow, result: Result, no_data: bool) -> bytes:
    """One result record of a scored window."""
    return encode_result(
        series.record_prefix, series.spec.measures, window.values, result.expected_values,
        score=result.anomaly_score, decision=result.anomaly_decision,
        confidence=result.confidence, stage=result.model_stage.value,
        processed=result.processed_data_points, start_ms=window.start_ms,
        end_ms=window.end_ms, raw_score=result.raw_score, no_data=no_data,
        last_data_ms=window.last_data_ms, attribution=result.attribution,
    )
