"""Event-time tumbling windows of one series. Pure, no I/O.

The series' watermark is the latest event time known to its stream minus the allowed delay: the
series' own highest event time, and (``advance``) the stream time of its partition, which the
worker derives from the records of every series (docs/decisions/0007-incidents.md). A window
``[start, start + interval)`` closes once the watermark reaches its end, even if the series sends
nothing more; a record older than the watermark is late (its window may already be closed) and is
refused with ``LateRecord``. Both inputs of the watermark come from the records in the order of
their partition, never from a clock, so a replay reproduces the same windows exactly.

Intervals without a record are closed too, as the ``empty`` policy says: a missing point (the
detector imputes it and keeps its daily alignment), a zero, the previous value, or nothing.

>>> windows = SeriesWindows(interval_ms=1000, delay_ms=0, aggregation=Aggregation.SUM)
>>> windows.add(100, (1.0,)), windows.add(900, (2.0,))
([], [])
>>> [(w.start_ms, w.values) for w in windows.add(2100, (5.0,))]
[(0, (3.0,)), (1000, None)]
>>> windows.add(1500, (1.0,))
Traceback (most recent call last):
...
stream.windowing.LateRecord: event time 1500 is older than the watermark 2100
>>> [(w.start_ms, w.values, w.last_data_ms) for w in windows.advance(4000)]
[(2000, (5.0,), 2100), (3000, None, 2100)]
"""

from __future__ import annotations

import heapq
from typing import Any, NamedTuple

from stream.config import Aggregation, EmptyIntervals


class LateRecord(Exception):
    """The record's event time is older than the series' watermark."""


class ClosedWindow(NamedTuple):
    start_ms: int
    end_ms: int
    values: tuple[float, ...] | None  # None: no record, and the policy says "missing"
    records: int  # records aggregated; 0 for an empty interval
    last_data_ms: int  # event time of the series' last record up to the window's end


