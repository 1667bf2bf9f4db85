"""The alerter as a process: real Kafka, real SMTP and HTTP receivers, kill -9 and restart.

Each test runs ``anomstream alert`` as a subprocess (with debug logging, the most talkative it
gets) on its own topic, consumer group and state directory, and counts what the receivers got.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.kafka_local import free_port
from contract.records import timeseries_id
from sinks.alerting.store import load
from tests.alerting_support import (
    HttpReceiver,
    SmtpReceiver,
    count,
    produce_results,
    result_record,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
MAIL_PASSWORD = "MailPassw0rd-e2e-5c1"
HOOK_TOKEN = "HookToken-e2e-9ad"
HOOK_PATH_SECRET = "PathSecret-e2e-77f"
# Not ``-m app.cli``: that loads app.cli twice (as __main__ too), with two CliErrors.
CLI = [sys.executable, "-c",
       "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))"]
SECRETS = (MAIL_PASSWORD, HOOK_TOKEN, HOOK_PATH_SECRET)
ENV = {"ALERT_MAIL_PASSWORD": MAIL_PASSWORD, "ALERT_HOOK_TOKEN": HOOK_TOKEN,
       "ALERT_HOOK_PATH": HOOK_PATH_SECRET}


def sid(detector: str, host: str) -> str:
    return timeseries_id(detector, "util", {"host": host})


def write_config(tmp: Path, bootstrap: str, topic: str, *, mail_port: int | None,
                 hook_port: int, metrics_port: int = 0) -> Path:
    receivers = [
        # Tokens only through ${VAR} references, as in production.
        f"  - name: hook\n"
        f"    url: json://hook:${{ALERT_HOOK_TOKEN}}@127.0.0.1:{hook_port}/hooks/${{ALERT_HOOK_PATH}}\n"
        f"    tags: [page]\n"
    ]
    if mail_port is not None:
        receivers.append(
            f"  - name: mail\n"
            f"    url: mailto://alerts:${{ALERT_MAIL_PASSWORD}}@127.0.0.1:{mail_port}"
            f"?smtp=127.0.0.1&from=alerts@example.com&to=oncall@example.com\n"
            f"    tags: [page]\n"
        )
    config = tmp / "alerts.yaml"
    config.write_text(f"""\
bootstrap_servers: "{bootstrap}"
result_topic: {topic}
group_id: alerter-{topic}
auto_offset_reset: earliest
state_dir: {tmp / "state"}
dashboard_url: http://127.0.0.1:8501
metrics_port: {metrics_port}
receivers:
{"".join(receivers)}
routes: {{critical: [page]}}
rules:
  - name: ops
    detectors: [cpu, mem]
    hysteresis: 20
    resolve_after: 3
    severity: critical
    repeat_interval: 20m
