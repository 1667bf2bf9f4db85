"""Per-series streaming detector on krcf's Random Cut Forest.

For each variable the forest sees two coordinates: the value and its daily-seasonal residual
(the value minus the closest same-time-of-day value of the last days; the deviation from the
running mean while no daily reference applies). The forest's raw score, each variable's distance
from its expected value and each variable's run of repeated values are calibrated into a 0–100
``anomalyScore`` by ``detectors.calibration``; see docs/detector.md and
docs/decisions/0008-calibrated-score.md for the design and its evaluation.
"""

from __future__ import annotations

import json
import math
import statistics
import struct
import sys
import zlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import krcf

from detectors.calibration import Calibrator
from detectors.config import DetectorConfig
from detectors.migration import upgrade_state
from detectors.result import ModelStage, Result
from detectors.seasonal import SeasonalReference, points_per_day

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

SNAPSHOT_VERSION = 6
_SNAPSHOT_MAGIC = b"ASD"
# Formats 5 and 6 (6 adds the relative deviation tails to the state): zstd over [state JSON
# length, seasonal buffers length] + state JSON + the seasonal
# buffers (float32) + the forest (krcf msgpack). zstd level 1 compresses a forest as well as zlib
# level 6 did (formats 3 and 4) at a twentieth of the time; a worker snapshots every changed
# series once per checkpoint interval, so this is most of a checkpoint's CPU.
_BODY = struct.Struct(">II")
# One compressor for all snapshots: making its context is a third of a small forest's
# compression. Its calls hold a lock, and each ends its own frame (FLUSH_FRAME).
_COMPRESSOR = zstd.ZstdCompressor(level=1)
_PERIOD_SAMPLE = 32  # sampling steps looked at before the daily period is fixed
_EXPECTED_DECAY = 0.2  # fast mean for the expected value of series without a daily cycle

# An incident holds the expectation of before it for this many points; one that lasts longer
# is a new normal (a lasting level shift), learned from then on.
_ACCEPT_AFTER = 180
_FIT_DECAY = 0.002  # the expected value follows whichever predictor fit the last ~500 points
_FIT_CLIP = 4.0
_INFERENCE, _LEARNING = ModelStage.INFERENCE, ModelStage.LEARNING  # an enum lookup costs 50 ns
_FLOAT32_SAFE = 1e30  # krcf stores float32: larger magnitudes overflow to inf and corrupt it


