"""Per-series streaming anomaly detectors (``protocol`` is what the runtime uses of them).

Imports none of the other packages.
"""

from detectors.config import DetectorConfig
from detectors.protocol import DETECTORS, Detector, DetectorFactory
from detectors.rcf import RcfDetector
from detectors.result import ModelStage, Result

__all__ = [
    "DETECTORS",
    "Detector",
    "DetectorConfig",
    "DetectorFactory",
    "ModelStage",
    "RcfDetector",
    "Result",
]
