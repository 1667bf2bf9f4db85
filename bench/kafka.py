"""Kafka benchmark: local broker start (with and without class-data sharing), replay and read-back.

Run from the repository root::

    .venv/bin/python bench/kafka.py            # 3 start pairs, 200,000 replayed rows
    .venv/bin/python bench/kafka.py --quick    # 1 start pair, 20,000 rows

Starts are timed in pairs (without, then with the class-data archive) so both see the same
machine load; CPU seconds (format tool + broker JVM until it serves) are reported beside wall
seconds because on a shared machine wall time mostly measures the neighbours. The replay part
times ``app.producer`` (read + check + encode, then send with acks) and ``consume_all``.
Results print as a rich table and are saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from app import kafka_local  # noqa: E402
from app.producer import ReplaySpec, build_records, read_table, send_records  # noqa: E402
from common.kafka_io import consume_all, create_topics  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def time_start(class_data_sharing: bool) -> dict[str, float]:
    """Format + start a fresh broker; wall seconds and CPU seconds until it serves."""
    with tempfile.TemporaryDirectory() as data_dir:
        kafka = kafka_local.LocalKafka(
            data_dir, port=kafka_local.free_port(), controller_port=kafka_local.free_port(),
            class_data_sharing=class_data_sharing,
        )
        format_cpu_before = _children_cpu()
        started = time.monotonic()
        kafka.start()
        wall = time.monotonic() - started
        pid = kafka.running_pid()
        assert pid is not None
        cpu = _process_cpu(pid) + _children_cpu() - format_cpu_before
        kafka.stop()
    return {"wall_s": wall, "cpu_s": cpu}


def time_replay(rows: int, work: Path) -> dict[str, float]:
    source = work / "replay.csv"
    times = pd.date_range("2014-04-01", periods=rows, freq="min")
    pd.DataFrame({
        "timestamp": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "value": np.random.default_rng(0).normal(size=rows).round(4),
        "host": np.array(["a", "b", "c", "d"])[np.arange(rows) % 4],
    }).to_csv(source, index=False)
    spec = ReplaySpec(dimension_columns=("host",), key_field="host")
    with kafka_local.LocalKafka(work / "broker", port=kafka_local.free_port(),
                                controller_port=kafka_local.free_port()) as kafka:
        create_topics(kafka.bootstrap, ["replay"], partitions=4)
        started = time.monotonic()
        records = build_records(read_table(source), spec, str(source))
        built = time.monotonic()
        report = send_records(kafka.bootstrap, "replay", records)
        sent = time.monotonic()
        read = consume_all(kafka.bootstrap, "replay", timeout_s=300)
        done = time.monotonic()
    assert report.delivered == rows and report.failed == 0 and len(read) == rows
    return {
        "rows": rows,
        "build_rows_per_s": rows / (built - started),
        "send_rows_per_s": rows / (sent - built),
        "consume_all_rows_per_s": rows / (done - sent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 start pair, 20,000 rows")
    parser.add_argument("--pairs", type=int, default=None, help="start pairs (default 3)")
    parser.add_argument("--rows", type=int, default=None, help="replayed rows (default 200,000)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kafka.json")
    args = parser.parse_args()
    pairs = args.pairs or (1 if args.quick else 3)
    rows = args.rows or (20_000 if args.quick else 200_000)
    console = Console()

    fetch_started = time.monotonic()
    kafka_local.ensure_jars()
    fetch_s = time.monotonic() - fetch_started
    # Make sure an archive exists, so the "with" runs measure mapping it, not dumping it.
    time_start(class_data_sharing=True)

    starts: dict[str, list[dict[str, float]]] = {"without_cds": [], "with_cds": []}
    with Progress(console=console) as progress:
        task = progress.add_task("broker starts", total=2 * pairs)
        for _ in range(pairs):
            starts["without_cds"].append(time_start(class_data_sharing=False))
            progress.advance(task)
            starts["with_cds"].append(time_start(class_data_sharing=True))
            progress.advance(task)
    with tempfile.TemporaryDirectory() as work, console.status(f"replaying {rows:,} rows"):
        replay = time_replay(rows, Path(work))

    def median(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in starts[kind])

    table = Table(title=f"Local Kafka {kafka_local.KAFKA_VERSION} (load {os.getloadavg()[0]:.1f})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("jar fetch (cached: ~0)", f"{fetch_s:.1f} s")
    for kind in starts:
        table.add_row(f"start {kind}: wall (median of {pairs})", f"{median(kind, 'wall_s'):.1f} s")
        table.add_row(f"start {kind}: CPU (median of {pairs})", f"{median(kind, 'cpu_s'):.1f} s")
    cpu_ratio = median("with_cds", "cpu_s") / median("without_cds", "cpu_s")
    table.add_row("start CPU with / without CDS", f"{cpu_ratio:.2f}")
    for key in ("build_rows_per_s", "send_rows_per_s", "consume_all_rows_per_s"):
        table.add_row(f"replay {key.removesuffix('_rows_per_s')}", f"{replay[key]:,.0f} rows/s")
    console.print(table)

    result: dict[str, Any] = {
        "kafka_version": kafka_local.KAFKA_VERSION,
        "machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0],
                    "python": platform.python_version()},
        "fetch_s": fetch_s,
        "starts": starts,
        "start_cpu_ratio_with_vs_without_cds": cpu_ratio,
        "replay": replay,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
