"""The result record: the one contract between the detector workers and everything downstream.

One record per series per closed detection interval, JSON with camelCase field names. The worker
writes them (``encode_head`` + ``encode_result``); the Parquet sink, alerting and the dashboard
read them (``decode``, ``RESULT_SCHEMA``), never detector internals. This module spells every
field name, the lake's Arrow schema, ``timeseriesId`` and the time format, and imports nothing
of the project's other packages.

Fields listed in ``RESULT_FIELDS`` never change meaning; new fields may be appended
(``EXTRA_FIELDS`` lists those the worker writes today).

>>> head = encode_head("cpu", "util", "t1", {"host": "a"}, 70.0)
>>> record = decode(encode_result(
...     head, ("util",), (42.0,), (40.0,), score=12.5, decision=0, confidence=80.0,
...     stage="INFERENCE", processed=300, start_ms=0, end_ms=60_000, raw_score=0.8,
...     no_data=False, last_data_ms=59_000, attribution=None))
>>> record[DETECTOR_NAME], record[DIMENSION_LIST], record[AGGREGATED_MEASURE_VALUE]
('cpu', [{'name': 'host', 'value': 'a'}], 42.0)
>>> record[DETECTION_PERIOD_END_TIME], record[LAST_DATA_TIME]
('1970-01-01T00:01:00.000Z', '1970-01-01T00:00:59.000Z')
>>> set(RESULT_FIELDS + EXTRA_FIELDS) >= set(record)
True
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

# -- field names ------------------------------------------------------------------------------

DETECTOR_NAME = "detectorName"
MEASURE = "measure"
TIMESERIES_ID = "timeseriesId"
DIMENSION_LIST = "dimensionList"  # [{name, value}] sorted by name
AGGREGATED_MEASURE_VALUE = "aggregatedMeasureValue"  # null for an interval without data
ANOMALY_SCORE = "anomalyScore"  # 0-100
ANOMALY_DECISION_THRESHOLD = "anomalyDecisionThreshold"
ANOMALY_DECISION = "anomalyDecision"  # 0/1
ANOMALY_CONFIDENCE_SCORE = "anomalyConfidenceScore"  # 0-100
MODEL_STAGE = "modelStage"  # LEARNING or INFERENCE
EXPECTED_VALUE = "expectedValue"
PROCESSED_DATA_POINTS = "processedDataPoints"
DETECTION_PERIOD_START_TIME = "detectionPeriodStartTime"
DETECTION_PERIOD_END_TIME = "detectionPeriodEndTime"

# Appended since: the forest's own score, the series' silence, and per-measure detail.
RAW_SCORE = "rawScore"
NO_DATA = "noData"  # 0/1: the series sent nothing for its detector's no_data_after
LAST_DATA_TIME = "lastDataTime"  # event time of the series' latest record
MEASURES = "measures"  # {measure: {value, expected}}, detectors of several measures only
ATTRIBUTION = "attribution"  # {measure: share of the score}, detectors of several measures only

RESULT_FIELDS: tuple[str, ...] = (
    DETECTOR_NAME,
    MEASURE,
    TIMESERIES_ID,
    DIMENSION_LIST,
    AGGREGATED_MEASURE_VALUE,
    ANOMALY_SCORE,
    ANOMALY_DECISION_THRESHOLD,
    ANOMALY_DECISION,
    ANOMALY_CONFIDENCE_SCORE,
    MODEL_STAGE,
    EXPECTED_VALUE,
    PROCESSED_DATA_POINTS,
    DETECTION_PERIOD_START_TIME,
    DETECTION_PERIOD_END_TIME,
)
EXTRA_FIELDS: tuple[str, ...] = (RAW_SCORE, NO_DATA, LAST_DATA_TIME, MEASURES, ATTRIBUTION)

# The keys of a ``dimensionList`` entry.
DIMENSION_NAME = "name"
DIMENSION_VALUE = "value"

# -- the lake's Arrow schema ------------------------------------------------------------------

DIMENSION_TYPE = pa.struct([(DIMENSION_NAME, pa.string()), (DIMENSION_VALUE, pa.string())])
MODEL_STAGE_TYPE = pa.dictionary(pa.int8(), pa.string())
TIME_TYPE = pa.timestamp("ms", tz="UTC")

RESULT_SCHEMA = pa.schema(
    [
        (DETECTOR_NAME, pa.string()),
        (MEASURE, pa.string()),
        (TIMESERIES_ID, pa.string()),
        (DIMENSION_LIST, pa.list_(DIMENSION_TYPE)),
        (AGGREGATED_MEASURE_VALUE, pa.float64()),
        (ANOMALY_SCORE, pa.float64()),
        (ANOMALY_DECISION_THRESHOLD, pa.float64()),
        (ANOMALY_DECISION, pa.int8()),
        (ANOMALY_CONFIDENCE_SCORE, pa.float64()),
        (MODEL_STAGE, MODEL_STAGE_TYPE),
        (EXPECTED_VALUE, pa.float64()),
        (PROCESSED_DATA_POINTS, pa.int64()),
        (DETECTION_PERIOD_START_TIME, TIME_TYPE),
        (DETECTION_PERIOD_END_TIME, TIME_TYPE),
    ]
)
assert tuple(RESULT_SCHEMA.names) == RESULT_FIELDS

# Lake columns besides the record's fields: one ``dim_<name>`` string column per dimension, then
# where the record came from (Kafka Connect style), then the Hive partition of its day.
DIMENSION_PREFIX = "dim_"
KAFKA_PARTITION = "kafkaPartition"
KAFKA_OFFSET = "kafkaOffset"
PROVENANCE_SCHEMA = pa.schema([(KAFKA_PARTITION, pa.int32()), (KAFKA_OFFSET, pa.int64())])
DAY_PARTITION = "dt"

# -- identity and dimensions ------------------------------------------------------------------


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
    """``[{name, value}]`` sorted by name, as in the result record.

    >>> dimension_list({"host": "a", "dc": "x"})
    [{'name': 'dc', 'value': 'x'}, {'name': 'host', 'value': 'a'}]
    """
    return [
        {DIMENSION_NAME: str(k), DIMENSION_VALUE: str(v)} for k, v in sorted(dimensions.items())
    ]


def dimensions_of(record: Mapping[str, Any]) -> dict[str, str]:
    """The dimension name -> value mapping of a result record."""
    items: Iterable[Mapping[str, str]] = record.get(DIMENSION_LIST) or ()
    return {item[DIMENSION_NAME]: item[DIMENSION_VALUE] for item in items}


# -- JSON -------------------------------------------------------------------------------------


def encode(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode(payload: bytes) -> dict[str, Any]:
    record = json.loads(payload)
    if not isinstance(record, dict):
        raise ValueError("a result record must be a JSON object")
    return record


def encode_head(
    detector: str, measure: str, series_id: str, dimensions: Mapping[str, str], threshold: float
) -> bytes:
    """The constant fields of a series' result records, encoded once: ``{...,``."""
    head = encode(
        {
            DETECTOR_NAME: detector,
            MEASURE: measure,
            TIMESERIES_ID: series_id,
            DIMENSION_LIST: dimension_list(dimensions),
            ANOMALY_DECISION_THRESHOLD: threshold,
        }
    )
    return head[:-1] + b","


