"""bench/detector.py runs end to end in quick mode and saves every section (timings unasserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "detector.py"


def test_quick_bench_saves_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results" / "detector.json"
    command = [sys.executable, str(BENCH), "--quick", "--detectors", "12", "--no-progress"]
    done = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "detector / bare forest" in done.stdout

    report = json.loads(out.read_text())
    assert set(report) >= {
        "environment",
        "settings",
        "config",
        "single_series",
        "latency_us",
        "snapshot",
        "fleets",
    }
    single = report["single_series"]
    assert single["detector_points_per_s"] > 0 and single["bare_forest_points_per_s"] > 0
    assert single["detector_vs_bare_ratio"] == (
        single["detector_points_per_s"] / single["bare_forest_points_per_s"]
    )
    latency = report["latency_us"]["all"]
    assert latency["calls"] == 2_000
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    cpu = report["latency_us"]["cpu_inference"]
    assert 0 < cpu["calls"] < 2_000 and cpu["p50"] <= cpu["p99"]
    snapshot = report["snapshot"]
    assert snapshot["bytes"] > 0 and snapshot["restored_scores_identical"] is True

    (fleet,) = report["fleets"]
    assert fleet["detectors"] == 12
    assert fleet["timed_updates"] >= 2_000 and fleet["points_per_s"] > 0
    assert fleet["rss_bytes_per_detector"] is None or fleet["rss_bytes_per_detector"] > 0
    # Warm-up runs past the detector's own warm-up, so the timed rounds score in INFERENCE.
    assert fleet["warm_points_per_detector"] > report["config"]["warmup"]
    assert fleet["share_in_inference"] == 1.0
