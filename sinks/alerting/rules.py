"""What a rule sees of a result record, and which records a rule (or a silence) matches."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from contract import records as r
from contract.records import dimensions_of, parse_time
from sinks.alerting.config import Rule


@dataclass(frozen=True)
class Observation:
    """One closed interval of one series, as read from a result record."""

    series_id: str
    detector: str
    measure: str
    dimensions: dict[str, str] = field(hash=False)
    value: float
    expected: float
    score: float
    threshold: float
    confidence: float
    stage: str
    start: float
    end: float
    # The series sent nothing for its detector's ``no_data_after`` (record field ``noData``).
    no_data: bool = False
    # Event time of the series' last record (``lastDataTime``); NaN when the record lacks it.
    last_data: float = math.nan

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Observation:
        """Raise ValueError naming the field when the record breaks the result contract."""

        def number(name: str, default: float | None = None) -> float:
            raw = record.get(name, default)
            if raw is None or isinstance(raw, bool):
                raise ValueError(f"field {name} is missing or not a number")
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"field {name} is not a number: {raw!r}") from None
            if math.isnan(value):
                raise ValueError(f"field {name} is NaN")
            return value

        def text(name: str) -> str:
            raw = record.get(name)
            if not isinstance(raw, str) or not raw:
                raise ValueError(f"field {name} is missing or not a string")
            return raw

        def moment(name: str) -> float:
            try:
                return parse_time(text(name)).timestamp()
            except ValueError as error:
                raise ValueError(f"field {name} is not an ISO-8601 time: {error}") from None

        try:
            dimensions = dimensions_of(record)
        except (KeyError, TypeError):
            raise ValueError(
                f"field {r.DIMENSION_LIST} must be a list of {{name, value}}"
            ) from None
        expected = record.get(r.EXPECTED_VALUE)
        last_data = record.get(r.LAST_DATA_TIME)
        # An interval without data reaches the detector as missing: its value is null.
        value = r.AGGREGATED_MEASURE_VALUE
        missing = value in record and record[value] is None
        return cls(
            series_id=text(r.TIMESERIES_ID),
            detector=text(r.DETECTOR_NAME),
            measure=str(record.get(r.MEASURE) or ""),
            dimensions={str(k): str(v) for k, v in dimensions.items()},
            value=math.nan if missing else number(r.AGGREGATED_MEASURE_VALUE),
            expected=number(r.EXPECTED_VALUE) if expected is not None else math.nan,
            score=number(r.ANOMALY_SCORE),
            threshold=number(r.ANOMALY_DECISION_THRESHOLD, 70.0),
            confidence=number(r.ANOMALY_CONFIDENCE_SCORE, 100.0),
            stage=str(record.get(r.MODEL_STAGE) or ""),
            start=moment(r.DETECTION_PERIOD_START_TIME),
            end=moment(r.DETECTION_PERIOD_END_TIME),
            no_data=bool(record.get(r.NO_DATA)),
            last_data=moment(r.LAST_DATA_TIME) if last_data is not None else math.nan,
        )

    def labels(self) -> dict[str, str]:
        return {
            **self.dimensions,
            "detector": self.detector,
            "measure": self.measure,
            "series": self.series_id,
        }


def rule_matches(rule: Rule, observation: Observation) -> bool:
    if rule.detectors and not any(fnmatchcase(observation.detector, p) for p in rule.detectors):
        return False
    return all(
        name in observation.dimensions and fnmatchcase(observation.dimensions[name], pattern)
        for name, pattern in rule.dimensions.items()
    )


def labels_match(matchers: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Every matcher (label -> glob) must match; a label the series lacks never matches."""
    return all(
        name in labels and fnmatchcase(labels[name], pattern) for name, pattern in matchers.items()
    )
