"""What a detector returns for one point."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ModelStage(StrEnum):
    LEARNING = "LEARNING"
    INFERENCE = "INFERENCE"


@dataclass(slots=True)
class Result:
    """The detector's verdict on one point (the caller's to keep; the detector keeps no reference).

    Not frozen: a frozen dataclass sets each field through ``object.__setattr__``, which cost
    ~0.9 µs of the ~8 µs the detector adds per point to the forest's own time.

    ``values`` and ``expected_values`` are in input units, one entry per variable (one for a
    univariate series). ``attribution`` shares the score among the variables (sums to 1) and is
    ``None`` while the point is not anomalous. ``missing`` is True when the point carried no
    usable value and the detector imputed it.
    """

    timestamp: float
    values: tuple[float, ...]
    anomaly_score: float
    anomaly_decision: int
    threshold: float
    model_stage: ModelStage
    confidence: float
    expected_values: tuple[float, ...]
    raw_score: float
    processed_data_points: int
    attribution: tuple[float, ...] | None = None
    missing: bool = False

    @property
    def value(self) -> float:
        """The first (for a univariate series, the only) value."""
        return self.values[0]

    @property
    def expected_value(self) -> float:
        return self.expected_values[0]
