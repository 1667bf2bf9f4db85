"""Parquet sink and lake query benchmark.

Measures, in one run:

* the pure write path: JSON result records -> ``parse_results`` -> rotation -> atomic zstd
  Parquet files (what the sink does per batch, without Kafka);
* the Kafka-to-lake path: ``ParquetSink`` reading a topic of committed records from a real local
  broker (started here unless ``--bootstrap`` is given), from its first record to its last file;
* query times over one day of 1,000 series at 1-minute intervals (1.44 M rows, written with the
  lake writer as 24 hourly files per partition, then again after compaction) for: top 20
  anomalies today, anomalies per detector per hour, one series' day, and the ``series`` view.

Prints a table and saves ``bench/results/sink.json``.

    .venv/bin/python bench/sink.py            # full run
    .venv/bin/python bench/sink.py --quick    # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from contract import records
from contract.records import DIMENSION_TYPE, RESULT_SCHEMA
from sinks import lake
from sinks.compact import compact
from sinks.lake_files import publish_sink_file
from sinks.parquet import PartitionBuffer, RotationPolicy
from sinks.result_table import (
    canonical_order,
    day_name,
    epoch_millis,
    parse_results,
)
from tests.lake_data import DAY0, DETECTORS, series_dimensions, stream_of_results

console = Console(stderr=True)
DAY = day_name(DAY0 // 86_400)


def encoded_records(count: int, series: int = 1_000) -> list[bytes]:
    ticks = -(-count // series)
    out = [records.encode(r) for r in stream_of_results(series, ticks)]
    return out[:count]


def write_path(payloads: list[bytes], out: Path, batch: int = 10_000) -> dict[str, float]:
    """The sink's per-batch work without Kafka: parse, rotate, publish."""
    policy = RotationPolicy(max_records=100_000, max_span_ms=3_600_000)
    buffer = PartitionBuffer(0, policy)
    parse_results(payloads[:100], 0, range(100))  # warm up: one-time imports are not the path
    started = time.perf_counter()
    cpu = time.process_time()
    files = 0
    for start in range(0, len(payloads), batch):
        chunk = payloads[start : start + batch]
        parsed = parse_results(chunk, 0, range(start, start + len(chunk)))
        for table in buffer.add(parsed.table, start + len(chunk)):
            _publish(out, table)
            files += 1
    last = buffer.take_all()
    if last is not None:
        _publish(out, last)
        files += 1
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    return {
        "rows": len(payloads),
        "files": files,
        "seconds": elapsed,
        "rows_per_s": len(payloads) / elapsed,
        "cpu_seconds": cpu,
        "rows_per_cpu_s": len(payloads) / cpu,
    }


