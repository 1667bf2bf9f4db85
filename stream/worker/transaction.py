"""The transaction loop every stage runs: consume, process, produce, commit, in one Kafka
transaction per batch; retries, hung calls and the replacement of failed clients."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from common.kafka_io import consumer_config, produce_when_room, producer_config
from common.logs import DeadLetterLog, ThrottledLog
from common.retry import Backoff, RebuildBudget, is_transient, retry
from stream.config import DetectConfig
from stream.metrics import Heartbeat, WorkerMetrics
from stream.worker.errors import TransactionLost, WorkerError
from stream.worker.topics import MAX_RECORD_BYTES

log = logging.getLogger("anomstream.worker")

# Kafka record headers as confluent-kafka takes and returns them.
Headers = list[tuple[str, Any]]
T = TypeVar("T")
# How long past its own time-out a transactional call may take before it counts as hung.
CALL_GRACE_S = 5.0


class Stage:
    """A consume-process-produce loop committing through one transactional producer.

    Transient Kafka errors are retried with back-off (``common.retry``) for up to
    ``worker.retry_timeout``. A client that fails for good (fenced, ``_FATAL``) is replaced: the
    stage drops what it holds as on a lost assignment, makes new clients (whose
    ``init_transactions`` aborts the old producer's open transaction) and rejoins, restoring its
    partitions as on any assignment. More such failures than ``RebuildBudget`` allows (a second
    live worker with the same instance id) end the worker non-zero instead. See
    docs/decisions/0006-retries-and-fatal-errors.md.
    """

    name = "stage"

    def __init__(
        self,
        config: DetectConfig,
        instance_id: str,
        metrics: WorkerMetrics,
        stop: threading.Event,
        group_id: str,
        topics: list[str],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.stop = stop
        self.instance_id = instance_id
        self.group_id = group_id
        self.stall_s = config.worker.stall_timeout / 1000
        self.heartbeat = Heartbeat(self.stall_s)
        self.last_progress = time.monotonic()
        self.ready = False
        self.topics = topics
        self.backoff = Backoff(give_up_s=config.worker.retry_timeout / 1000)
        self.in_transaction = False
        self.transaction_began = 0.0
        self.commit_interval_s = config.worker.commit_interval_ms / 1000
        self.transaction_timeout_s = config.kafka.transaction_timeout / 1000
        self._rebuilds = RebuildBudget(f"{self.name} (instance {instance_id!r})")
        self._discarding = False
        self._errors = ThrottledLog(log, self.name)
        self.dead_letter_log = DeadLetterLog(log, self.name)
        self._connect()

    def _connect(self) -> None:
        kafka = self.config.kafka
        metrics = self.metrics
        self.producer = Producer(
            producer_config(
                kafka.bootstrap,
                security=kafka.security,
                **{
                    # Stable per instance and stage: a restarted worker fences its predecessor
                    # and aborts the transaction the predecessor left open, at once.
                    "transactional.id": f"{kafka.group_id}.{self.instance_id}.{self.name}",
                    "transaction.timeout.ms": kafka.transaction_timeout,
                    "message.max.bytes": MAX_RECORD_BYTES,
                    # Records are small and go to a broker nearby; compressing them costs CPU
                    # in the worker and the broker (snapshots are zlib-compressed already).
                    "compression.type": "none",
                },
            )
        )
        producer = self.producer
        self._call(lambda: self._txn(producer.init_transactions, 60.0, "init_transactions"),
                   "init_transactions")
        consumer_settings: dict[str, Any] = {
            "partition.assignment.strategy": "range",
            "session.timeout.ms": kafka.session_timeout,
            "heartbeat.interval.ms": max(500, kafka.session_timeout // 5),
            "statistics.interval.ms": 5000,
            "stats_cb": lambda stats: metrics.observe_stats(self.name, stats),
            "fetch.max.bytes": MAX_RECORD_BYTES * 2,
        }
        if kafka.static_membership:
            consumer_settings["group.instance.id"] = f"{self.instance_id}.{self.name}"
        self.consumer = Consumer(
            consumer_config(
                kafka.bootstrap, self.group_id, security=kafka.security, **consumer_settings
            )
        )

    def _call(self, call: Callable[[], T], what: str) -> T:
        """``call()`` with transient Kafka errors retried for up to ``worker.retry_timeout``."""
        return retry(call, f"{self.name}: {what}", backoff=self.backoff)

    def _bounded(self, call: Callable[[], T], timeout_s: float, what: str) -> T:
        """``call()`` (a transactional API call given ``timeout_s``), which must return in time.

        librdkafka's transactional calls take a time-out, but after a broker restart
        ``send_offsets_to_transaction`` was seen blocking for minutes past it (2.16, its
        consumer's session expired meanwhile). The call runs in a helper thread; if it has not
        returned ``CALL_GRACE_S`` after its own time-out the transaction counts as lost and
        ``run`` replaces the clients (the stuck thread ends with its old client).
        """
        outcome: list[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                outcome.append((True, call()))
            except BaseException as error:  # handed to the caller's thread
                outcome.append((False, error))
            finally:
                done.set()

        threading.Thread(target=run, name=f"{self.name}-{what}", daemon=True).start()
        if not done.wait(timeout_s + CALL_GRACE_S):
            raise TransactionLost(
                f"{what} did not return within {timeout_s + CALL_GRACE_S:.0f} s"
            )
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        return cast(T, value)

    # -- transactions -------------------------------------------------------------------------

    def begin(self) -> None:
        if not self.in_transaction:
            self._call(self.producer.begin_transaction, "begin_transaction")  # local, no I/O
            self.in_transaction = True
            self.transaction_began = time.monotonic()

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
        partition: int = -1,
    ) -> None:
        self.begin()
        produce_when_room(self.producer, topic, value, key, partition=partition, headers=headers)

    def offsets_to_commit(self) -> list[TopicPartition]:
        raise NotImplementedError

    def prepare_commit(self, checkpoint: Iterable[int] = ()) -> None:
        """Last writes of a transaction (the score stage's snapshots)."""

    def committed(self, offsets: list[TopicPartition]) -> None:
        """After a successful commit."""

    def aborted(self) -> None:
        """After an aborted transaction: the in-memory state is ahead of Kafka; rewind it."""
        raise NotImplementedError

    def forget(self) -> None:
        """Drop everything held for the assignment, as when partitions are lost."""
        raise NotImplementedError

    def commit(self, checkpoint: Iterable[int] = ()) -> bool:
        """Commit the open transaction: what the batches since the last commit produced and the
        offsets they consumed become visible together, or not at all.

        The steps, in this order (docs/decisions/0002-exactly-once.md):

        1. Last writes: the score stage's snapshots and checkpoint markers (``prepare_commit``;
           the partitions in ``checkpoint`` are checkpointed whole), so a checkpoint is committed
           with exactly the offsets it describes.
        2. Nothing produced and no offset moved: no transaction, nothing to commit.
        3. Add the consumed offsets to the transaction (``send_offsets_to_transaction``).
        4. Commit the transaction: results, dead letters, repartitioned records, snapshots,
           markers and offsets together.
        5. On failure: an abortable error aborts the transaction and rewinds the in-memory state
           to what Kafka holds (``aborted``); a transaction that cannot be committed within
           ``transaction.timeout.ms`` is lost (``TransactionLost``), and a fatal error goes up;
           for both ``run`` replaces the clients and restores.
        6. After success: count it and let the stage record its committed offsets
           (``committed``).

        Returns False when the transaction was aborted (and the state rewound), else True.
        """
        # 1. Last writes of the transaction (snapshots, checkpoint markers).
        self.prepare_commit(checkpoint)
        # 2. No transaction open: nothing to commit.
        if not self.in_transaction:
            return True
        offsets = self.offsets_to_commit()
        began = time.perf_counter()
        # The broker aborts a transaction older than transaction.timeout.ms on its own, so
        # retrying its calls longer is pointless; a transaction that cannot be committed in
        # that time is lost, and new clients restore what Kafka holds (``run``).
        deadline = self.transaction_began + self.transaction_timeout_s
        in_transaction = Backoff(give_up_s=max(1.0, deadline - time.monotonic()))

        def time_left() -> float:
            return min(60.0, max(1.0, deadline - time.monotonic()))

        producer = self.producer

        try:
            # 3. The consumed offsets join the transaction.
            if offsets:
                metadata = self.consumer.consumer_group_metadata()
                retry(
                    lambda: self._txn(
                        lambda timeout: producer.send_offsets_to_transaction(
                            offsets, metadata, timeout
                        ),
                        time_left(), "send_offsets_to_transaction",
                    ),
                    f"{self.name}: send_offsets_to_transaction", backoff=in_transaction,
                )
            # 4. Commit. A timed-out commit goes on in the background; calling again waits for
            # its outcome.
            retry(lambda: self._txn(producer.commit_transaction, time_left(),
                                    "commit_transaction"),
                  f"{self.name}: commit_transaction", backoff=in_transaction)
        except KafkaException as error:
            # 5. Failed: lost (transient past the time-out), fatal, or aborted and rewound.
            kafka_error = error.args[0]
            if is_transient(error):
                raise TransactionLost(
                    f"the transaction could not be committed within transaction.timeout.ms: "
                    f"{kafka_error}"
                ) from error
            if not kafka_error.txn_requires_abort():
                raise  # fatal: ``run`` replaces the clients
            log.warning("%s: aborting transaction: %s", self.name, kafka_error)
            self._abort()
            self.in_transaction = False
            self.metrics.transactions.labels(self.name, "aborted").inc()
            self.aborted()
            return False
        # 6. Committed: the stage's own bookkeeping follows.
        self.in_transaction = False
        self.last_progress = time.monotonic()
        self.metrics.commit_seconds.labels(self.name).observe(time.perf_counter() - began)
        self.metrics.transactions.labels(self.name, "committed").inc()
        self.committed(offsets)
        return True

    def _abort(self) -> None:
        producer = self.producer
        self._call(lambda: self._txn(producer.abort_transaction, 60.0, "abort_transaction"),
                   "abort_transaction")

    def _txn(self, call: Callable[[float], Any], timeout_s: float, what: str) -> Any:
        return self._bounded(lambda: call(timeout_s), timeout_s, what)

    def abort_if_open(self) -> None:
        if self.in_transaction:
            self._abort()
            self.in_transaction = False
            self.metrics.transactions.labels(self.name, "aborted").inc()

    # -- loop ---------------------------------------------------------------------------------

    def subscribe(self) -> None:
        self.consumer.subscribe(
            self.topics, on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost,
        )

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._on_assign(consumer, partitions)
        self.last_progress = time.monotonic()

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._discarding:  # a replaced client's partitions were forgotten already
            self._on_revoke(consumer, partitions)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._discarding:
            self._on_lost(consumer, partitions)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        raise NotImplementedError

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        raise NotImplementedError

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        raise NotImplementedError

    def process(self, messages: list[Any]) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except (KafkaException, TransactionLost) as error:
                # Recovered inside the handler, so that the error (and the frames of its
                # traceback, with the batch and the models they held) is dropped before the
                # loop runs again instead of living until the next failure.
                self._recover(error)

    def _recover(self, failure: Exception) -> None:
        """New clients, as often as the rebuild budget allows."""
        while True:
            if isinstance(failure, KafkaException) and is_transient(failure):
                # Retried for worker.retry_timeout in vain.
                raise WorkerError(f"{self.name}: Kafka unavailable: {failure}") from failure
            if self.stop.is_set():
                raise WorkerError(f"{self.name}: stopped with a failed client: {failure}") \
                    from failure
            try:
                self._rebuild(failure)
                return
            except (KafkaException, TransactionLost) as error:
                failure = error

    def _loop(self) -> None:
        self.subscribe()
        batch = self.config.worker.max_batch
        while not self.stop.is_set():
            self.heartbeat.beat()
            messages = self.consumer.consume(batch, self.poll_timeout_s())
            if messages:
                self.process(messages)
            if self.in_transaction and (
                time.monotonic() - self.transaction_began >= self.commit_interval_s
            ):
                self.commit()
            self.tick()
            self.dead_letter_log.report()
        self.commit()
        self.consumer.close()  # revokes (commits/checkpoints) and leaves the group
        self.abort_if_open()
        self.dead_letter_log.report(force=True)

    def _rebuild(self, error: Exception) -> None:
        """New clients after a fatal error; the assignment is restored as after a rebalance."""
        self._rebuilds.spend(error)
        log.warning("%s: %s; replacing the Kafka clients and rejoining the group", self.name,
                    error)
        self.metrics.client_rebuilds.labels(self.name).inc()
        self.ready = False
        self.forget()
        self.in_transaction = False
        self._discarding = True
        try:
            self.consumer.close()
        except Exception as close_error:  # the failed client may refuse; it is dropped anyway
            log.info("%s: closing the failed consumer: %s", self.name, close_error)
        finally:
            self._discarding = False
        with contextlib.suppress(Exception):
            # Its open transaction is aborted by the new producer's init_transactions.
            self.producer.purge()
        self._connect()

    def consumer_error(self, message: Any) -> None:
        """A consume error: fatal ones replace the clients; others are logged, each text at most
        once per 10 s (a broker outage repeats the same one for minutes)."""
        error = message.error()
        if error.fatal() or error.code() == KafkaError._FATAL:
            raise KafkaException(error)
        self._errors.warn(str(error))

    def stalled(self) -> bool:
        """Lag and no record consumed or transaction committed for ``worker.stall_timeout``."""
        return (
            self.metrics.stage_lag.get(self.name, 0) > 0
            and time.monotonic() - self.last_progress > self.stall_s
        )

    def tick(self) -> None:
        """Housekeeping once per loop turn."""

    def poll_timeout_s(self) -> float:
        """How long a loop turn waits for records: briefly, unless ``tick`` has work to do."""
        return 0.05

    def close(self) -> None:
        self.producer.flush(10)
