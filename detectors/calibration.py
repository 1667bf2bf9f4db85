"""Turn a point's evidence into a calibrated 0–100 score that means the same on every series.

Each kind of evidence is a number that grows with how unusual the point is; each is judged
against its own history on this series by a ``Tail``, which says how rare a value at least
this large has been: its *surprise*, ``-log10`` of the tail probability. Three kinds:

1. the forest's raw score, smoothed over the last ``score_window`` points;
2. each variable's distance from its expected value (the frozen pre-incident expectation while
   an incident lasts, so a stuck sensor keeps its distance), judged twice: as it is, and in
   units of the series' recent volatility, each against its own tail; its surprise is the mean
   of the two. Where the volatility does not move the two agree; a move that is routine in a
   volatile stretch (a busy market hour, a burst of bursts) counts for less, and one out of
   line with a calm stretch for more (docs/decisions/0010);
3. each variable's run of unchanged values, on a series that normally changes at every point,
   judged against the runs this series has made (a frozen price, a stuck sensor).

The score is ``100 * s / (s + k)`` for the largest surprise ``s``, with ``k`` set so that 70
means "as rare as one point in 10 ** ``rarity``". It is monotone in the evidence and reaches 100
only in the limit, so the strongest incident ranks first. There is no report-once rule: the
score holds while the evidence lasts, and paging once per incident is the alerter's job.

>>> calibrator = Calibrator(DetectorConfig())
>>> quiet = [calibrator.grade(0.8 + 0.01 * (i % 3), [i + i % 3], [i + 1]) for i in range(400)]
>>> max(quiet[200:]) < 70
True
>>> calibrator.grade(3.0, [425.0], [400.0]) >= 70  # far from expected, the forest agrees
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from detectors.config import DetectorConfig

_LN10 = math.log(10.0)
_MAX_SHAPE = 0.25  # heavier tails than this are not told apart by a moment estimate
_REFIT = 8  # a tail's fit is refreshed every this many values (its moments move slowly)
_CHANGING = 0.05  # a series whose points repeat more often than this cannot be stale
# Recent volatility: the mean absolute deviation of about the last 50 points.
_VOLATILITY_RATE = 0.02
_TINY = 1e-12
_AFTERGLOW = 0.7  # the surprise fades by this factor a point once its evidence is gone


class Tail:
    """Streaming tail of one statistic: how rare is a value at least ``x``?

    Exceedances over the running mean are modelled as a generalized Pareto distribution fitted
    by moments (peaks over threshold, as SPOT does): a heavy-tailed statistic (bursty counts)
    gets a heavy tail and a light one an exponential tail, instead of a Gaussian tail that
    understates every heavy one. Values are learned clipped at the point where they would score
    ``clip`` surprise, so one incident does not blind the series for long.

    >>> tail = Tail()
    >>> for i in range(500):
    ...     tail.learn(float(i % 10), 0.001, clip=6.0)
    >>> tail.surprise(5.0, 0.0) < 0.5 < tail.surprise(20.0, 0.0) < tail.surprise(40.0, 0.0)
    True
    """

    __slots__ = ("base", "count", "limit", "mean", "over", "shape", "shape_moment", "size")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.over = 0.5  # share of values above the mean
        self.size = 0.0  # mean excess over the mean, given an excess
        self.shape_moment = 0.0  # mean squared excess, given an excess
        # The fit, refreshed every _REFIT values learned (the moments move slowly): the shape,
        # -log10(over), and the excess at which a learned value is clipped.
        self.shape = 0.0
        self.base = -math.log10(self.over)
        self.limit = math.inf

    def surprise(self, x: float, floor: float, given_excess: bool = False) -> float:
        """``-log10 P(X >= x)``; 0 at or below the mean. ``floor`` bounds the excess scale from
        below, so that a near-constant statistic does not turn its smallest change into an
        alarm. ``given_excess``: the probability given that ``X`` exceeds its mean at all (how
        long a run lasts once it started, not how rare runs are)."""
        excess = x - self.mean
        if excess <= 0.0:
            return 0.0
        size = self.size if self.size > floor else floor
        if size <= 0.0:
            return math.inf
        shape = self.shape
        base = 0.0 if given_excess else self.base
        if shape > 1e-6:
            return base + math.log10(1.0 + shape * excess / (size * (1.0 - shape))) / shape
        return base + excess / (size * _LN10)

    def learn(self, x: float, decay: float, clip: float) -> None:
        """Learn ``x``, clipped where its surprise would reach ``clip`` (once fitted)."""
        count = self.count = self.count + 1
        rate = decay if decay * count > 1.0 else 1.0 / count
        excess = x - self.mean
        if excess > self.limit:
            excess = self.limit
        if excess > 0.0:
            self.over += rate * (1.0 - self.over)
            self.size += rate / self.over * (excess - self.size)
            self.shape_moment += rate / self.over * (excess * excess - self.shape_moment)
        else:
            self.over -= rate * self.over
        self.mean += rate * excess
        if not count % _REFIT:
            self._refit(decay, clip)

    def _refit(self, decay: float, clip: float) -> None:
        size = self.size
        variance = self.shape_moment - size * size
        shape = 0.5 * (1.0 - size * size / variance) if variance > 0.0 else 0.0
        self.shape = shape = 0.0 if shape < 0.0 else _MAX_SHAPE if shape > _MAX_SHAPE else shape
        self.base = base = -math.log10(self.over) if self.over > 0.0 else 0.0
        if self.count < 0.1 / decay or size <= 0.0:  # too young to tell a wild value
            self.limit = math.inf
            return
        scale, target = size * (1.0 - shape), max(clip - base, 0.0)
        if shape > 1e-6:
            self.limit = scale * (10.0 ** (shape * target) - 1.0) / shape
        else:
            self.limit = scale * _LN10 * target

    def to_state(self) -> list[float]:
        return [
            self.count,
            self.mean,
            self.over,
            self.size,
            self.shape_moment,
            self.shape,
            self.base,
            self.limit,
        ]

    @classmethod
    def from_state(cls, state: Sequence[float]) -> Tail:
        tail = cls()
        count, tail.mean, tail.over, tail.size, tail.shape_moment, *fit = state
        tail.count = int(count)
        if fit:
            tail.shape, tail.base, tail.limit = fit
        return tail


class _Repeats:
    """One variable's run of unchanged values, judged against the runs this series makes.

    Only a series that normally changes at every point (at most one point in
    ``1 / _CHANGING`` repeats its predecessor) can be stale: a price, a utilisation, a latency;
    not an error count that often stays at 0 or 1. There a run's length is a statistic like any
    other: its ``Tail`` learns how long this series' runs get once started (each run is learned
    when it ends), with a floor of one repeat, so a frozen feed is reported after a few points.
    A run that was reported teaches nothing (a frozen feed is not a run this series makes), so a
    second frozen feed is reported as soon as the first was.
    """

    __slots__ = ("last", "reported", "run", "seen", "share", "tail")

    def __init__(self) -> None:
        self.last: float | None = None
        self.run = 0
        self.reported = False  # the current run has been reported
        self.tail = Tail()
        self.share = 0.0  # of points that repeat their predecessor
        self.seen = 0

    def surprise(
        self, value: float, armed: bool, decay: float, clip: float, rarity: float
    ) -> float:
        """The surprise of the run ``value`` extends (0 for a changed value, which ends the run
        and teaches its length); ``rarity`` is the surprise that reports it."""
        seen = self.seen = self.seen + 1
        rate = decay if decay * seen > 1.0 else 1.0 / seen
        share = self.share
        if value == self.last:
            run = self.run = self.run + 1
            self.share = share + rate * (1.0 - share)
            if armed and share < _CHANGING:
                found = self.tail.surprise(run, 1.0, given_excess=True)
                if found >= rarity:
                    self.reported = True
                return found
            return 0.0
        self.share = share - rate * share
        if self.run and not self.reported:
            self.tail.learn(self.run, decay, clip)
        self.run = 0
        self.reported = False
        self.last = value
        return 0.0

    def to_state(self) -> list[Any]:
        return [self.last, self.run, self.tail.to_state(), self.share, self.seen, self.reported]

    @classmethod
    def from_state(cls, state: Sequence[Any]) -> _Repeats:
        repeats = cls()
        repeats.last, repeats.run, tail, repeats.share, repeats.seen, *reported = state
        repeats.tail = Tail.from_state(tail)
        repeats.reported = bool(reported and reported[0])
        return repeats


def score_of(surprise: float, rarity: float) -> float:
    """The 0–100 score of a surprise: 70 at ``rarity``, monotone, 100 only in the limit.

    >>> round(score_of(4.0, 4.0), 1), round(score_of(0.0, 4.0), 1), score_of(1e9, 4.0) < 100
    (70.0, 0.0, True)
    """
    return 100.0 * surprise / (surprise + rarity * 3.0 / 7.0)


class Calibrator:
    """The streaming 0–100 score of one series of ``dimensions`` variables; deterministic and
    serializable."""

    __slots__ = (
        "_deviation_tails",
        "_forest_tail",
        "_glow",
        "_last_deviations",
        "_look_elsewhere",
        "_relative_tails",
        "_repeats",
        "_volatility",
        "_window",
        "config",
        "stale",
    )

    def __init__(self, config: DetectorConfig, dimensions: int = 1) -> None:
        self.config = config
        self._window: list[float] = []
        self._glow = 0.0  # the last point's surprise
        self._last_deviations = [0.0] * dimensions
        self._volatility = [0.0] * dimensions
        self._relative_tails = [Tail() for _ in range(dimensions)]
        self._forest_tail = Tail()
        self._deviation_tails = [Tail() for _ in range(dimensions)]
        self._repeats = [_Repeats() for _ in range(dimensions)]
        self.stale = False  # the last point's run of repeats alone reports it
        # The rarest of d variables' deviations is d times less rare than one of them.
        self._look_elsewhere = math.log10(dimensions) if dimensions > 1 else 0.0

    def grade(
        self,
        raw_score: float,
        values: Sequence[float],
        expected: Sequence[float],
        settling: Sequence[float] | None = None,
        learn: bool = True,
    ) -> float:
        """Score one point (0–100) and learn from it.

        ``values`` and ``expected`` are the variables' values and expected values (a deviation
        under ``noise_floor`` of the expected value's magnitude never counts). ``settling``, the
        expected values of the way the series was described before, says that the forest's
        input and the expected value just changed meaning (the daily comparison took over):
        until the forest's sample adapts it cannot report, and a deviation counts only as far
        as it is one from both expectations. ``learn`` is False while an incident lasts: the
        deviation tails then keep the pre-incident picture.
        """
        p = self.config
        # The smoothed score, summed afresh each time (the window is tiny) so that a restored
        # snapshot continues bit-exact.
        window = self._window
        window.append(raw_score)
        if len(window) > p.score_window:
            del window[0]
        level = sum(window) / len(window)
        forest_tail = self._forest_tail
        armed = forest_tail.count >= p.score_warmup
        surprise = forest_tail.surprise(level, 0.0) if armed else 0.0
        if settling is not None and surprise > 0.5 * p.rarity:
            surprise = 0.5 * p.rarity
        decay = p.score_decay
        # What a point teaches is clipped at twice the surprise that scores 70: a wild value
        # does not blind the series for long, and a series can still learn that its moves
        # are bigger than its first quiet stretch suggested.
        clip = 2.0 * p.rarity
        forest_tail.learn(level, decay, clip)
        recent = self._last_deviations
        noise_floor = p.noise_floor
        for index, tail in enumerate(self._deviation_tails):
            # Two points, so a lone noisy value counts half and a lasting deviation in full;
            # a deviation that ends counts as ended at once (smoothing delays a rise only).
            latest = abs(values[index] - expected[index])
            deviation = 0.5 * (latest + recent[index])
            if latest < deviation:
                deviation = latest
            judged = deviation
            if settling is not None:
                before = abs(values[index] - settling[index])
                if before < judged:
                    judged = before
            recent[index] = latest
            floor = noise_floor * abs(expected[index])
            # The same deviation in units of the recent volatility (of the points before this
            # one, so that a jump does not excuse itself), against its own tail.
            volatility = self._volatility[index]
            unit = volatility if volatility > floor else floor
            if unit <= 0.0:
                unit = _TINY
            relative_tail = self._relative_tails[index]
            if armed and tail.count >= p.score_warmup:
                found = tail.surprise(judged, floor)
                relative = relative_tail.surprise(judged / unit, floor / unit)
                found = 0.5 * (found + relative)
                found -= self._look_elsewhere
                if found > surprise:
                    surprise = found
            if learn:
                tail.learn(deviation, decay, clip)
                relative_tail.learn(deviation / unit, decay, clip)
                self._volatility[index] = (
                    volatility + _VOLATILITY_RATE * (latest - volatility) if volatility
                    else latest
                )
        stale = 0.0
        for index, repeats in enumerate(self._repeats):  # not zip(..., strict=True): slow
            found = repeats.surprise(values[index], armed, decay, clip, p.rarity)
            found -= self._look_elsewhere
            if found > stale:
                stale = found
        self.stale = stale >= p.rarity
        if stale > surprise:
            surprise = stale
        # The afterglow: while the evidence flickers just under the threshold (at least 0.9 of
        # its surprise), the score fades from the last one instead of dropping, so such an
        # incident stays one incident; evidence that is gone ends it at once.
        cap = 2.0 * p.rarity
        glow = self._glow if self._glow < cap else cap
        if glow * _AFTERGLOW > surprise >= 0.9 * p.rarity:
            surprise = glow * _AFTERGLOW
        self._glow = surprise
        return score_of(surprise, p.rarity)

    def observe(self, values: Sequence[float]) -> None:
        """Learn repeats from a point that is not graded (the forest is still warming up)."""
        decay, clip = self.config.score_decay, 2.0 * self.config.rarity
        for repeats, value in zip(self._repeats, values, strict=True):
            repeats.surprise(value, False, decay, clip, self.config.rarity)

    def to_state(self) -> dict[str, Any]:
        return {
            "window": self._window,
            "glow": self._glow,
            "recent": self._last_deviations,
            "volatility": self._volatility,
            "relative": [t.to_state() for t in self._relative_tails],
            "forest": self._forest_tail.to_state(),
            "deviations": [t.to_state() for t in self._deviation_tails],
            "repeats": [r.to_state() for r in self._repeats],
        }

    @classmethod
    def from_state(cls, config: DetectorConfig, state: dict[str, Any]) -> Calibrator:
        calibrator = cls(config, dimensions=0)
        calibrator._window = list(state["window"])
        calibrator._glow = state["glow"]
        calibrator._last_deviations = list(state["recent"])
        calibrator._volatility = list(state["volatility"])
        calibrator._forest_tail = Tail.from_state(state["forest"])
        calibrator._deviation_tails = [Tail.from_state(t) for t in state["deviations"]]
        calibrator._relative_tails = [Tail.from_state(t) for t in state["relative"]]
        calibrator._repeats = [_Repeats.from_state(r) for r in state["repeats"]]
        dimensions = len(calibrator._repeats)
        calibrator._look_elsewhere = math.log10(dimensions) if dimensions > 1 else 0.0
        return calibrator
