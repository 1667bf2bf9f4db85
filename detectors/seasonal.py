"""Daily-seasonal reference values for one variable, robust to yesterday's anomalies."""

from __future__ import annotations

from array import array
from typing import Any

SECONDS_PER_DAY = 86_400.0
_MIN_POINTS_PER_DAY = 12
_MAX_POINTS_PER_DAY = 1_440


def points_per_day(median_step_seconds: float) -> int:
    """The daily period in points for a sampling step, or 0 when no daily cycle applies.

    Series sampled more coarsely than every two hours, or more finely than every minute, get no
    daily reference: too few points a day to compare, or too much memory for little gain.

    >>> points_per_day(300.0), points_per_day(3600.0), points_per_day(86400.0)
    (288, 24, 0)
    """
    if median_step_seconds <= 0.0:
        return 0
    period = round(SECONDS_PER_DAY / median_step_seconds)
    return period if _MIN_POINTS_PER_DAY <= period <= _MAX_POINTS_PER_DAY else 0


class SeasonalReference:
    """Same-time-of-day values of the last ``days`` days, one variable.

    ``compare(x)`` gives ``x`` minus the closest of those values: a single odd day in the history
    cannot echo into today (the other days still match), while a change against every recent
    day shows. ``expected()`` is their median, the value a user would call "usual".

    >>> ref = SeasonalReference(period=4, days=3)
    >>> for x in [1, 2, 3, 4] * 3 + [1, 9, 3, 4, 1]:  # a one-off 9 on the fourth day
    ...     ref.push(float(x))
    >>> ref.compare(2.0)  # (residual, expected): the next phase is the 9's, it does not echo
    (0.0, 2.0)
    """

    __slots__ = ("_buffer", "_count", "_head", "days", "period")

    def __init__(self, period: int, days: int = 3) -> None:
        self.period = period
        self.days = days
        # float32, as the forest itself stores values: 8 days of minutes cost 46 KB, not 92 KB.
        self._buffer = array("f", bytes(4 * period * days))
        self._head = 0
        self._count = 0

    def _references(self) -> list[float]:
        size = len(self._buffer)
        available = min(self._count // self.period, self.days)
        return [
            self._buffer[(self._head - day * self.period) % size] for day in range(1, available + 1)
        ]

    @property
    def ready(self) -> bool:
        return self._count >= self.period

    def compare(self, value: float) -> tuple[float, float]:
        """``(residual, expected)`` for ``value``; both read the references once (hot path).

        The residual is ``value`` minus the closest same-phase value of the last days, the
        expected value their median. Call only when ``ready``.
        """
        references = self._references()
        residual = value - references[0]
        for reference in references[1:]:
            difference = value - reference
            if abs(difference) < abs(residual):
                residual = difference
        return residual, _median(references)

    def expected(self) -> float | None:
        references = self._references()
        return _median(references) if references else None

    def push(self, value: float) -> None:
        self._buffer[self._head] = value
        self._head = (self._head + 1) % len(self._buffer)
        self._count += 1

    def to_state(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "days": self.days,
            "head": self._head,
            "count": self._count,
            "buffer": self._buffer.tobytes().hex(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SeasonalReference:
        reference = cls(state["period"], state["days"])
        reference._buffer = array("f", bytes.fromhex(state["buffer"]))
        reference._head = state["head"]
        reference._count = state["count"]
        return reference


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return 0.5 * (ordered[middle - 1] + ordered[middle])
