"""Benchmark: the whole ``anomstream detect`` pipeline through a real broker vs the detector alone.

Same run, same data (``--series`` series x ``--points`` points, one point per detection
interval, aggregation ``last`` so every point is scored exactly once):

1. detector alone: ``RcfDetector.update`` over the points, in the order they are produced;
   then one short unmeasured pass through the pipeline on other topics warms the broker's JVM
   (``--warmup-series``, ``--warmup-points``);
2. pipeline throughput: the points are produced to the input topic first, then a worker process
   (``python -m app.cli detect``) starts; points/s = points / (last result readable - worker
   ready). Route, repartition, windows, scoring, results and transactions are all inside;
3. latency: points produced at a steady rate; for each, the time from producing it to the result
   it closes being readable by a read_committed consumer (p50, p99). The first step (one point
   per series) follows the throughput backlog at once, while the worker still finishes its
   models' learning; its latency is printed apart (``latency_after_backlog_ms``), p50 and p99
   are over the ``--latency-points`` steps after it, at the steady rate;
4. restore: after a checkpoint, kill -9 of the worker with every series live, restart; times to
   /readyz and until every series has produced its next result. ``--kill-at-once`` kills right
   after the latency phase instead, when the replay since the last marker is longest.

Besides: the worker's resident memory per live series (at the kill, over what it held when
ready), the checkpoint's share of the worker's CPU (the CPU time of series snapshots over the
worker's CPU time; their wall time too, which other processes on the cores stretch), and with
``--profile`` py-spy profiles of the worker (throughput phase; latency and checkpoint phase)
summarised by ``bench/profile_summary.py`` into the result.

``--score-processes N`` runs the worker's score stage in N child processes (``detect
--score-processes``); the worker's CPU time and memory include them.

``--workers N`` measures instead, in the same run and over the same points: one worker, then N
workers (one process each) in one consumer group, each phase on fresh topics and a fresh group.
The input is produced before the workers start, in a transaction committed once all are ready;
points/s runs from that commit to the last result. Per phase: each worker's CPU time and the
windows it scored, and the cores used by the workers, the broker (when the bench started it),
the bench's result reader and the rest of the machine over the same interval. The pair of
phases runs ``--repeats`` times (one, N, one, N, ...): the speedup is that of the summed wall
times, so a slower or faster spell of the machine falls on both sides.

Prints a table and writes ``bench/results/pipeline.json``.

    .venv/bin/python bench/pipeline.py                   # starts its own broker
    .venv/bin/python bench/pipeline.py --bootstrap 127.0.0.1:9092 --series 200 --points 50
    .venv/bin/python bench/pipeline.py --series 10000 --points 50 --workers 2
    .venv/bin/python bench/pipeline.py --series 10000 --points 50 --score-processes 2
    # eviction: 100,000 series, 10,000 live models; no latency phase
    .venv/bin/python bench/pipeline.py --series 100000 --points 5 --max-live-models 10000 \
        --latency-points 0 --timeout-scale 6 --out bench/results/pipeline-100000-evict.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import profile_summary  # noqa: E402  (bench/profile_summary.py)

from app.kafka_local import LocalKafka, free_port  # noqa: E402
from common.kafka_io import consumer_config, create_topics  # noqa: E402
from detectors import DetectorConfig, RcfDetector  # noqa: E402

console = Console()
STEP_MS = 1000
PARTITIONS = 4


def series_values(series: int, points: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(points, dtype=float)
    phase = rng.uniform(0, 2 * math.pi, size=(series, 1))
    period = rng.uniform(20, 80, size=(series, 1))
    values = 50 + 10 * np.sin(2 * math.pi * t / period + phase)
    values += rng.normal(0, 0.5, size=(series, points))
    return values


def record(name: str, step: int, value: float) -> bytes:
    return json.dumps({"timestamp": step * STEP_MS, "value": value, "series": name}).encode()


def detector_alone(values: np.ndarray, params: dict[str, Any]) -> tuple[float, float, float]:
    """Wall and CPU seconds for one detector per series to score every point, in order, and
    the wall seconds it took to make the detectors (not in the first two: the pipeline makes
    them too, once per new series; krcf allocates and touches a forest's whole capacity then)."""
    config = DetectorConfig.from_dict(params)
    began = time.perf_counter()
    detectors = [RcfDetector(config) for _ in range(values.shape[0])]
    made_s = time.perf_counter() - began
    rows = values.T.tolist()
    began, cpu = time.perf_counter(), time.process_time()
    for step, row in enumerate(rows):
        for detector, value in zip(detectors, row, strict=True):
            detector.update(float(step), value)
    return time.perf_counter() - began, time.process_time() - cpu, made_s


def detector_alone_in_chunks(
    values: np.ndarray, params: dict[str, Any], chunk: int
) -> tuple[float, float, float]:
    """``detector_alone`` over ``chunk`` series at a time, summed: with eviction
    (``--max-live-models``) the series' detectors together would not fit in memory (100,000
    default forests take ~23 GB), nor do they in the worker."""
    total = (0.0, 0.0, 0.0)
    for first in range(0, values.shape[0], chunk):
        part = detector_alone(values[first:first + chunk], params)
        total = (total[0] + part[0], total[1] + part[1], total[2] + part[2])
    return total


def eviction_figures(
    args: argparse.Namespace, metrics_at_kill: str, spill_dir: Path
) -> dict[str, Any]:
    """What eviction leaves at the kill: series held as snapshots in the spill store (on disk,
    not in the worker's memory) and the store's size; the snapshots of every cause (the
    checkpoint figures above divide by checkpoint snapshots only); clients the score stage
    replaced (a burst of windows outliving the transaction time-out is fenced)."""
    snapshots = metric_value(metrics_at_kill, "anomstream_snapshots_total")
    seconds = metric_value(metrics_at_kill, "anomstream_snapshot_seconds_sum")
    written = metric_value(metrics_at_kill, "anomstream_snapshot_bytes_total")
    return {
        "max_live_models": args.max_live_models,
        "stored_series_at_kill": metric_value(metrics_at_kill, "anomstream_stored_series"),
        "evictions_to_kill": metric_value(metrics_at_kill, "anomstream_evictions_total"),
        "snapshots_all_causes_to_kill": snapshots,
        "snapshot_ms_all_causes": round(1000 * seconds / snapshots, 3) if snapshots else None,
        "snapshot_bytes_all_causes": round(written / snapshots) if snapshots else None,
        "client_rebuilds_to_kill": metric_value(metrics_at_kill,
                                                "anomstream_client_rebuilds_total"),
        "spill_store_mb_at_kill": round(
            sum(f.stat().st_size for f in spill_dir.glob("*.sqlite")) / 2**20, 1),
    }


class ResultReader:
    """Reads the output topic (read_committed) in a thread; remembers when each result arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer(consumer_config(bootstrap))
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                              for p in range(PARTITIONS)])
        self.arrivals: dict[tuple[str, str], float] = {}
        self.track = False  # parse results (latency phase) or only count them (throughput)
        self.count = 0
        self.last_at = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for message in self.consumer.consume(1000, 0.05):
                if message.error() is not None:
                    continue
                now = time.perf_counter()
                value = message.value()
                if self.track and value is not None:
                    result = json.loads(value)
                    series = result["dimensionList"][0]["value"]
                    self.arrivals[(series, result["detectionPeriodStartTime"])] = now
                self.count += 1
                self.last_at = now

    def wait_count(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count} of {count} results after {timeout_s:.0f} s")
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The pids of a process's children, theirs, and so on."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread or the process ended meanwhile
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


class WorkerRun:
    """The worker: one process with both stages, or (``split``) one process per stage; with
    ``score_processes`` above 1 its score stage runs in that many child processes (``detect
    --score-processes``), whose CPU and memory count as the worker's."""

    def __init__(self, config: Path, log: Path, split: bool, instance_id: str = "bench",
                 score_processes: int = 1) -> None:
        self.started = time.perf_counter()
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        for stages in (["route", "score"] if split else ["route,score"]):
            port = free_port()
            with log.open("ab") as handle:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "detect", "--config", str(config),
                     "--instance-id", instance_id, "--stages", stages, "--metrics-port", str(port),
                     "--score-processes", str(score_processes), "--log-level", "WARNING"],
                    cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                ))
            self.ports.append(port)

    def wait_ready(self, timeout_s: float = 120) -> float:
        deadline = time.monotonic() + timeout_s
        pending = list(self.ports)
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in self.processes):
                raise RuntimeError("the worker exited; see the bench log")
            for port in list(pending):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",
                                                timeout=1) as r:
                        if r.status == 200:
                            pending.remove(port)
                except OSError:
                    pass
            if not pending:
                return time.perf_counter()
            time.sleep(0.02)
        raise TimeoutError("worker not ready")

    def pids(self) -> list[int]:
        """The worker's processes and their children (score processes)."""
        return [pid for process in self.processes for pid in (process.pid,
                                                              *descendants(process.pid))]

    def rss_bytes(self) -> int:
        """Resident memory of the worker process(es)."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker process(es) so far (all threads).

        A score process that ended (the pid gone) takes its CPU time with it: the worker's
        processes all live from its start to its stop or kill."""
        return sum(process_cpu_seconds(pid) for pid in self.pids())

    def cpu_seconds_by_process(self) -> dict[int, float]:
        """The same per process: the worker's first (the route stage, with the score stage
        unless it runs in children), then its children."""
        return {pid: process_cpu_seconds(pid) for pid in self.pids()}

    def metrics(self) -> str:
        texts = []
        for port in self.ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                texts.append(str(r.read().decode()))
        return "\n".join(texts)

    def kill(self) -> None:
        children = [pid for process in self.processes for pid in descendants(process.pid)]
        for process in self.processes:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        # The score processes die with their worker (PR_SET_PDEATHSIG): wait until they have.
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in children):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker's children {children} outlived its kill -9")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()


