"""Alert lifecycle on real detector output: one page per incident, resolved after it ends.

The series is generated (a GPU's utilisation, stuck at 0 for 15 intervals twice, an hour apart)
and scored by the real detector with its default configuration; the rules are the defaults and
the shipped examples. Until the detector holds its score while an outage lasts (issue "a score
that means the same on series it never saw", item 1), these tests fail: they state the behaviour
on-call needs, not what an older detector happens to do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from sinks.alerting.config import Rule, load_config
from sinks.alerting.messages import duration_text, render
from sinks.alerting.rules import Observation
from sinks.alerting.state import AlertEngine, Event, Group, Kind
from tests.alerting_support import result_record
from tests.incident_support import OUTAGES, STEP_S, scored_gpu_records

ROOT = Path(__file__).resolve().parents[1]
NEVER = lambda labels: False  # noqa: E731


def events_of(engine: AlertEngine, records: list[dict[str, Any]]) -> list[Event]:
    events: list[Event] = []
    for item in records:
        events += engine.observe(Observation.from_record(item), NEVER)
    return events


def assert_one_incident_per_outage(events: list[Event]) -> None:
    assert [e.kind for e in events] == [Kind.FIRING, Kind.RESOLVED] * len(OUTAGES), [
        (e.kind.value, e.start) for e in events
    ]
    for outage, (page, resolve) in zip(OUTAGES, zip(events[::2], events[1::2], strict=True),
                                       strict=True):
        # Paged at the outage's start (the upward crossing), not intervals later.
        assert outage.start_s() <= page.start < outage.start_s() + 2 * STEP_S
        # Resolved only after the outage is over, and within four intervals of its end: three
        # under the exit threshold (resolve_after), and one for the smoothed score to fall
        # under it.
        assert outage.end_s() < resolve.end <= outage.end_s() + 4 * STEP_S
        # The incident it reports on covers the outage.
        assert resolve.incident_start == page.incident_start
        assert resolve.duration >= (outage.last - outage.first) * STEP_S


def test_default_rule_pages_each_outage_once_and_resolves_after_it_ends() -> None:
    events = events_of(AlertEngine([Rule(name="gpu")]), scored_gpu_records())
    assert_one_incident_per_outage(events)


def test_example_ops_rule_pages_each_outage_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SMTP_PASSWORD", "SLACK_TOKEN_A", "SLACK_TOKEN_B", "SLACK_TOKEN_C",
                 "PAGERDUTY_INTEGRATION_KEY", "PAGERDUTY_API_KEY"):
        monkeypatch.setenv(name, "x")
    config = load_config(ROOT / "examples" / "alerts.yaml")
    rules = [rule for rule in config.rules if rule.name == "ops-cpu"]
    records = scored_gpu_records("gpu", {"host": "gpu-7", "dc": "eu-west-1"})
    assert_one_incident_per_outage(events_of(AlertEngine(rules), records))


def test_page_and_resolve_carry_value_expected_duration_and_link() -> None:
    events = events_of(AlertEngine([Rule(name="gpu", severity="critical")]),
                       scored_gpu_records())
    page, resolve = events[0], events[1]
    fired = render(Group(Kind.FIRING, "critical", {"rule": "gpu"}, page.end, 0.0, [page]),
                   "http://dash:8501").body
    assert "value 0 (expected " in fired
    assert f"{page.expected:.6g}" in fired and not math.isnan(page.expected)
    assert "so far" in fired
    assert f"http://dash:8501/?series={page.series_id}" in fired
    over = render(Group(Kind.RESOLVED, "critical", {"rule": "gpu"}, resolve.end, 0.0, [resolve]),
                  "http://dash:8501").body
    assert f"lasted {duration_text(resolve.duration)}" in over
    assert f"http://dash:8501/?series={resolve.series_id}" in over


def silent_records(host: str, silent: range, flagged_from: int, count: int
                   ) -> list[dict[str, Any]]:
    """Records of a series with no data in the intervals ``silent``, ``noData`` from
    ``flagged_from`` on, as the worker writes them (value null, last data time kept)."""
    out = []
    last_data = ""
    for i in range(count):
        item = result_record("cpu", {"host": host}, i, 0.0 if i in silent else 10.0,
                             measure="cpu_util")
        if i in silent:
            item["aggregatedMeasureValue"] = None
        else:
            last_data = item["detectionPeriodEndTime"]
        item["noData"] = int(i in silent and i >= flagged_from)
        item["lastDataTime"] = last_data
        out.append(item)
    return out


def test_no_data_rule_pages_when_a_series_goes_silent_and_resolves_when_it_returns() -> None:
    # Data for intervals 0-1, silence for 2-19 (no_data flagged from 12 on), data again from 20.
    records = silent_records("web-7", range(2, 20), 12, 24)
    engine = AlertEngine([Rule(name="silent", condition="no_data", resolve_after=1)])
    events = events_of(engine, records)
    assert [(e.kind, round((e.start - events[0].start) / 60)) for e in events] == [
        (Kind.FIRING, 0), (Kind.RESOLVED, 8)
    ]
    text = render(Group(Kind.FIRING, "warning", {}, 0.0, 0.0, [events[0]]), "http://d").body
    assert "host=web-7" in text
    assert "stopped reporting cpu_util 11 min ago" in text
    # Anomaly rules see the silent intervals as missing (score 0), never as an anomaly.
    assert events_of(AlertEngine([Rule(name="cpu")]), records) == []
