"""Parse and validate input records into series points, or say why a record cannot be used.

A record is a JSON object with a timestamp (ISO-8601 string or epoch milliseconds), measure
fields and dimension fields. It feeds every detector of its topic whose ``match`` it satisfies;
a matching detector that cannot use it (missing field, wrong type, NaN) rejects it, and the record
is dead-lettered with that reason (it still feeds the detectors that accepted it).

>>> from stream.config import DetectorSpec
>>> router = Router([DetectorSpec(name="cpu", input="m", measures=("util",),
...                               dimensions=("host",), interval="60s")])
>>> points, rejections = router.route("m", b'{"timestamp": 60000, "util": 0.5, "host": "a"}')
>>> points[0].event_ms, points[0].values, points[0].dimensions, rejections
(60000, (0.5,), {'host': 'a'}, [])
>>> router.route("m", b'{"timestamp": 60000, "util": "high", "host": "a"}')[1][0].reason
'bad_type'
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from contract.records import parse_time, timeseries_id
from stream.config import DetectorSpec

# Dead-letter reasons (the ``reason`` header); stable names, counted in the metrics.
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
NON_FINITE = "non_finite"
BAD_TIMESTAMP = "bad_timestamp"
NO_DETECTOR = "no_detector"
LATE = "late"
UNEXPECTED = "unexpected"  # a failure no rule foresaw (a bug); the record is kept, not lost

# Epoch milliseconds beyond year 9999 are surely a unit mistake (microseconds, nanoseconds).
_MAX_EPOCH_MS = 253_402_300_799_999


class Point(NamedTuple):
    """One record's contribution to one series (a tuple: built once per record, so cheap)."""

    detector: int  # index into the router's detector list
    timeseries_id: str
    event_ms: int
    values: tuple[float, ...]
    dimensions: dict[str, str]


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    detail: str
    detector: str | None = None


class InvalidRecord(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_event_ms(value: Any) -> int:
    """Epoch milliseconds of an ISO-8601 string (UTC if no offset) or of epoch milliseconds.

    >>> parse_event_ms("1970-01-01T00:01:00Z"), parse_event_ms(60000), parse_event_ms("60000")
    (60000, 60000, 60000)
    """
    if type(value) is int and 0 <= value <= _MAX_EPOCH_MS:  # the common case, first
        return value
    if isinstance(value, bool):
        raise InvalidRecord(BAD_TIMESTAMP, "timestamp is a boolean")
    if isinstance(value, int):  # beyond the epoch range (and maybe beyond the float range)
        digits = str(value)
        text = digits if len(digits) <= 30 else f"{digits[:20]}... ({len(digits)} digits)"
        raise InvalidRecord(BAD_TIMESTAMP, f"timestamp {text} is not epoch milliseconds")
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            try:
                moment = parse_time(text)
            except ValueError:
                raise InvalidRecord(
                    BAD_TIMESTAMP, f"timestamp {value!r} is neither ISO-8601 nor epoch ms"
                ) from None
            return round(moment.timestamp() * 1000)
    else:
        raise InvalidRecord(BAD_TIMESTAMP, f"timestamp has type {type(value).__name__}")
    if not math.isfinite(number) or not 0 <= number <= _MAX_EPOCH_MS:
        raise InvalidRecord(BAD_TIMESTAMP, f"timestamp {value!r} is not epoch milliseconds")
    return round(number)


def _measure(record: dict[str, Any], name: str) -> float:
    """The value of measure ``name`` as a finite float.

    >>> _measure({"v": 10**400}, "v")
    Traceback (most recent call last):
    ...
    stream.routing.InvalidRecord: measure 'v' is an integer of 401 digits, beyond the float range
    """
    value = record.get(name)
    if type(value) is float and math.isfinite(value):  # the common case, first
        return value
    if name not in record:
        raise InvalidRecord(MISSING_FIELD, f"missing measure field {name!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRecord(BAD_TYPE, f"measure {name!r} is {type(value).__name__}, not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range (JSON allows any length)
        raise InvalidRecord(
            NON_FINITE, f"measure {name!r} is an integer of {len(str(abs(value)))} digits, "
            "beyond the float range"
        ) from None
    if not math.isfinite(number):
        raise InvalidRecord(NON_FINITE, f"measure {name!r} is {value}")
    return number


def _dimension(record: dict[str, Any], name: str) -> str:
    if name not in record:
        raise InvalidRecord(MISSING_FIELD, f"missing dimension field {name!r}")
    value = record[name]
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return json.dumps(value)
    raise InvalidRecord(BAD_TYPE, f"dimension {name!r} is {type(value).__name__}")


def load_object(payload: bytes | None) -> dict[str, Any]:
    if payload is None:
        raise InvalidRecord(NOT_JSON, "empty record (null value)")
    try:
        record = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise InvalidRecord(NOT_JSON, f"not JSON: {error}") from None
    if not isinstance(record, dict):
        raise InvalidRecord(NOT_OBJECT, f"a JSON {type(record).__name__}, not an object")
    return record


class Router:
    """Turns a record of a topic into points of the detectors reading that topic."""

    def __init__(self, detectors: Sequence[DetectorSpec]) -> None:
        self.detectors = list(detectors)
        self.by_topic: dict[str, list[int]] = {}
        for index, spec in enumerate(self.detectors):
            self.by_topic.setdefault(spec.input, []).append(index)
        # timeseriesId is a sha256 per record otherwise; series repeat, so remember them.
        self._ids: dict[tuple[int, tuple[str, ...]], tuple[str, dict[str, str]]] = {}

    def point(self, index: int, record: dict[str, Any]) -> Point:
        """The point of detector ``index`` in an already-decoded record (raises InvalidRecord)."""
        spec = self.detectors[index]
        if spec.timestamp not in record:
            raise InvalidRecord(MISSING_FIELD, f"missing timestamp field {spec.timestamp!r}")
        event_ms = parse_event_ms(record[spec.timestamp])
        values = tuple(_measure(record, name) for name in spec.measures)
        dims = tuple(_dimension(record, name) for name in spec.dimensions)
        key = (index, dims)
        known = self._ids.get(key)
        if known is None:
            dimensions = dict(zip(spec.dimensions, dims, strict=True))
            known = (timeseries_id(spec.name, spec.measure, dimensions), dimensions)
            if len(self._ids) > 1_000_000:  # bound the cache; ids are cheap to recompute
                self._ids.clear()
            self._ids[key] = known
        # The dimensions dict is shared between the points of a series: read it, never change it.
        return Point(index, known[0], event_ms, values, known[1])

    def route(self, topic: str, payload: bytes | None) -> tuple[list[Point], list[Rejection]]:
        try:
            record = load_object(payload)
        except InvalidRecord as error:
            return [], [Rejection(error.reason, error.detail)]
        points: list[Point] = []
        rejections: list[Rejection] = []
        matched = False
        for index in self.by_topic.get(topic, ()):
            spec = self.detectors[index]
            if spec.match and any(record.get(k) != v for k, v in spec.match.items()):
                continue
            matched = True
            try:
                points.append(self.point(index, record))
            except InvalidRecord as error:
                rejections.append(Rejection(error.reason, error.detail, spec.name))
        if not matched:
            rejections.append(Rejection(NO_DETECTOR, f"no detector matches this {topic} record"))
        return points, rejections