class SeriesWindows:
    """Open windows, watermark and fill state of one series.

    Accumulators are lists ``[count, last_event_ms, v1, ..., vn]``: sums for sum/avg, extremes for
    min/max, the latest values (by event time, ties to the later arrival) for last.
    """

    __slots__ = (
        "aggregation",
        "delay_ms",
        "empty",
        "interval_ms",
        "last_data_ms",
        "max_event_ms",
        "max_fill",
        "next_start_ms",
        "open",
        "previous",
        "watermark_ms",
    )

    def __init__(
        self,
        interval_ms: int,
        delay_ms: int = 0,
        aggregation: Aggregation = Aggregation.AVG,
        empty: EmptyIntervals = EmptyIntervals.MISSING,
        max_fill: int = 10_000,
    ) -> None:
        self.interval_ms = interval_ms
        self.delay_ms = delay_ms
        self.aggregation = aggregation
        self.empty = empty
        self.max_fill = max_fill
        self.open: dict[int, list[float]] = {}
        self.max_event_ms: int | None = None
        self.next_start_ms: int | None = None  # start of the next window to emit
        self.previous: tuple[float, ...] | None = None  # last emitted values, for 'previous'
        self.watermark_ms: int | None = None
        self.last_data_ms = 0  # event time of the last record in a closed window

    def add(self, event_ms: int, values: tuple[float, ...]) -> list[ClosedWindow]:
        """Aggregate one record; return the windows that its watermark advance closed."""
        watermark = self.watermark_ms
        if watermark is not None and event_ms < watermark:
            raise LateRecord(f"event time {event_ms} is older than the watermark {watermark}")
        start = event_ms - event_ms % self.interval_ms
        acc = self.open.get(start)
        if acc is None:
            self.open[start] = [1.0, float(event_ms), *values]
        else:
            self._accumulate(acc, event_ms, values)
        if self.max_event_ms is None or event_ms > self.max_event_ms:
            self.max_event_ms = event_ms
            return self.advance(event_ms - self.delay_ms)
        return []

    def advance(self, watermark: int) -> list[ClosedWindow]:
        """Move the watermark to ``watermark`` (if later); return the windows that closed."""
        if self.watermark_ms is not None and watermark <= self.watermark_ms:
            return []
        self.watermark_ms = watermark
        return self._close(watermark)

    def next_close_ms(self) -> int | None:
        """The watermark at which ``advance`` next closes a window; None while nothing would.

        That is the end of the earliest open window or, for a series that has gone quiet, of its
        next empty interval, until ``max_fill`` of them have been filled since its last record.
        """
        interval = self.interval_ms
        open_starts = self.open
        # Called for every record and closed window: no list of candidates.
        earliest = min(open_starts) + interval if open_starts else None
        next_start = self.next_start_ms
        if (
            next_start is not None
            and self.empty is not EmptyIntervals.SKIP
            and next_start < self._fill_horizon()
            and (earliest is None or next_start + interval < earliest)
        ):
            return next_start + interval
        return earliest

    def upcoming(self) -> tuple[int, tuple[float, ...], int] | None:
        """The start, values so far and records of the window that closes next, if it is an
        open one (no empty interval comes first); None otherwise."""
        if not self.open:
            return None
        start = min(self.open)
        next_start = self.next_start_ms
        if next_start is not None and next_start < start and self.empty is not EmptyIntervals.SKIP:
            return None
        acc = self.open[start]
        return start, self._result(acc), int(acc[0])

    def _fill_horizon(self) -> int:
        """Empty intervals starting at or after this are not filled: ``max_fill`` past the end of
        the interval of the series' last record."""
        last = self.last_data_ms
        return last - last % self.interval_ms + (1 + self.max_fill) * self.interval_ms

    def _accumulate(self, acc: list[float], event_ms: int, values: tuple[float, ...]) -> None:
        acc[0] += 1
        acc[1] = max(acc[1], float(event_ms))  # for 'last', also the event time of its values
        kind = self.aggregation
        if kind is Aggregation.SUM or kind is Aggregation.AVG:
            for i, v in enumerate(values, 2):
                acc[i] += v
        elif kind is Aggregation.MIN:
            for i, v in enumerate(values, 2):
                acc[i] = min(acc[i], v)
        elif kind is Aggregation.MAX:
            for i, v in enumerate(values, 2):
                acc[i] = max(acc[i], v)
        elif kind is Aggregation.LAST and event_ms >= acc[1]:
            acc[2:] = values

    def _result(self, acc: list[float]) -> tuple[float, ...]:
        count = acc[0]
        kind = self.aggregation
        if kind is Aggregation.COUNT:
            return tuple(count for _ in acc[2:])
        if kind is Aggregation.AVG:
            return tuple(v / count for v in acc[2:])
        return tuple(acc[2:])

    def _close(self, watermark: int) -> list[ClosedWindow]:
        interval = self.interval_ms
        closable = [start for start in self.open if start + interval <= watermark]
        if not closable:
            return []
        if len(closable) > 1:
            closable.sort()
        closed: list[ClosedWindow] = []
        for start in closable:
            if self.next_start_ms is not None:
                closed.extend(self._fill(self.next_start_ms, start))
            acc = self.open.pop(start)
            values = self._result(acc)
            self.last_data_ms = max(self.last_data_ms, int(acc[1]))
            closed.append(ClosedWindow(start, start + self.interval_ms, values, int(acc[0]),
                                       self.last_data_ms))
            self.previous = values
            self.next_start_ms = start + self.interval_ms
        # Empty intervals after the last closed window up to the watermark are closed now, so a
        # series that pauses keeps producing results as its watermark moves.
        if self.empty is not EmptyIntervals.SKIP and self.next_start_ms is not None:
            last_closable = watermark - watermark % self.interval_ms
            closed.extend(self._fill(self.next_start_ms, last_closable))
        return closed

    def _fill(self, start: int, stop: int) -> list[ClosedWindow]:
        """Results for the empty intervals ``[start, stop)``, per the empty-interval policy."""
        if start >= stop or self.empty is EmptyIntervals.SKIP:
            return []
        filled: list[ClosedWindow] = []
        values: tuple[float, ...] | None
        for s in range(start, min(stop, self._fill_horizon()), self.interval_ms):
            if self.empty is EmptyIntervals.MISSING:
                values = None
            elif self.empty is EmptyIntervals.ZERO:
                values = tuple(0.0 for _ in self.previous or (0.0,))
            elif self.previous is None:
                continue
            else:
                values = self.previous
            filled.append(ClosedWindow(s, s + self.interval_ms, values, 0, self.last_data_ms))
        self.next_start_ms = max(start, stop)
        return filled

    def to_dict(self) -> dict[str, Any]:
        return {
            "open": [[start, *acc] for start, acc in sorted(self.open.items())],
            "maxEvent": self.max_event_ms,
            "nextStart": self.next_start_ms,
            "previous": None if self.previous is None else list(self.previous),
            "watermark": self.watermark_ms,
            "lastData": self.last_data_ms,
        }

    def restore(self, data: dict[str, Any]) -> SeriesWindows:
        self.open = {int(row[0]): [float(x) for x in row[1:]] for row in data["open"]}
        self.max_event_ms = data["maxEvent"]
        self.next_start_ms = data["nextStart"]
        previous = data["previous"]
        self.previous = None if previous is None else tuple(previous)
        # Snapshots written before the stream watermark: the series' own watermark, and the end
        # of its last closed window as an approximate time of its last record.
        max_event = self.max_event_ms
        self.watermark_ms = data.get(
            "watermark", None if max_event is None else max_event - self.delay_ms
        )
        self.last_data_ms = data.get("lastData", self.next_start_ms or 0)
        return self


