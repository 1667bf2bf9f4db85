"""Detector benchmark: speed, latency, memory per live detector, snapshots, trade-off sweep.

Run from the repository root::

    .venv/bin/python bench/detector.py                  # default run, a few minutes
    .venv/bin/python bench/detector.py --quick          # seconds, small sizes
    .venv/bin/python bench/detector.py --sweep          # adds the forest-size sweep

What it measures, in one run (ratios are only compared within a run; the machine is shared):

- points/s of ``RcfDetector`` (default config) against a bare krcf ``score()`` + ``update()``
  loop with the same forest parameters, over the same series; repeats are interleaved
  (A, B, A, B, ...) and the medians compared. The ratio is the headline: what the detector's
  calibration, missing-data handling and result building cost on top of the forest.
- p50/p99 latency of one ``RcfDetector.update`` call.
- points/s and resident memory per live detector with 1,000 and 10,000 detectors fed
  round-robin, each fleet in a fresh subprocess so that one's heap does not colour the other.
- snapshot size and ``to_bytes``/``from_bytes`` times for a warm detector.
- with ``--sweep``: points/s and memory per detector across forest sizes and cache settings.

Results are printed as rich tables and saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import krcf

from detectors.config import DetectorConfig
from detectors.rcf import RcfDetector
from detectors.result import ModelStage

REPO = Path(__file__).resolve().parents[1]
NAB_FILE = REPO / ".." / "shared" / "data" / "nab" / "data" / "realKnownCause" / "nyc_taxi.csv"
SWEEP_GRID: list[dict[str, Any]] = [
    {"num_trees": trees, "sample_size": samples, "bounding_box_cache_fraction": cache}
    for trees in (30, 50)
    for samples in (128, 256)
    for cache in (0.0, 1.0)
]


def resident_bytes() -> int | None:
    """This process's resident set size (VmRSS), or None where /proc is absent."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_series(limit: int | None) -> tuple[str, list[float], list[float]]:
    """(source, epoch timestamps, values): NAB's nyc_taxi if present, else a synthetic day cycle."""
    if NAB_FILE.is_file():
        stamps, values = [], []
        with open(NAB_FILE, newline="") as handle:
            for row in csv.DictReader(handle):
                moment = datetime.fromisoformat(row["timestamp"]).replace(tzinfo=UTC)
                stamps.append(moment.timestamp())
                values.append(float(row["value"]))
        source = "NAB realKnownCause/nyc_taxi.csv"
    else:
        count = 10_320
        stamps = [1_404_172_800.0 + 1800.0 * i for i in range(count)]
        values = [
            15_000 + 8_000 * math.sin(2 * math.pi * i / 48) + 500 * math.sin(i * 0.7)
            for i in range(count)
        ]
        source = f"synthetic day cycle (NAB not found at {NAB_FILE})"
    if limit is not None:
        stamps, values = stamps[:limit], values[:limit]
    return f"{source}, {len(values):,} points", stamps, values


def forest_options(config: DetectorConfig) -> dict[str, Any]:
    """The krcf options of the forest inside ``RcfDetector(config)``, for the bare baseline.

    Read from the detector's own forest when it exposes one, because the detector may feed the
    forest more coordinates than the series has (e.g. a seasonal residual beside each value)
    and the baseline must be the same forest; otherwise derived from the config.
    """
    forest = getattr(RcfDetector(config), "_forest", None)
    if forest is not None and hasattr(forest, "options"):
        return {key: value for key, value in forest.options().items() if value is not None}
    return {
        "dimensions": 1,
        "shingle_size": config.shingle_size,
        "num_trees": config.num_trees,
        "sample_size": config.sample_size,
        "output_after": config.warmup,
        "random_seed": config.seed,
        "lambda": config.time_decay,
        "internal_shingling": True,
        "bounding_box_cache_fraction": config.bounding_box_cache_fraction,
    }


def bare_points(values: list[float], width: int) -> list[list[float]]:
    """Forest inputs of ``width`` coordinates: the value, then its step-to-step change."""
    previous = values[0]
    points = []
    for value in values:
        points.append([value] + [value - previous] * (width - 1))
        previous = value
    return points


