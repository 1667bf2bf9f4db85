"""The pure alerting core: rules, state machine, grouping, silences, messages, config, redaction."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from sinks.alerting.config import ConfigError, MofN, Rule, load_config, parse_duration
from sinks.alerting.messages import render, series_link
from sinks.alerting.redact import Redactor, redacted_url
from sinks.alerting.rules import Observation
from sinks.alerting.silences import Silence, SilenceSet, parse_matchers, write_silence
from sinks.alerting.state import AlertEngine, Event, Grouper, Kind
from sinks.alerting.store import load
from tests.alerting_support import INTERVAL_S, result_record

NEVER = lambda labels: False  # noqa: E731


def observation(score: float, interval: int, detector: str = "cpu", host: str = "web-1",
                **kwargs: object) -> Observation:
    return Observation.from_record(
        result_record(detector, {"host": host}, interval, score, **kwargs)  # type: ignore[arg-type]
    )


def run(engine: AlertEngine, scores: list[float], **kwargs: object) -> list[Event]:
    events = []
    for i, score in enumerate(scores):
        events += engine.observe(observation(score, i, **kwargs), NEVER)  # type: ignore[arg-type]
    return events


def test_ten_interval_anomaly_fires_once_and_resolves_once() -> None:
    engine = AlertEngine([Rule(name="cpu", hysteresis=20, resolve_after=3)])
    scores = [10.0] * 10 + [92.0] * 10 + [5.0] * 10
    events = run(engine, scores)
    assert [e.kind for e in events] == [Kind.FIRING, Kind.RESOLVED]
    firing, resolved = events
    assert firing.start == observation(0, 10).start
    assert firing.enter_threshold == 70.0  # the record's own decision threshold
    # Resolved after K = 3 intervals under the exit threshold (50), not at the first.
    assert resolved.start == observation(0, 22).start
    assert resolved.peak_score == 92.0
    assert engine.states == {}  # nothing kept for a healthy series


def test_flapping_series_pages_at_most_once_per_repeat_interval() -> None:
    repeat_intervals = 20
    engine = AlertEngine([
        Rule(name="cpu", hysteresis=15, resolve_after=3,
             repeat_interval=repeat_intervals * INTERVAL_S)
    ])
    # Around the threshold: 75, 62, 75, 62, ... and now and then a dip under the exit (55).
    scores = [75.0 if i % 2 == 0 else (50.0 if i % 7 == 0 else 62.0) for i in range(50)]
    events = run(engine, scores)
    pages = [e for e in events if e.kind in (Kind.FIRING, Kind.REPEAT)]
    assert len(pages) <= math.ceil(50 / repeat_intervals)
    assert [e.kind for e in pages] == [Kind.FIRING, Kind.REPEAT, Kind.REPEAT]
    assert not [e for e in events if e.kind is Kind.RESOLVED]
    # Each reminder comes a full repeat interval (record time) after the previous page.
    for earlier, later in itertools.pairwise(pages):
        assert later.end - earlier.end >= repeat_intervals * INTERVAL_S


def test_without_hysteresis_flapping_would_storm() -> None:
    # The counterfactual that shows what hysteresis and K buy: exit == enter, K = 1.
    engine = AlertEngine([Rule(name="cpu", hysteresis=0, resolve_after=1)])
    scores = [75.0 if i % 2 == 0 else 62.0 for i in range(50)]
    assert len([e for e in run(engine, scores) if e.kind is Kind.FIRING]) == 25


def test_m_of_n_needs_enough_anomalous_intervals() -> None:
    rule = Rule(name="cpu", fire_after=MofN(m=3, n=5))
    assert run(AlertEngine([rule]), [90, 10, 90, 10, 10, 90, 10]) == []
    events = run(AlertEngine([rule]), [90, 10, 90, 10, 90])
    assert [(e.kind, e.start) for e in events] == [(Kind.FIRING, observation(0, 4).start)]


def test_min_confidence_learning_stage_and_explicit_thresholds() -> None:
    rule = Rule(name="cpu", enter_threshold=80, exit_threshold=40, min_confidence=60)
    assert run(AlertEngine([rule]), [95.0] * 3, confidence=30.0) == []
    assert run(AlertEngine([rule]), [95.0] * 3, stage="LEARNING") == []
    assert run(AlertEngine([rule]), [79.0] * 3) == []
    events = run(AlertEngine([rule]), [85.0, 50.0, 50.0, 50.0, 39.0, 39.0, 39.0])
    assert [e.kind for e in events] == [Kind.FIRING, Kind.RESOLVED]
    assert events[0].enter_threshold == 80


def test_rules_match_detectors_and_dimension_globs() -> None:
    rule = Rule(name="web", detectors=["cpu*"], dimensions={"host": "web-*"})
    engine = AlertEngine([rule])
    assert engine.observe(observation(95, 0, detector="cpu", host="db-1"), NEVER) == []
    assert engine.observe(observation(95, 0, detector="mem", host="web-1"), NEVER) == []
    assert len(engine.observe(observation(95, 0, detector="cpu-eu", host="web-9"), NEVER)) == 1


def test_duplicate_record_changes_nothing() -> None:
    engine = AlertEngine([Rule(name="cpu", fire_after=MofN(m=2, n=2))])
    first = observation(95, 0)
    assert engine.observe(first, NEVER) == []
    assert engine.observe(first, NEVER) == []  # replayed: must not count twice
    assert len(engine.observe(observation(95, 1), NEVER)) == 1


def test_silenced_firing_is_announced_after_the_silence_and_resolves_silently() -> None:
    silence = Silence({"detector": "cpu"}, starts_at=0, ends_at=100)
    engine = AlertEngine([Rule(name="cpu", resolve_after=1)])
    assert engine.observe(observation(95, 0), lambda lb: silence.matches(lb, now=50)) == []
    assert engine.observe(observation(95, 1), lambda lb: silence.matches(lb, now=60)) == []
    # Silence over, still anomalous: one page now.
    late = engine.observe(observation(95, 2), lambda lb: silence.matches(lb, now=200))
    assert [e.kind for e in late] == [Kind.FIRING]
    # A silenced incident that ends before the silence does leaves no trace at all.
    engine = AlertEngine([Rule(name="cpu", resolve_after=1)])
    during = lambda lb: silence.matches(lb, now=50)  # noqa: E731
    assert engine.observe(observation(95, 0), during) + engine.observe(
        observation(5, 1), during) == []
    assert engine.states == {}


def test_silences_match_only_their_labels_and_time() -> None:
    silence = Silence(parse_matchers(["detector=cpu", "host=web-*"]), starts_at=10, ends_at=20)
    labels = {"detector": "cpu", "host": "web-3"}
    assert silence.matches(labels, 15)
    assert not silence.matches(labels, 25)
    assert not silence.matches({"detector": "cpu", "host": "db-1"}, 15)
    assert not silence.matches({"detector": "cpu"}, 15)
    with pytest.raises(ValueError, match="label=value"):
        parse_matchers(["detector"])


def test_silence_directory_is_picked_up_by_a_running_set(tmp_path: Path) -> None:
    silences = SilenceSet([], tmp_path / "silences")
    silences.refresh()
    assert silences.all == []
    write_silence(tmp_path / "silences", Silence({"detector": "cpu"}, 0, 1e12))
    assert silences.refresh()
    assert silences.matcher(now=5)({"detector": "cpu"})
    assert not silences.matcher(now=5)({"detector": "gpu"})


def test_configured_silences_and_unreadable_state(tmp_path: Path) -> None:
    config = write(tmp_path / "alerts.yaml", f"""\
