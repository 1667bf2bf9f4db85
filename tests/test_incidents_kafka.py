"""Incidents end to end on the real broker: worker process -> result topic -> alerter process.

Three series at 5-minute intervals, one input partition, event times from the generator:
- ``gpu/gpu-7``: three days of a daily cycle, then stuck at 0 for 15 intervals twice, an hour
  apart: each outage pages exactly once and resolves within 3 intervals after it ends;
- ``cpu/web-7``: stops sending for two hours: its last interval closes on stream time (delay plus
  one interval), a no-data page follows ``no_data_after`` and resolves when it sends again;
- ``gpu/gpu-8``: a 3-hour gap: no page; its missing intervals reach the detector as missing.

The anomaly pages depend on the detector holding its score while an outage lasts (issue "a score
that means the same on series it never saw"); with a detector that reports once per incident this
test fails on the resolve-while-still-down, by design.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from common.kafka_io import create_topics
from contract.records import parse_time, timeseries_id
from detectors import DetectorConfig, RcfDetector
from sinks.alerting.messages import duration_text
from tests.alerting_support import HttpReceiver, Received, headline, series_of
from tests.detect_support import (
    ROOT,
    WorkerProcess,
    by_series,
    produce,
    results,
    wait_for,
    wait_for_results,
    write_config,
)
from tests.incident_support import OUTAGES, POINTS, START_S, STEP_S, daily_util, gpu_util

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

DELAY_S = 60
NO_DATA_AFTER_S = 600
SILENT = range(700, 724)  # web-7 sends nothing for two hours
GAP = range(600, 636)  # gpu-8 sends nothing for three hours
TOKEN = "incident-hook-token"
CLI = [sys.executable, "-c",
       "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))"]


def event_ms(i: int) -> int:
    """Records come a delay into their interval: the next one closes the interval before."""
    return (START_S + i * STEP_S + DELAY_S) * 1000


def records(first: int, stop: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(first, stop):
        rows = [("gpu", "gpu-7", "util", gpu_util(i))]
        if i not in SILENT:
            rows.append(("cpu", "web-7", "cpu_util", 30.0 + daily_util(i, 11) / 4))
        if i not in GAP:
            rows.append(("gpu", "gpu-8", "util", daily_util(i, 3)))
        for kind, host, measure, value in rows:
            out.append((host, json.dumps({"timestamp": event_ms(i), "kind": kind, "host": host,
                                          measure: value}).encode()))
    return out


def interval_index(text: str) -> int:
    return round((parse_time(text).timestamp() - START_S) / STEP_S)


def pages(messages: list[Received], rule: str, series: str) -> list[tuple[str, int, int]]:
    """(kind, first interval, last interval + 1) of each message of ``rule`` about ``series``."""
    found = []
    for message in messages:
        if f"] {rule} (" not in message.title or series not in series_of(message):
            continue
        start, end = re.findall(r"interval (\S+) - (\S+)", message.body)[0]
        found.append((headline(message), interval_index(start), interval_index(end)))
    return sorted(found, key=lambda page: page[1])


def test_outages_silence_and_gaps_page_as_incidents(kafka_bootstrap: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    input_topic = f"incidents-{tag}"
    create_topics(kafka_bootstrap, [input_topic], partitions=1)
    topics = {"group": f"incidents-{tag}", "output": f"incidents-out-{tag}",
              "dead_letter": f"incidents-dlq-{tag}", "repartition": f"incidents-rep-{tag}",
              "state": f"incidents-state-{tag}"}
    common = {"input": input_topic, "dimensions": ["host"], "aggregation": "avg",
              "interval": f"{STEP_S}s", "delay": f"{DELAY_S}s"}
    config = write_config(
        tmp_path / "detect.yaml", kafka_bootstrap, input_topic=input_topic, **topics,
        detectors=[
            {"name": "gpu", "measure": "util", "match": {"kind": "gpu"}, **common},
            {"name": "cpu", "measure": "cpu_util", "match": {"kind": "cpu"},
             "no_data_after": f"{NO_DATA_AFTER_S}s", **common},
        ],
    )
    gpu7, gpu8 = (timeseries_id("gpu", "util", {"host": h}) for h in ("gpu-7", "gpu-8"))
    web7 = timeseries_id("cpu", "cpu_util", {"host": "web-7"})
    worker = WorkerProcess(config, "incidents-0", tmp_path)
    try:
        worker.wait_ready()
        # Up to the first record whose time is web-7's last interval's end plus the delay.
        produce(kafka_bootstrap, input_topic, records(0, SILENT.start + 1))
        wait_for(lambda: any(r["timeseriesId"] == web7
                             and interval_index(r["detectionPeriodStartTime"]) == SILENT.start - 1
                             for r in results(kafka_bootstrap, topics["output"])),
                 240, "web-7's last interval, closed on stream time")
        produce(kafka_bootstrap, input_topic, records(SILENT.start + 1, POINTS))
        # Every interval of every series but the last, which nothing later closes.
        out = wait_for_results(kafka_bootstrap, topics["output"], 3 * (POINTS - 1), 300, [worker])
    finally:
        assert worker.stop() == 0, worker.log()
    series = by_series(out)

    # web-7: its silent intervals are results with no value; noData once silent 10 minutes.
    silent = [r for r in series[web7] if interval_index(r["detectionPeriodStartTime"]) in SILENT]
    assert len(silent) == len(SILENT)
    assert all(r["aggregatedMeasureValue"] is None and r["anomalyScore"] == 0 for r in silent)
    last_data = parse_time(silent[0]["lastDataTime"]).timestamp()
    assert last_data == event_ms(SILENT.start - 1) / 1000
    flagged = [parse_time(r["detectionPeriodEndTime"]).timestamp() - last_data >= NO_DATA_AFTER_S
               for r in silent]
    assert [r["noData"] for r in silent] == [int(f) for f in flagged] and any(flagged)
    assert all(r["noData"] == 0 for r in series[web7] if r["aggregatedMeasureValue"] is not None)
    # gpu-8: the gap reached the detector as missing points, so its results are exactly those of
    # a detector fed None for each missing interval (the daily alignment holds).
    reference = RcfDetector(DetectorConfig())
    for record in series[gpu8]:
        i = interval_index(record["detectionPeriodStartTime"])
        expected = reference.update(START_S + i * STEP_S,
                                    None if i in GAP else daily_util(i, 3))
        assert record["anomalyScore"] == pytest.approx(expected.anomaly_score, abs=1e-9), i
        assert (record["aggregatedMeasureValue"] is None) == (i in GAP)

    with HttpReceiver("hook", TOKEN) as hook:
        alert_config = tmp_path / "alerts.yaml"
        alert_config.write_text(f"""\
