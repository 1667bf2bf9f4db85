"""Turn a group of events into the text a person on call reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import quote

from contract.records import format_time
from sinks.alerting.state import Event, Group, Kind

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


def duration_text(seconds: float) -> str:
    """A span as people say it: ``45 s``, ``10 min``, ``1 h 15 min``, ``2 d 3 h``.

    >>> duration_text(600), duration_text(4500), duration_text(183600)
    ('10 min', '1 h 15 min', '2 d 3 h')
    """
    if math.isnan(seconds):
        return "n/a"
    total = max(0, round(seconds))
    if total < 60:
        return f"{total} s"
    minutes = total // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _describe(event: Event, dashboard_url: str) -> str:
    dims = ", ".join(f"{k}={v}" for k, v in sorted(event.dimensions.items())) or "(no dimensions)"
    lines = [f"- {event.detector} / {event.measure}: {dims}"]
    if event.condition == "no_data":
        if event.kind is Kind.RESOLVED:
            lines.append(
                f"  reporting {event.measure} again: value {_number(event.value)} "
                f"(expected {_number(event.expected)})"
            )
        else:
            silent = event.end - event.last_data
            lines.append(
                f"  stopped reporting {event.measure} {duration_text(silent)} ago "
                f"(last data {_time(event.last_data)}, expected {_number(event.expected)})"
            )
    else:
        lines.append(
            f"  value {_number(event.value)} (expected {_number(event.expected)}), "
            f"score {event.score:.1f} (threshold {event.enter_threshold:.1f}, "
            f"peak {event.peak_score:.1f}), confidence {event.confidence:.0f}"
        )
    lines.append(f"  interval {format_time(event.start)} - {format_time(event.end)}")
    if event.kind is Kind.RESOLVED:
        lines.append(
            f"  incident {format_time(event.incident_start)} - {_time(event.incident_end)}, "
            f"lasted {duration_text(event.duration)}"
        )
    else:
        lines.append(
            f"  incident since {format_time(event.incident_start)}, "
            f"{duration_text(event.end - event.incident_start)} so far"
        )
    lines.append(f"  {series_link(dashboard_url, event.series_id)}")
    return "\n".join(lines)


def _time(epoch_seconds: float) -> str:
    return "n/a" if math.isnan(epoch_seconds) else format_time(epoch_seconds)


def render(group: Group, dashboard_url: str) -> Message:
    events = sorted(group.events, key=lambda e: (e.detector, sorted(e.dimensions.items())))
    rules = sorted({e.rule for e in events})
    scope = ", ".join(f"{k}={v}" for k, v in group.labels.items() if v and k != "rule")
    count = f"{len(events)} series" if len(events) != 1 else "1 series"
    title = f"[{_HEADLINE[group.kind]}] {', '.join(rules)} ({group.severity})"
    title += f" {scope}: {count}" if scope else f": {count}"
    if all(e.condition == "no_data" for e in events):
        intro = {
            Kind.FIRING: "Series stopped reporting:",
            Kind.REPEAT: "Still no data (reminder):",
            Kind.RESOLVED: "Reporting again:",
        }[group.kind]
    else:
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
