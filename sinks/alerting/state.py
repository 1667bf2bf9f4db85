"""The alerting core: a pure state machine per (rule, series), and the grouping of its events.

Fed one ``Observation`` at a time, ``AlertEngine`` decides when an incident fires (M of the last N
intervals over the enter threshold; by default the first, so it pages at the upward crossing), when
to remind (repeat interval, in record time), and when it is over (K intervals in a row under the
lower exit threshold). A ``no_data`` rule does the same on the record's ``noData`` flag: it fires
when the series goes silent and is over once data comes back. It does no I/O and keeps its state
in plain data so that the service can persist it with the offsets it reflects.

>>> from sinks.alerting.config import Rule
>>> engine = AlertEngine([Rule(name="hot", enter_threshold=70, resolve_after=1)])
>>> def obs(i, score):
...     return Observation("s1", "cpu", "util", {}, 1.0, 0.5, score, 70, 90, "INFERENCE",
...                        60.0 * i, 60.0 * (i + 1))
>>> [e.kind.value for e in engine.observe(obs(0, 90), lambda labels: False)]
['firing']
>>> engine.observe(obs(1, 95), lambda labels: False)
[]
>>> [e.kind.value for e in engine.observe(obs(2, 10), lambda labels: False)]
['resolved']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from sinks.alerting.config import Rule
from sinks.alerting.rules import Observation, rule_matches

IsSilenced = Callable[[dict[str, str]], bool]


class Kind(StrEnum):
    FIRING = "firing"
    REPEAT = "repeat"  # still firing, reminder after the repeat interval
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Event:
    kind: Kind
    rule: str
    severity: str
    series_id: str
    detector: str
    measure: str
    dimensions: dict[str, str]
    value: float
    expected: float
    score: float
    enter_threshold: float
    confidence: float
    start: float
    end: float
    incident_start: float
    peak_score: float
    # End of the incident's last interval over the exit threshold (or without data): with
    # ``incident_start``, how long it lasted. Defaults let events saved by older versions load.
    incident_end: float = math.nan
    condition: str = "anomaly"
    last_data: float = math.nan

    @property
    def duration(self) -> float:
        """Seconds from the incident's start to the end of its last anomalous interval."""
        return self.incident_end - self.incident_start

    def labels(self) -> dict[str, str]:
        return {
            **self.dimensions,
            "detector": self.detector,
            "measure": self.measure,
            "series": self.series_id,
            "rule": self.rule,
            "severity": self.severity,
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        return cls(**{**data, "kind": Kind(data["kind"])})


@dataclass
class SeriesState:
    firing: bool = False
    recent: list[bool] = field(default_factory=list)  # hot or not, last N intervals
    below: int = 0  # consecutive intervals under the exit threshold while firing
    incident_start: float = 0.0
    incident_end: float = 0.0  # end of the last interval that kept the incident going
    peak_score: float = 0.0
    # End of the interval last notified; None while firing but silenced so far.
    last_notified_end: float | None = None
    last_end: float | None = None  # guards against a record seen twice

    def idle(self) -> bool:
        return not self.firing and not any(self.recent)


class AlertEngine:
    def __init__(
        self, rules: Sequence[Rule], states: dict[tuple[str, str], SeriesState] | None = None
    ) -> None:
        self.rules = list(rules)
        self.states: dict[tuple[str, str], SeriesState] = states if states is not None else {}

    def observe(self, observation: Observation, is_silenced: IsSilenced) -> list[Event]:
        """Advance every matching rule's state for this series; return the notifiable events.

        Silenced transitions change state but return no event: a firing that was never
        notified is announced once the silence is over, and it resolves silently.
        """
        events = []
        for rule in self.rules:
            if rule_matches(rule, observation):
                event = self._step(rule, observation, is_silenced)
                if event is not None:
                    events.append(event)
        return events

    def firing_count(self) -> int:
        return sum(1 for state in self.states.values() if state.firing)

    def _step(self, rule: Rule, obs: Observation, is_silenced: IsSilenced) -> Event | None:
        key = (rule.name, obs.series_id)
        state = self.states.get(key) or SeriesState()
        if state.last_end is not None and obs.end <= state.last_end:
            return None
        state.last_end = obs.end
        enter, exit_ = rule.thresholds(obs.threshold)
        if rule.condition == "no_data":
            hot = obs.no_data
            cool = not obs.no_data
        else:
            trusted = not (rule.skip_learning and obs.stage.upper() == "LEARNING")
            hot = trusted and obs.score >= enter and obs.confidence >= rule.min_confidence
            cool = obs.score < exit_
        event_kind: Kind | None = None
        incident = state  # what the event reports on, even once the state is reset

        if not state.firing:
            state.recent = [*state.recent, hot][-rule.fire_after.n :]
            if sum(state.recent) >= rule.fire_after.m:
                state.firing, state.below = True, 0
                state.incident_start, state.peak_score = obs.start, obs.score
                state.incident_end = obs.end
                state.last_notified_end = None
                event_kind = Kind.FIRING
        else:
            state.peak_score = max(state.peak_score, obs.score)
            if cool:
                state.below += 1
                if state.below >= rule.resolve_after:
                    was_notified = state.last_notified_end is not None
                    event_kind = Kind.RESOLVED if was_notified else None
                    state = SeriesState(last_end=obs.end)
            else:
                state.below = 0
                state.incident_end = obs.end
                if state.last_notified_end is None:
                    event_kind = Kind.FIRING
                elif obs.end - state.last_notified_end >= rule.repeat_interval:
                    event_kind = Kind.REPEAT

        event = None
        if event_kind is not None:
            event = self._event(event_kind, rule, obs, enter, incident)
            if is_silenced(event.labels()):
                event = None
            elif event_kind is not Kind.RESOLVED:
                state.last_notified_end = obs.end
        if state.idle():
            # Keep memory proportional to the series that are, or may soon be, in trouble.
            self.states.pop(key, None)
        else:
            self.states[key] = state
        return event

    @staticmethod
    def _event(kind: Kind, rule: Rule, obs: Observation, enter: float, st: SeriesState) -> Event:
        return Event(
            kind=kind,
            rule=rule.name,
            severity=rule.severity,
            series_id=obs.series_id,
            detector=obs.detector,
            measure=obs.measure,
            dimensions=dict(obs.dimensions),
            value=obs.value,
            expected=obs.expected,
            score=obs.score,
            enter_threshold=enter,
            confidence=obs.confidence,
            start=obs.start,
            end=obs.end,
            incident_start=st.incident_start,
            peak_score=max(st.peak_score, obs.score),
            incident_end=st.incident_end,
            condition=rule.condition,
            last_data=obs.last_data,
        )

    # Plain-data form for the state file.
    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"rule": rule, "series": series, **asdict(state)}
            for (rule, series), state in self.states.items()
        ]

    @staticmethod
    def states_from_json(items: Iterable[dict[str, Any]]) -> dict[tuple[str, str], SeriesState]:
        states = {}
        for item in items:
            data = dict(item)
            key = (data.pop("rule"), data.pop("series"))
            states[key] = SeriesState(**data)
        return states


