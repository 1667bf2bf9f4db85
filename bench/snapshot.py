"""Benchmark: detector snapshots, the current format against format 4 (zlib 6, hex buffers).

A worker snapshots every changed series once per checkpoint interval and restores each from its
snapshot after a restart, so both directions scale with the live series. For three kinds of
series (the pipeline bench's 1-s series with no daily cycle; a 1-minute daily series two days in,
whose 8 days of references are the biggest state; a 2-measure series), each detector is written
and read ``--repeat`` times in both formats, in the same run (compare the ratios). Format 4 is
written here as the release before format 5 wrote it; reading it goes through the migration.

Prints a table and writes ``bench/results/snapshot.json``.

    .venv/bin/python bench/snapshot.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import struct
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectors import RcfDetector  # noqa: E402
from detectors.rcf import SNAPSHOT_VERSION, _read_snapshot  # noqa: E402

console = Console()


def format_4(detector: RcfDetector) -> bytes:
    """The snapshot the release before format 5 wrote: zlib 6 over the JSON state (daily
    buffers as hex) and the forest."""
    current = detector.to_bytes()  # to take the state exactly as the detector saves it
    state, _forest = _read_snapshot(current)
    for entry in state["seasonal"] or ():
        entry["buffer"] = entry["buffer"].hex()
    header = json.dumps(state, separators=(",", ":")).encode()
    body = struct.pack(">I", len(header)) + header + detector._forest.to_msgpack()
    return b"ASD" + bytes([4]) + zlib.compress(body, 6)


def series_kinds() -> dict[str, RcfDetector]:
    """Trained detectors: the pipeline bench's kind of series and two heavier ones."""
    bench = RcfDetector()
    for t in range(300):
        bench.update(float(t), 50 + 10 * math.sin(2 * math.pi * t / 40) + (t * 7 % 5) * 0.2)
    daily = RcfDetector()
    for t in range(2 * 1440 + 100):
        daily.update(60.0 * t, 50 + 10 * math.sin(2 * math.pi * t / 1440) + (t * 7 % 5) * 0.2)
    pair = RcfDetector(dimensions=2)
    for t in range(600):
        pair.update(60.0 * t, [100 + (t * 7 % 11), 0.5 + 0.01 * (t * 3 % 7)])
    return {"1s_no_daily_cycle": bench, "1min_daily_2_days": daily, "2_measures": pair}


def per_call_ms(call: Callable[[], object], repeat: int) -> float:
    best = math.inf
    for _ in range(3):  # the best of three rounds: the machine is shared
        began = time.perf_counter()
        for _ in range(repeat):
            call()
        best = min(best, (time.perf_counter() - began) / repeat)
    return 1000 * best


def measure(detector: RcfDetector, repeat: int) -> dict[str, Any]:
    new, old = detector.to_bytes(), format_4(detector)
    write_new = per_call_ms(detector.to_bytes, repeat)
    write_old = per_call_ms(lambda: format_4(detector), repeat)
    read_new = per_call_ms(lambda: RcfDetector.from_bytes(new), repeat)
    read_old = per_call_ms(lambda: RcfDetector.from_bytes(old), repeat)
    return {
        "format_4": {"write_ms": round(write_old, 3), "read_ms": round(read_old, 3),
                     "bytes": len(old)},
        f"format_{SNAPSHOT_VERSION}": {"write_ms": round(write_new, 3),
                                       "read_ms": round(read_new, 3), "bytes": len(new)},
        "write_speedup": round(write_old / write_new, 2),
        "read_speedup": round(read_old / read_new, 2),
        "bytes_ratio": round(len(new) / len(old), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "snapshot.json"))
    args = parser.parse_args()
    results = {name: measure(detector, args.repeat) for name, detector in series_kinds().items()}
    table = Table(title=f"detector snapshots: format 4 vs format {SNAPSHOT_VERSION}")
    for column in ("series", "write ms (4 -> new)", "read ms (4 -> new)", "bytes (4 -> new)"):
        table.add_column(column, justify="right" if column != "series" else "left")
    new = f"format_{SNAPSHOT_VERSION}"
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['format_4']['write_ms']} -> {r[new]['write_ms']} ({r['write_speedup']}x)",
            f"{r['format_4']['read_ms']} -> {r[new]['read_ms']} ({r['read_speedup']}x)",
            f"{r['format_4']['bytes']} -> {r[new]['bytes']}",
        )
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "series": results,
        "repeat": args.repeat,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"python": platform.python_version(), "load_average_1m": os.getloadavg()[0]},
    }, indent=2) + "\n")
    console.print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