class RcfDetector:
    """One series' detector: ``update(timestamp, value) -> Result``, deterministic for a seed.

    ``timestamp`` is in epoch seconds; ``value`` is a float (or one float per variable for a
    multivariate series), and ``None``, NaN or infinity mean the point is missing.

    >>> detector = RcfDetector(DetectorConfig())
    >>> results = [detector.update(60.0 * t, 10.0 + (t % 5)) for t in range(600)]
    >>> results[0].model_stage.value, results[-1].model_stage.value
    ('LEARNING', 'INFERENCE')
    >>> max(r.anomaly_score for r in results[300:]) < 70
    True
    >>> spike = detector.update(60.0 * 600, 500.0)
    >>> spike.anomaly_decision, spike.anomaly_score >= 70, round(spike.expected_value)
    (1, True, 12)
    >>> restored = RcfDetector.from_bytes(detector.to_bytes())
    >>> restored.update(60.0 * 601, 11.0) == detector.update(60.0 * 601, 11.0)
    True
    """

    def __init__(self, config: DetectorConfig | None = None, dimensions: int = 1) -> None:
        if dimensions < 1:
            raise ValueError("dimensions must be at least 1")
        self.config = config or DetectorConfig()
        self.dimensions = dimensions
        self._forest = self._new_forest()
        self._calibrator = Calibrator(self.config, dimensions)
        self._seasonal: list[SeasonalReference] | None = None
        self._steps: list[float] = []
        self._step = 0.0  # the sampling step once learned (median of the first steps)
        self._gap_after = -math.inf  # a step longer than this leaves daily slots empty
        self._last_timestamp: float | None = None
        self._last_values: list[float] | None = None
        self._mean_values: list[float] | None = None
        self._seen = 0
        self._residual_age = 0
        # Per variable: recent mean absolute error of the daily and of the running-mean predictor.
        self._fits = [[0.0, 0.0] for _ in range(dimensions)]
        self._observed_share = 1.0
        self._incident = 0  # points of the current incident so far
        # A multivariate forest sees each variable divided by its own typical spread, so that a
        # small-scale variable counts as much as a large one. The spread is measured on the
        # first ``warmup`` points, which wait in ``_pending`` until then.
        self._scales: list[float] | None = [1.0] if dimensions == 1 else None
        self._pending: list[list[float]] = []
        self._has_margins = self.config.absolute_margin > 0.0 or self.config.ratio_margin > 0.0
        self._log = self.config.transform == "log"
        # The point the forest has scored and not learned yet (``learn_pending``), and a point
        # scored ahead with its raw score (``prepare``).
        self._unlearned: list[float] | None = None
        self._prepared: tuple[list[float], float] | None = None

    def _new_forest(self) -> krcf.RandomCutForest:
        c = self.config
        return krcf.RandomCutForest(
            {
                "dimensions": 2 * self.dimensions,
                "shingle_size": c.shingle_size,
                "num_trees": c.num_trees,
                "sample_size": c.sample_size,
                "output_after": c.warmup,
                "random_seed": c.seed,
                "lambda": c.time_decay,  # type: ignore[typeddict-unknown-key]
                "internal_shingling": True,
                "bounding_box_cache_fraction": c.bounding_box_cache_fraction,
            }
        )

    @property
    def model_stage(self) -> ModelStage:
        self.learn_pending()
        return ModelStage.INFERENCE if self._forest.is_output_ready() else ModelStage.LEARNING

    def learn_pending(self) -> None:
        """Teach the forest the last point ``update`` scored, if it has not learned it yet.

        ``update`` returns its result once the forest has scored the point, and leaves the
        learning (about two thirds of the forest's work) until the forest is next used, or until
        this is called. The forest sees the same calls in the same order either way, so the
        results are the same; a worker that closes a burst of windows at once gets every result
        out first and lets the models learn when it is idle.

        >>> detector = RcfDetector(DetectorConfig(warmup=8))
        >>> late = [detector.update(60.0 * t, float(t % 3)) for t in range(40)]
        >>> eager = RcfDetector(DetectorConfig(warmup=8))
        >>> now = []
        >>> for t in range(40):
        ...     now.append(eager.update(60.0 * t, float(t % 3)))
        ...     eager.learn_pending()
        >>> now == late
        True
        >>> eager.update(60.0 * 40, 9.0) == detector.update(60.0 * 40, 9.0)
        True
        """
        point = self._unlearned
        if point is not None:
            self._unlearned = None
            self._prepared = None
            self._forest.update(point)

    def prepare(self, timestamp: float, value: float | Sequence[float] | None) -> None:
        """Score ahead the point that ``update(timestamp, value)`` may get next.

        The runtime calls it while idle, for a window that is still open. If ``update`` then
        gets the same point with nothing in between, it takes the forest's score from here
        (about a third of the forest's work); any other point is scored as always, so results
        never depend on it. Only the common case is prepared: one variable, the usual step.

        >>> detector = RcfDetector(DetectorConfig(warmup=8))
        >>> twin = RcfDetector(DetectorConfig(warmup=8))
        >>> for t in range(60):
        ...     value = float(t % 4)
        ...     detector.prepare(60.0 * t, value + (t % 3 == 0))  # wrong every third time
        ...     assert detector.update(60.0 * t, value) == twin.update(60.0 * t, value)
        """
        if self._scales is None or len(self._scales) > 1:
            return
        last = self._last_timestamp
        if last is None or not timestamp - last <= self._gap_after:
            return  # not the usual step: update moves the daily references first
        observed = _finite_values(value, 1)
        if observed is None:
            return
        values = [_to_log(v) for v in observed] if self._log else observed
        daily = self._daily(values)
        residuals = None if daily is None else [residual for residual, _expected in daily]
        point = values + (residuals or self._deviations(values))
        self.learn_pending()
        self._prepared = (point, self._forest.score(point))

    @property
    def processed_data_points(self) -> int:
        return self._seen

    def update(self, timestamp: float, value: float | Sequence[float] | None) -> Result:
        observed = _finite_values(value, self.dimensions)
        last = self._last_timestamp
        if last is not None and timestamp - last <= self._gap_after:  # the usual next step
            self._last_timestamp = timestamp
        else:
            self._advance(timestamp)
        if observed is None:
            return self._missing(timestamp)
        values = [_to_log(v) for v in observed] if self._log else observed
        residuals, expected = self._compare(values)
        point = values + (residuals or self._deviations(values))
        if self._scales is None or len(self._scales) > 1:
            raw = self._score_and_learn(point)
        else:  # a univariate series: the forest takes the point as it is (hot path)
            self.learn_pending()
            prepared = self._prepared
            if prepared is not None and prepared[0] == point:
                raw = prepared[1]
            else:
                raw = self._forest.score(point)
            self._prepared = None
            self._unlearned = point
        c = self.config
        seen = self._seen = self._seen + 1
        self._observed_share += c.time_decay * (1.0 - self._observed_share)

        score = 0.0
        if raw > 0.0:
            settling = None
            if 0 < self._residual_age <= c.settle:  # the daily comparison just took over
                settling = self._mean_values or values
            score = self._calibrator.grade(
                raw,
                values,
                expected,
                settling,
                not 0 < self._incident <= _ACCEPT_AFTER,  # learn unless holding
            )
        else:
            self._calibrator.observe(values)
        if self._log:
            expected = [_from_log(e) for e in expected]
        # A frozen value sits right on its expected value: margins do not excuse it.
        if self._has_margins and not self._calibrator.stale:
            score = self._apply_margins(score, observed, expected)
        decision = int(raw > 0.0 and score >= c.threshold)
        self._remember(values, decision == 1)
        # Positional, in the order of Result's fields: eleven keywords cost about 5 % of
        # the detector's own Python work per point.
        return Result(
            timestamp,
            tuple(observed),
            score,
            decision,
            c.threshold,
            _INFERENCE if raw > 0.0 else _LEARNING,
            self._confidence(),
            tuple(expected),
            raw,
            seen,
            self._attribution(point) if decision else None,
        )

    def _score_and_learn(self, point: list[float]) -> float:
        """The forest's score of a multivariate point, its variables on their own scales."""
        scales = self._scales
        if scales is None:
            return self._wait_for_scales(point)
        point = [x / scale for x, scale in zip(point, scales + scales, strict=True)]
        self.learn_pending()
        raw = self._forest.score(point)
        self._unlearned = point
        return raw

    def _wait_for_scales(self, point: list[float]) -> float:
        """Hold a multivariate series' first points until each variable's spread is known."""
        pending = self._pending
        pending.append(point)
        if len(pending) >= self.config.warmup:
            d = self.dimensions
            self._scales = [_spread([p[i] for p in pending]) for i in range(d)]
            self._pending = []
            for held in pending:
                self._score_and_learn(held)
        return 0.0

    def _missing(self, timestamp: float) -> Result:
        """A missing point teaches nothing and reports nothing; confidence drops a little."""
        self._observed_share -= self.config.time_decay * self._observed_share
        imputed = self._expected(self._last_values or [0.0] * self.dimensions)
        if self._seasonal is not None:
            for reference in self._seasonal:
                reference.push(math.nan)
        if self._log:
            imputed = [_from_log(v) for v in imputed]
        return Result(
            timestamp=timestamp,
            values=tuple(math.nan for _ in range(self.dimensions)),
            anomaly_score=0.0,
            anomaly_decision=0,
            threshold=self.config.threshold,
            model_stage=self.model_stage,
            confidence=self._confidence(),
            expected_values=tuple(imputed),
            raw_score=0.0,
            processed_data_points=self._seen,
            missing=True,
        )

    def _advance(self, timestamp: float) -> None:
        """Learn the sampling step from the first steps; leave the daily slots of a gap empty."""
        last = self._last_timestamp
        self._last_timestamp = timestamp
        if last is None or not timestamp > last:
            return
        if len(self._steps) < _PERIOD_SAMPLE:  # the period is learned from the first steps only
            self._steps.append(timestamp - last)
            if len(self._steps) == _PERIOD_SAMPLE:
                self._step = statistics.median(self._steps)
                self._gap_after = 1.5 * self._step
                period = points_per_day(self._step)
                if period:
                    days = self.config.seasonal_days
                    self._seasonal = [
                        SeasonalReference(period, days) for _ in range(self.dimensions)
                    ]
            return
        seasonal = self._seasonal
        if seasonal is not None and timestamp - last > self._gap_after:
            skipped = round((timestamp - last) / self._step) - 1
            for reference in seasonal:
                reference.skip(skipped)

    def _deviations(self, values: list[float]) -> list[float]:
        """The forest's second coordinate until a daily reference exists.

        A daily series gets its deviation from the running mean: the same meaning as the daily
        residual and a similar scale, so the coordinate does not jump from a constant 0 to real
        values when the reference becomes ready (which made every series look anomalous at
        once, a day after it started). A series without a daily cycle keeps 0.
        """
        if self._seasonal is None or self._mean_values is None:
            return [0.0] * self.dimensions
        return [v - m for v, m in zip(values, self._mean_values, strict=True)]

    def _compare(self, values: list[float]) -> tuple[list[float] | None, list[float]]:
        """Daily residuals (None before a full day, or where a gap left no reference) and the
        expected values of this point."""
        compared = self._daily(values)
        if compared is None:
            return None, self._expected(values)
        means = self._mean_values or values
        residuals, expected = [], []
        learn = not self._holding
        fits = self._fits
        # Indexed, not zip(..., strict=True): a keyword argument makes zip slow (hot path).
        for index, (residual, daily) in enumerate(compared):
            value, mean, fit = values[index], means[index], fits[index]
            residuals.append(residual)
            expected.append(_better(daily, mean, fit))
            if learn:  # an incident must not teach "follow the level"
                daily_error, mean_error = fit
                # Errors clipped: an outage (a sensor stuck at 0) must not either.
                larger = daily_error if daily_error > mean_error else mean_error
                cap = _FIT_CLIP * larger or math.inf
                error = abs(value - daily)
                fit[0] = daily_error + _FIT_DECAY * ((error if error < cap else cap) - daily_error)
                error = abs(value - mean)
                fit[1] = mean_error + _FIT_DECAY * ((error if error < cap else cap) - mean_error)
        self._residual_age += 1
        return residuals, expected

    def _daily(self, values: list[float]) -> list[tuple[float, float]] | None:
        """Each variable's (residual, expected value) against its daily references; None
        before a full day, or where a gap left no reference (the variables' references fill
        and empty together)."""
        seasonal = self._seasonal
        if seasonal is None or not seasonal[0].ready:
            return None
        compared = []
        for index, ref in enumerate(seasonal):
            pair = ref.compare(values[index])
            if pair is None:
                return None
            compared.append(pair)
        return compared

    def _expected(self, values: Sequence[float]) -> list[float]:
        """Expected values without a daily comparison: before a full day, or imputed."""
        seasonal = self._seasonal
        means = self._mean_values
        if means is None:
            return list(values)
        if seasonal is None or not seasonal[0].ready:
            return list(means)
        expected = []
        for ref, mean, fit in zip(seasonal, means, self._fits, strict=True):
            daily = ref.expected()
            expected.append(mean if daily is None else _better(daily, mean, fit))
        return expected

    def _apply_margins(self, score: float, values: list[float], expected: list[float]) -> float:
        """Not an anomaly when every value is within the configured margins of its expected."""
        c = self.config
        if score < c.threshold:
            return score
        close = all(
            abs(v - e) <= max(c.absolute_margin, c.ratio_margin * abs(e))
            for v, e in zip(values, expected, strict=True)
        )
        return min(score, 0.5 * c.threshold) if close else score

    @property
    def _holding(self) -> bool:
        """Whether the expectation of before the incident is held (see ``_remember``)."""
        return 0 < self._incident <= _ACCEPT_AFTER

    def _remember(self, values: list[float], anomalous: bool) -> None:
        """Learn the point. While an incident lasts the expectation stays what it was before,
        so that a stuck GPU stays far from it and a return to normal ends the incident at
        once; an incident that lasts beyond ``_ACCEPT_AFTER`` points is a new normal."""
        self._incident = self._incident + 1 if anomalous else 0
        if self._seasonal is not None:
            for index, reference in enumerate(self._seasonal):
                reference.push(values[index])
        if self._mean_values is None:
            self._mean_values = list(values)
        elif not self._holding:
            means = self._mean_values
            for index, value in enumerate(values):  # in place: no list comprehension's frame
                means[index] += _EXPECTED_DECAY * (value - means[index])
        self._last_values = values

    def _confidence(self) -> float:
        return (
            100.0
            * self._observed_share
            * confidence(self.config.time_decay, self._seen, self.config.warmup)
        )

    def _attribution(self, point: list[float]) -> tuple[float, ...]:
        """Share of the score per variable (value and residual coordinates together)."""
        self.learn_pending()  # of the forest that has learned the point, as it always was
        scales = self._scales or [1.0] * self.dimensions
        if len(scales) > 1:
            point = [x / scale for x, scale in zip(point, scales + scales, strict=True)]
        divector = self._forest.attribution(point)
        parts = [h + lo for h, lo in zip(divector["high"], divector["low"], strict=True)]
        d = self.dimensions
        per_variable = [parts[i] + parts[d + i] for i in range(d)]
        total = sum(per_variable)
        return tuple(p / total if total > 0 else 1.0 / d for p in per_variable)

    def to_bytes(self) -> bytes:
        """A compact snapshot; ``from_bytes`` restores a detector that continues identically."""
        self.learn_pending()
        seasonal = [r.to_state() for r in self._seasonal] if self._seasonal else None
        state: dict[str, Any] = {
            "dimensions": self.dimensions,
            "calibrator": self._calibrator.to_state(),
            "seasonal": [scalars for scalars, _buffer in seasonal] if seasonal else None,
            "steps": self._steps,
            "step": self._step,
            "last_timestamp": self._last_timestamp,
            "last_values": self._last_values,
            "mean_values": self._mean_values,
            "seen": self._seen,
            "residual_age": self._residual_age,
            "fits": self._fits,
            "observed_share": self._observed_share,
            "incident": self._incident,
            "scales": self._scales,
            "pending": self._pending,
        }
        # {"config": ..., <the state>}: the configuration's JSON is shared by all its series.
        header = _config_json(self.config) + json.dumps(state, separators=(",", ":"))[1:].encode()
        buffers = b"".join(buffer for _scalars, buffer in seasonal) if seasonal else b""
        body = b"".join(
            (_BODY.pack(len(header), len(buffers)), header, buffers, self._forest.to_msgpack())
        )
        compressed = _COMPRESSOR.compress(body, mode=zstd.ZstdCompressor.FLUSH_FRAME)
        return _SNAPSHOT_MAGIC + bytes([SNAPSHOT_VERSION]) + compressed

    @classmethod
    def from_bytes(cls, data: bytes, config: DetectorConfig | None = None) -> RcfDetector:
        """Restore a snapshot of this release or of an earlier one (``detectors.migration``).

        With ``config``, the restored detector takes up its threshold, margins and calibration
        (an operator's new settings), and keeps the parameters its model was learned with
        (``DetectorConfig.adopting``).
        """
        state, forest = _read_snapshot(data)
        saved = DetectorConfig.upgraded(state["config"])
        detector = cls(saved if config is None else saved.adopting(config), state["dimensions"])
        detector._forest = krcf.RandomCutForest.from_msgpack(forest)
        detector._calibrator = Calibrator.from_state(detector.config, state["calibrator"])
        if state["seasonal"] is not None:
            detector._seasonal = [
                SeasonalReference.from_state(s, s["buffer"]) for s in state["seasonal"]
            ]
        detector._steps = state["steps"]
        detector._step = state["step"]
        detector._gap_after = 1.5 * detector._step if detector._step else -math.inf
        detector._last_timestamp = state["last_timestamp"]
        detector._last_values = state["last_values"]
        detector._mean_values = state["mean_values"]
        detector._seen = state["seen"]
        detector._residual_age = state["residual_age"]
        detector._fits = state["fits"]
        detector._observed_share = state["observed_share"]
        detector._incident = state["incident"]
        detector._scales = state["scales"]
        detector._pending = state["pending"]
        return detector


