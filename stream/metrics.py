"""Prometheus metrics of a worker and its HTTP endpoint: /metrics, /healthz, /readyz.

Each worker owns a registry (not prometheus-client's global one) so several workers can live in
one process, as they do in tests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# Scoring one closed window takes tens of microseconds for a small forest: sub-ms buckets.
SCORING_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records_in = Counter(
            "anomstream_records_in", "Records consumed", ["stage", "topic"], registry=r
        )
        self.records_out = Counter(
            "anomstream_records_out", "Records produced", ["kind"], registry=r
        )
        self.dead_letters = Counter(
            "anomstream_dead_letters", "Records sent to the dead-letter topic", ["reason"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "anomstream_consumer_lag", "Records behind the end of the partition",
            ["stage", "topic", "partition"], registry=r,
        )
        self.live_series = Gauge("anomstream_live_series", "Series with a model in memory",
                                 registry=r)
        self.stored_series = Gauge(
            "anomstream_stored_series", "Owned series held only as a snapshot (evicted or not yet "
            "reloaded)", registry=r,
        )
        self.windows_closed = Counter(
            "anomstream_windows_closed", "Detection intervals closed and scored", ["detector"],
            registry=r,
        )
        self.anomalies = Counter(
            "anomstream_anomalies", "Results produced with anomalyDecision = 1", ["detector"],
            registry=r,
        )
        self.scoring_seconds = Histogram(
            "anomstream_scoring_seconds", "Detector time per closed window",
            buckets=SCORING_BUCKETS, registry=r,
        )
        self.snapshot_age = Gauge(
            "anomstream_snapshot_age_seconds",
            "Age of the oldest checkpoint among the owned partitions", registry=r,
        )
        self.snapshots = Counter(
            "anomstream_snapshots", "Series snapshots written", ["cause"], registry=r
        )
        self.evictions = Counter("anomstream_evictions", "Series evicted from memory", registry=r)
        self.transactions = Counter(
            "anomstream_transactions", "Kafka transactions", ["stage", "outcome"], registry=r
        )
        self.commit_seconds = Histogram(
            "anomstream_commit_seconds",
            "Time to commit a transaction (offsets + commit), the price of exactly-once",
            ["stage"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            "anomstream_snapshot_seconds", "Time to snapshot one series (model + windows)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=r,
        )
        # CPU, not wall time: the checkpoint's share of the worker's CPU, whatever else the
        # machine runs meanwhile.
        self.snapshot_cpu_seconds = Counter(
            "anomstream_snapshot_cpu_seconds",
            "CPU time of the snapshotting thread spent in series snapshots", registry=r,
        )
        self.snapshot_bytes = Counter(
            "anomstream_snapshot_bytes", "Bytes of series snapshots written", registry=r
        )
        self.restore_seconds = Histogram(
            "anomstream_restore_seconds", "Time to restore assigned partitions from snapshots",
            registry=r,
        )
        self.client_rebuilds = Counter(
            "anomstream_client_rebuilds",
            "Kafka clients replaced after a fatal error (fenced, _FATAL)", ["stage"], registry=r,
        )
        # Total lag per stage, for /healthz (a stuck stage is one with lag and no progress).
        self.stage_lag: dict[str, int] = {}
        self.replayed = Counter(
            "anomstream_replayed_records",
            "Repartition records replayed with output suppressed after a restore", registry=r,
        )

    def observe_stats(self, stage: str, stats_json: str) -> None:
        """librdkafka statistics -> per-partition lag (last stable offset - next to consume)."""
        stats: dict[str, Any] = json.loads(stats_json)
        total = 0
        for topic, topic_stats in stats.get("topics", {}).items():
            for partition, p in topic_stats.get("partitions", {}).items():
                if partition == "-1" or p.get("app_offset", -1) < 0:
                    continue
                end = p["ls_offset"] if p.get("ls_offset", -1) >= 0 else p.get("hi_offset", -1)
                if end >= 0:
                    lag = max(0, end - p["app_offset"])
                    self.consumer_lag.labels(stage, topic, partition).set(lag)
                    total += lag
        self.stage_lag[stage] = total


class HasRegistry(Protocol):
    """What /metrics serves: a worker's metrics, or several processes' merged."""

    @property
    def registry(self) -> CollectorRegistry: ...


class HealthServer:
    """/metrics, /healthz (the loops are turning) and /readyz (partitions assigned and restored).

    /metrics is prometheus_client's own WSGI app (content negotiation and compression
    included); the two probes are routes in front of it, on the same port, served by
    prometheus_client's threading WSGI server.

    >>> import urllib.request
    >>> server = HealthServer(0, WorkerMetrics(), healthy=lambda: True, ready=lambda: False)
    >>> server = server.start()
    >>> urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz").read()
    b'ok\\n'
    >>> b"anomstream_" in urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read()
    True
    >>> server.stop()
    """

    def __init__(
        self,
        port: int,
        metrics: HasRegistry,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        host: str = "127.0.0.1",
    ) -> None:
        metrics_app = make_wsgi_app(metrics.registry)
        # path -> (the probe, its body when it passes, its body when it fails)
        probes = {
            "/healthz": (healthy, b"ok\n", b"stalled\n"),
            "/readyz": (ready, b"ready\n", b"not ready\n"),
        }

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path.startswith("/metrics"):
                return metrics_app(environ, start_response)
            for prefix, (probe, passed, failed) in probes.items():
                if path.startswith(prefix):
                    if probe():
                        return _plain(start_response, "200 OK", passed)
                    return _plain(start_response, "503 Service Unavailable", failed)
            return _plain(start_response, "404 Not Found", b"try /metrics, /healthz or /readyz\n")

        self.server = make_server(host, port, app, ThreadingWSGIServer, _QuietHandler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="metrics-http")

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _plain(start_response: Callable[..., Any], status: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the worker's own log


class Heartbeat:
    """When a loop last turned; /healthz fails if a loop stalls longer than ``stall_s``."""

    def __init__(self, stall_s: float = 60.0) -> None:
        self.stall_s = stall_s
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < self.stall_s
