"""Per-series streaming anomaly detectors. Imports nothing from stream/, sinks/ or dashboard/."""

from detectors.config import DetectorConfig
from detectors.rcf import RcfDetector
from detectors.result import ModelStage, Result

__all__ = ["DetectorConfig", "ModelStage", "RcfDetector", "Result"]