grouping: {{window: 1s, by: [rule, detector]}}
delivery: {{initial_backoff: 0.2s, max_backoff: 1s, timeout: 10s}}
""")
    return config


@contextmanager
def alerter(config: Path, log: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """``anomstream alert`` in a subprocess, stdout and stderr appended to ``log``."""
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [*CLI, "alert", "--config", str(config), "-v", *extra],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **ENV},
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def assigned(log: Path) -> bool:
    return " assigned " in log.read_text(errors="replace")


def scrape(port: int, name: str, receiver: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf'^{name}{{receiver="{receiver}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def assert_no_secrets(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert text.strip(), "the alerter logged nothing at all"
    for secret in SECRETS:
        assert secret not in text, f"secret leaked into the alerter's output: {secret[:6]}..."


def anomaly_records() -> list[dict[str, Any]]:
    """50 intervals, interleaved by interval as a detector would write them."""
    records = []
    for i in range(50):
        # A ten-interval anomaly: intervals 5-14 over the threshold, then quiet.
        if i < 30:
            # Two hosts at once: one incident each, announced together in one message.
            for host in ("a", "b"):
                score = 90.0 if 5 <= i < 15 else 12.0
                records.append(result_record("cpu", {"host": host}, i, score))
        # Flapping around the threshold (70, exit 50) for 50 intervals, dipping under the exit
        # now and then but never for K = 3 intervals in a row.
        flap = 75.0 if i % 2 == 0 else (45.0 if i % 7 == 0 else 62.0)
        records.append(result_record("cpu", {"host": "flap"}, i, flap))
        # The same anomaly on a silenced detector.
        if i < 30:
            records.append(result_record("mem", {"host": "a"}, i, 90.0 if 5 <= i < 15 else 12.0))
    return records


@pytest.mark.kafka
def test_alerter_pages_once_resolves_once_honours_silences_and_retries(
    kafka_bootstrap: str, topic_factory: Any, tmp_path: Path,
) -> None:
    topic = topic_factory("alert-results")
    metrics_port = free_port()
    log = tmp_path / "alerter.log"
    with SmtpReceiver("alerts", MAIL_PASSWORD) as smtp, HttpReceiver("hook", HOOK_TOKEN) as hook:
        hook.failing = True  # the webhook is down at first
        config = write_config(tmp_path, kafka_bootstrap, topic, mail_port=smtp.port,
                              hook_port=hook.port, metrics_port=metrics_port)
        with alerter(config, log) as process:
            wait_until(lambda: assigned(log), 60, "the alerter's partition assignment")
            # A silence made while the alerter runs holds at once.
            silence = subprocess.run(
                [*CLI, "alert", "silence", "--config", str(config),
                 "--match", "detector=mem", "--for", "2h", "--comment", "noisy"],
                cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **ENV},
            )
            assert silence.returncode == 0, silence.stderr
            assert "silenced detector=mem until" in silence.stdout
            produce_results(kafka_bootstrap, topic, anomaly_records())

            cpu_a, flap, mem_a = sid("cpu", "a"), sid("cpu", "flap"), sid("mem", "a")

            def flap_pages(messages: Any) -> int:
                return count(messages, "FIRING", flap) + count(messages, "STILL FIRING", flap)

            wait_until(lambda: count(smtp.received(), "RESOLVED", cpu_a) == 1
                       and flap_pages(smtp.received()) == 3, 90, "the e-mails")
            # Mail went out while the webhook kept failing; its failures are counted.
            assert hook.received() == [] and hook.failures >= 1
            wait_until(lambda: scrape(metrics_port, "anomstream_alert_delivery_failures_total",
                                      "hook") >= 1, 30, "the failure metric")
            hook.failing = False
            wait_until(lambda: len(hook.received()) == len(smtp.received()), 60, "the retries")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0

        cpu_b = sid("cpu", "b")
        for messages in (smtp.received(), hook.received()):
            # The ten-interval anomaly: one page, one all-clear, per series...
            for series in (cpu_a, cpu_b):
                assert count(messages, "FIRING", series) == 1
                assert count(messages, "RESOLVED", series) == 1
                assert count(messages, "STILL FIRING", series) == 0
            # ...grouped: both series started in the same window, so they share each message.
            together = [m for m in messages if cpu_a in m.body]
            assert len(together) == 2 and all(cpu_b in m.body for m in together)
            assert all(m.title.endswith("detector=cpu: 2 series") for m in together)
            # Flapping for 50 intervals with a 20-interval repeat: at most one page per repeat
            # interval (first page, then reminders at +20 and +40), never resolved.
            assert count(messages, "FIRING", flap) == 1
            assert count(messages, "STILL FIRING", flap) == 2
            assert count(messages, "RESOLVED", flap) == 0
            # Silenced detector: nothing at all.
            assert not [m for m in messages if mem_a in m.body]
        assert sorted(m.title for m in hook.received()) == sorted(m.title for m in smtp.received())
        firing = next(m for m in smtp.received() if m.title.startswith("[FIRING]")
                      and cpu_a in m.body)
        for text in ("cpu / util", "host=a", "value 130", "expected 42", "score 90.0",
                     "confidence 90", "interval 2026-09-21T",
                     f"http://127.0.0.1:8501/?series={cpu_a}"):
            assert text in firing.body, text
    output = log.read_text()
    assert "silenced by" in output and "retrying in" in output
    assert_no_secrets(log)


@pytest.mark.kafka
def test_kill_9_neither_pages_twice_nor_misses_what_came_meanwhile_nor_loses_the_outbox(
    kafka_bootstrap: str, topic_factory: Any, tmp_path: Path,
) -> None:
    topic = topic_factory("alert-restart")
    log = tmp_path / "alerter.log"
    first, second = sid("cpu", "first"), sid("cpu", "second")
    with HttpReceiver("hook", HOOK_TOKEN) as hook:
        config = write_config(tmp_path, kafka_bootstrap, topic, mail_port=None,
                              hook_port=hook.port)
        produce_results(kafka_bootstrap, topic, [
            result_record("cpu", {"host": "first"}, i, 90.0 if i >= 5 else 10.0)
            for i in range(10)
        ])
        with alerter(config, log) as process:
            wait_until(lambda: count(hook.received(), "FIRING", first) == 1, 60, "the page")
            # Delivered and recorded as delivered: the incident is now mid-way.
            state_file = tmp_path / "state" / "alerter-state.json"
            wait_until(lambda: not load(state_file).outbox, 30, "the outbox to drain")
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            assert process.returncode == -signal.SIGKILL

        # While it is down: the first incident goes on then ends; a second one starts.
        produce_results(kafka_bootstrap, topic, [
            result_record("cpu", {"host": "first"}, i, 90.0 if i < 15 else 10.0)
            for i in range(10, 20)
        ] + [
            result_record("cpu", {"host": "second"}, i, 95.0 if i >= 5 else 10.0)
            for i in range(10)
        ])
        # Back up while the webhook is down: the new messages can only be queued. Killed again
        # with both in the outbox (and their records' offsets committed).
        hook.failing = True
        with alerter(config, log) as process:
            wait_until(lambda: len(load(state_file).outbox) == 2 and hook.failures >= 1, 60,
                       "both messages durably queued")
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        assert hook.received() == [hook.received()[0]]
        hook.failing = False
        with alerter(config, log, "--until-idle", "3") as process:
            assert process.wait(timeout=90) == 0
    messages = hook.received()
    assert count(messages, "FIRING", first) == 1  # no second page for the same incident
    assert count(messages, "RESOLVED", first) == 1
    assert count(messages, "FIRING", second) == 1  # the anomaly that came while it was down
    assert len(messages) == 3
    assert_no_secrets(log)


def test_a_url_apprise_rejects_is_reported_without_its_token(tmp_path: Path) -> None:
    config = tmp_path / "alerts.yaml"
    config.write_text(f"""\
state_dir: {tmp_path / "state"}
receivers: [{{name: broken, url: "nosuchservice://admin:{HOOK_TOKEN}@example.com/{HOOK_PATH_SECRET}"}}]
rules: [{{name: ops}}]
""")
    result = subprocess.run(
        [*CLI, "alert", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "receiver broken: apprise cannot use the URL nosuchservice://example.com/***" in (
        result.stderr
    )
    for secret in (HOOK_TOKEN, HOOK_PATH_SECRET):
        assert secret not in result.stderr + result.stdout