def encode_result(
    head: bytes,
    measures: Sequence[str],
    values: Sequence[float] | None,
    expected: Sequence[float],
    *,
    score: float,
    decision: int,
    confidence: float,
    stage: str,
    processed: int,
    start_ms: int,
    end_ms: int,
    raw_score: float,
    no_data: bool,
    last_data_ms: int,
    attribution: Sequence[float] | None,
) -> bytes:
    """One result record after its series' ``encode_head``; ``values`` is None for an interval
    without data (its value is null).

    Formatted by hand: it is built for every closed window, and float ``repr`` is exactly what
    ``json.dumps`` writes for the finite numbers a detector returns. Detectors of several
    measures add each measure's value and expectation, and the attribution if they have one.
    """
    text = (
        f'"{AGGREGATED_MEASURE_VALUE}":{"null" if values is None else repr(float(values[0]))},'
        f'"{ANOMALY_SCORE}":{float(score)!r},'
        f'"{ANOMALY_DECISION}":{int(decision)},'
        f'"{ANOMALY_CONFIDENCE_SCORE}":{float(confidence)!r},'
        f'"{MODEL_STAGE}":"{stage}",'
        f'"{EXPECTED_VALUE}":{float(expected[0])!r},'
        f'"{PROCESSED_DATA_POINTS}":{int(processed)},'
        f'"{DETECTION_PERIOD_START_TIME}":"{iso_time(start_ms)}",'
        f'"{DETECTION_PERIOD_END_TIME}":"{iso_time(end_ms)}",'
        f'"{RAW_SCORE}":{float(raw_score)!r},'
        f'"{NO_DATA}":{int(no_data)},'
        f'"{LAST_DATA_TIME}":"{iso_time(last_data_ms)}"'
    )
    if len(measures) > 1:
        extra: dict[str, Any] = {
            MEASURES: {
                name: {"value": value, "expected": expected_value}
                for name, value, expected_value in zip(
                    measures, values or (None,) * len(measures), expected, strict=True
                )
            }
        }
        if attribution is not None:
            extra[ATTRIBUTION] = dict(zip(measures, attribution, strict=True))
        text += "," + json.dumps(extra, separators=(",", ":"))[1:-1]
    return head + text.encode() + b"}"


