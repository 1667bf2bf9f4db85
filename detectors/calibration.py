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
    """Running min and max of one quantity; ``exceeds`` asks whether a value leaves it."""

    __slots__ = ("high", "low")

    def __init__(self) -> None:
        self.low = math.inf
        self.high = -math.inf

    def exceeds(self, value: float, margin: float, noise_floor: float, extra: float = 0.0) -> bool:
        if self.low > self.high:
            return False
        span = self.high - self.low
        slack = margin * span + noise_floor * max(abs(self.low), abs(self.high), span) + extra
        return value > self.high + slack or value < self.low - slack

    def add(self, value: float) -> None:
        if value < self.low:
            self.low = value
        if value > self.high:
            self.high = value

    def check_and_add(
        self, value: float, margin: float, noise_floor: float, check: bool, extra: float = 0.0
    ) -> bool:
        """``exceeds`` (when ``check``) and then ``add``: one call on the per-point path."""
        outside = check and self.exceeds(value, margin, noise_floor, extra)
        self.add(value)
        return outside


class _Jitter:
    """Typical size of a step between consecutive values: EW mean of ``|x_t - x_(t-1)|``."""

    __slots__ = ("last", "size")

    def __init__(self) -> None:
        self.last: float | None = None
        self.size = 0.0

    def step(self, value: float) -> float:
        """The typical step size before ``value``; then learn from ``value``."""
        size = self.size
        if self.last is not None:
            self.size += _JITTER_DECAY * (abs(value - self.last) - size)
        self.last = value
        return size


class Calibrator:
    """Streaming grade in [0, 1] for one series; deterministic and serializable."""

    __slots__ = (
        "_jitters",
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

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.threshold = config.threshold / 100.0
        self._window: list[float] = []
        self._stat_mean = 0.0
        self._stat_var = 0.0
        self._stat_count = 0
        self._value_ranges: list[_Range] = []
        self._residual_ranges: list[_Range] = []
        self._streak = False
        self._last_report = -(10**9)
        self._report_level = 0.0
        self._seen = 0
        self._jitters: list[_Jitter] = []

    def observe(self, values: Sequence[float]) -> None:
        """Learn the range from a point that is not graded (the forest is still warming up)."""
        self._ranges(self._value_ranges, len(values))
        for value_range, value in zip(self._value_ranges, values, strict=True):
            value_range.add(value)
        for jitter, value in zip(self._new_jitters(len(values)), values, strict=True):
            jitter.step(value)

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
        level = self._smoothed(raw_score)
        grade = 0.0
        if self._stat_count >= p.score_warmup:
            deviation = max(math.sqrt(self._stat_var), 1e-4)
            tail = 0.5 * math.erfc((level - self._stat_mean) / deviation / _SQRT2)
            grade = min(1.0, math.log10(max(tail, 1e-300)) / -p.log10_tail) if tail < 1.0 else 0.0
            if settling:
                grade = min(grade, 0.5 * self.threshold)
        self._learn_level(level)

        if residuals is not None:
            check = residuals_armed and grade >= p.extreme_gate
            ranges = self._ranges(self._residual_ranges, len(residuals))
            for residual_range, residual in zip(ranges, residuals, strict=True):
                if residual_range.check_and_add(residual, p.residual_margin, p.noise_floor, check):
                    grade = 1.0
        check = values_armed and grade >= p.extreme_gate
        ranges = self._ranges(self._value_ranges, len(values))
        jitters = self._new_jitters(len(values))
        for value_range, jitter, value in zip(ranges, jitters, values, strict=True):
            # A drifting series makes new highs (lows) by less than its usual step: not news.
            slack = p.extreme_jitter * jitter.step(value)
            if value_range.check_and_add(value, p.extreme_margin, p.noise_floor, check, slack):
                grade = 1.0
        return self._report_once(grade, level)

    def _new_jitters(self, size: int) -> list[_Jitter]:
        while len(self._jitters) < size:
            self._jitters.append(_Jitter())
        return self._jitters

    def _smoothed(self, raw_score: float) -> float:
        # Summed afresh each time (the window is tiny) so a restored snapshot continues bit-exact.
        window = self._window
        window.append(raw_score)
        if len(window) > self.config.score_window:
            del window[0]
        return sum(window) / len(window)

    def _learn_level(self, level: float) -> None:
        self._stat_count += 1
        alpha = max(self.config.score_decay, 1.0 / self._stat_count)
        delta = level - self._stat_mean
        self._stat_mean += alpha * delta
        self._stat_var = (1.0 - alpha) * (self._stat_var + alpha * delta * delta)

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

    @staticmethod
    def _ranges(ranges: list[_Range], size: int) -> list[_Range]:
        while len(ranges) < size:
            ranges.append(_Range())
        return ranges

    def to_state(self) -> dict[str, Any]:
        return {
            "window": self._window,
            "stat": [self._stat_mean, self._stat_var, self._stat_count],
            "value_ranges": [[r.low, r.high] for r in self._value_ranges],
            "residual_ranges": [[r.low, r.high] for r in self._residual_ranges],
            "jitters": [[j.last, j.size] for j in self._jitters],
            "report": [self._streak, self._last_report, self._report_level, self._seen],
        }

    @classmethod
    def from_state(cls, config: DetectorConfig, state: dict[str, Any]) -> Calibrator:
        calibrator = cls(config)
        calibrator._window = list(state["window"])
        calibrator._stat_mean, calibrator._stat_var, calibrator._stat_count = state["stat"]
        for target, pairs in (
            (calibrator._value_ranges, state["value_ranges"]),
            (calibrator._residual_ranges, state["residual_ranges"]),
        ):
            for low, high in pairs:
                value_range = _Range()
                value_range.low, value_range.high = low, high
                target.append(value_range)
        for last, size in state["jitters"]:
            jitter = _Jitter()
            jitter.last, jitter.size = last, size
            calibrator._jitters.append(jitter)
        streak, last_report, level, seen = state["report"]
        calibrator._streak = streak
        calibrator._last_report = last_report
        calibrator._report_level = level
        calibrator._seen = seen
        return calibrator