@lru_cache(maxsize=64)
def _config_json(config: DetectorConfig) -> bytes:
    """``{"config":{...},`` for a snapshot's JSON state."""
    return b'{"config":' + json.dumps(config.to_dict(), separators=(",", ":")).encode() + b","


def _read_snapshot(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A snapshot's state in the current format (its seasonal entries with their ``buffer`` as
    bytes) and its forest (krcf msgpack)."""
    version = _snapshot_version(data)
    compressed = data[len(_SNAPSHOT_MAGIC) + 1 :]
    if version < 5:  # zlib; the seasonal buffers inside the JSON state, as hex
        body = zlib.decompress(compressed)
        (length,) = struct.unpack_from(">I", body)
        return upgrade_state(json.loads(body[4 : 4 + length]), version), body[4 + length :]
    body = zstd.decompress(compressed)
    header_length, buffers_length = _BODY.unpack_from(body)
    start = _BODY.size + header_length
    state: dict[str, Any] = json.loads(body[_BODY.size : start])
    buffers = body[start : start + buffers_length]
    offset = 0
    for entry in state["seasonal"] or ():
        size = 4 * entry["period"] * entry["days"]
        entry["buffer"] = buffers[offset : offset + size]
        offset += size
    if offset != buffers_length:
        raise ValueError("a detector snapshot's seasonal buffers do not match their sizes")
    return upgrade_state(state, version), body[start + buffers_length :]


def _snapshot_version(data: bytes) -> int:
    """The format version of a snapshot: ``ASD`` and one digit (3, the first release's) or
    one byte (4 onwards)."""
    if not data.startswith(_SNAPSHOT_MAGIC) or len(data) < 4:
        raise ValueError("not an anomstream detector snapshot")
    version = data[3] - ord("0") if data[3:4] == b"3" else data[3]
    if not 3 <= version <= SNAPSHOT_VERSION:
        raise ValueError(
            f"detector snapshot format {version} is newer than this release reads "
            f"(up to {SNAPSHOT_VERSION}): upgrade anomstream"
        )
    return version


def _spread(values: list[float]) -> float:
    """A variable's typical spread: mean absolute deviation from its mean, never 0."""
    mean = sum(values) / len(values)
    spread = sum(abs(v - mean) for v in values) / len(values)
    return spread or abs(mean) or 1.0


def confidence(time_decay: float, seen: int, warmup: int) -> float:
    """Time-decayed share of the sample that arrived after warm-up, in [0, 1].

    ``(e^{λn} − e^{λm}) / (e^{λn} − 1)`` for decay λ, n points seen and warm-up m.

    >>> round(confidence(1 / 2560, 100, 64), 2), round(confidence(1 / 2560, 1000, 64), 2)
    (0.36, 0.95)
    """
    exponent = time_decay * seen
    if exponent <= 0.0 or seen <= warmup:
        return 0.0
    if exponent >= 20.0:
        return 1.0
    grown = math.exp(exponent)
    return (grown - math.exp(time_decay * warmup)) / (grown - 1.0)


def _better(daily: float, mean: float, fit: list[float]) -> float:
    """The expected value from the predictor that fitted recent points better (``fit``: mean
    absolute errors of the daily references and of the running mean).

    A daily series is best described by its same-time-of-day values; a trending or wandering
    one (a price, a gradient norm) by its recent level, which yesterday's values miss by the
    day's drift.
    """
    return daily if fit[0] <= fit[1] else mean


def _to_log(value: float) -> float:
    """Signed ``log1p``: multiplicative noise becomes additive; 0 and negatives stay valid."""
    return math.copysign(math.log1p(abs(value)), value)


def _from_log(value: float) -> float:
    return math.copysign(math.expm1(abs(value)), value)


def _finite_values(value: float | Sequence[float] | None, dimensions: int) -> list[float] | None:
    """The point's values as floats, or None when it is missing (None, NaN, inf, too large)."""
    if type(value) is float and dimensions == 1:  # the common case, kept cheap
        return [value] if abs(value) <= _FLOAT32_SAFE else None  # NaN fails the comparison too
    if value is None:
        return None
    items = [value] if isinstance(value, int | float) else list(value)
    if len(items) != dimensions:
        raise ValueError(f"expected {dimensions} value(s), got {len(items)}")
    out: list[float] = []
    for item in items:
        if item is None:
            return None
        number = float(item)
        if not math.isfinite(number) or abs(number) > _FLOAT32_SAFE:
            return None
        out.append(number)
    return out