@dataclass
class Group:
    """Events of one kind and one set of group labels, to go out as one message."""

    kind: Kind
    severity: str
    labels: dict[str, str]
    opened_record: float  # record time of the first event
    opened_wall: float  # wall time it was opened: an idle stream still flushes
    events: list[Event] = field(default_factory=list)

    def key(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        return (self.kind.value, self.severity, tuple(sorted(self.labels.items())))

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "severity": self.severity,
            "labels": self.labels,
            "opened_record": self.opened_record,
            "opened_wall": self.opened_wall,
            "events": [e.to_json() for e in self.events],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Group:
        return cls(
            kind=Kind(data["kind"]),
            severity=data["severity"],
            labels=dict(data["labels"]),
            opened_record=data["opened_record"],
            opened_wall=data["opened_wall"],
            events=[Event.from_json(e) for e in data["events"]],
        )


class Grouper:
    """Collects events into groups keyed by kind, severity and the configured labels.

    A group closes once record time has moved ``window`` past its first event, or, when the
    stream is quiet, once ``window`` of wall time has passed since it opened.
    """

    def __init__(
        self, window: float, by: Sequence[str], groups: Iterable[Group] = (),
        closed: Iterable[Group] = (),
    ) -> None:
        self.window = window
        self.by = list(by)
        self.groups: dict[tuple[str, str, tuple[tuple[str, str], ...]], Group] = {
            g.key(): g for g in groups
        }
        # Groups whose window was overtaken by a later event of the same key (catch-up reads).
        self.closed: list[Group] = list(closed)

    def add(self, event: Event, wall_now: float) -> None:
        labels = event.labels()
        group_labels = {name: labels.get(name, "") for name in self.by}
        candidate = Group(event.kind, event.severity, group_labels, event.end, wall_now)
        open_group = self.groups.get(candidate.key())
        if (
            open_group is not None
            and event.end > open_group.opened_record
            and event.end >= open_group.opened_record + self.window
        ):
            # This event starts after the window: the open group is complete.
            self.closed.append(self.groups.pop(candidate.key()))
        group = self.groups.setdefault(candidate.key(), candidate)
        # A later event of the same series within the window replaces the earlier one.
        group.events = [
            e for e in group.events if e.series_id != event.series_id or e.rule != event.rule
        ]
        group.events.append(event)

    def due(self, record_watermark: float, wall_now: float) -> list[Group]:
        ready = [
            g
            for g in self.groups.values()
            if record_watermark >= g.opened_record + self.window
            or wall_now >= g.opened_wall + self.window
        ]
        for group in ready:
            del self.groups[group.key()]
        ready, self.closed = self.closed + ready, []
        return sorted(ready, key=lambda g: (g.opened_record, g.kind != Kind.FIRING))

    def pending(self) -> list[Group]:
        return self.closed + list(self.groups.values())