def _publish(out: Path, table: pa.Table) -> None:
    day = day_name(int(epoch_millis(table.slice(0, 1))[0] // 86_400_000))
    publish_sink_file(out, "results", 0, day, table)


def kafka_path(payloads: list[bytes], out: Path, bootstrap: str | None) -> dict[str, float]:
    """Records already committed on a topic -> lake, through ``ParquetSink``."""
    from contextlib import ExitStack

    from confluent_kafka import Producer

    from app.kafka_local import LocalKafka, free_port
    from common.kafka_io import create_topics, producer_config
    from sinks.parquet import ParquetSink, SinkConfig

    with ExitStack() as stack:
        if bootstrap is None:
            data = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-kafka-"))
            broker, controller = free_port(), free_port()
            while controller == broker:
                controller = free_port()
            console.print("starting a local Kafka broker ...")
            bootstrap = stack.enter_context(
                LocalKafka(data, port=broker, controller_port=controller)
            ).bootstrap
        topic = f"bench-results-{int(time.time())}"
        create_topics(bootstrap, [topic], partitions=4)
        producer = Producer(
            producer_config(bootstrap, **{"transactional.id": topic, "linger.ms": 20})
        )
        producer.init_transactions(30)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("producing", total=len(payloads))
            for start in range(0, len(payloads), 20_000):
                producer.begin_transaction()
                for payload in payloads[start : start + 20_000]:
                    producer.produce(topic, value=payload)
                    producer.poll(0)
                producer.commit_transaction(60)
                progress.advance(task, min(20_000, len(payloads) - start))
        producer.flush(30)
        del producer  # before the broker stops, or its client keeps reconnecting noisily
        sink = ParquetSink(
            SinkConfig(
                lake=out,
                topic=topic,
                bootstrap=bootstrap,
                group=f"bench-{topic}",
                idle_flush_s=1.0,
                stop_after_idle_s=3.0,
                batch_size=20_000,
            )
        )
        console.print("sinking ...")
        cpu = time.process_time()
        stats = sink.run()
        cpu = time.process_time() - cpu
        assert stats.first_record_at is not None and stats.last_publish_at is not None
        seconds = stats.last_publish_at - stats.first_record_at
        return {
            "rows": stats.rows,
            "files": stats.files,
            "seconds": seconds,
            "rows_per_s": stats.rows_per_s(),
            # The whole run, consumer start and the idle wait included: an upper bound.
            "cpu_seconds": cpu,
            "rows_per_cpu_s": stats.rows / cpu,
        }


def day_lake(out: Path, series: int = 1_000, minutes: int = 1_440, seed: int = 7) -> int:
    """One day of ``series`` series at 1-minute intervals, written with the lake writer as the
    sink would (4 partitions by series, one file per partition per hour)."""
    rng = np.random.default_rng(seed)
    dims = [series_dimensions(i) for i in range(series)]
    ids = np.array(
        [records.timeseries_id(DETECTORS[i % 3], "value", d) for i, d in enumerate(dims)],
        dtype=object,
    )
    dim_lists = [records.dimension_list(d) for d in dims]
    offsets = [0, 0, 0, 0]
    rows = 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("writing the 1.44 M-row day", total=24)
        for hour in range(24):
            tick = np.repeat(np.arange(hour * 60, (hour + 1) * 60), series)
            index = np.tile(np.arange(series), 60)
            n = len(tick)
            score = np.minimum(rng.exponential(12.0, n), 100.0)
            start_ms = (DAY0 + tick * 60) * 1000
            for partition in range(4):
                mask = index % 4 == partition
                table = _hour_table(
                    mask,
                    index,
                    tick,
                    score,
                    start_ms,
                    ids,
                    dims,
                    dim_lists,
                    rng,
                    partition,
                    offsets[partition],
                )
                offsets[partition] += table.num_rows
                rows += table.num_rows
                publish_sink_file(out, "results", partition, DAY, table)
            progress.advance(task)
    return rows


def _hour_table(
    mask: np.ndarray,
    index: np.ndarray,
    tick: np.ndarray,
    score: np.ndarray,
    start_ms: np.ndarray,
    ids: np.ndarray,
    dims: list[dict[str, str]],
    dim_lists: list[list[dict[str, str]]],
    rng: np.random.Generator,
    partition: int,
    first_offset: int,
) -> pa.Table:
    idx, tk, sc, ms = index[mask], tick[mask], score[mask], start_ms[mask]
    n = len(idx)
    names = [RESULT_SCHEMA.field(i).name for i in range(len(RESULT_SCHEMA))]
    stage = np.where(tk >= 10, "INFERENCE", "LEARNING")
    lists = pa.array([dim_lists[i] for i in idx], pa.list_(DIMENSION_TYPE))
    columns = [
        pa.array(np.array(DETECTORS, dtype=object)[idx % 3], pa.string()),
        pa.array(np.full(n, "value", dtype=object), pa.string()),
        pa.array(ids[idx], pa.string()),
        lists,
        pa.array(rng.normal(50, 10, n)),
        pa.array(sc),
        pa.array(np.full(n, 70.0)),
        pa.array((sc >= 70).astype(np.int8)),
        pa.array(np.minimum(tk * 2.0, 100.0)),
        pa.array(stage, pa.string())
        .dictionary_encode()
        .cast(pa.dictionary(pa.int8(), pa.string())),
        pa.array(np.full(n, 50.0)),
        pa.array(tk + 1, pa.int64()),
        pa.array(ms, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        pa.array(ms + 60_000, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
    ]
    table = pa.table(columns, names=names)
    for name in ("gpu", "host", "region"):
        table = table.append_column(
            f"dim_{name}", pa.array([dims[i].get(name) for i in idx], pa.string())
        )
    table = table.append_column("kafkaPartition", pa.array(np.full(n, partition, np.int32)))
    table = table.append_column(
        "kafkaOffset", pa.array(np.arange(first_offset, first_offset + n, dtype=np.int64))
    )
    return canonical_order(table)


QUERIES = {
    "top 20 anomalies today": f"""
        SELECT timeseriesId, detectorName, dim_host, detectionPeriodStartTime, anomalyScore
        FROM anomalies WHERE dt = DATE '{DAY}' ORDER BY anomalyScore DESC LIMIT 20""",
    "anomalies per detector per hour": f"""
        SELECT detectorName, date_trunc('hour', detectionPeriodStartTime) AS hour,
               count(*) AS anomalies
        FROM anomalies WHERE dt = DATE '{DAY}' GROUP BY ALL ORDER BY ALL""",
    "one series' day": f"""
        SELECT detectionPeriodStartTime, aggregatedMeasureValue, expectedValue, anomalyScore,
               anomalyDecision
        FROM scores WHERE timeseriesId = '{{series}}' AND dt = DATE '{DAY}'
        ORDER BY detectionPeriodStartTime""",
    "series view (1,000 rows)": "SELECT * FROM series",
}


def time_queries(lake_dir: Path, repeats: int) -> dict[str, dict[str, Any]]:
    one = lake.query(lake_dir, "SELECT timeseriesId FROM series ORDER BY 1 LIMIT 1")
    series_id = one.column(0)[0].as_py()
    connection = lake.connect(lake_dir)
    results: dict[str, dict[str, Any]] = {}
    for name, sql in QUERIES.items():
        sql = sql.replace("{series}", series_id)
        held, fresh = [], []
        rows = 0
        for _ in range(repeats):
            started = time.perf_counter()
            rows = connection.sql(sql).to_arrow_table().num_rows
            held.append(time.perf_counter() - started)
            started = time.perf_counter()
            lake.query(lake_dir, sql)
            fresh.append(time.perf_counter() - started)
        results[name] = {
            "rows": rows,
            "median_s": statistics.median(held),
            "median_s_with_connect": statistics.median(fresh),
        }
    connection.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--rows", type=int, default=300_000, help="rows for the write paths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--skip-kafka", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sink.json"))
    args = parser.parse_args()
    rows = 20_000 if args.quick else args.rows
    report: dict[str, Any] = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-lake-") as scratch:
        root = Path(scratch)
        console.print(f"encoding {rows:,} result records ...")
        payloads = encoded_records(rows)
        report["write_path"] = write_path(payloads, root / "write")
        if not args.skip_kafka:
            report["kafka_to_lake"] = kafka_path(payloads, root / "kafka", args.bootstrap)
        day = root / "day"
        series = 100 if args.quick else 1_000
        report["day_rows"] = day_lake(day, series=series)
        report["queries_hourly_files"] = time_queries(day, args.repeats)
        compact(day, before="9999-12-31", grace_s=0)
        report["queries_compacted"] = time_queries(day, args.repeats)
    report["load_average_after"] = os.getloadavg()
    _print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    plot = Path(args.out).with_suffix(".png")
    _plot(report, plot)
    console.print(f"saved {args.out} and {plot}")
    return 0


def _print(report: dict[str, Any]) -> None:
    out = Console()
    paths = Table(title="Sink throughput")
    for column in ("path", "rows", "files", "seconds", "rows/s", "rows/CPU-s"):
        paths.add_column(column, justify="right" if column != "path" else "left")
    for key in ("write_path", "kafka_to_lake"):
        if key in report:
            r = report[key]
            paths.add_row(
                key,
                f"{r['rows']:,}",
                str(r["files"]),
                f"{r['seconds']:.2f}",
                f"{r['rows_per_s']:,.0f}",
                f"{r['rows_per_cpu_s']:,.0f}",
            )
    out.print(paths)
    queries = Table(title=f"Queries over one day ({report['day_rows']:,} rows), median seconds")
    for column in ("query", "rows", "hourly files", "+connect", "compacted", "+connect"):
        queries.add_column(column, justify="right" if column != "query" else "left")
    for name in QUERIES:
        a, b = report["queries_hourly_files"][name], report["queries_compacted"][name]
        queries.add_row(
            name,
            str(a["rows"]),
            f"{a['median_s']:.3f}",
            f"{a['median_s_with_connect']:.3f}",
            f"{b['median_s']:.3f}",
            f"{b['median_s_with_connect']:.3f}",
        )
    out.print(queries)
    out.print(
        f"load average {report['load_average_before'][0]:.1f} -> "
        f"{report['load_average_after'][0]:.1f} on {report['cpus']} CPUs"
    )


def _plot(report: dict[str, Any], path: Path) -> None:
    """Query times per analyst question, small hourly files vs compacted day."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(QUERIES)
    hourly = [report["queries_hourly_files"][n]["median_s"] for n in names]
    compacted = [report["queries_compacted"][n]["median_s"] for n in names]
    y = np.arange(len(names))
    figure, axes = plt.subplots(figsize=(8, 3.5))
    axes.barh(y + 0.2, hourly, 0.4, label="hourly sink files")
    axes.barh(y - 0.2, compacted, 0.4, label="after compaction")
    axes.set_yticks(y, names)
    axes.invert_yaxis()
    axes.set_xlabel("median seconds (held connection)")
    axes.set_title(f"Lake queries over one day, {report['day_rows']:,} rows")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
