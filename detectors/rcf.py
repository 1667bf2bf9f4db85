"""Per-series streaming detector on krcf's Random Cut Forest (v0: forest score, EW calibration)."""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import krcf

from detectors.config import DetectorConfig
from detectors.result import ModelStage, Result

_SNAPSHOT_MAGIC = b"ASD1"


class RcfDetector:
    """One series' detector: ``update(timestamp, value) -> Result``, deterministic for a seed.

    >>> detector = RcfDetector(DetectorConfig(warmup=16))
    >>> results = [detector.update(float(t), 10.0 + (t % 5)) for t in range(200)]
    >>> results[0].model_stage, results[-1].model_stage
    (<ModelStage.LEARNING: 'LEARNING'>, <ModelStage.INFERENCE: 'INFERENCE'>)
    >>> spike = detector.update(200.0, 500.0)
    >>> spike.anomaly_decision, spike.anomaly_score >= 70
    (1, True)
    """

    def __init__(self, config: DetectorConfig | None = None, dimensions: int = 1) -> None:
        self.config = config or DetectorConfig()
        self.dimensions = dimensions
        self._forest = self._new_forest()
        self._seen = 0
        self._last: list[float] | None = None
        self._score_mean = 0.0
        self._score_var = 0.0

    def _new_forest(self) -> krcf.RandomCutForest:
        c = self.config
        return krcf.RandomCutForest(
            {
                "dimensions": self.dimensions,
                "shingle_size": c.shingle_size,
                "num_trees": c.num_trees,
                "sample_size": c.sample_size,
                "output_after": c.warmup,
                "random_seed": c.seed,
                "lambda": c.time_decay,
                "internal_shingling": True,
                "bounding_box_cache_fraction": c.bounding_box_cache_fraction,
            }
        )

    def update(self, timestamp: float, value: float | Sequence[float] | None) -> Result:
        values = _as_values(value, self.dimensions)
        missing = values is None
        if values is None:
            values = list(self._last) if self._last is not None else [0.0] * self.dimensions
        raw = self._forest.score(values)
        self._forest.update(values)
        self._seen += 1
        self._last = values
        ready = raw > 0.0
        score = 0.0
        if ready:
            std = math.sqrt(self._score_var) if self._score_var > 0 else 0.1
            z = (raw - self._score_mean) / max(std, 0.05)
            score = 100.0 / (1.0 + math.exp(-(z - 3.0))) if not missing else 0.0
            alpha = 0.01
            delta = raw - self._score_mean
            self._score_mean += alpha * delta
            self._score_var = (1 - alpha) * (self._score_var + alpha * delta * delta)
        else:
            self._score_mean = raw
        c = self.config
        return Result(
            timestamp=timestamp,
            values=tuple(values),
            anomaly_score=score,
            anomaly_decision=int(ready and score >= c.threshold),
            threshold=c.threshold,
            model_stage=ModelStage.INFERENCE if ready else ModelStage.LEARNING,
            confidence=100.0 * confidence(c.time_decay, self._seen, c.warmup),
            expected_values=tuple(values),
            raw_score=raw,
            processed_data_points=self._seen,
            missing=missing,
        )

    def to_bytes(self) -> bytes:
        state: dict[str, Any] = {
            "config": self.config.to_dict(),
            "dimensions": self.dimensions,
            "seen": self._seen,
            "last": self._last,
            "score_mean": self._score_mean,
            "score_var": self._score_var,
        }
        state_bytes = json.dumps(state).encode()
        body = struct.pack(">I", len(state_bytes)) + state_bytes + self._forest.to_msgpack()
        return _SNAPSHOT_MAGIC + zlib.compress(body, 6)

    @classmethod
    def from_bytes(cls, data: bytes) -> RcfDetector:
        if not data.startswith(_SNAPSHOT_MAGIC):
            raise ValueError("not an anomstream detector snapshot")
        body = zlib.decompress(data[len(_SNAPSHOT_MAGIC) :])
        (length,) = struct.unpack(">I", body[:4])
        state = json.loads(body[4 : 4 + length])
        detector = cls(DetectorConfig.from_dict(state["config"]), state["dimensions"])
        detector._forest = krcf.RandomCutForest.from_msgpack(body[4 + length :])
        detector._seen = state["seen"]
        detector._last = state["last"]
        detector._score_mean = state["score_mean"]
        detector._score_var = state["score_var"]
        return detector


def confidence(time_decay: float, seen: int, warmup: int) -> float:
    """Time-decayed share of the sample that arrived after warm-up, in [0, 1].

    >>> round(confidence(1 / 2560, 100, 64), 2), round(confidence(1 / 2560, 1000, 64), 2)
    (0.36, 0.95)
    """
    exponent = time_decay * seen
    if exponent <= 0.0 or seen <= warmup:
        return 0.0
    if exponent >= 20.0:
        return 1.0
    return (math.exp(exponent) - math.exp(time_decay * warmup)) / math.expm1(exponent)


def _as_values(value: float | Sequence[float] | None, dimensions: int) -> list[float] | None:
    """Finite float32-safe values, or None when the point is missing (None, NaN, inf, empty)."""
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
        if not math.isfinite(number) or abs(number) > 1e30:
            return None
        out.append(number)
    return out