class PartitionClock:
    """Stream time per input partition, as seen by one partition of the repartition topic, and
    when each of its series is next due.

    Every record carries the input partition it came from (its ``source``). The stream time of a
    source is the highest event time among its records so far: the records of one input partition
    come in the order they were produced, whereas the route stage interleaves different input
    partitions as it pleases (a backlog of one can pass before another's). A series is closed on
    the time of the source of its latest record, so a series on a slower input partition is never
    made late by a faster one; a series that stops sending is closed as the other series of its
    input partition move on. (An input partition that goes quiet altogether holds its series back:
    nothing in the input says how late it is.)

    ``resumed`` is, per source, where its time last jumped by at least ``gap_ms`` (the whole input
    was quiet, say a market closed overnight): a series' silence counts from there at the
    earliest, so the input resuming does not flag every series as silent.

    The schedule maps each series to its source and the time at which one of its windows closes
    next (``schedule``); ``due`` hands out the series whose time has come.

    >>> clock = PartitionClock(gap_ms=None)
    >>> clock.observe("in/0", 5000), clock.observe("in/0", 3000), clock.observe("in/1", 1000)
    (5000, None, 1000)
    >>> clock.schedule("a", "in/0", 6000); clock.schedule("b", "in/1", 2000)
    >>> clock.due("in/0", clock.observe("in/0", 7000))
    ['a']
    """

    __slots__ = ("_due_at", "_heaps", "gap_ms", "resumed", "times")

    def __init__(self, gap_ms: int | None) -> None:
        self.gap_ms = gap_ms
        self.times: dict[str, int] = {}
        self.resumed: dict[str, int] = {}
        self._heaps: dict[str, list[tuple[int, str]]] = {}
        self._due_at: dict[str, tuple[str, int]] = {}

    def observe(self, source: str, event_ms: int) -> int | None:
        """Account a record of ``source``; its new stream time if that moved, else None."""
        previous = self.times.get(source)
        if previous is not None and event_ms <= previous:
            return None
        self.times[source] = event_ms
        if previous is not None and self.gap_ms is not None and event_ms - previous >= self.gap_ms:
            self.resumed[source] = event_ms
        return event_ms

    def silent_since(self, source: str, last_data_ms: int) -> int:
        """Since when a series of ``source`` whose last record was at ``last_data_ms`` is silent."""
        return max(last_data_ms, self.resumed.get(source, last_data_ms))

    def schedule(self, key: str, source: str, due_ms: int | None) -> None:
        """``key`` is next due when ``source`` reaches ``due_ms`` (None: not until it sends)."""
        if due_ms is None:
            self._due_at.pop(key, None)
        elif self._due_at.get(key) != (source, due_ms):
            self._due_at[key] = (source, due_ms)
            heapq.heappush(self._heaps.setdefault(source, []), (due_ms, key))

    def due(self, source: str, time_ms: int | None) -> list[str]:
        """The keys of ``source`` due at or before ``time_ms``, earliest first; unscheduled."""
        heap = self._heaps.get(source)
        if heap is None or time_ms is None:
            return []
        due_at = self._due_at
        keys = []
        while heap and heap[0][0] <= time_ms:
            due_ms, key = heapq.heappop(heap)
            if due_at.get(key) == (source, due_ms):  # not superseded by a later schedule
                del due_at[key]
                keys.append(key)
        return keys

    def to_dict(self) -> dict[str, Any]:
        return {"times": dict(self.times), "resumed": dict(self.resumed)}

    def restore(self, data: dict[str, Any]) -> PartitionClock:
        self.times = {str(k): int(v) for k, v in data["times"].items()}
        self.resumed = {str(k): int(v) for k, v in data["resumed"].items()}
        return self
