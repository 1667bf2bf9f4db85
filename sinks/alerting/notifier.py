"""Delivery: a durable outbox drained per receiver, with retry/backoff and a rate limit.

Each receiver has its own worker thread and its own FIFO slice of the outbox, so a receiver that
fails or hangs delays only its own messages. The main thread owns the outbox (it is persisted with
the alert state); workers only send and report back.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from sinks.alerting.config import Delivery, Receiver
from sinks.alerting.messages import Message
from sinks.alerting.redact import Redactor, redacted_url

log = logging.getLogger(__name__)

DELIVERED = Counter(
    "anomstream_alert_notifications_delivered_total",
    "Notifications delivered, by receiver.",
    ["receiver"],
)
FAILED_ATTEMPTS = Counter(
    "anomstream_alert_delivery_failures_total",
    "Failed delivery attempts (each is retried with backoff), by receiver.",
    ["receiver"],
)
GIVEN_UP = Counter(
    "anomstream_alert_notifications_dropped_total",
    "Notifications dropped after give_up_after of failed attempts, by receiver.",
    ["receiver"],
)
PENDING = Gauge(
    "anomstream_alert_outbox_pending",
    "Notifications waiting in the outbox, by receiver.",
    ["receiver"],
)


class DeliveryError(Exception):
    """A delivery attempt failed; the message is already redacted."""


@dataclass
class OutboxEntry:
    id: int
    receiver: str
    title: str
    body: str
    notify_type: str
    created: float
    attempts: int = 0
    next_attempt: float = 0.0
    in_flight: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("in_flight")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutboxEntry:
        return cls(**data)


def backoff(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failure: doubling, capped.

    >>> [backoff(n, 1.0, 10.0) for n in (1, 2, 3, 4, 5)]
    [1.0, 2.0, 4.0, 8.0, 10.0]
    """
    return float(min(maximum, initial * 2 ** max(0, attempts - 1)))


class TokenBucket:
    """``capacity`` messages per ``per`` seconds, refilled continuously."""

    def __init__(self, capacity: int, per: float) -> None:
        self.capacity = capacity
        self.rate = capacity / per if per > 0 else float("inf")
        self.tokens = float(capacity)
        self.updated: float | None = None

    def take(self, now: float) -> bool:
        if self.updated is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


Send = Callable[[OutboxEntry], None]


class AppriseSender:
    """Sends to one receiver's apprise URL; failures become redacted DeliveryErrors."""

    def __init__(self, receiver: Receiver, timeout: float, redactor: Redactor) -> None:
        self.name = receiver.name
        self._redact = redactor
        self._timeout = timeout
        self._url = receiver.resolved_url()
        self._tags = receiver.tags or None
        self._apprise()  # fail at start-up, not at the first page, on a URL apprise rejects

    def _apprise(self) -> Any:
        """A fresh apprise object per send.

        apprise throttles each service object by a fixed delay (5.5 s for e-mail); pacing is
        the receiver's own ``rate_limit`` here, so a burst of pages is not held back by it.
        """
        import apprise

        instance = apprise.Apprise()
        if not instance.add(self._url, tag=self._tags):
            raise ValueError(
                f"receiver {self.name}: apprise cannot use the URL {redacted_url(self._url)}"
            )
        return instance

    def __call__(self, entry: OutboxEntry) -> None:
        try:
            result = self._apprise().notify(
                body=entry.body,
                title=entry.title,
                notify_type=entry.notify_type,
                body_format="text",
                timeout=self._timeout,
            )
        except Exception as error:  # apprise plugins may raise anything; keep the loop alive
            raise DeliveryError(self._redact(f"{type(error).__name__}: {error}")) from None
        if not result:
            reasons = [e.message for e in result.logs() if e.level in ("WARNING", "ERROR")]
            detail = "; ".join(reasons[-3:]) or f"status {result.status.name}"
            raise DeliveryError(self._redact(detail))


class _Worker(threading.Thread):
    def __init__(self, name: str, send: Send, results: queue.Queue[tuple[str, int, str | None]]):
        super().__init__(name=f"alert-deliver-{name}", daemon=True)
        self.receiver = name
        self._send = send
        self._results = results
        self.inbox: queue.Queue[OutboxEntry | None] = queue.Queue(maxsize=1)

    def run(self) -> None:
        while True:
            entry = self.inbox.get()
            if entry is None:
                return
            try:
                self._send(entry)
            except DeliveryError as error:
                self._results.put((self.receiver, entry.id, str(error) or "failed"))
            except Exception as error:  # never let a worker die silently
                self._results.put((self.receiver, entry.id, f"{type(error).__name__}"))
            else:
                self._results.put((self.receiver, entry.id, None))


