"""Event-time tumbling windows of one series, closed by that series' watermark. Pure, no I/O.

The watermark is the highest event time the series has seen minus the allowed delay. A window
``[start, start + interval)`` closes once the watermark reaches its end; a record older than the
watermark is late (its window may already be closed) and is refused with ``LateRecord``.
The watermark is per series on purpose: a series' results then depend only on its own records,
so a replay, a repartition or a rebalance reproduces them exactly.

>>> windows = SeriesWindows(interval_ms=1000, delay_ms=0, aggregation=Aggregation.SUM)
>>> windows.add(100, (1.0,)), windows.add(900, (2.0,))
([], [])
>>> [(w.start_ms, w.values) for w in windows.add(2100, (5.0,))]
[(0, (3.0,))]
>>> windows.add(1500, (1.0,))
Traceback (most recent call last):
...
stream.windowing.LateRecord: event time 1500 is older than the watermark 2100
"""

from __future__ import annotations

from typing import Any, NamedTuple

from stream.config import Aggregation, EmptyIntervals


class LateRecord(Exception):
    """The record's event time is older than the series' watermark."""


class ClosedWindow(NamedTuple):
    start_ms: int
    end_ms: int
    values: tuple[float, ...]
    records: int  # records aggregated; 0 for an empty interval filled with zero/previous


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
        "max_event_ms",
        "max_fill",
        "next_start_ms",
        "open",
        "previous",
    )

    def __init__(
        self,
        interval_ms: int,
        delay_ms: int = 0,
        aggregation: Aggregation = Aggregation.AVG,
        empty: EmptyIntervals = EmptyIntervals.SKIP,
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

    @property
    def watermark_ms(self) -> int | None:
        return None if self.max_event_ms is None else self.max_event_ms - self.delay_ms

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
            return self._close(event_ms - self.delay_ms)
        return []

    def _accumulate(self, acc: list[float], event_ms: int, values: tuple[float, ...]) -> None:
        acc[0] += 1
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
            acc[1] = float(event_ms)
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
            closed.append(ClosedWindow(start, start + self.interval_ms, values, int(acc[0])))
            self.previous = values
            self.next_start_ms = start + self.interval_ms
        # Empty intervals after the last closed window up to the watermark are filled now, so a
        # series that pauses keeps producing (zero or previous) results as its watermark moves.
        if self.empty is not EmptyIntervals.SKIP and self.next_start_ms is not None:
            last_closable = watermark - watermark % self.interval_ms
            closed.extend(self._fill(self.next_start_ms, last_closable))
        return closed

    def _fill(self, start: int, stop: int) -> list[ClosedWindow]:
        """Results for the empty intervals ``[start, stop)``, per the empty-interval policy."""
        if start >= stop or self.empty is EmptyIntervals.SKIP:
            return []
        gap = (stop - start) // self.interval_ms
        filled: list[ClosedWindow] = []
        if gap <= self.max_fill:
            for s in range(start, stop, self.interval_ms):
                if self.empty is EmptyIntervals.ZERO:
                    values = tuple(0.0 for _ in self.previous or (0.0,))
                elif self.previous is None:
                    continue
                else:
                    values = self.previous
                filled.append(ClosedWindow(s, s + self.interval_ms, values, 0))
        self.next_start_ms = stop
        return filled

    def to_dict(self) -> dict[str, Any]:
        return {
            "open": [[start, *acc] for start, acc in sorted(self.open.items())],
            "maxEvent": self.max_event_ms,
            "nextStart": self.next_start_ms,
            "previous": None if self.previous is None else list(self.previous),
        }

    def restore(self, data: dict[str, Any]) -> SeriesWindows:
        self.open = {int(row[0]): [float(x) for x in row[1:]] for row in data["open"]}
        self.max_event_ms = data["maxEvent"]
        self.next_start_ms = data["nextStart"]
        previous = data["previous"]
        self.previous = None if previous is None else tuple(previous)
        return self