class Stopwatch:
    """Wall-clock and CPU time (this process) of a block.

    On a shared machine the wall time also counts the time other processes held the cores;
    the CPU time is what the code itself cost. Both are reported.
    """

    wall = cpu = 0.0

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def time_detector(config: DetectorConfig, stamps: list[float], values: list[float]) -> Stopwatch:
    detector = RcfDetector(config)
    update = detector.update
    gc.collect()
    with Stopwatch() as watch:
        for stamp, value in zip(stamps, values, strict=True):
            update(stamp, value)
    return watch


def time_bare_forest(config: DetectorConfig, values: list[float]) -> Stopwatch:
    options = forest_options(config)
    forest = krcf.RandomCutForest(options)  # type: ignore[arg-type]
    score, update = forest.score, forest.update
    points = bare_points(values, options["dimensions"])
    gc.collect()
    with Stopwatch() as watch:
        for point in points:
            score(point)
            update(point)
    return watch


def single_series(
    config: DetectorConfig,
    stamps: list[float],
    values: list[float],
    repeats: int,
    tick: Callable[[], None],
) -> dict[str, Any]:
    """Interleaved A/B repeats: RcfDetector against the bare forest loop, same data and forest."""
    detector_runs, bare_runs = [], []
    for _ in range(repeats):
        detector_runs.append(time_detector(config, stamps, values))
        tick()
        bare_runs.append(time_bare_forest(config, values))
        tick()
    n = len(values)
    detector = statistics.median(n / run.wall for run in detector_runs)
    bare = statistics.median(n / run.wall for run in bare_runs)
    detector_cpu = statistics.median(n / run.cpu for run in detector_runs)
    bare_cpu = statistics.median(n / run.cpu for run in bare_runs)
    return {
        "points": n,
        "repeats": repeats,
        "detector_points_per_s": detector,
        "bare_forest_points_per_s": bare,
        "detector_vs_bare_ratio": detector / bare,
        "detector_overhead_us_per_point": 1e6 / detector - 1e6 / bare,
        "detector_points_per_cpu_s": detector_cpu,
        "bare_forest_points_per_cpu_s": bare_cpu,
        "detector_vs_bare_ratio_cpu": detector_cpu / bare_cpu,
        "bare_forest_options": forest_options(config),
        "detector_points_per_s_runs": [n / run.wall for run in detector_runs],
        "bare_forest_points_per_s_runs": [n / run.wall for run in bare_runs],
    }


