"""Turning a raw forest score into a calibrated 0–1 anomaly grade, one point at a time.

A raw Random Cut Forest score is a good ranking signal within one series but means different
things on different series. Three kinds of evidence are combined, each calibrated on the series'
own history so that one threshold fits a CPU metric, a price and a count alike:

1. *Rarity of the forest score*: the mean of the last few raw scores, judged against the
   exponentially weighted mean and deviation of such means; its Gaussian tail probability ``q``
   is mapped to ``log(q) / log(q_min)`` so a grade of 0.7 means "as rare as q_min ** 0.7".
2. *New extremes*: a value outside everything the series has shown so far (by a margin of the
   range), or a daily-seasonal residual outside every residual seen so far. These catch level
   shifts, spikes and broken daily patterns that a tail estimate reacts to late. Both need weak
   agreement from the forest (``extreme_gate``), which filters trend-driven new highs.
3. *Report once*: a run of points above the threshold is reported at its first point; within
   ``repeat_window`` points of a report, another needs clearly stronger forest evidence
   (``repeat_escalation``). This keeps one incident from paging many times.

>>> calibrator = Calibrator(DetectorConfig())
>>> grades = [calibrator.grade(0.8 + 0.01 * (i % 3), (10.0 + i % 3,), None) for i in range(400)]
>>> max(grades[200:]) < 0.7
True
>>> calibrator.grade(3.0, (50.0,), None) >= 0.7  # far outside the range, forest agrees
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from detectors.config import DetectorConfig

_SQRT2 = math.sqrt(2.0)
_JITTER_DECAY = 0.05  # about the last 20 steps


class _Range:
    """Running min and max of one quantity, and the typical step between its values."""

    __slots__ = ("high", "last", "low", "step")

    def __init__(self) -> None:
        self.low = math.inf
        self.high = -math.inf
        self.last: float | None = None
        self.step = 0.0  # EW mean of |x_t - x_(t-1)|

    def check_and_add(
        self, value: float, margin: float, noise_floor: float, jitter: float, check: bool
    ) -> bool:
        """Whether ``value`` leaves the range (asked only when ``check``); then learn it.

        The slack beyond the range is ``margin`` of its span, ``noise_floor`` of its magnitude
        and ``jitter`` typical steps: a drifting series makes new highs (lows) by less than its
        usual step, which is not news. One call per variable on the per-point path.
        """
        low, high = self.low, self.high
        outside = False
        if check and low <= high:
            span = high - low
            slack = margin * span + noise_floor * max(abs(low), abs(high), span)
            slack += jitter * self.step
            outside = value > high + slack or value < low - slack
        if value < low:
            self.low = value
        if value > high:
            self.high = value
        if jitter:  # the typical step is only learned where it is used
            last = self.last
            if last is not None:
                self.step += _JITTER_DECAY * (abs(value - last) - self.step)
            self.last = value
        return outside

    def to_state(self) -> list[float | None]:
        return [self.low, self.high, self.last, self.step]

    @classmethod
    def from_state(cls, state: list[Any]) -> _Range:
        value_range = cls()
        value_range.low, value_range.high, value_range.last, value_range.step = state
        return value_range


class Calibrator:
    """Streaming grade in [0, 1] for one series of ``dimensions`` variables; deterministic and
    serializable."""

    __slots__ = (
        "_last_report",
        "_report_level",
        "_residual_ranges",
        "_seen",
        "_stat_count",
        "_stat_mean",
        "_stat_var",
        "_streak",
        "_value_ranges",
        "_window",
        "config",
        "threshold",
    )

    def __init__(self, config: DetectorConfig, dimensions: int = 1) -> None:
        self.config = config
        self.threshold = config.threshold / 100.0
        self._window: list[float] = []
        self._stat_mean = 0.0
        self._stat_var = 0.0
        self._stat_count = 0
        self._value_ranges = [_Range() for _ in range(dimensions)]
        self._residual_ranges = [_Range() for _ in range(dimensions)]
        self._streak = False
        self._last_report = -(10**9)
        self._report_level = 0.0
        self._seen = 0

    def observe(self, values: Sequence[float]) -> None:
        """Learn the range from a point that is not graded (the forest is still warming up)."""
        jitter = self.config.extreme_jitter
        for value_range, value in zip(self._value_ranges, values, strict=True):
            value_range.check_and_add(value, 0.0, 0.0, jitter, False)

    def grade(
        self,
        raw_score: float,
        values: Sequence[float],
        residuals: Sequence[float] | None,
        values_armed: bool = True,
        residuals_armed: bool = True,
        settling: bool = False,
    ) -> float:
        """Grade one point.

        ``values_armed`` and ``residuals_armed`` say whether the series has shown enough values
        (residuals) — a full daily cycle and a minimum count — for "outside everything seen so
        far" to mean something. ``settling`` says the forest's input just changed (the daily
        comparison took over): its raw scores run high until its sample adapts, so their
        rarity alone cannot report; new extremes still can.
        """
        p = self.config
        # The smoothed score, summed afresh each time (the window is tiny) so that a restored
        # snapshot continues bit-exact.
        window = self._window
        window.append(raw_score)
        if len(window) > p.score_window:
            del window[0]
        level = sum(window) / len(window)
        grade = 0.0
        count = self._stat_count
        if count >= p.score_warmup:
            deviation = max(math.sqrt(self._stat_var), 1e-4)
            tail = 0.5 * math.erfc((level - self._stat_mean) / deviation / _SQRT2)
            grade = min(1.0, math.log10(max(tail, 1e-300)) / -p.log10_tail) if tail < 1.0 else 0.0
            if settling:
                grade = min(grade, 0.5 * self.threshold)
        # Learn the level: exponentially weighted mean and variance (exact while young).
        count += 1
        self._stat_count = count
        alpha = max(p.score_decay, 1.0 / count)
        delta = level - self._stat_mean
        self._stat_mean += alpha * delta
        self._stat_var = (1.0 - alpha) * (self._stat_var + alpha * delta * delta)

        if residuals is not None:
            check = residuals_armed and grade >= p.extreme_gate
            for residual_range, residual in zip(self._residual_ranges, residuals, strict=True):
                if residual_range.check_and_add(
                    residual, p.residual_margin, p.noise_floor, 0.0, check
                ):
                    grade = 1.0
        check = values_armed and grade >= p.extreme_gate
        for value_range, value in zip(self._value_ranges, values, strict=True):
            if value_range.check_and_add(
                value, p.extreme_margin, p.noise_floor, p.extreme_jitter, check
            ):
                grade = 1.0
        return self._report_once(grade, level)

    def _report_once(self, grade: float, level: float) -> float:
        """Cap the points after a report so one incident reports once (see module docstring)."""
        self._seen += 1
        if grade < self.threshold:
            self._streak = False
            return grade
        if self._streak:
            return min(grade, 0.5 * self.threshold)
        self._streak = True
        p = self.config
        recent = self._seen - self._last_report < p.repeat_window
        if recent and level <= self._report_level * p.repeat_escalation:
            return min(grade, 0.5 * self.threshold)
        self._last_report = self._seen
        self._report_level = level
        return grade

    def to_state(self) -> dict[str, Any]:
        return {
            "window": self._window,
            "stat": [self._stat_mean, self._stat_var, self._stat_count],
            "value_ranges": [r.to_state() for r in self._value_ranges],
            "residual_ranges": [r.to_state() for r in self._residual_ranges],
            "report": [self._streak, self._last_report, self._report_level, self._seen],
        }

    @classmethod
    def from_state(cls, config: DetectorConfig, state: dict[str, Any]) -> Calibrator:
        calibrator = cls(config, dimensions=0)
        calibrator._window = list(state["window"])
        calibrator._stat_mean, calibrator._stat_var, calibrator._stat_count = state["stat"]
        calibrator._value_ranges = [_Range.from_state(r) for r in state["value_ranges"]]
        calibrator._residual_ranges = [_Range.from_state(r) for r in state["residual_ranges"]]
        streak, last_report, level, seen = state["report"]
        calibrator._streak = streak
        calibrator._last_report = last_report
        calibrator._report_level = level
        calibrator._seen = seen
        return calibrator
