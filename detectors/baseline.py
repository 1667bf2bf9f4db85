"""A river baseline for evaluation: an exponentially weighted z-score, mapped to 0–100.

``anomstream evaluate --baseline`` scores a corpus with it, so that the NAB figures of the RCF
detector can be read against a plain, well-known online detector: river's exponentially
weighted mean and variance (``river.stats.EWMean``, ``EWVar``) give each point its distance
``z`` from the recent level in recent standard deviations, and ``100 z / (z + 3)`` maps that to
0–100 (z = 3 scores 50, z = 7 scores 70). No seasonality, no calibration, one variable. It scores
each point before learning it, one at a time, as a stream would feed it.

(river's ``HalfSpaceTrees`` was tried first: with one min-max scaled variable a spike beyond the
range seen so far lands in an edge leaf and scores no higher than normal points.)

>>> import math
>>> baseline = RiverBaseline()
>>> normal = [baseline.update(10 + math.sin(i / 6)) for i in range(500)]
>>> spike = baseline.update(40.0)
>>> round(max(normal[100:])), round(spike)
(38, 93)
>>> baseline.update(None)  # a missing point scores 0 and teaches nothing
0.0
"""

from __future__ import annotations

import math

from river import stats


class RiverBaseline:
    """The z-score of each value against river's exponentially weighted mean and variance.

    ``fading_factor`` is the weight of the newest point (0.01: a memory of about 100 points);
    the first ``grace`` points score 0 while the statistics settle.
    """

    def __init__(self, fading_factor: float = 0.01, grace: int = 30) -> None:
        self.mean = stats.EWMean(fading_factor=fading_factor)
        self.var = stats.EWVar(fading_factor=fading_factor)
        self.grace = grace
        self.seen = 0

    def update(self, value: float | None) -> float:
        """The 0–100 score of ``value`` before learning it; 0 for a missing value."""
        if value is None or not math.isfinite(value):
            return 0.0
        score = 0.0
        deviation = math.sqrt(max(0.0, self.var.get()))
        if self.seen >= self.grace and deviation > 0.0:
            z = abs(value - self.mean.get()) / deviation
            score = 100.0 * z / (z + 3.0)
        self.mean.update(value)
        self.var.update(value)
        self.seen += 1
        return score
