"""What the runtime needs of a detector, and the one factory that makes and restores them.

The worker (``stream/``) holds one detector per series and only ever: feeds it the closed windows
of its series (``update`` -> ``Result``, whose ``model_stage`` says LEARNING or INFERENCE),
snapshots it into the state topic (``to_bytes``) and restores it from such a snapshot. It refers
to ``Detector`` and ``DETECTORS`` only; ``RcfDetector`` is the implementation they give today.

>>> detector = DETECTORS.create(DetectorConfig(warmup=32), dimensions=1)
>>> isinstance(detector, Detector)
True
>>> result = detector.update(0.0, 1.0)
>>> result.model_stage
<ModelStage.LEARNING: 'LEARNING'>
>>> restored = DETECTORS.restore(detector.to_bytes())
>>> restored.update(60.0, 1.0).processed_data_points
2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from detectors.config import DetectorConfig
from detectors.rcf import RcfDetector
from detectors.result import ModelStage, Result

__all__ = ["DETECTORS", "Detector", "DetectorFactory", "ModelStage", "RcfDetectors", "Result"]


@runtime_checkable
class Detector(Protocol):
    """One series' model: deterministic for its configuration and inputs, and serializable."""

    def update(self, timestamp: float, value: float | Sequence[float] | None) -> Result:
        """Score the point at ``timestamp`` (seconds) and learn it; ``None`` (or NaN) is a
        missing point, a sequence one value per measure. The learning may wait until the model
        is next used or saved, or until ``learn_pending``."""
        ...

    def prepare(self, timestamp: float, value: float | Sequence[float] | None) -> None:
        """Score ahead the point ``update`` may get next (an open window); results never
        depend on it. The runtime calls it when it is idle."""
        ...

    def learn_pending(self) -> None:
        """Learn what ``update`` has scored and not learned yet (nothing, if it has). The
        runtime calls it when it is idle; results never depend on when it is called."""
        ...

    @property
    def config(self) -> DetectorConfig:
        """The parameters it runs with."""
        ...

    def to_bytes(self) -> bytes:
        """A snapshot from which ``DetectorFactory.restore`` rebuilds the same detector."""
        ...


class DetectorFactory(Protocol):
    """Makes a new detector for a series, or restores one from its snapshot."""

    def create(self, config: DetectorConfig, dimensions: int) -> Detector: ...

    def restore(self, snapshot: bytes, config: DetectorConfig | None = None) -> Detector:
        """The detector of ``snapshot``; with ``config``, running with its settings where the
        model allows (``DetectorConfig.adopting``)."""
        ...


class RcfDetectors:
    """The factory of ``RcfDetector``: a Random Cut Forest with a calibrated 0-100 score."""

    def create(self, config: DetectorConfig, dimensions: int) -> Detector:
        return RcfDetector(config, dimensions)

    def restore(self, snapshot: bytes, config: DetectorConfig | None = None) -> Detector:
        return RcfDetector.from_bytes(snapshot, config)


DETECTORS: DetectorFactory = RcfDetectors()