bootstrap_servers: "{kafka_bootstrap}"
result_topic: {topics["output"]}
group_id: alerter-{tag}
auto_offset_reset: earliest
state_dir: {tmp_path / "alert-state"}
receivers:
  - name: hook
    url: json://hook:{TOKEN}@127.0.0.1:{hook.port}/hooks
    tags: [page]
routes: {{critical: [page]}}
rules:
  - name: ops
    severity: critical
  - name: silent
    condition: no_data
    resolve_after: 1
    severity: critical
grouping: {{window: 1s, by: [rule, detector]}}
delivery: {{initial_backoff: 0.2s, max_backoff: 1s, timeout: 10s}}
""")
        done = subprocess.run([*CLI, "alert", "--config", str(alert_config), "--until-idle", "5"],
                              cwd=ROOT, capture_output=True, text=True, timeout=240,
                              env=dict(os.environ))
        assert done.returncode == 0, done.stderr
        messages = hook.received()

    # web-7: paged once no_data_after had passed, resolved by its first interval with data.
    first_flagged = SILENT.start + flagged.index(True)
    web_pages = pages(messages, "silent", web7)
    assert [(kind, first) for kind, first, _ in web_pages] == [
        ("FIRING", first_flagged), ("RESOLVED", SILENT.stop)
    ]
    silence = START_S + (first_flagged + 1) * STEP_S - last_data
    stopped = next(m for m in messages if "] silent (" in m.title and "[FIRING]" in m.title)
    assert "host=web-7" in stopped.body
    assert f"stopped reporting cpu_util {duration_text(silence)} ago" in stopped.body
    # No other page for a silence or a gap: not web-7's silence as an anomaly, nor anything for
    # gpu-8's three-hour gap (it has no no_data_after) or after it.
    assert [p for p in pages(messages, "ops", web7) if p[2] > SILENT.start] == []
    assert [p for p in pages(messages, "ops", gpu8) if p[2] > GAP.start] == []
    assert pages(messages, "silent", gpu8) == []
    # gpu-7 (last: it needs the detector of issue 11): one page per outage at its start,
    # resolved within 4 intervals after it ends (3 under the exit threshold, and one for the
    # smoothed score to fall under it).
    gpu_pages = pages(messages, "ops", gpu7)
    assert [kind for kind, _, _ in gpu_pages] == ["FIRING", "RESOLVED"] * len(OUTAGES), gpu_pages
    for outage, (page, resolve) in zip(OUTAGES, zip(gpu_pages[::2], gpu_pages[1::2],
                                                    strict=True), strict=True):
        assert outage.first <= page[1] <= outage.first + 1
        assert outage.last + 1 < resolve[2] <= outage.last + 1 + 4