# -- time -------------------------------------------------------------------------------------


def format_time(epoch_seconds: float) -> str:
    """ISO-8601 UTC with milliseconds, the form of the record's period start and end times.

    >>> format_time(0)
    '1970-01-01T00:00:00.000Z'
    """
    moment = datetime.fromtimestamp(epoch_seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """The aware datetime of an ISO-8601 text: the one ISO parser of the project.

    Record times written by ``format_time``, input timestamps, label windows and CSV cells all
    pass here; a time without a zone is UTC, ``Z`` (or ``z``) is UTC, surrounding blanks are
    ignored. Raises ``ValueError`` for anything else (``TypeError`` for a non-string).

    >>> parse_time("1970-01-01T00:00:01.500Z").timestamp()
    1.5
    >>> parse_time(" 1970-01-02 00:00:00 ").timestamp(), parse_time("1970-01-01T01:00+01:00").hour
    (86400.0, 1)
    """
    if not isinstance(text, str):
        raise TypeError(f"expected an ISO-8601 text, got {type(text).__name__}")
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# Epoch numbers at or above this are milliseconds: 1e11 s is the year 5138, 1e11 ms is 1973.
_EPOCH_MILLIS_FROM = 1e11


def epoch_seconds(number: float) -> float:
    """Epoch seconds of an epoch number in seconds or, when too large for seconds, milliseconds.

    >>> epoch_seconds(1_500_000_000), epoch_seconds(1_500_000_000_000)
    (1500000000.0, 1500000000.0)
    """
    number = float(number)
    return number / 1000.0 if abs(number) >= _EPOCH_MILLIS_FROM else number


def parse_timestamp(text: str) -> float:
    """Epoch seconds of ISO-8601 (``parse_time``) or of an epoch number (``epoch_seconds``).

    Raises ``ValueError`` for anything else.

    >>> parse_timestamp("2014-07-01 00:30:00"), parse_timestamp("2014-07-01T00:30:00+01:00")
    (1404174600.0, 1404171000.0)
    >>> parse_timestamp("1404174600"), parse_timestamp("1404174600000")
    (1404174600.0, 1404174600.0)
    """
    try:
        number = float(text)
    except ValueError:
        return parse_time(text).timestamp()
    if not math.isfinite(number):
        raise ValueError(f"not a finite epoch: {text!r}")
    return epoch_seconds(number)


_DAY_MS = 86_400_000
_day_text: dict[int, str] = {}
# Windows of all series close on the same interval bounds: most record times repeat.
_time_text: dict[int, str] = {}


def iso_time(epoch_ms: int) -> str:
    """``format_time`` of epoch milliseconds, without a datetime per call.

    Two per result record made the datetime path a visible share of the worker's time.

    >>> iso_time(1_704_067_230_500) == format_time(1_704_067_230.5)
    True
    """
    text = _time_text.get(epoch_ms)
    if text is None:
        if len(_time_text) > 100_000:
            _time_text.clear()
        text = _time_text[epoch_ms] = _format_epoch_ms(epoch_ms)
    return text


def _format_epoch_ms(epoch_ms: int) -> str:
    day, ms = divmod(int(epoch_ms), _DAY_MS)
    text = _day_text.get(day)
    if text is None:
        if len(_day_text) > 10_000:
            _day_text.clear()
        text = _day_text[day] = format_time(day * 86_400)[:11]  # "YYYY-MM-DDT"
    seconds, millis = divmod(ms, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{text}{hour:02d}:{minute:02d}:{second:02d}.{millis:03d}Z"
