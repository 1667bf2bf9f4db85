"""Synthetic result records for the lake tests and the sink benchmark."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from contract import records

DETECTORS = ("cpu", "latency", "prices")
STAGES = ("LEARNING", "INFERENCE")
DAY0 = 1_795_132_800  # 2026-11-20T00:00:00Z


def series_dimensions(index: int) -> dict[str, str]:
    dims = {"host": f"host-{index:04d}", "region": ("eu", "us", "ap")[index % 3]}
    if index % 5 == 0:
        dims["gpu"] = str(index % 8)
    return dims


def result_record(
    index: int,
    tick: int,
    *,
    start: int = DAY0,
    step_s: int = 60,
    rng: random.Random | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Series ``index`` at interval ``tick``: a complete, valid result record."""
    rng = rng or random.Random(index * 1_000_003 + tick)
    detector = DETECTORS[index % len(DETECTORS)]
    dims = series_dimensions(index)
    score = rng.random() * 100
    begin = start + tick * step_s
    record: dict[str, Any] = {
        "detectorName": detector,
        "measure": "value",
        "timeseriesId": records.timeseries_id(detector, "value", dims),
        "dimensionList": records.dimension_list(dims),
        "aggregatedMeasureValue": rng.gauss(50, 10),
        "anomalyScore": score,
        "anomalyDecisionThreshold": 70.0,
        "anomalyDecision": int(score >= 70),
        "anomalyConfidenceScore": min(100.0, tick * 2.0),
        "modelStage": STAGES[tick >= 10],
        "expectedValue": 50.0,
        "processedDataPoints": tick + 1,
        "detectionPeriodStartTime": records.format_time(begin),
        "detectionPeriodEndTime": records.format_time(begin + step_s),
    }
    if extra:
        record.update(extra)
    return record


def stream_of_results(series: int, ticks: int, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Tick by tick, every series once per tick (the order a detector worker emits them)."""
    for tick in range(ticks):
        for index in range(series):
            yield result_record(index, tick, **kwargs)