class Profiler:
    """py-spy sampling the worker process(es) until ``stop`` (collapsed stacks, one file each)."""

    def __init__(self, worker: WorkerRun, out: Path) -> None:
        self.outs = [out.with_suffix(f".{i}.txt") if len(worker.processes) > 1 else out
                     for i in range(len(worker.processes))]
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.processes = [
            subprocess.Popen(
                [py_spy, "record", "--pid", str(process.pid), "--format", "raw", "--function",
                 "--threads", "--nonblocking", "--rate", "50", "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for process, path in zip(worker.processes, self.outs, strict=True)
        ]

    def stop(self) -> list[Path]:
        for process in self.processes:
            process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        return [path for path in self.outs if path.exists()]


def metric_value(text: str, name: str) -> float:
    """The sum of the samples of ``name`` (``metric`` or ``metric{label="value",...}``) whose
    labels include the given ones: a worker with score processes labels each sample with its
    process besides."""
    base, _, wanted = name.partition("{")
    required = [pair for pair in wanted.rstrip("}").split(",") if pair]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(base + " ") or (
            line.startswith(base + "{")
            and all(pair in line.partition("}")[0] for pair in required)
        ):
            total += float(line.rpartition(" ")[2])
    return total


def produce_all(bootstrap: str, topic: str, records: list[tuple[str, bytes]],
                label: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000})
    produce_with_progress(producer, topic, records, label)


def produce_with_progress(producer: Producer, topic: str, records: list[tuple[str, bytes]],
                          label: str) -> None:
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(label, total=len(records))
        for i, (key, value) in enumerate(records):
            producer.produce(topic, value, key)
            if i % 5000 == 0:
                producer.poll(0)
                progress.update(task, completed=i)
        producer.flush(60)


def pipeline_setup(
    bootstrap: str, workdir: Path, args: argparse.Namespace, params: dict[str, Any], series: int
) -> tuple[Path, str, dict[str, Any]]:
    """Fresh topics and a worker configuration for one pass: (config path, input, topics)."""
    tag = uuid.uuid4().hex[:8]
    topics = {
        "output": f"bench-out-{tag}", "dead_letter": f"bench-dlq-{tag}",
        "repartition": f"bench-rep-{tag}", "state": f"bench-state-{tag}",
        "partitions": PARTITIONS,
    }
    input_topic = f"bench-in-{tag}"
    create_topics(bootstrap, [input_topic], partitions=PARTITIONS)
    config_path = workdir / f"bench-{tag}.yaml"
    config_path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap": bootstrap, "group_id": f"bench-{tag}", "session_timeout": 6000,
                  "transaction_timeout": 15000},
        "topics": topics,
        "worker": {"snapshot_interval": f"{args.snapshot_interval}s",
                   "commit_interval": "100ms",
                   "max_live_models": args.max_live_models or series * 2,
                   "spill_dir": str(workdir / "spill")},
        "detectors": [{"name": "bench", "input": input_topic, "measure": "value",
                       "dimensions": ["series"], "aggregation": "last", "interval": "1s",
                       "params": params}],
    }, sort_keys=False))
    return config_path, input_topic, topics