class Dispatcher:
    """Owns the outbox; hands due entries to idle per-receiver workers and applies results."""

    def __init__(
        self,
        senders: dict[str, Send],
        receivers: Iterable[Receiver],
        delivery: Delivery,
        entries: Iterable[OutboxEntry] = (),
        next_id: int = 1,
    ) -> None:
        self.delivery = delivery
        self.entries: list[OutboxEntry] = sorted(entries, key=lambda e: e.id)
        self.next_id = max([next_id, *(e.id + 1 for e in self.entries)])
        self._results: queue.Queue[tuple[str, int, str | None]] = queue.Queue()
        self._workers = {name: _Worker(name, send, self._results) for name, send in senders.items()}
        self._busy: set[str] = set()
        self._buckets = {
            r.name: TokenBucket(r.rate_limit.messages, r.rate_limit.per) for r in receivers
        }
        for worker in self._workers.values():
            worker.start()
        self._update_gauges()

    def enqueue(self, message: Message, receivers: Iterable[str], now: float) -> list[OutboxEntry]:
        added = []
        for receiver in receivers:
            entry = OutboxEntry(
                self.next_id, receiver, message.title, message.body, message.notify_type, now
            )
            self.next_id += 1
            self.entries.append(entry)
            added.append(entry)
        self._update_gauges()
        return added

    def collect(self, now: float, wait: float = 0.0) -> bool:
        """Apply finished attempts; True when the outbox changed (and should be persisted)."""
        changed = False
        while True:
            try:
                receiver, entry_id, error = self._results.get(timeout=wait) if wait else (
                    self._results.get_nowait()
                )
            except queue.Empty:
                break
            wait = 0.0
            self._busy.discard(receiver)
            entry = next((e for e in self.entries if e.id == entry_id), None)
            if entry is None:
                continue
            entry.in_flight = False
            entry.attempts += 1
            changed = True
            if error is None:
                self.entries.remove(entry)
                DELIVERED.labels(receiver).inc()
                log.info("delivered notification %d to %s: %s", entry.id, receiver, entry.title)
            elif now - entry.created >= self.delivery.give_up_after:
                self.entries.remove(entry)
                GIVEN_UP.labels(receiver).inc()
                log.error(
                    "giving up on notification %d to %s after %d attempts: %s",
                    entry.id, receiver, entry.attempts, error,
                )
            else:
                FAILED_ATTEMPTS.labels(receiver).inc()
                delay = backoff(
                    entry.attempts, self.delivery.initial_backoff, self.delivery.max_backoff
                )
                entry.next_attempt = now + delay
                log.warning(
                    "delivery of notification %d to %s failed (attempt %d), retrying in %.1fs: %s",
                    entry.id, receiver, entry.attempts, delay, error,
                )
        if changed:
            self._update_gauges()
        return changed

    def dispatch(self, now: float) -> None:
        """Start the next due entry of every idle receiver (FIFO per receiver, rate-limited)."""
        heads: dict[str, OutboxEntry] = {}
        for entry in self.entries:
            heads.setdefault(entry.receiver, entry)
        for receiver, entry in heads.items():
            worker = self._workers.get(receiver)
            if worker is None:
                log.error("notification %d is for unknown receiver %s; dropped", entry.id, receiver)
                self.entries.remove(entry)
                continue
            if receiver in self._busy or entry.in_flight or entry.next_attempt > now:
                continue
            if not self._buckets[receiver].take(now):
                continue
            entry.in_flight = True
            self._busy.add(receiver)
            worker.inbox.put(entry)

    def pending(self) -> int:
        return len(self.entries)

    def idle(self) -> bool:
        return not self.entries and not self._busy

    def close(self, wait: float = 5.0) -> None:
        deadline = time.monotonic() + wait
        for worker in self._workers.values():
            with contextlib.suppress(queue.Full):
                worker.inbox.put(None, timeout=max(0.0, deadline - time.monotonic()))
        for worker in self._workers.values():
            worker.join(timeout=max(0.0, deadline - time.monotonic()))

    def _update_gauges(self) -> None:
        counts = dict.fromkeys(self._workers, 0)
        for entry in self.entries:
            counts[entry.receiver] = counts.get(entry.receiver, 0) + 1
        for receiver, count in counts.items():
            PENDING.labels(receiver).set(count)
