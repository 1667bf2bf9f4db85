"""Log lines that stay readable when the same thing happens thousands of times.

A broker outage repeats one consumer error for minutes, and a bad producer can send thousands of
bad records a second; one line per event would bury everything else in the log.

>>> import logging
>>> summary = DeadLetterLog(logging.getLogger("doc"), "route", interval_s=10.0,
...                         clock=lambda: 0.0)
>>> for _ in range(800):
...     summary.count("non_finite")
>>> summary.count("not_json")
>>> summary.line()
'route: dead-lettered 801 records: non_finite (800), not_json (1)'
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable


class _IntervalLog:
    """A logger, the prefix of its lines, and the interval (on ``clock``) they are paced by."""

    def __init__(self, logger: logging.Logger, prefix: str, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.prefix = prefix
        self.interval_s = interval_s
        self.clock = clock


class ThrottledLog(_IntervalLog):
    """Warn about each distinct message at most once per ``interval_s``."""

    def __init__(self, logger: logging.Logger, prefix: str, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logger, prefix, interval_s, clock)
        self._last: dict[str, float] = {}

    def warn(self, text: str) -> None:
        now = self.clock()
        last = self._last.get(text)
        if last is None or now - last >= self.interval_s:
            if len(self._last) > 1000:  # distinct texts are few; bound it all the same
                self._last.clear()
            self._last[text] = now
            self.logger.warning("%s: %s", self.prefix, text)


class DeadLetterLog(_IntervalLog):
    """One summary line per ``interval_s`` of the records dead-lettered, by reason."""

    def __init__(self, logger: logging.Logger, prefix: str, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logger, prefix, interval_s, clock)
        self.counts: Counter[str] = Counter()
        self._since = clock()

    def count(self, reason: str, records: int = 1) -> None:
        self.counts[reason] += records

    def line(self) -> str:
        reasons = ", ".join(f"{reason} ({n})" for reason, n in self.counts.most_common())
        return f"{self.prefix}: dead-lettered {sum(self.counts.values())} records: {reasons}"

    def report(self, force: bool = False) -> None:
        """Log the summary if the interval is over (or ``force``) and anything was counted."""
        now = self.clock()
        if not force and now - self._since < self.interval_s:
            return
        if self.counts:
            self.logger.warning("%s", self.line())
            self.counts.clear()
        self._since = now