state_dir: {tmp_path / "state"}
receivers: [{{name: hook, url: "json://127.0.0.1/x"}}]
rules: [{{name: cpu}}]
silences:
  - {{matchers: {{detector: cpu, host: "web-*"}}, ends_at: 2000, comment: maintenance}}
""")
    loaded = load_config(config)
    silences = SilenceSet(
        [Silence.from_spec(s, i) for i, s in enumerate(loaded.silences)], loaded.silences_dir
    )
    silences.refresh()
    assert silences.matcher(now=1000)({"detector": "cpu", "host": "web-2"})
    assert not silences.matcher(now=3000)({"detector": "cpu", "host": "web-2"})
    loaded.state_file.parent.mkdir(parents=True)
    loaded.state_file.write_text("{truncated")
    with pytest.raises(ValueError, match="alert state is unreadable"):
        load(loaded.state_file)


def test_grouping_collects_series_that_start_within_the_window() -> None:
    grouper = Grouper(window=30, by=["rule", "detector"])
    engine = AlertEngine([Rule(name="r")])
    for host in ("a", "b", "c"):
        for event in engine.observe(observation(95, 0, host=host), NEVER):
            grouper.add(event, wall_now=1000)
    for event in engine.observe(observation(95, 0, detector="gpu"), NEVER):
        grouper.add(event, wall_now=1000)
    watermark = observation(0, 0).end
    assert grouper.due(watermark, wall_now=1001) == []  # window still open
    groups = grouper.due(watermark + 30, wall_now=1001)
    assert sorted(len(g.events) for g in groups) == [1, 3]
    # Read in one batch (catching up), alerts that start a window apart still go out apart.
    engine = AlertEngine([Rule(name="r", resolve_after=1)])
    for i, score in enumerate([95, 5, 95, 5, 95]):
        for event in engine.observe(observation(score, i, host="z"), NEVER):
            grouper.add(event, wall_now=1000)
    late = grouper.due(observation(0, 10).end, wall_now=1000)
    assert [(g.kind, len(g.events)) for g in late] == [
        (Kind.FIRING, 1), (Kind.RESOLVED, 1), (Kind.FIRING, 1), (Kind.RESOLVED, 1),
        (Kind.FIRING, 1)]
    # A quiet stream still flushes by wall time.
    grouper.add(engine.observe(observation(95, 0, host="d"), NEVER)[0], wall_now=2000)
    assert len(grouper.due(0, wall_now=2030)) == 1


def test_message_says_what_happened_with_a_dashboard_link() -> None:
    engine = AlertEngine([Rule(name="cpu-high", severity="critical")])
    grouper = Grouper(window=0, by=["rule", "detector"])
    for host in ("web-1", "web-2"):
        grouper.add(engine.observe(observation(91.5, 3, host=host), NEVER)[0], wall_now=0)
    (group,) = grouper.due(1e12, 0)
    message = render(group, "http://dash:8501/")
    assert message.title == "[FIRING] cpu-high (critical) detector=cpu: 2 series"
    assert message.notify_type == "failure"
    first = group.events[0]
    for text in ("cpu / util", "host=web-1", "host=web-2", "value 131.5", "expected 42",
                 "score 91.5", "threshold 70.0", "confidence 90", "2026-09-21T",
                 series_link("http://dash:8501", first.series_id)):
        assert text in message.body, text
    assert series_link("http://dash:8501/", "abc") == "http://dash:8501/?series=abc"


def test_bad_records_are_rejected_with_the_field_named() -> None:
    record = result_record("cpu", {}, 0, 50)
    del record["anomalyScore"]
    with pytest.raises(ValueError, match="anomalyScore"):
        Observation.from_record(record)
    record = result_record("cpu", {}, 0, 50)
    record["detectionPeriodEndTime"] = "yesterday"
    with pytest.raises(ValueError, match="detectionPeriodEndTime"):
        Observation.from_record(record)


def test_durations() -> None:
    assert parse_duration("2h") == 7200 and parse_duration("1d") == 86400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_errors_name_file_line_and_field_but_never_the_url(tmp_path: Path) -> None:
    config = write(tmp_path / "alerts.yaml", """\