def percentile(sorted_values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of an ascending sequence.

    >>> percentile([1, 2, 3, 4], 0.5), percentile([1, 2, 3, 4], 0.99)
    (2, 4)
    """
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


def latency(
    config: DetectorConfig, stamps: list[float], values: list[float]
) -> tuple[dict[str, Any], RcfDetector]:
    """Per-call latency of ``update`` (µs), for all calls and for those after LEARNING.

    Wall-clock latency is what a caller waits, including time the OS gave the core to others;
    the CPU-time latency of the same calls (this thread's CPU clock) shows the call's own cost.
    """
    detector = RcfDetector(config)
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    every, inference, cpu_inference = [], [], []
    gc.collect()
    for stamp, value in zip(stamps, values, strict=True):
        cpu_start = cpu_clock()
        start = clock()
        result = detector.update(stamp, value)
        elapsed = (clock() - start) / 1000.0
        cpu_elapsed = (cpu_clock() - cpu_start) / 1000.0
        every.append(elapsed)
        if result.model_stage is ModelStage.INFERENCE:
            inference.append(elapsed)
            cpu_inference.append(cpu_elapsed)

    def summary(samples: list[float]) -> dict[str, float | int]:
        ordered = sorted(samples)
        if not ordered:
            return {"calls": 0}
        return {
            "calls": len(ordered),
            "p50": percentile(ordered, 0.50),
            "p90": percentile(ordered, 0.90),
            "p99": percentile(ordered, 0.99),
            "p999": percentile(ordered, 0.999),
            "max": ordered[-1],
        }

    report = {
        "all": summary(every),
        "inference": summary(inference),
        "cpu_inference": summary(cpu_inference),
    }
    return report, detector


def snapshot(
    detector: RcfDetector, stamps: list[float], values: list[float], repeats: int
) -> dict[str, Any]:
    """Size and save/load times of a warm detector's snapshot (medians of ``repeats``)."""
    saves, loads = [], []
    data = b""
    for _ in range(repeats):
        with Stopwatch() as save:
            data = detector.to_bytes()
        with Stopwatch() as load:
            restored = RcfDetector.from_bytes(data)
        saves.append(save)
        loads.append(load)
    # A snapshot is only worth timing if it restores the same detector: check the next result.
    probe_time, probe_value = stamps[-1] + 1.0, values[-1]
    identical = restored.update(probe_time, probe_value) == detector.update(probe_time, probe_value)
    return {
        "bytes": len(data),
        "to_bytes_ms": statistics.median(1000 * run.wall for run in saves),
        "from_bytes_ms": statistics.median(1000 * run.wall for run in loads),
        "to_bytes_cpu_ms": statistics.median(1000 * run.cpu for run in saves),
        "from_bytes_cpu_ms": statistics.median(1000 * run.cpu for run in loads),
        "repeats": repeats,
        "restored_scores_identical": identical,
    }


# --- fleets: many detectors fed round-robin, each fleet in a fresh subprocess ----------------


def fleet_series(count: int, length: int) -> list[list[float]]:
    """One distinct series per detector: its own level, cycle length, phase and noise."""
    import numpy as np

    rng = np.random.default_rng(7)
    steps = np.arange(length)
    level = rng.uniform(10, 1000, size=(count, 1))
    amplitude = level * rng.uniform(0.05, 0.3, size=(count, 1))
    period = rng.integers(12, 96, size=(count, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(count, 1))
    noise = rng.normal(0, 1, size=(count, length)) * amplitude * 0.05
    series = level + amplitude * np.sin(2 * np.pi * steps / period + phase) + noise
    return [row.tolist() for row in series]


def run_fleet(spec: dict[str, Any], show_progress: bool) -> dict[str, Any]:
    """Create ``detectors`` detectors, warm each on its own series, then time round-robin rounds.

    Resident memory is read before the detectors exist and after they are created and warm, so
    the difference divided by their number is the memory one more live detector costs.
    """
    from app.progress import progress_bar

    digest = detectors_digest()
    config = DetectorConfig.from_dict(spec["config"])
    count, warm_points = spec["detectors"], spec["warm_points"]
    rounds = max(1, math.ceil(spec["timed_updates"] / count))
    series = fleet_series(count, warm_points + rounds)
    stamps = [1_700_000_000.0 + 60.0 * i for i in range(warm_points + rounds)]
    gc.collect()
    rss_before = resident_bytes()

    label = f"{count:,} detectors"
    with progress_bar(f"{label}: create", count, enabled=show_progress) as advance:
        start = time.perf_counter()
        fleet = []
        for index in range(count):
            fleet.append(RcfDetector(replace(config, seed=config.seed + index)))
            if index % 256 == 255:
                advance(256)
        create_s = time.perf_counter() - start

    with progress_bar(f"{label}: warm-up rounds", warm_points, enabled=show_progress) as advance:
        start = time.perf_counter()
        for step in range(warm_points):
            stamp = stamps[step]
            for detector, values in zip(fleet, series, strict=True):
                detector.update(stamp, values[step])
            advance(1)
        warm_s = time.perf_counter() - start
    gc.collect()
    rss_warm = resident_bytes()

    inference = 0
    gc.collect()
    timed_bar = progress_bar(f"{label}: timed rounds", rounds, enabled=show_progress)
    with timed_bar as advance, Stopwatch() as timed:
        for step in range(warm_points, warm_points + rounds):
            stamp = stamps[step]
            for detector, values in zip(fleet, series, strict=True):
                detector.update(stamp, values[step])
            advance(1)
    for detector, values in zip(fleet, series, strict=True):
        inference += detector.update(stamps[-1] + 60.0, values[-1]).model_stage is (
            ModelStage.INFERENCE
        )

    per_detector = (rss_warm - rss_before) / count if rss_before is not None and rss_warm else None
    return {
        "detectors": count,
        "config": config.to_dict(),
        "warm_points_per_detector": warm_points,
        "timed_rounds": rounds,
        "timed_updates": rounds * count,
        "points_per_s": rounds * count / timed.wall,
        "points_per_cpu_s": rounds * count / timed.cpu,
        "warm_up_points_per_s": warm_points * count / warm_s,
        "create_ms_per_detector": create_s * 1000 / count,
        "rss_before_bytes": rss_before,
        "rss_after_warm_bytes": rss_warm,
        "rss_after_timed_bytes": resident_bytes(),
        "rss_bytes_per_detector": per_detector,
        "share_in_inference": inference / count,
        "samplers_full": warm_points >= config.sample_size,
        "detectors_source_sha256": digest,
    }


def fleet_in_subprocess(spec: dict[str, Any], show_progress: bool) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--fleet-worker", json.dumps(spec)]
    if not show_progress:
        command.append("--no-progress")
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# --- the run ------------------------------------------------------------------------------


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 1000,10000, got {text!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return counts


def detectors_digest() -> str:
    """Short sha256 of detectors/*.py: the detector is often measured while being tuned, so
    each part of a run names the exact source it measured."""
    sources = sorted((REPO / "detectors").glob("*.py"))
    return hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "detectors"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        dirty = None
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "detectors_uncommitted_changes": dirty,
        "detectors_source_sha256": detectors_digest(),
        "python": platform.python_version(),
        "krcf": version("krcf"),
        "cpus": os.cpu_count(),
        "load_average_at_start": load,
        "machine": platform.machine(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "detector.json")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--detectors", type=parse_counts, help="fleet sizes (default 1000,10000)")
    parser.add_argument("--sweep", action="store_true", help="add the forest-size sweep")
    parser.add_argument("--sweep-detectors", type=int, help="fleet size of the sweep (1000)")
    parser.add_argument("--repeats", type=int, help="A/B repeats of the single-series run (5)")
    parser.add_argument("--warm-points", type=int, help="warm-up points per fleet detector (100)")
    parser.add_argument(
        "--timed-updates", type=int, help="updates timed per fleet, round-robin (40000)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--fleet-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    show_progress = not args.no_progress

    if args.fleet_worker:
        print(json.dumps(run_fleet(json.loads(args.fleet_worker), show_progress)))
        return 0

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    config = DetectorConfig()
    quick = args.quick
    repeats = args.repeats or (1 if quick else 5)
    counts = args.detectors or ([50, 200] if quick else [1000, 10_000])
    # Fleets are timed once every detector has left LEARNING (its first score comes after
    # ``warmup`` shingles), so the rounds measure the steady state the service lives in.
    past_learning = config.warmup + config.shingle_size + 16
    warm_points = args.warm_points or (past_learning if quick else max(100, past_learning + 20))
    timed_updates = args.timed_updates or (2_000 if quick else 40_000)
    sweep_count = args.sweep_detectors or (50 if quick else 1000)
    source, stamps, values = load_series(2_000 if quick else None)

    report: dict[str, Any] = {
        "environment": environment(),
        "settings": {
            "quick": quick,
            "series": source,
            "repeats": repeats,
            "fleet_sizes": counts,
            "warm_points_per_detector": warm_points,
            "timed_updates_per_fleet": timed_updates,
        },
        "config": config.to_dict(),
    }
    with Progress(console=console, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("single series A/B (detector, bare forest)", total=2 * repeats)
        report["single_series"] = single_series(
            config, stamps, values, repeats, lambda: progress.advance(task)
        )
        progress.add_task("latency and snapshot", total=None)
        report["latency_us"], warm = latency(config, stamps, values)
        report["snapshot"] = snapshot(warm, stamps, values, repeats=5 if quick else 20)

    base_spec = {"config": config.to_dict(), "warm_points": warm_points}
    report["fleets"] = [
        fleet_in_subprocess(
            {**base_spec, "detectors": count, "timed_updates": timed_updates}, show_progress
        )
        for count in counts
    ]
    if args.sweep:
        report["sweep"] = []
        for grid in SWEEP_GRID:
            swept = replace(config, **grid)
            # Until a forest's samplers are full an update only inserts; once full it also
            # evicts, which costs more. Sample sizes differ across the grid, so each point is
            # warmed past its own sample size to compare them in the same (steady) state.
            spec = {
                "config": swept.to_dict(),
                "warm_points": args.warm_points or max(warm_points, swept.sample_size + 32),
                "detectors": sweep_count,
                "timed_updates": timed_updates,
            }
            report["sweep"].append(fleet_in_subprocess(spec, show_progress))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(console, report)
    console.print(f"saved {args.out}")
    return 0


def print_report(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    single, lat, snap = report["single_series"], report["latency_us"], report["snapshot"]
    table = Table(title=f"RcfDetector, default config — {report['settings']['series']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("RcfDetector points/s (median)", f"{single['detector_points_per_s']:,.0f}")
    table.add_row("bare krcf score+update points/s", f"{single['bare_forest_points_per_s']:,.0f}")
    table.add_row("[bold]detector / bare forest", f"[bold]{single['detector_vs_bare_ratio']:.2f}")
    per_cpu = (single["detector_points_per_cpu_s"], single["bare_forest_points_per_cpu_s"])
    table.add_row(
        "points per CPU-second: detector / bare", f"{per_cpu[0]:,.0f} / {per_cpu[1]:,.0f}"
    )
    table.add_row(
        "detector / bare forest (CPU time)", f"{single['detector_vs_bare_ratio_cpu']:.2f}"
    )
    table.add_row("detector overhead µs/point", f"{single['detector_overhead_us_per_point']:.1f}")
    for stage, label in (
        ("all", "update latency, all calls"),
        ("inference", "update latency, INFERENCE"),
        ("cpu_inference", "update CPU time, INFERENCE"),
    ):
        if lat[stage].get("calls"):
            table.add_row(
                f"{label}: p50 / p99 µs", f"{lat[stage]['p50']:.0f} / {lat[stage]['p99']:.0f}"
            )
    table.add_row("snapshot size", f"{snap['bytes'] / 1024:,.1f} KiB")
    table.add_row(
        "to_bytes / from_bytes ms", f"{snap['to_bytes_ms']:.2f} / {snap['from_bytes_ms']:.2f}"
    )
    table.add_row(
        "to_bytes / from_bytes CPU ms",
        f"{snap['to_bytes_cpu_ms']:.2f} / {snap['from_bytes_cpu_ms']:.2f}",
    )
    table.add_row("restored detector scores identically", str(snap["restored_scores_identical"]))
    console.print(table)

    for title, rows in (("Fleets, round-robin", report["fleets"]), ("Sweep", report.get("sweep"))):
        if not rows:
            continue
        fleet_table = Table(title=title)
        for name in (
            "detectors",
            "trees",
            "samples",
            "cache",
            "pts/s",
            "pts/CPU-s",
            "KiB/det",
            "warm",
        ):
            fleet_table.add_column(name, justify="right")
        for row in rows:
            c = row["config"]
            per = row["rss_bytes_per_detector"]
            fleet_table.add_row(
                f"{row['detectors']:,}",
                str(c["num_trees"]),
                str(c["sample_size"]),
                f"{c['bounding_box_cache_fraction']:g}",
                f"{row['points_per_s']:,.0f}",
                f"{row['points_per_cpu_s']:,.0f}",
                "n/a" if per is None else f"{per / 1024:,.0f}",
                str(row["warm_points_per_detector"]),
            )
        console.print(fleet_table)


if __name__ == "__main__":
    sys.exit(main())
