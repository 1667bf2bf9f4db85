"""Real receivers on 127.0.0.1 for the alerting tests, and synthetic result records.

``SmtpReceiver`` is an aiosmtpd server (with AUTH over plain text, so the apprise ``mailto://``
URL carries a password like a real one); ``HttpReceiver`` is an http.server webhook for apprise
``json://`` URLs that can be told to answer 500 for its first requests.
"""

from __future__ import annotations

import base64
import email
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from app.kafka_local import free_port
from contract.records import dimension_list, encode, format_time, timeseries_id

INTERVAL_S = 60.0
T0 = 1_790_000_000.0  # 2026-09-21, a fixed record-time origin


@dataclass(frozen=True)
class Received:
    title: str
    body: str


def series_of(received: Received) -> list[str]:
    """The series ids a message lists (each has one dashboard link)."""
    return [
        line.split("?series=", 1)[1].strip()
        for line in received.body.splitlines()
        if "?series=" in line
    ]


def headline(received: Received) -> str:
    return received.title.split("]", 1)[0].lstrip("[")


def count(messages: Iterable[Received], kind: str, series: str) -> int:
    return sum(1 for m in messages if headline(m) == kind and series in series_of(m))


class SmtpReceiver:
    def __init__(self, user: str, password: str) -> None:
        self.port = free_port()
        self.messages: list[Received] = []
        self.logins: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                parsed = email.message_from_bytes(envelope.content)
                parts = [parsed] if not parsed.is_multipart() else list(parsed.walk())
                text = next(
                    bytes(p.get_payload(decode=True)).decode("utf-8", "replace")
                    for p in parts
                    if p.get_content_type() == "text/plain"
                )
                with receiver._lock:
                    receiver.messages.append(Received(str(parsed["Subject"]), text))
                return "250 OK"

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any):
            login = (data.login.decode(), data.password.decode())
            receiver.logins.append(login)
            return AuthResult(success=login == (user, password))

        self._controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            server_hostname="localhost",
            authenticator=authenticator,
            auth_require_tls=False,
        )

    def url(self, user: str, password: str) -> str:
        return (
            f"mailto://{user}:{password}@127.0.0.1:{self.port}"
            "?smtp=127.0.0.1&from=alerts@example.com&to=oncall@example.com"
        )

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def __enter__(self) -> SmtpReceiver:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


class HttpReceiver:
    """Counts apprise json:// posts; answers HTTP 500 to the first ``fail_first`` requests, and to
    every request while ``failing`` is set."""

    def __init__(self, user: str, password: str, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.failing = False
        self.messages: list[Received] = []
        self.requests = 0
        self.failures = 0
        self._lock = threading.Lock()
        expected_auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                with receiver._lock:
                    receiver.requests += 1
                    failing = receiver.failing or receiver.requests <= receiver.fail_first
                    authorised = self.headers.get("Authorization") == expected_auth
                    if failing or not authorised:
                        receiver.failures += 1
                    else:
                        receiver.messages.append(Received(payload["title"], payload["message"]))
                self.send_response(500 if failing else 200 if authorised else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, user: str, password: str, path: str) -> str:
        return f"json://{user}:{password}@127.0.0.1:{self.port}/{path}"

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def __enter__(self) -> HttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.1)


def result_record(
    detector: str,
    dimensions: dict[str, str],
    interval: int,
    score: float,
    *,
    measure: str = "util",
    threshold: float = 70.0,
    confidence: float = 90.0,
    stage: str = "INFERENCE",
) -> dict[str, Any]:
    start = T0 + interval * INTERVAL_S
    return {
        "detectorName": detector,
        "measure": measure,
        "timeseriesId": timeseries_id(detector, measure, dimensions),
        "dimensionList": dimension_list(dimensions),
        "aggregatedMeasureValue": 40.0 + score,
        "anomalyScore": score,
        "anomalyDecisionThreshold": threshold,
        "anomalyDecision": int(score >= threshold),
        "anomalyConfidenceScore": confidence,
        "modelStage": stage,
        "expectedValue": 42.0,
        "processedDataPoints": 100 + interval,
        "detectionPeriodStartTime": format_time(start),
        "detectionPeriodEndTime": format_time(start + INTERVAL_S),
    }


def produce_results(bootstrap: str, topic: str, records: Iterable[dict[str, Any]]) -> None:
    """Write result records keyed by timeseriesId in one Kafka transaction."""
    from confluent_kafka import Producer

    from common.kafka_io import producer_config

    producer = Producer(
        producer_config(bootstrap, **{"transactional.id": f"alert-test-{time.monotonic_ns()}"})
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for record in records:
        producer.produce(topic, key=record["timeseriesId"].encode(), value=encode(record))
    producer.commit_transaction(30)
