"""The result record: the one contract between the detector workers and everything downstream.

Sinks, alerting and the dashboard read these records (JSON, camelCase), never detector internals.
Fields listed in ``RESULT_FIELDS`` never change meaning; new fields may be appended.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

RESULT_FIELDS: tuple[str, ...] = (
    "detectorName",
    "measure",
    "timeseriesId",
    "dimensionList",
    "aggregatedMeasureValue",
    "anomalyScore",
    "anomalyDecisionThreshold",
    "anomalyDecision",
    "anomalyConfidenceScore",
    "modelStage",
    "expectedValue",
    "processedDataPoints",
    "detectionPeriodStartTime",
    "detectionPeriodEndTime",
)


def timeseries_id(detector: str, measure: str, dimensions: Mapping[str, str]) -> str:
    """sha256 hex of the detector, the measure and the dimension pairs sorted by name.

    >>> timeseries_id("cpu", "util", {"host": "a", "dc": "x"}) == timeseries_id(
    ...     "cpu", "util", {"dc": "x", "host": "a"})
    True
    """
    canonical = json.dumps(
        [detector, measure, sorted((str(k), str(v)) for k, v in dimensions.items())],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def dimension_list(dimensions: Mapping[str, str]) -> list[dict[str, str]]:
    """``[{name, value}]`` sorted by name, as in the result record."""
    return [{"name": str(k), "value": str(v)} for k, v in sorted(dimensions.items())]


def dimensions_of(record: Mapping[str, Any]) -> dict[str, str]:
    """The dimension name -> value mapping of a result record."""
    items: Iterable[Mapping[str, str]] = record.get("dimensionList") or ()
    return {item["name"]: item["value"] for item in items}


def encode(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode(payload: bytes) -> dict[str, Any]:
    record = json.loads(payload)
    if not isinstance(record, dict):
        raise ValueError("a result record must be a JSON object")
    return record


def format_time(epoch_seconds: float) -> str:
    """ISO-8601 UTC with milliseconds, the form of the record's period start and end times.

    >>> format_time(0)
    '1970-01-01T00:00:00.000Z'
    """
    moment = datetime.fromtimestamp(epoch_seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """The aware UTC datetime of a record time written by ``format_time`` (or any ISO-8601).

    >>> parse_time("1970-01-01T00:00:01.500Z").timestamp()
    1.5
    """
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
