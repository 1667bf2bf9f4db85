"""A generated GPU-utilisation series with outages, scored by the real detector.

The alerting tests run on what the detector really outputs for a fault (issue "Incidents end to
end"), not on made-up scores: a daily-cycling utilisation with noise, stuck at 0 during outages.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from contract.records import dimension_list, format_time, timeseries_id
from detectors import DetectorConfig, RcfDetector, Result

STEP_S = 300  # one point every 5 minutes
START_S = 1_790_006_400  # 2026-09-21T00:00:00Z, midnight: days line up with the daily cycle
LEAD = 3 * 288  # three days of normal operation before the first outage
OUTAGE = 15  # intervals at 0
BETWEEN = 12  # an hour between the end of one outage and the start of the next


@dataclass(frozen=True)
class Outage:
    first: int  # index of its first interval at 0
    last: int  # index of its last interval at 0

    def start_s(self) -> float:
        return START_S + self.first * STEP_S

    def end_s(self) -> float:
        """End of its last interval."""
        return START_S + (self.last + 1) * STEP_S


OUTAGES = (Outage(LEAD, LEAD + OUTAGE - 1),
           Outage(LEAD + OUTAGE + BETWEEN, LEAD + 2 * OUTAGE + BETWEEN - 1))
POINTS = OUTAGES[-1].last + 1 + 36  # three hours of normal operation after the second outage


def daily_util(i: int, seed: int) -> float:
    """Utilisation (%) at point ``i``: 60 ± 25 over the day, noise of 3."""
    rng = random.Random(seed * 1_000_003 + i)
    phase = ((START_S + i * STEP_S) % 86_400) / 86_400
    return 60.0 + 25.0 * math.sin(2 * math.pi * phase) + rng.gauss(0.0, 3.0)


def gpu_util(i: int) -> float:
    """The GPU with the outages: 0 inside one, its daily cycle otherwise."""
    return 0.0 if any(o.first <= i <= o.last for o in OUTAGES) else daily_util(i, 7)


def record(detector: str, measure: str, dimensions: dict[str, str], start_s: float,
           result: Result, threshold: float = 70.0) -> dict[str, Any]:
    """A result record with the fields the worker writes for ``result``."""
    return {
        "detectorName": detector,
        "measure": measure,
        "timeseriesId": timeseries_id(detector, measure, dimensions),
        "dimensionList": dimension_list(dimensions),
        "aggregatedMeasureValue": None if result.missing else result.value,
        "anomalyScore": result.anomaly_score,
        "anomalyDecisionThreshold": threshold,
        "anomalyDecision": result.anomaly_decision,
        "anomalyConfidenceScore": result.confidence,
        "modelStage": result.model_stage.value,
        "expectedValue": result.expected_value,
        "processedDataPoints": result.processed_data_points,
        "detectionPeriodStartTime": format_time(start_s),
        "detectionPeriodEndTime": format_time(start_s + STEP_S),
    }


def scored_gpu_records(detector: str = "gpu", dimensions: dict[str, str] | None = None
                       ) -> list[dict[str, Any]]:
    """Every interval of the GPU series through a default-configured detector, as records."""
    dims = dimensions or {"host": "gpu-7"}
    model = RcfDetector(DetectorConfig())
    out = []
    for i in range(POINTS):
        start = START_S + i * STEP_S
        out.append(record(detector, "util", dims, start, model.update(start, gpu_util(i))))
    return out
