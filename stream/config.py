"""Typed configuration of ``anomstream detect``: a YAML file validated by pydantic v2.

Errors name the file and the field path (``detectors[1].interval``) and say what is expected,
so a typo in the YAML is reported before the worker touches Kafka.

>>> config = DetectConfig.model_validate({
...     "kafka": {"bootstrap": "127.0.0.1:9092"},
...     "topics": {"output": "results"},
...     "detectors": [{"name": "cpu", "input": "metrics", "measure": "util",
...                    "dimensions": ["host"], "interval": "60s"}],
... })
>>> config.detectors[0].interval_ms, config.detectors[0].measures
(60000, ('util',))
"""

from __future__ import annotations

import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.config import ConfigError, line_of, read_yaml, yaml_lines
from common.durations import parse_duration_ms
from common.kafka_security import PLAINTEXT, KafkaSecurity
from detectors import DetectorConfig

# Milliseconds, written in YAML as "60s", "500ms", "5m" or a number of seconds.
DurationMs = Annotated[int, BeforeValidator(parse_duration_ms)]


class Aggregation(StrEnum):
    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    COUNT = "count"
    LAST = "last"


class EmptyIntervals(StrEnum):
    """What an interval with no record feeds the detector: a missing point, zeros, the last value,
    or nothing at all (``skip``: the detector's daily alignment then drifts over gaps)."""

    MISSING = "missing"
    SKIP = "skip"
    ZERO = "zero"
    PREVIOUS = "previous"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Strict):
    bootstrap: str
    group_id: str = "anomstream"
    # Stable per worker: it names the transactional producers (a restarted worker fences and
    # aborts its predecessor's open transaction at once) and the static group membership.
    instance_id: str | None = None
    static_membership: bool = True
    session_timeout: int = Field(default=10_000, description="ms")
    transaction_timeout: int = Field(default=30_000, description="ms")
    # TLS, mutual TLS or SASL (SCRAM) over TLS; secrets come from the environment or files.
    security: KafkaSecurity = PLAINTEXT


class TopicSettings(_Strict):
    output: str
    dead_letter: str = "anomstream-dead-letter"
    repartition: str = "anomstream-repartition"
    state: str = "anomstream-state"
    # Partitions of the repartition and state topics (which must match) when the worker creates
    # them; an existing topic keeps its own count.
    partitions: int = Field(default=4, ge=1)
    # Replicas and min.insync.replicas of the topics the worker creates; None: the cluster's
    # defaults (default.replication.factor, min.insync.replicas).
    replication: int | None = Field(default=None, ge=1)
    min_insync_replicas: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _insync_within_replicas(self) -> TopicSettings:
        if (
            self.replication is not None
            and self.min_insync_replicas is not None
            and self.min_insync_replicas > self.replication
        ):
            raise ValueError(
                f"min_insync_replicas ({self.min_insync_replicas}) cannot exceed replication "
                f"({self.replication}): no write could ever be acknowledged"
            )
        return self


class WorkerSettings(_Strict):
    max_live_models: int = Field(default=10_000, ge=1)
    snapshot_interval: DurationMs = Field(default=30_000, ge=0)
    commit_interval: DurationMs = Field(default=100, ge=0)
    # A checkpoint round is spread over the transactions of the first half of the interval
    # (paced by time), at least this many series snapshots per commit.
    snapshots_per_commit: int = Field(default=32, ge=1)
    # A round snapshots a changed series only when that pays: it scored at least
    # snapshot_min_changes windows since its last snapshot, or its unsaved changes are older
    # than snapshot_max_age or more than snapshot_max_replay records of its partition back (the
    # bound of the replay after a kill -9). A partition quiet since its last round is
    # checkpointed whole.
    snapshot_min_changes: int = Field(default=50, ge=1)
    snapshot_max_age: DurationMs = Field(default=3_600_000, ge=0)
    snapshot_max_replay: int = Field(default=100_000, ge=1)
    # Records per consume call. The score stage scores a batch's windows series by series, so
    # on a backlog a larger batch puts more windows of a series together (a warm forest).
    max_batch: int = Field(default=2000, ge=1)
    # Closed windows scored before their results are produced; between such slices the
    # transaction is committed once commit_interval has passed, so the results of a burst of
    # windows (a partition's stream time closing every series at once) become readable in parts.
    score_slice_windows: int = Field(default=500, ge=1)
    # The directory of the score stage's spill store: snapshots of the series it holds but not
    # as live models (evicted, or restored and not yet seen), on disk instead of in memory
    # (decision 0009). A cache, rebuilt from the state topic at every restore; put it on a disk,
    # not a tmpfs, where a tmpfs /tmp would hold it in memory after all.
    spill_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "anomstream-spill"
    )
    # Processes running the score stage (the route stage stays in the worker's own): the score
    # stage is one process on one core otherwise. Each is a member of the score group under an
    # instance id derived from the worker's (docs/decisions/0011-score-processes.md).
    score_processes: int = Field(default=1, ge=1)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Most empty intervals filled (missing, zero or previous) after a series' last record; beyond
    # that it gets no results until it sends again, so a series silent for a year (or gone for
    # good) does not score millions of empty intervals.
    max_fill_intervals: int = Field(default=10_000, ge=0)
    # /healthz fails when a stage has lag and has consumed or committed nothing for this long
    # (or its loop has not turned for this long): a stuck worker, for a supervisor to restart.
    stall_timeout: DurationMs = Field(default=60_000, ge=1000)
    # How long a transient Kafka error (broker down, coordinator moving, time-outs) is retried
    # with back-off before the worker gives up and exits non-zero (docs/decisions/0006).
    retry_timeout: DurationMs = Field(default=600_000, ge=1000)

    @property
    def snapshot_interval_ms(self) -> int:
        return self.snapshot_interval

    @property
    def commit_interval_ms(self) -> int:
        return self.commit_interval