def warm_broker(
    bootstrap: str, workdir: Path, args: argparse.Namespace, params: dict[str, Any]
) -> None:
    """One short pass through the whole pipeline on throwaway topics, not measured.

    A broker the bench has just started runs its transactional produce and fetch paths in the
    JVM's interpreter at first; without this pass, that warm-up lands inside the measured one.
    """
    series, points = args.warmup_series, args.warmup_points
    if series <= 0 or points <= 1:
        return
    names = [f"w{i:04d}" for i in range(series)]
    values = series_values(series, points, seed=11)
    config_path, input_topic, topics = pipeline_setup(bootstrap, workdir, args, params, series)
    produce_all(bootstrap, input_topic,
                [(names[s], record(names[s], step, float(values[s, step])))
                 for step in range(points) for s in range(series)],
                "warming the broker")
    reader = ResultReader(bootstrap, topics["output"])
    worker = WorkerRun(config_path, workdir / "warmup-worker.log", args.split_stages,
                       score_processes=args.score_processes)
    try:
        worker.wait_ready()
        reader.wait_count(series * (points - 1), 300)
    finally:
        worker.stop()
        reader.close()


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values (the nearest rank below); -1 for none."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else -1


def run(
    args: argparse.Namespace, bootstrap: str, workdir: Path, broker_pid: int | None
) -> dict[str, Any]:
    params: dict[str, Any] = json.loads(args.params)
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    names = [f"s{i:04d}" for i in range(args.series)]
    warm = args.points
    # The step right after the backlog, then the steady ones (none of either with 0).
    latency_steps = 1 + args.latency_points if args.latency_points else 0
    values = series_values(args.series, warm + latency_steps + 2)

    alone = (detector_alone if args.max_live_models is None
             else partial(detector_alone_in_chunks, chunk=args.max_live_models))
    load_at_start = os.getloadavg()
    console.print(f"detector alone: {args.series} series x {warm} points ...")
    alone_runs = [alone(values[:, :warm], params)]
    points = args.series * warm

    warm_broker(bootstrap, workdir, args, params)
    config_path, input_topic, topics = pipeline_setup(
        bootstrap, workdir, args, params, args.series
    )
    log = workdir / "worker.log"

    bulk = [(names[s], record(names[s], step, float(values[s, step])))
            for step in range(warm) for s in range(args.series)]
    produce_all(bootstrap, input_topic, bulk, "producing the throughput data")

    reader = ResultReader(bootstrap, topics["output"])
    worker = WorkerRun(config_path, log, args.split_stages,
                       score_processes=args.score_processes)
    try:
        ready_at = worker.wait_ready()
        use = CoreUse([worker], broker_pid)
        cpu_at_ready = worker.cpu_seconds()
        cpu_by_process_at_ready = worker.cpu_seconds_by_process()
        rss_at_ready = worker.rss_bytes()
        profiles: dict[str, list[Path]] = {}
        profiler = Profiler(worker, profile_dir / "throughput.txt") if profile_dir else None
        profiling = profile_dir or Path()
        # The last point of each series leaves its window open: (warm - 1) results per series.
        expected = args.series * (warm - 1)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("pipeline throughput", total=expected)
            deadline = time.monotonic() + 600 * args.timeout_scale
            while reader.count < expected and time.monotonic() < deadline:
                progress.update(task, completed=reader.count)
                time.sleep(0.1)
        reader.wait_count(expected, 10)
        pipeline_s = reader.last_at - ready_at
        pipeline_cpu_s = worker.cpu_seconds() - cpu_at_ready
        cpu_by_process = {pid: cpu - cpu_by_process_at_ready.get(pid, 0.0)
                          for pid, cpu in worker.cpu_seconds_by_process().items()}
        use.end()
        if profiler is not None:
            profiles["throughput"] = profiler.stop()
            profiler = Profiler(worker, profiling / "steady.txt")
        reader.track = True
        during = worker.metrics()
        commits = {
            stage: (metric_value(during, f'anomstream_commit_seconds_sum{{stage="{stage}"}}'),
                    metric_value(during, f'anomstream_commit_seconds_count{{stage="{stage}"}}'))
            for stage in ("route", "score")
        }
        pipeline_points = expected  # windows scored; the open last windows are scored later

        # Latency: steady rate. A series' window closes at the first record of its input
        # partition past the window's end (the partition's stream time; decision 0007), often
        # another series' record: latency counts from that record's production to the result
        # being readable.
        produced_at: dict[tuple[int, int], float] = {}  # (input partition, step) -> first sent
        partition_of: dict[str, int] = {}

        def delivered(error: Any, message: Any) -> None:
            if error is None:
                partition_of[message.key().decode()] = message.partition()

        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        rate = args.latency_rate
        began = time.perf_counter()
        n = 0
        sent: list[tuple[str, int, float]] = []
        for step in range(warm, warm + latency_steps):
            for s in range(args.series):
                due = began + n / rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                producer.produce(input_topic, record(names[s], step, float(values[s, step])),
                                 names[s], on_delivery=delivered)
                producer.poll(0)
                sent.append((names[s], step, time.perf_counter()))
                n += 1
        producer.flush(30)
        reader.wait_count(expected + n, 120)
        for name, step, at in sent:
            key = (partition_of[name], step)
            produced_at[key] = min(at, produced_at.get(key, at))
        from contract.records import format_time
        latencies = []  # at the steady rate: after the step that follows the backlog
        by_step: dict[int, list[float]] = {}
        for name, step, _at in sent:
            arrived = reader.arrivals.get((name, format_time((step - 1) * STEP_MS / 1000)))
            if arrived is not None:
                latency = (arrived - produced_at[(partition_of[name], step)]) * 1000
                if step > warm:
                    latencies.append(latency)
                by_step.setdefault(step, []).append(latency)
        latencies.sort()
        after_backlog = sorted(by_step.get(warm, []))
        # The checkpoint's share while points arrive; the round the wait below brings (a quiet
        # partition snapshots every changed series) is in the share up to the kill.
        after_latency = worker.metrics()
        cpu_after_latency = worker.cpu_seconds() - cpu_at_ready
        snapshot_cpu_s_after_latency = metric_value(after_latency,
                                                    "anomstream_snapshot_cpu_seconds_total")

        # Restore: once every partition has checkpointed, kill -9 with all series live
        # (--kill-at-once: right after the latency phase, the worst case for the replay).
        deadline = time.monotonic() + args.snapshot_interval + 120
        while not args.kill_at_once and time.monotonic() < deadline:
            time.sleep(1.0)
            text = worker.metrics()
            if (metric_value(text, "anomstream_snapshot_age_seconds") == 0
                    and metric_value(text, "anomstream_snapshots_total") >= args.series):
                break
        before_kill = worker.metrics()
        cpu_at_kill = worker.cpu_seconds() - cpu_at_ready
        rss_at_kill = worker.rss_bytes()
        if profiler is not None:
            profiles["steady"] = profiler.stop()
            profiler = None
        live = metric_value(before_kill, "anomstream_live_series")
        evicted = eviction_figures(args, before_kill, workdir / "spill")
        snapshot_s = metric_value(before_kill, "anomstream_snapshot_seconds_sum")
        snapshots = metric_value(before_kill, 'anomstream_snapshots_total{cause="checkpoint"}')
        snapshot_bytes = metric_value(before_kill, "anomstream_snapshot_bytes_total")
        snapshot_cpu_s = metric_value(before_kill, "anomstream_snapshot_cpu_seconds_total")
        commit_all_s = metric_value(before_kill, "anomstream_commit_seconds_sum")
        worker.kill()
        before = reader.count
        restarted = WorkerRun(config_path, log, args.split_stages,
                              score_processes=args.score_processes)
        worker = restarted
        ready_after = restarted.wait_ready() - restarted.started
        cpu_restart = restarted.cpu_seconds()
        step = warm + latency_steps
        for s in range(args.series):
            producer.produce(input_topic, record(names[s], step, float(values[s, step])),
                             names[s])
        producer.flush(30)
        reader.wait_count(before + args.series, 180 * args.timeout_scale)
        first_results_after = reader.last_at - restarted.started
        restore_cpu_s = restarted.cpu_seconds() - cpu_restart
        rss_after_restore = restarted.rss_bytes()
        replayed = metric_value(restarted.metrics(), "anomstream_replayed_records_total")
    finally:
        if profiler is not None:
            profiler.stop()
        worker.stop()
        reader.close()

    # Measured again after the pipeline: on a shared machine the faster of the two runs is the
    # fair (conservative) reference for the ratio.
    console.print("detector alone, again ...")
    alone_runs.append(alone(values[:, :warm], params))
    alone_rate = points / min(wall for wall, _cpu, _made in alone_runs)
    alone_cpu_per_point = min(cpu for _wall, cpu, _made in alone_runs) / points
    made_s = min(made for _wall, _cpu, made in alone_runs)
    alone_with_making_rate = points / (min(wall for wall, _cpu, _made in alone_runs) + made_s)
    pipeline_rate = pipeline_points / pipeline_s
    return {
        "series": args.series,
        # Processes that run stages: one with both, or the route stage's and the score
        # stage's (--split-stages), N of them with --score-processes N.
        "worker_processes": (1 + args.score_processes
                             if args.split_stages or args.score_processes > 1 else 1),
        "score_processes": args.score_processes,
        "broker_warmup_pass": {"series": args.warmup_series, "points": args.warmup_points},
        "points_per_series": warm,
        "detector_params": params,
        "detector_alone_points_per_s": round(alone_rate, 1),
        "detector_alone_runs_points_per_s": [round(points / t, 1) for t, _, _ in alone_runs],
        # Making the detectors (once per series; the pipeline does it too, within its time):
        # with few points per series a visible part of the work.
        "detector_making_ms_per_series": round(1000 * made_s / args.series, 3),
        "detector_alone_with_making_points_per_s": round(alone_with_making_rate, 1),
        "pipeline_points_per_s": round(pipeline_rate, 1),
        "pipeline_vs_detector_ratio": round(pipeline_rate / alone_rate, 3),
        "pipeline_vs_detector_with_making_ratio": round(pipeline_rate / alone_with_making_rate, 3),
        # The same comparison in CPU time per point (worker process, all threads, vs the
        # detector loop): what the worker itself adds, without the broker and the other
        # processes that share the machine's cores.
        "detector_alone_cpu_us_per_point": round(1e6 * alone_cpu_per_point, 1),
        "pipeline_worker_cpu_us_per_point": round(1e6 * pipeline_cpu_s / pipeline_points, 1),
        "pipeline_vs_detector_cpu_ratio": round(
            alone_cpu_per_point / (pipeline_cpu_s / pipeline_points), 3),
        # Per process: the worker's own first (its route stage), then its score processes.
        "pipeline_worker_cpu_us_per_point_by_process": [
            round(1e6 * cpu / pipeline_points, 1) for cpu in cpu_by_process.values()],
        # points/s = the worker's cores / its CPU per point: the cores each party used during
        # the throughput phase say how many the worker had.
        "throughput_cores": use.cores(pipeline_s),
        "latency_rate_points_per_s": rate,
        "latency_samples": len(latencies),
        "latency_p50_ms": round(percentile(latencies, 0.50), 2),
        "latency_p99_ms": round(percentile(latencies, 0.99), 2),
        # The step right after the throughput backlog: its burst closes the windows the backlog
        # left open, and meets models that have not finished learning the backlog's last points.
        "latency_after_backlog_ms": {
            "p50": round(percentile(after_backlog, 0.50), 1),
            "p99": round(percentile(after_backlog, 0.99), 1),
            "max": round(after_backlog[-1], 1) if after_backlog else None},
        # Per step of the latency phase (a burst of --series windows each), that one first.
        "latency_by_step_ms": [
            {"p0": round(s[0], 1), "p50": round(percentile(s, 0.50), 1),
             "p99": round(percentile(s, 0.99), 1), "max": round(s[-1], 1)}
            for s in (sorted(v) for _step, v in sorted(by_step.items()))
        ],
        # The price of exactly-once during the throughput phase: time inside transaction
        # commits (each stage commits every commit_interval while it has work).
        "commits_during_throughput": {
            stage: {"count": int(count), "mean_ms": round(1000 * total / count, 2) if count
                    else None, "share_of_wall_time": round(total / pipeline_s, 3)}
            for stage, (total, count) in commits.items()
        },
        "checkpoint_snapshots": int(snapshots),
        "snapshot_ms_per_series": round(1000 * snapshot_s / snapshots, 3) if snapshots
        else None,
        "snapshot_cpu_ms_per_series": round(1000 * snapshot_cpu_s / snapshots, 3) if snapshots
        else None,
        "snapshot_bytes_per_series": round(snapshot_bytes / snapshots) if snapshots else None,
        "live_series_at_kill": live,
        "restore_to_ready_s": round(ready_after, 3),
        "restore_to_all_series_scoring_s": round(first_results_after, 3),
        "replayed_records_after_restore": replayed,
        "restore_cpu_s_ready_to_all_scoring": round(restore_cpu_s, 2),
        "snapshot_interval_s": args.snapshot_interval,
        "killed_at_once": args.kill_at_once,
        # Resident memory of the worker when it was ready (no series yet), at the kill (every
        # series live) and after the restore; per live series: the growth over the ready state.
        "rss_at_ready_mb": round(rss_at_ready / 2**20, 1),
        "rss_at_kill_mb": round(rss_at_kill / 2**20, 1),
        "rss_after_restore_mb": round(rss_after_restore / 2**20, 1),
        # (The worker may have made series before /readyz answered: the growth is a lower
        # bound, the whole resident memory per series an upper one.)
        "rss_per_live_series_kb": round((rss_at_kill - rss_at_ready) / max(live, 1) / 1024, 1),
        "rss_per_live_series_upper_kb": round(rss_at_kill / max(live, 1) / 1024, 1),
        # From ready to the kill: the worker's CPU, the CPU and wall time its score stage spent
        # taking snapshots (checkpoints; evictions, none here), its wall time inside
        # transaction commits (mostly waiting for the broker, so not CPU).
        "worker_cpu_s_ready_to_kill": round(cpu_at_kill, 1),
        "snapshot_cpu_s_ready_to_kill": round(snapshot_cpu_s, 2),
        "snapshot_wall_s_ready_to_kill": round(snapshot_s, 2),
        "checkpoint_share_of_worker_cpu": round(snapshot_cpu_s / cpu_at_kill, 3)
        if cpu_at_kill else None,
        "commit_wall_s_ready_to_kill": round(commit_all_s, 2),
        "checkpoint_share_ready_to_latency_end": round(
            snapshot_cpu_s_after_latency / cpu_after_latency, 3) if cpu_after_latency else None,
        **evicted,
        "profiles": {phase: profile_summary.summarize(paths)
                     for phase, paths in profiles.items()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m": os.getloadavg()[0],
                    "load_average_at_start": [round(x, 2) for x in load_at_start],
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
    }


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is counted in user already.
    busy = sum(jiffies[i] for i in (0, 1, 2, 5, 6, 7))
    idle = jiffies[3] + jiffies[4]
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, idle / tick


class CoreUse:
    """CPU time from its making to ``end``: of the workers, the broker (when the bench started
    it), this process (mostly the result reader) and the rest of the machine; ``cores`` divides
    it by the wall time into the cores each used (CPU seconds per second)."""

    def __init__(self, workers: list[WorkerRun], broker_pid: int | None) -> None:
        self.workers, self.broker_pid = workers, broker_pid
        self.load_before = os.getloadavg()[0]
        self.workers_before = [worker.cpu_seconds() for worker in workers]
        self.broker_before = process_cpu_seconds(broker_pid) if broker_pid else 0.0
        self.bench_before = time.process_time()
        self.busy_before, self.idle_before = machine_cpu_seconds()

    def end(self) -> None:
        self.worker_cpu_s = [worker.cpu_seconds() - before for worker, before
                             in zip(self.workers, self.workers_before, strict=True)]
        self.broker_s = (process_cpu_seconds(self.broker_pid) - self.broker_before
                         if self.broker_pid else None)
        self.bench_s = time.process_time() - self.bench_before
        busy, idle = machine_cpu_seconds()
        self.busy_s, self.idle_s = busy - self.busy_before, idle - self.idle_before
        self.load_after = os.getloadavg()[0]

    def cores(self, wall_s: float) -> dict[str, Any]:
        workers_s = sum(self.worker_cpu_s)
        others_s = self.busy_s - workers_s - (self.broker_s or 0.0) - self.bench_s
        broker_s = self.broker_s
        return {
            # The CPU times are read up to the poll after the last result, a tenth of a
            # second at most past it.
            "cores_workers": round(workers_s / wall_s, 2),
            "cores_broker": round(broker_s / wall_s, 2) if broker_s is not None else None,
            "cores_bench_reader": round(self.bench_s / wall_s, 2),
            "cores_others": round(others_s / wall_s, 2),
            "cores_idle": round(self.idle_s / wall_s, 2),
            "broker_cpu_s": round(broker_s, 2) if broker_s is not None else None,
            "load_average_1m_before_after": [round(self.load_before, 2),
                                             round(self.load_after, 2)],
        }


def produce_gated(bootstrap: str, topic: str, records: list[tuple[str, bytes]],
                  label: str) -> Producer:
    """Produce ``records`` in one open transaction; they become readable when it commits.

    The workers read input read_committed: they can join their group and settle before any
    of it is theirs, and then all start on it at once.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000,
                         "transactional.id": f"bench-gate-{uuid.uuid4().hex[:8]}",
                         # Producing and the workers' start fit well within it.
                         "transaction.timeout.ms": 600_000})
    producer.init_transactions(60)
    producer.begin_transaction()
    produce_with_progress(producer, topic, records, label)
    return producer


def workers_phase(
    bootstrap: str, workdir: Path, args: argparse.Namespace, n: int,
    records: list[tuple[str, bytes]], broker_pid: int | None,
) -> dict[str, Any]:
    """``n`` workers (one process each, both stages) in one group, on fresh topics.

    The input is on the broker before the workers start, in a transaction committed once all
    of them are ready: no worker starts on every partition before the others have joined, and
    the time runs from the commit to the last result. Besides the workers' CPU, the broker's,
    this process's (the result reader) and the rest of the machine's over the same interval
    show how much of the cores the workers had.
    """
    params: dict[str, Any] = json.loads(args.params)
    config_path, input_topic, topics = pipeline_setup(
        bootstrap, workdir, args, params, args.series)
    gate = produce_gated(bootstrap, input_topic, records, f"producing the input of {n} worker(s)")
    reader = ResultReader(bootstrap, topics["output"])
    workers = [WorkerRun(config_path, workdir / f"workers{n}-{i}.log", False,
                         instance_id=f"bench-{i}") for i in range(n)]
    try:
        for worker in workers:
            worker.wait_ready()
        use = CoreUse(workers, broker_pid)
        began = time.perf_counter()
        gate.commit_transaction(60)
        expected = args.series * (args.points - 1)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"{n} worker(s)", total=expected)
            deadline = time.monotonic() + 1800
            while reader.count < expected and time.monotonic() < deadline:
                progress.update(task, completed=reader.count)
                time.sleep(0.1)
        reader.wait_count(expected, 10)
        wall_s = reader.last_at - began
        use.end()
        texts = [worker.metrics() for worker in workers]
    finally:
        for worker in workers:
            worker.stop()
        reader.close()
    return {
        "workers": n,
        "points": expected,
        "wall_s": round(wall_s, 2),
        "points_per_s": round(expected / wall_s, 1),
        "worker_cpu_s": [round(c, 2) for c in use.worker_cpu_s],
        "worker_cpu_us_per_point": round(1e6 * sum(use.worker_cpu_s) / expected, 1),
        # How evenly the group split the series: windows each worker scored.
        "windows_scored_per_worker": [int(metric_value(text, "anomstream_windows_closed_total"))
                                      for text in texts],
        **use.cores(wall_s),
    }


def print_phases(phases: list[dict[str, Any]]) -> None:
    table = Table(title="one worker against several, same input")
    table.add_column("measure")
    for phase in phases:
        table.add_column(f"{phase['workers']} worker(s)", justify="right")
    for key in phases[0]:
        table.add_row(key, *(str(phase[key]) for phase in phases))
    console.print(table)


def run_workers(
    args: argparse.Namespace, bootstrap: str, workdir: Path, broker_pid: int | None
) -> dict[str, Any]:
    """One worker, then ``--workers`` in one group, over the same points, each phase on fresh
    topics and a fresh group (nothing of the first phase's state is reused by the second)."""
    params: dict[str, Any] = json.loads(args.params)
    names = [f"s{i:04d}" for i in range(args.series)]
    values = series_values(args.series, args.points)
    bulk = [(names[s], record(names[s], step, float(values[s, step])))
            for step in range(args.points) for s in range(args.series)]
    warm_broker(bootstrap, workdir, args, params)
    phases = []
    for repeat in range(args.repeats):
        for n in (1, args.workers):
            console.print(f"{n} worker(s), pass {repeat + 1} of {args.repeats}: "
                          f"{args.series} series x {args.points} points ...")
            phases.append(workers_phase(bootstrap, workdir, args, n, bulk, broker_pid))
    print_phases(phases)
    ones, manys = phases[0::2], phases[1::2]

    def total(group: list[dict[str, Any]], key: str) -> float:
        return sum(phase[key] for phase in group)

    def cpu_us(group: list[dict[str, Any]]) -> float:
        return 1e6 * sum(sum(phase["worker_cpu_s"]) for phase in group) / total(group, "points")

    def cores(group: list[dict[str, Any]]) -> float:
        return sum(phase["cores_workers"] * phase["wall_s"] for phase in group) / total(
            group, "wall_s")

    return {
        "series": args.series,
        "points_per_series": args.points,
        "partitions": PARTITIONS,
        "detector_params": params,
        "repeats": args.repeats,
        "phases": phases,
        "speedup_points_per_s": round(total(ones, "wall_s") / total(manys, "wall_s"), 3),
        "speedup_per_pass": [round(one["wall_s"] / many["wall_s"], 3)
                             for one, many in zip(ones, manys, strict=True)],
        # points/s = workers' cores / CPU per point, so the speedup is the product of these two:
        # how many more cores the workers got, and how much CPU a point cost more or less.
        "worker_cores_ratio": round(cores(manys) / cores(ones), 3),
        "cpu_per_point_efficiency": round(cpu_us(ones) / cpu_us(manys), 3),
        "broker_measured": broker_pid is not None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--points", type=int, default=100, help="points per series (throughput)")
    parser.add_argument("--latency-points", type=int, default=3,
                        help="points per series produced at a steady rate (latency), after "
                             "the one that follows the backlog (0: no latency phase)")
    parser.add_argument("--latency-rate", type=float, default=500.0, help="points/s")
    parser.add_argument("--snapshot-interval", type=float, default=30.0,
                        help="seconds (the worker's default)")
    parser.add_argument("--warmup-series", type=int, default=200,
                        help="series of the unmeasured pass that warms the broker (0: none)")
    parser.add_argument("--warmup-points", type=int, default=50,
                        help="points per series of that pass")
    parser.add_argument("--params", default="{}",
                        help='detector parameters as JSON (default: production defaults)')
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline.json"))
    parser.add_argument("--kill-at-once", action="store_true",
                        help="kill -9 right after the latency phase instead of after a "
                             "checkpoint (the longest replay)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (worker log)")
    parser.add_argument("--split-stages", action="store_true",
                        help="run the route and score stages as two processes (two cores)")
    parser.add_argument("--score-processes", type=int, default=1, metavar="N",
                        help="run the worker's score stage in N processes (detect "
                             "--score-processes)")
    parser.add_argument("--max-live-models", type=int,
                        help="the worker's max_live_models (default: twice --series, no "
                             "eviction); the detector-alone reference then runs this many "
                             "series at a time")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiplies the throughput (600 s) and restore (180 s) time-outs")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy the worker; collapsed stacks and summaries go to DIR")
    parser.add_argument("--repeats", type=int, default=2,
                        help="with --workers: passes of one worker then N (default 2)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="instead of the phases above: points/s of one worker, then of N "
                             "in one group, over the same input (N must divide the "
                             f"{PARTITIONS} partitions)")
    args = parser.parse_args()
    if args.workers and (args.workers < 2 or PARTITIONS % args.workers):
        # An uneven split would measure the partition layout, not the workers.
        parser.error(f"--workers must be 2 or more and divide {PARTITIONS}")
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        workdir = Path(tmp)
        console.print(f"work dir {workdir}")
        if args.bootstrap:
            # Another broker's pid is not ours to guess: its CPU is left out.
            result = (run_workers(args, args.bootstrap, workdir, None) if args.workers
                      else run(args, args.bootstrap, workdir, None))
        else:
            with LocalKafka(workdir / "kafka", port=free_port(), controller_port=free_port()) as k:
                result = (run_workers(args, k.bootstrap, workdir, k.running_pid())
                          if args.workers else run(args, k.bootstrap, workdir, k.running_pid()))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title="anomstream detect pipeline")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if not isinstance(value, dict) and key != "phases":  # phases: printed above
            table.add_row(key, str(value))
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