receivers:
  - name: hook
    url: json://user:TOPSECRET99@127.0.0.1/x
rules:
  - name: cpu
    enter_threshold: 60
    exit_threshold: 80
""")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert f"{config}:5" in message and "rules.0" in message
    assert "exit_threshold (80.0) must not exceed enter_threshold (60.0)" in message
    config = write(tmp_path / "alerts.yaml", """\
receivers:
  - name: hook
    url: TOPSECRET99
rules: [{name: cpu, repetition: 3}]
""")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert f"{config}:3: receivers.0.url" in message and "rules.0.repetition" in message
    assert "TOPSECRET99" not in message


def test_config_expands_environment_variables(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "alerts.yaml", """\
receivers: [{name: hook, url: "json://u:${HOOK_TOKEN}@127.0.0.1/x", tags: [warning]}]
rules: [{name: cpu}]
""")
    with pytest.raises(ConfigError, match=r"alerts.yaml:1: .*HOOK_TOKEN is not set"):
        load_config(config)
    monkeypatch.setenv("HOOK_TOKEN", "s3cr3t-value")
    loaded = load_config(config)
    assert loaded.receivers[0].resolved_url() == "json://u:s3cr3t-value@127.0.0.1/x"
    assert "s3cr3t-value" not in repr(loaded)
    assert [r.name for r in loaded.receivers_for("warning")] == ["hook"]


def test_redactor_hides_tokens_everywhere() -> None:
    url = "slack://TokenA123/TokenB456/TokenC789abcdef/#alerts"
    mail = "mailto://bob:pw@smtp.example.com:2525?from=a@example.com&pass=hunter22"
    redact = Redactor([url, mail])
    assert redact(f"failed to send to {url}") == "failed to send to slack://tokena123/***"
    line = redact("POST https://hooks.slack.com/services/TokenA123/TokenB456/TokenC789abcdef")
    assert "TokenB456" not in line and "TokenC789abcdef" not in line
    assert "hunter22" not in redact(f"error: {mail} refused") and "pw@" not in redact(mail)
    # Hosts and addresses stay readable: they tell which receiver failed.
    assert redact("connect to smtp.example.com for a@example.com") == (
        "connect to smtp.example.com for a@example.com")
    # Credentials in URLs the redactor was never told about are stripped too.
    assert redact("http://alice:pa55word@10.0.0.1/x") == "http://***@10.0.0.1/x"
    assert redacted_url("json://u:p@127.0.0.1:9/x") == "json://127.0.0.1:9/***"


def test_silence_command_writes_a_silence_and_rejects_bad_matchers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main

    config = write(tmp_path / "alerts.yaml", f"""\
state_dir: {tmp_path / "state"}
receivers: [{{name: hook, url: "json://127.0.0.1/x"}}]
rules: [{{name: cpu}}]
""")
    assert main(["alert", "silence", "--config", str(config), "--match", "detector"]) == 2
    assert "must look like label=value" in capsys.readouterr().err
    assert main(["alert", "silence", "--config", str(config), "--match", "detector=cpu",
                 "--for", "2h"]) == 0
    assert "silenced detector=cpu until" in capsys.readouterr().out
    silences = SilenceSet([], load_config(config).silences_dir)
    silences.refresh()
    (silence,) = silences.all
    assert silence.matchers == {"detector": "cpu"}
    assert silence.ends_at is not None and silence.starts_at is not None
    assert silence.ends_at - silence.starts_at == 7200
    assert main(["alert", "silence", "--config", str(config), "--list"]) == 0
    assert f"{silence.id}\tdetector=cpu\tuntil " in capsys.readouterr().out
    assert main(["alert", "silence", "--config", str(config), "--expire", "../alerts"]) == 2
    assert "no silence '../alerts'" in capsys.readouterr().err
    assert main(["alert", "silence", "--config", str(config), "--expire", silence.id]) == 0
    assert silences.refresh() and silences.all == []