class DetectorSpec(_Strict):
    name: str = Field(min_length=1)
    input: str = Field(min_length=1, description="input topic")
    timestamp: str = "timestamp"
    measures: tuple[str, ...] = Field(min_length=1)
    dimensions: tuple[str, ...] = ()
    aggregation: Aggregation = Aggregation.AVG
    interval: DurationMs = Field(gt=0)
    delay: DurationMs = Field(default=0, ge=0)
    empty: EmptyIntervals = EmptyIntervals.MISSING
    # A series that sent nothing for this long (stream time) is flagged ``noData`` in its results.
    no_data_after: DurationMs | None = Field(default=None, gt=0)
    threshold: float = Field(default=70.0, ge=0.0, le=100.0)
    # Only records whose fields equal these values feed this detector (several detectors can
    # share a topic); a record that matches no detector is dead-lettered as ``no_detector``.
    match: dict[str, str | int | float | bool] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "measure" in data:
            if "measures" in data:
                raise ValueError("give either 'measure' or 'measures', not both")
            data["measures"] = [data.pop("measure")]
        return data

    @field_validator("measures", "dimensions")
    @classmethod
    def _distinct(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(names)) != len(names):
            raise ValueError(f"names must be distinct, got {list(names)}")
        return names

    @field_validator("params")
    @classmethod
    def _detector_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        if "threshold" in params:
            raise ValueError("set the threshold on the detector ('threshold:'), not in params")
        DetectorConfig.from_dict(params)  # ValueError names the unknown or invalid parameter
        return params

    @property
    def interval_ms(self) -> int:
        return self.interval

    @property
    def delay_ms(self) -> int:
        return self.delay

    @property
    def measure(self) -> str:
        """The ``measure`` of the result record: the measure names joined with ','."""
        return ",".join(self.measures)

    def detector_config(self) -> DetectorConfig:
        return DetectorConfig.from_dict({**self.params, "threshold": self.threshold})


class DetectConfig(_Strict):
    kafka: KafkaSettings
    topics: TopicSettings
    worker: WorkerSettings = WorkerSettings()
    # No min_length here: pydantic would also report "0 items" when one detector is invalid.
    detectors: tuple[DetectorSpec, ...]

    @field_validator("detectors")
    @classmethod
    def _unique_names(cls, specs: tuple[DetectorSpec, ...]) -> tuple[DetectorSpec, ...]:
        if not specs:
            raise ValueError("list at least one detector")
        names = [spec.name for spec in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"detector names must be unique; repeated: {', '.join(duplicates)}")
        return specs

    @model_validator(mode="after")
    def _topics_disjoint(self) -> DetectConfig:
        internal = {
            self.topics.output,
            self.topics.dead_letter,
            self.topics.repartition,
            self.topics.state,
        }
        if len(internal) != 4:
            raise ValueError("topics.output, dead_letter, repartition and state must differ")
        clash = sorted({spec.input for spec in self.detectors} & internal)
        if clash:
            raise ValueError(f"a detector reads {', '.join(clash)}, which the worker writes")
        return self

    @property
    def input_topics(self) -> list[str]:
        return sorted({spec.input for spec in self.detectors})


def load_config(path: str | Path) -> DetectConfig:
    """The validated configuration in ``path``; ``ConfigError`` names the file, line and field."""
    data, text = read_yaml(path, what="a mapping with kafka, topics, detectors")
    try:
        return DetectConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: {describe_errors(error, yaml_lines(text))}") from None


def describe_errors(error: ValidationError, lines: dict[tuple[Any, ...], int]) -> str:
    """One part per problem: ``line 12, detectors[0].interval: expected a duration ...``."""
    parts_out = []
    for item in error.errors():
        parts: list[str] = []
        for loc in item["loc"]:
            if isinstance(loc, int):
                parts.append(f"[{loc}]")
            else:
                parts.append(("." if parts else "") + str(loc))
        field = "".join(parts) or "(top level)"
        message = str(item["msg"]).removeprefix("Value error, ")
        line = line_of(lines, tuple(item["loc"]))
        parts_out.append(f"{'' if line is None else f'line {line}, '}{field}: {message}")
    return "; ".join(parts_out)
