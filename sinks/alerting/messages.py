"""Turn a group of events into the text a person on call reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import quote

from sinks.alerting.state import Event, Group, Kind
from stream.records import format_time

_HEADLINE = {Kind.FIRING: "FIRING", Kind.REPEAT: "STILL FIRING", Kind.RESOLVED: "RESOLVED"}


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    notify_type: str  # apprise NotifyType value: info, success, warning, failure


def series_link(dashboard_url: str, series_id: str) -> str:
    return f"{dashboard_url.rstrip('/')}/?series={quote(series_id, safe='')}"


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.6g}"


def _describe(event: Event, dashboard_url: str) -> str:
    dims = ", ".join(f"{k}={v}" for k, v in sorted(event.dimensions.items())) or "(no dimensions)"
    lines = [
        f"- {event.detector} / {event.measure}: {dims}",
        f"  value {_number(event.value)} (expected {_number(event.expected)}), "
        f"score {event.score:.1f} (threshold {event.enter_threshold:.1f}, "
        f"peak {event.peak_score:.1f}), confidence {event.confidence:.0f}",
        f"  interval {format_time(event.start)} - {format_time(event.end)}",
    ]
    lines.append(f"  incident since {format_time(event.incident_start)}")
    lines.append(f"  {series_link(dashboard_url, event.series_id)}")
    return "\n".join(lines)


def render(group: Group, dashboard_url: str) -> Message:
    events = sorted(group.events, key=lambda e: (e.detector, sorted(e.dimensions.items())))
    rules = sorted({e.rule for e in events})
    scope = ", ".join(f"{k}={v}" for k, v in group.labels.items() if v and k != "rule")
    count = f"{len(events)} series" if len(events) != 1 else "1 series"
    title = f"[{_HEADLINE[group.kind]}] {', '.join(rules)} ({group.severity})"
    title += f" {scope}: {count}" if scope else f": {count}"
    intro = {
        Kind.FIRING: "Anomalous intervals crossed the alert threshold:",
        Kind.REPEAT: "Still anomalous (reminder):",
        Kind.RESOLVED: "Back to normal (scores under the exit threshold):",
    }[group.kind]
    body = "\n".join([intro, *(_describe(e, dashboard_url) for e in events)])
    if group.kind is Kind.RESOLVED:
        notify_type = "success"
    else:
        notify_type = "failure" if group.severity in ("critical", "page", "error") else "warning"
    return Message(title=title, body=body, notify_type=notify_type)
