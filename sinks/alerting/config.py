"""The alerter's YAML configuration, typed with pydantic, with errors that say what to fix.

Durations are written as ``30s``, ``5m``, ``2h``, ``1d`` (or plain seconds). Receiver URLs may
reference environment variables as ``${NAME}`` so that tokens stay out of the file; a URL is
never echoed back in an error because it usually carries a token.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.config import ConfigError, read_yaml, yaml_lines
from common.durations import parse_duration
from common.kafka_security import PLAINTEXT, KafkaSecurity

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


Duration = Annotated[float, BeforeValidator(parse_duration)]


def expand_env(text: str, environ: dict[str, str] | None = None) -> str:
    """Replace ``${NAME}`` by the environment variable; a missing one is an error naming it."""
    env = os.environ if environ is None else environ

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ValueError(f"environment variable {name} is not set")
        return env[name]

    return _ENV_REFERENCE.sub(substitute, text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    """At most ``messages`` per ``per`` for one receiver; the excess waits in the outbox."""

    messages: int = Field(default=20, ge=1)
    per: Duration = 60.0


class Receiver(_Strict):
    name: str = Field(min_length=1)
    # The URL as written (with ${VAR} references); ``resolved_url`` is the secret-bearing form.
    url: str = Field(min_length=1, repr=False)
    tags: list[str] = Field(default_factory=list)
    rate_limit: RateLimit = Field(default_factory=RateLimit)

    def resolved_url(self) -> str:
        return expand_env(self.url)

    @field_validator("url")
    @classmethod
    def _has_scheme(cls, url: str) -> str:
        if "://" not in url:
            # Deliberately not quoting the value: it may hold a token.
            raise ValueError("must be an apprise URL such as json://host/path or mailto://...")
        return url


class MofN(_Strict):
    """Fire when at least ``m`` of the last ``n`` intervals are anomalous."""

    m: int = Field(default=1, ge=1)
    n: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _m_at_most_n(self) -> MofN:
        if self.m > self.n:
            raise ValueError(f"m ({self.m}) cannot exceed n ({self.n})")
        return self


class Rule(_Strict):
    name: str = Field(min_length=1)
    # "anomaly": the score crosses the enter threshold. "no_data": the series went silent for its
    # detector's ``no_data_after`` (the result record's ``noData``); it is over once data returns.
    condition: Literal["anomaly", "no_data"] = "anomaly"
    # Glob patterns (fnmatch) on detectorName; empty means every detector.
    detectors: list[str] = Field(default_factory=list)
    # Dimension name -> glob pattern; every listed dimension must match.
    dimensions: dict[str, str] = Field(default_factory=dict)
    # None: use each record's own anomalyDecisionThreshold.
    enter_threshold: float | None = Field(default=None, ge=0, le=100)
    # None: enter threshold minus ``hysteresis``.
    exit_threshold: float | None = Field(default=None, ge=0, le=100)
    hysteresis: float = Field(default=10.0, ge=0, le=100)
    fire_after: MofN = Field(default_factory=MofN)
    resolve_after: int = Field(
        default=3, ge=1, description="K intervals under the exit threshold (or with data again)"
    )
    min_confidence: float = Field(default=0.0, ge=0, le=100)
    # Scores of a model still learning are not trusted enough to page anyone.
    skip_learning: bool = True
    severity: str = "warning"
    repeat_interval: Duration = 4 * 3600.0

    @model_validator(mode="after")
    def _exit_below_enter(self) -> Rule:
        if (
            self.enter_threshold is not None
            and self.exit_threshold is not None
            and self.exit_threshold > self.enter_threshold
        ):
            raise ValueError(
                f"exit_threshold ({self.exit_threshold}) must not exceed "
                f"enter_threshold ({self.enter_threshold})"
            )
        return self

    def thresholds(self, record_threshold: float) -> tuple[float, float]:
        """(enter, exit) for a record whose own decision threshold is ``record_threshold``."""
        enter = self.enter_threshold if self.enter_threshold is not None else record_threshold
        exit_ = self.exit_threshold if self.exit_threshold is not None else enter - self.hysteresis
        return enter, min(exit_, enter)


class Grouping(_Strict):
    # Alerts starting within this window (record time, or wall time if the stream is idle)
    # go out as one message.
    window: Duration = 30.0
    # Labels: detector, measure, rule, severity, or any dimension name.
    by: list[str] = Field(default_factory=lambda: ["rule", "detector"])


class SilenceSpec(_Strict):
    matchers: dict[str, str] = Field(min_length=1)
    starts_at: float | None = Field(default=None, description="epoch seconds; default: always")
    ends_at: float | None = None
    comment: str = ""


class Delivery(_Strict):
    initial_backoff: Duration = 1.0
    max_backoff: Duration = 300.0
    # A notification still undelivered after this long is dropped with an error.
    give_up_after: Duration = 86400.0
    timeout: Duration = 15.0


class AlertConfig(_Strict):
    bootstrap_servers: str = "127.0.0.1:9092"
    # TLS, mutual TLS or SASL (SCRAM) over TLS, as ``kafka.security`` of the detect config.
    kafka_security: KafkaSecurity = PLAINTEXT
    result_topic: str = "anomstream-results"
    group_id: str = "anomstream-alerter"
    # Static group membership: a restarted alerter (even after kill -9) takes its partitions back
    # at once instead of waiting out the dead member's session. One alerter per group.
    instance_id: str = "alerter-0"
    auto_offset_reset: Literal["earliest", "latest"] = "latest"
    # Holds the durable alert state (with the offsets it reflects) and the silences directory.
    state_dir: Path = Path("alert-state")
    dashboard_url: str = "http://127.0.0.1:8501"
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables /metrics")
    receivers: list[Receiver] = Field(min_length=1)
    # Severity -> apprise tags; a severity not listed routes to the tag of its own name.
    routes: dict[str, list[str]] = Field(default_factory=dict)
    rules: list[Rule] = Field(min_length=1)
    grouping: Grouping = Field(default_factory=Grouping)
    silences: list[SilenceSpec] = Field(default_factory=list)
    delivery: Delivery = Field(default_factory=Delivery)

    @model_validator(mode="after")
    def _unique_names(self) -> AlertConfig:
        for kind, names in (
            ("receiver", [r.name for r in self.receivers]),
            ("rule", [r.name for r in self.rules]),
        ):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{kind} names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def tags_for(self, severity: str) -> set[str]:
        return set(self.routes.get(severity, [severity]))

    def receivers_for(self, severity: str) -> list[Receiver]:
        wanted = self.tags_for(severity)
        return [r for r in self.receivers if wanted & set(r.tags)]

    @property
    def silences_dir(self) -> Path:
        return self.state_dir / "silences"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "alerter-state.json"


def _describe(error: ValidationError, path: Path, lines: dict[tuple[Any, ...], int]) -> str:
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        location = tuple(item["loc"])
        where = ".".join(str(part) for part in location) or "(top level)"
        line = next(
            (lines[location[:n]] for n in range(len(location), -1, -1) if location[:n] in lines),
            None,
        )
        at = f"{path}:{line}" if line else str(path)
        problems.append(f"{at}: {where}: {item['msg']}")
    return "invalid alert configuration:\n  " + "\n  ".join(problems)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> AlertConfig:
    """Read and validate ``path``; raise ConfigError naming file, line and field on any problem."""
    path = Path(path)
    data, text = read_yaml(path, what="a mapping of settings at the top level", empty_ok=True)
    data.update(overrides or {})
    try:
        config = AlertConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, path, yaml_lines(text))) from None
    for index, receiver in enumerate(config.receivers):
        try:
            receiver.resolved_url()
        except ValueError as error:
            line = yaml_lines(text).get(("receivers", index, "url"))
            at = f"{path}:{line}" if line else str(path)
            raise ConfigError(f"{at}: receivers.{index}.url ({receiver.name}): {error}") from None
    return config
