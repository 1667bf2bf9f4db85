"""The ``detect`` worker: two transactional consume-process-produce stages.

- ``RouteStage`` (group ``<group_id>``) reads the input topics, validates records and forwards
  each series point to the repartition topic keyed by timeseriesId, so every series has exactly
  one owner whatever input partition its records came in on. Bad records go to the dead-letter
  topic with their original bytes.
- ``ScoreStage`` (group ``<group_id>.score``) owns partitions of the repartition topic: per
  series event-time windows and a detector; each closed window yields one result record.

Both commit with Kafka transactions: what a batch produced (results, dead letters, repartitioned
records, snapshots) and the input offsets it consumed become visible together or not at all.
State recovery (snapshots + replay with suppressed output) is explained in
docs/decisions/0002-exactly-once.md and in ``ScoreStage._restore``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from common.kafka_io import consumer_config, create_topics, producer_config
from common.logs import DeadLetterLog, ThrottledLog
from common.retry import Backoff, RebuildBudget, is_transient, retry
from contract.records import encode_head, encode_result
from stream.config import DetectConfig
from stream.metrics import Heartbeat, WorkerMetrics
from stream.routing import (
    LATE,
    NO_DETECTOR,
    UNEXPECTED,
    InvalidRecord,
    Rejection,
    Router,
    load_object,
)
from stream.state import (
    CHECKPOINT_KEY,
    Series,
    decode_checkpoint,
    decode_snapshot,
    encode_checkpoint,
    snapshot_header,
)
from stream.windowing import ClosedWindow, LateRecord, PartitionClock, SeriesWindows

if TYPE_CHECKING:
    from detectors import Result

log = logging.getLogger("anomstream.worker")

# Snapshots of big forests exceed Kafka's default 1 MB record limit.
MAX_RECORD_BYTES = 16 * 1024 * 1024
_EVENT = struct.Struct(">q")
# Kafka record headers as confluent-kafka takes and returns them.
Headers = list[tuple[str, Any]]
T = TypeVar("T")
# How long past its own time-out a transactional call may take before it counts as hung.
CALL_GRACE_S = 5.0
# Header positions of a repartition record, written by RouteStage, read by ScoreStage.
_H_DETECTOR, _H_EVENT, _H_SOURCE_TOPIC, _H_SOURCE_PARTITION, _H_SOURCE_OFFSET = range(5)


class WorkerError(Exception):
    """The worker cannot go on (fenced by a newer instance, broker unreachable, bad topics)."""


class TransactionLost(Exception):
    """A transaction outlived transaction.timeout.ms uncommitted (the broker aborts it)."""


def default_instance_id() -> str:
    return socket.gethostname()


def ensure_topics(config: DetectConfig) -> None:
    """Create the worker's own topics; the repartition and state topics must match partitions."""
    topics = config.topics
    bootstrap, security = config.kafka.bootstrap, config.kafka.security
    replication: dict[str, Any] = {
        "replication_factor": topics.replication,
        "min_insync_replicas": topics.min_insync_replicas,
        "security": security,
    }
    create_topics(bootstrap, [topics.repartition, topics.output, topics.dead_letter],
                  partitions=topics.partitions, **replication)
    create_topics(
        bootstrap, [topics.state], partitions=topics.partitions, compacted=True, **replication,
        config={
            "max.message.bytes": str(MAX_RECORD_BYTES),
            # Compact eagerly: a restore reads the whole partition, superseded snapshots included.
            "segment.ms": "60000",
            "min.cleanable.dirty.ratio": "0.1",
        },
    )
    admin_consumer = Consumer(consumer_config(bootstrap, security=security))
    try:
        metadata = admin_consumer.list_topics(timeout=30)
        counts = {
            name: len(metadata.topics[name].partitions)
            for name in (topics.repartition, topics.state)
        }
    finally:
        admin_consumer.close()
    if counts[topics.repartition] != counts[topics.state]:
        raise WorkerError(
            f"topics {topics.repartition} and {topics.state} must have the same number of "
            f"partitions (have {counts[topics.repartition]} and {counts[topics.state]})"
        )


class _Stage:
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
        while True:
            try:
                self.producer.produce(topic, value, key, partition=partition, headers=headers)
                return
            except BufferError:  # local queue full: let librdkafka send, then retry
                self.producer.poll(0.05)

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

    def commit(self, checkpoint: Iterable[int] = ()) -> None:
        self.prepare_commit(checkpoint)
        if not self.in_transaction:
            return
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
            # A timed-out commit goes on in the background; calling again waits for its outcome.
            retry(lambda: self._txn(producer.commit_transaction, time_left(),
                                    "commit_transaction"),
                  f"{self.name}: commit_transaction", backoff=in_transaction)
        except KafkaException as error:
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
            return
        self.in_transaction = False
        self.last_progress = time.monotonic()
        self.metrics.commit_seconds.labels(self.name).observe(time.perf_counter() - began)
        self.metrics.transactions.labels(self.name, "committed").inc()
        self.committed(offsets)

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
                failure: Exception = error
            while True:  # new clients, as often as the rebuild budget allows
                if isinstance(failure, KafkaException) and is_transient(failure):
                    # Retried for worker.retry_timeout in vain.
                    raise WorkerError(f"{self.name}: Kafka unavailable: {failure}") from failure
                if self.stop.is_set():
                    raise WorkerError(f"{self.name}: stopped with a failed client: {failure}") \
                        from failure
                try:
                    self._rebuild(failure)
                    break
                except (KafkaException, TransactionLost) as error:
                    failure = error

    def _loop(self) -> None:
        self.subscribe()
        batch = self.config.worker.max_batch
        while not self.stop.is_set():
            self.heartbeat.beat()
            messages = self.consumer.consume(batch, 0.05)
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

    def close(self) -> None:
        self.producer.flush(10)


class RouteStage(_Stage):
    name = "route"

    def __init__(
        self, config: DetectConfig, instance_id: str, metrics: WorkerMetrics,
        stop: threading.Event,
    ) -> None:
        super().__init__(config, instance_id, metrics, stop, config.kafka.group_id,
                         config.input_topics)
        self.router = Router(config.detectors)
        self.offsets: dict[tuple[str, int], int] = {}
        self.assignment: list[TopicPartition] = []
        self._in = {topic: metrics.records_in.labels(self.name, topic) for topic in self.topics}
        self._forwarded = metrics.records_out.labels("repartition")
        repartition = config.topics.repartition
        metadata = self.producer.list_topics(repartition, timeout=30).topics[repartition]
        self.repartition_partitions = sorted(metadata.partitions)
        # Ticks of an input partition's stream time go out at most once per the shortest
        # interval of the detectors reading its topic (see ``_tick``).
        self.tick_ms = {
            topic: min(spec.interval_ms for spec in config.detectors if spec.input == topic)
            for topic in self.topics
        }
        self.ticked: dict[tuple[str, int], int] = {}  # input partition -> last tick's bucket

    def _tick(self, topic: str, partition: int, event_ms: int, source: Headers) -> None:
        """Tell every score partition how far this input partition's event time has come.

        A score partition sees only the records of its own series; a series that went silent
        alone in its partition would otherwise never have its windows closed. A tick is a record
        without key or value whose headers hold an empty detector name, the event time and the
        source. It is derived from the input alone (sent when the input partition's event time
        enters a new tick interval), so the score stage stays deterministic on replay; a
        restarted route stage sends one more tick, which changes nothing.
        """
        key = (topic, partition)
        bucket = event_ms // self.tick_ms[topic]
        if bucket <= self.ticked.get(key, -1):
            return
        self.ticked[key] = bucket
        headers: Headers = [("detector", b""), ("event", _EVENT.pack(event_ms)), *source]
        repartition = self.config.topics.repartition
        for number in self.repartition_partitions:
            self.produce(repartition, None, None, headers, partition=number)

    def process(self, messages: list[Any]) -> None:
        repartition = self.config.topics.repartition
        detectors = self.router.detectors
        forwarded = 0
        consumed: dict[str, int] = {}
        for message in messages:
            if message.error() is not None:
                self.consumer_error(message)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            value = message.value()
            try:
                points, rejections = self.router.route(topic, value)
            except Exception as error:  # a record no rule foresaw must not stop the worker
                if not self.dead_letter_log.counts[UNEXPECTED]:  # one traceback per summary
                    log.exception("route: unexpected failure on %s/%d@%d", topic, partition,
                                  offset)
                points, rejections = [], [Rejection(UNEXPECTED, f"{type(error).__name__}: {error}")]
            source: Headers = [
                ("source_topic", topic),
                ("source_partition", str(partition)),
                ("source_offset", str(offset)),
            ]
            for point in points:
                event = _EVENT.pack(point.event_ms) + struct.pack(
                    f">{len(point.values)}d", *point.values
                )
                self.produce(
                    repartition, value, point.timeseries_id,
                    [("detector", detectors[point.detector].name), ("event", event), *source],
                )
            forwarded += len(points)
            if points:
                self._tick(topic, partition, max(point.event_ms for point in points), source)
            if rejections:
                first = rejections[0]
                headers: Headers = [
                    ("reason", first.reason),
                    ("detail", "; ".join(r.detail for r in rejections)),
                    *source,
                ]
                if first.detector:
                    headers.append(("detector", first.detector))
                self.produce(self.config.topics.dead_letter, value, message.key(), headers)
                self.metrics.dead_letters.labels(first.reason).inc()
                self.dead_letter_log.count(first.reason)
            self.begin()
            self.offsets[(topic, partition)] = offset + 1
            consumed[topic] = consumed.get(topic, 0) + 1
        self._forwarded.inc(forwarded)
        for topic, count in consumed.items():
            self._in[topic].inc(count)
        if consumed:
            self.last_progress = time.monotonic()

    def offsets_to_commit(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in self.offsets.items()]

    def committed(self, offsets: list[TopicPartition]) -> None:
        self.offsets.clear()

    def aborted(self) -> None:
        self.offsets.clear()
        self.ticked.clear()  # the aborted ticks are sent again with the records they came with
        if self.assignment:
            committed = self._call(lambda: self.consumer.committed(self.assignment, 60),
                                   "reading committed offsets")
            for tp in committed:
                self.consumer.seek(
                    TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0
                                   else OFFSET_BEGINNING)
                )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment = list(partitions)
        self.ready = True

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.commit()
        self.assignment = []

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.abort_if_open()
        self.forget()

    def forget(self) -> None:
        self.offsets.clear()
        self.ticked.clear()
        self.assignment = []


class _Partition:
    """What the score stage holds for one owned repartition partition."""

    __slots__ = ("checkpoint_offset", "checkpointed_at", "clock", "committed", "live",
                 "next_offset", "number", "round_clock", "round_offset", "round_pending",
                 "stored")

    def __init__(self, number: int, start: int, committed: int, clock: PartitionClock) -> None:
        self.number = number
        self.clock = clock  # stream time per input partition, after the records below next_offset
        self.next_offset = start  # one past the last record applied
        self.committed = committed  # records below were processed and committed already
        self.checkpoint_offset = start
        self.checkpointed_at = time.monotonic()
        self.live: dict[str, Series] = {}
        self.stored: dict[str, bytes] = {}  # snapshots of series not in memory
        self.round_offset: int | None = None  # offset of the checkpoint being written
        self.round_clock: dict[str, Any] = {}  # the clock at that offset
        self.round_pending: list[str] = []  # series still to snapshot in that checkpoint


class _Due:
    """A closed window waiting for its series' detector (``ScoreStage._flush``)."""

    __slots__ = ("error", "headers", "message", "no_data", "result", "series", "window")

    def __init__(
        self, series: Series, window: ClosedWindow, message: Any, headers: Headers,
        no_data: bool,
    ) -> None:
        self.series = series
        self.window = window
        self.message = message  # the record that closed it, and its headers: for a dead letter
        self.headers = headers
        self.no_data = no_data  # the series had been silent for its no_data_after by the end
        self.result: Result | None = None
        self.error: str | None = None


# A record to produce: topic, value, key, headers.
_Output = tuple[str, bytes | None, str | None, Headers]


class ScoreStage(_Stage):
    name = "score"

    def __init__(
        self, config: DetectConfig, instance_id: str, metrics: WorkerMetrics,
        stop: threading.Event,
    ) -> None:
        super().__init__(config, instance_id, metrics, stop, f"{config.kafka.group_id}.score",
                         [config.topics.repartition])
        self.router = Router(config.detectors)
        self.spec_index = {spec.name: i for i, spec in enumerate(config.detectors)}
        self.partitions: dict[int, _Partition] = {}
        self.lru: OrderedDict[str, Series] = OrderedDict()
        self.max_live = config.worker.max_live_models
        self.max_fill = config.worker.max_fill_intervals
        self.snapshot_interval_s = config.worker.snapshot_interval_ms / 1000
        self.snapshots_per_commit = config.worker.snapshots_per_commit
        # A jump of an input's stream time this long is the whole input pausing (PartitionClock).
        self.pause_ms = min(
            (spec.no_data_after for spec in config.detectors if spec.no_data_after), default=None
        )
        self._last_gauges = 0.0
        self._in = metrics.records_in.labels(self.name, config.topics.repartition)
        self._results = metrics.records_out.labels("result")
        self._windows = {spec.name: metrics.windows_closed.labels(spec.name)
                         for spec in config.detectors}
        self._anomalies = {spec.name: metrics.anomalies.labels(spec.name)
                           for spec in config.detectors}
        self._scoring = metrics.scoring_seconds
        # Closed windows not yet scored, by series, and what the batch produces, in order:
        # result records (their windows) and dead letters.
        self._due: dict[Series, list[_Due]] = {}
        self._outbox: list[_Due | _Output] = []

    # -- processing ---------------------------------------------------------------------------

    def process(self, messages: list[Any]) -> None:
        """Window the batch's records in offset order, then score the windows they closed.

        Scoring is grouped by series (each series' windows consecutively, in closing order):
        its forest then stays in the CPU caches across its windows, where record order would
        touch every forest of the batch once per window. A series' results depend only on its
        own windows, so the grouping changes no result; what the batch yields is produced in
        the order it arose, so the output topics are the same as with record-order scoring.
        """
        consumed = False
        ticks = 0
        for message in messages:
            if message.error() is not None:
                self.consumer_error(message)
                continue
            consumed = True
            part = self.partitions.get(message.partition())
            if part is None:  # a record fetched just before its partition was revoked
                continue
            offset = message.offset()
            live_output = offset >= part.committed
            headers = message.headers() or []
            event = headers[_H_EVENT][1]
            event_ms: int = _EVENT.unpack_from(event)[0]
            source = (headers[_H_SOURCE_TOPIC][1] + b"/" + headers[_H_SOURCE_PARTITION][1]).decode()
            if headers[_H_DETECTOR][1]:
                self._apply(part, message, headers, event, event_ms, source, live_output)
            else:  # a tick of the input's time (RouteStage._tick)
                ticks += 1
            # Every record moves its input's stream time, also one skipped or late: the clock is
            # a function of the partition's records, so a replay closes the same windows.
            self._advance_clock(part, source, event_ms, message, headers, live_output)
            part.next_offset = offset + 1
        self._flush()
        if not self.in_transaction and any(
            p.next_offset > p.committed for p in self.partitions.values()
        ):
            self.begin()  # offsets advanced (even without output): commit them on schedule
        # Input records only: ticks are the route stage's bookkeeping, not records consumed.
        self._in.inc(len(messages) - ticks)
        if consumed:
            self.last_progress = time.monotonic()

    def _apply(
        self, part: _Partition, message: Any, headers: Headers, event: bytes, event_ms: int,
        source: str, live_output: bool,
    ) -> None:
        """Window one record into its series."""
        tsid = message.key().decode()
        series = self._series(part, tsid, headers, message.value(), live_output)
        if series is None or message.offset() < series.skip_below:
            return
        values = struct.unpack_from(f">{len(series.spec.measures)}d", event, 8)
        try:
            closed = series.windows.add(event_ms, values)
        except LateRecord as late:
            if live_output:
                self._dead_letter(message, headers, LATE, str(late))
            return
        series.dirty = True
        series.source = source
        self._closed(part, series, closed, message, headers, live_output)

    def _advance_clock(
        self, part: _Partition, source: str, event_ms: int, message: Any, headers: Headers,
        live_output: bool,
    ) -> None:
        """Close the windows that the stream time of ``source`` has passed, in every series
        of that input partition, whether it sent anything lately or not."""
        clock = part.clock
        for tsid in clock.due(source, clock.observe(source, event_ms)):
            series = self.lru.get(tsid) or self._stored_series(part, tsid)
            if series is None:  # its detector was removed from the configuration
                continue
            closed = series.windows.advance(clock.times[source] - series.spec.delay_ms)
            series.dirty = True
            self._closed(part, series, closed, message, headers, live_output)

    def _closed(
        self, part: _Partition, series: Series, closed: list[ClosedWindow], message: Any,
        headers: Headers, live_output: bool,
    ) -> None:
        """Queue the windows that closed for scoring; schedule the series' next close."""
        spec = series.spec
        if closed:
            no_data_after = spec.no_data_after
            since = part.clock.silent_since
            due = [
                _Due(
                    series, window, message, headers,
                    no_data_after is not None and window.records == 0
                    and window.end_ms - since(series.source, window.last_data_ms) >= no_data_after,
                )
                for window in closed
            ]
            pending = self._due.get(series)
            if pending is None:
                self._due[series] = due
            else:
                pending.extend(due)
            if live_output:
                self._outbox.extend(due)
        next_close = series.windows.next_close_ms()
        part.clock.schedule(
            series.timeseries_id, series.source,
            None if next_close is None else next_close + spec.delay_ms,
        )

    def _flush(self) -> None:
        """Score the pending windows series by series; produce the outbox in its order."""
        perf = time.perf_counter
        observe = self._scoring.observe
        scored = 0
        traced = False
        for series, windows in self._due.items():
            detector = series.detector
            for due in windows:
                window = due.window
                began = perf()
                try:
                    due.result = detector.update(window.start_ms / 1000, window.values)
                except Exception as error:  # deterministic, so a replay fails the same way
                    if not traced and not self.dead_letter_log.counts[UNEXPECTED]:
                        traced = True  # one traceback per summary interval, not per window
                        log.exception("score: series %s, window %d", series.timeseries_id,
                                      window.start_ms)
                    due.error = f"{type(error).__name__}: {error}"
                    continue
                observe(perf() - began)
                scored += 1
            self._windows[series.spec.name].inc(len(windows))
        self._due.clear()
        output = self.config.topics.output
        produce = self.produce
        for entry in self._outbox:
            if isinstance(entry, tuple):  # a dead letter
                produce(*entry)
            elif entry.result is not None:
                series = entry.series
                produce(output,
                        _result_record(series, entry.window, entry.result, entry.no_data),
                        series.timeseries_id)
                if entry.result.anomaly_decision:
                    self._anomalies[series.spec.name].inc()
            else:
                produce(*self._dead_letter_args(entry.message.value(), entry.headers,
                                                UNEXPECTED, entry.error or ""))
        self._outbox.clear()
        self._results.inc(scored)

    def _series(
        self, part: _Partition, tsid: str, headers: Headers, value: bytes | None,
        live_output: bool,
    ) -> Series | None:
        series = self.lru.get(tsid)
        if series is not None:
            self.lru.move_to_end(tsid)
            return series
        detector_name = headers[_H_DETECTOR][1].decode()
        index = self.spec_index.get(detector_name)
        if index is None:  # the detector was removed from the configuration
            if live_output:
                self._dead_letter_raw(value, headers, NO_DETECTOR,
                                      f"detector {detector_name!r} is no longer configured")
            return None
        spec = self.config.detectors[index]
        payload = part.stored.pop(tsid, None)
        if payload is not None:
            return self._load(part, tsid, payload, index)
        try:
            dimensions = self.router.point(index, load_object(value)).dimensions
        except InvalidRecord as error:  # the route stage validated it; a config change?
            if live_output:
                self._dead_letter_raw(value, headers, error.reason, error.detail)
            return None
        return self._live(part, Series(tsid, index, spec, dimensions, part.number, self.max_fill))

    def _stored_series(self, part: _Partition, tsid: str) -> Series | None:
        """A series not in memory, loaded from its snapshot; None if its detector is gone."""
        payload = part.stored.get(tsid)
        if payload is None:
            return None
        index = self.spec_index.get(snapshot_header(payload)["detector"])
        if index is None:
            return None
        del part.stored[tsid]
        return self._load(part, tsid, payload, index)

    def _load(self, part: _Partition, tsid: str, payload: bytes, index: int) -> Series:
        try:
            snapshot = decode_snapshot(payload)
            series = Series.from_snapshot(
                snapshot, tsid, index, self.config.detectors[index], part.number, self.max_fill
            )
        except Exception as error:
            # Starting the series afresh would silently send it back to LEARNING.
            raise WorkerError(
                f"the snapshot of series {tsid} ({self.config.topics.state} partition "
                f"{part.number}) cannot be restored: {error}"
            ) from error
        series.skip_below = snapshot.offset
        return self._live(part, series)

    def _live(self, part: _Partition, series: Series) -> Series:
        tsid = series.timeseries_id
        series.record_prefix = _record_prefix(series)
        part.live[tsid] = series
        self.lru[tsid] = series
        while len(self.lru) > self.max_live:
            self._evict(next(iter(self.lru.values())))
        return series

    def _evict(self, series: Series) -> None:
        if series in self._due:  # its snapshot must hold every window it closed
            self._flush()
        part = self.partitions[series.partition]
        payload = (
            self._snapshot(part, series, "eviction") if series.dirty
            else series.snapshot(part.next_offset)
        )
        part.stored[series.timeseries_id] = payload
        del part.live[series.timeseries_id]
        del self.lru[series.timeseries_id]
        self.metrics.evictions.inc()

    def _dead_letter(
        self, message: Any, headers: Headers, reason: str, detail: str
    ) -> None:
        self._dead_letter_raw(message.value(), headers, reason, detail)

    def _dead_letter_raw(
        self, value: bytes | None, headers: Headers, reason: str, detail: str
    ) -> None:
        """Queue a dead letter; ``_flush`` produces it in order with the batch's results."""
        self._outbox.append(self._dead_letter_args(value, headers, reason, detail))

    def _dead_letter_args(
        self, value: bytes | None, headers: Headers, reason: str, detail: str
    ) -> _Output:
        out: Headers = [("reason", reason), ("detail", detail)]
        out.extend(headers[_H_SOURCE_TOPIC:])
        out.append(headers[_H_DETECTOR])
        self.metrics.dead_letters.labels(reason).inc()
        self.dead_letter_log.count(reason)
        return (self.config.topics.dead_letter, value, None, out)

    # -- commits and checkpoints --------------------------------------------------------------

    def prepare_commit(self, checkpoint: Iterable[int] = ()) -> None:
        """Snapshot work for this transaction.

        A checkpoint of a partition is spread over several transactions (a round) so that no
        commit stalls scoring for long: the round fixes its offset X when it starts and lists the
        series changed so far; each commit snapshots up to ``snapshots_per_commit`` of them (each
        snapshot carries its own, newer offset, so a replay from X skips what it holds); the
        marker X is written with the last of them. Revoked partitions are checkpointed at once.
        """
        forced = [self.partitions[p] for p in checkpoint if p in self.partitions]
        for part in forced:
            self._checkpoint_now(part)
        budget = self.snapshots_per_commit
        now = time.monotonic()
        for part in sorted(self.partitions.values(), key=lambda p: p.checkpointed_at):
            if part.round_offset is None:
                if (part.next_offset <= part.checkpoint_offset
                        or now - part.checkpointed_at < self.snapshot_interval_s):
                    continue
                part.round_offset = part.next_offset
                part.round_clock = part.clock.to_dict()
                part.round_pending = [t for t, series in part.live.items() if series.dirty]
            while part.round_pending and budget > 0:
                series = part.live.get(part.round_pending.pop())
                # Gone: evicted (its snapshot was written then) or dropped with the partition.
                if series is not None and series.dirty:
                    self._snapshot(part, series, "checkpoint")
                    budget -= 1
            if part.round_pending:
                return
            self._mark(part, part.round_offset, part.round_clock)

    def _snapshot(self, part: _Partition, series: Series, cause: str) -> bytes:
        began = time.perf_counter()
        payload = series.snapshot(part.next_offset)
        self.produce(self.config.topics.state, payload, series.timeseries_id,
                     partition=part.number)
        series.dirty = False
        self.metrics.snapshots.labels(cause).inc()
        self.metrics.snapshot_bytes.inc(len(payload))
        self.metrics.snapshot_seconds.observe(time.perf_counter() - began)
        return payload

    def _checkpoint_now(self, part: _Partition) -> None:
        for series in part.live.values():
            if series.dirty:
                self._snapshot(part, series, "checkpoint")
        self._mark(part, part.next_offset, part.clock.to_dict())

    def _mark(self, part: _Partition, offset: int, clock: dict[str, Any]) -> None:
        self.produce(self.config.topics.state, encode_checkpoint(offset, clock), CHECKPOINT_KEY,
                     partition=part.number)
        part.checkpoint_offset = offset
        part.checkpointed_at = time.monotonic()
        part.round_offset = None
        part.round_pending = []

    def offsets_to_commit(self) -> list[TopicPartition]:
        topic = self.config.topics.repartition
        return [
            TopicPartition(topic, p.number, p.next_offset)
            for p in self.partitions.values()
            if p.next_offset > p.committed
        ]

    def committed(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            part = self.partitions.get(tp.partition)
            if part is not None:
                part.committed = max(part.committed, tp.offset)

    def aborted(self) -> None:
        # The models are ahead of what Kafka now holds: rebuild them exactly as after a restart.
        numbers = sorted(self.partitions)
        self._drop(numbers)
        self._restore(numbers)
        topic = self.config.topics.repartition
        for n in numbers:
            self.consumer.seek(TopicPartition(topic, n, self.partitions[n].next_offset))

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last_gauges < 1.0:
            return
        self._last_gauges = now
        unsaved = [p for p in self.partitions.values() if p.next_offset > p.checkpoint_offset]
        if any(now - p.checkpointed_at >= self.snapshot_interval_s for p in unsaved):
            self.commit()  # a quiet partition still gets (and finishes) its checkpoint on time
        self.metrics.live_series.set(len(self.lru))
        self.metrics.stored_series.set(sum(len(p.stored) for p in self.partitions.values()))
        # How old the state a restore would start from is: 0 when the checkpoint is current.
        self.metrics.snapshot_age.set(
            max((now - p.checkpointed_at for p in unsaved), default=0.0)
        )

    # -- rebalances and restores --------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assign_restored(sorted(tp.partition for tp in partitions))
        self.ready = True

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        # Checkpoint what is handed over, so the next owner restores without replaying.
        self.commit(checkpoint=numbers)
        self._drop(numbers)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.abort_if_open()
        self._drop([tp.partition for tp in partitions])

    def forget(self) -> None:
        self._drop(list(self.partitions))
        self._due.clear()
        self._outbox.clear()

    def _drop(self, numbers: Iterable[int]) -> None:
        for number in numbers:
            part = self.partitions.pop(number, None)
            if part is not None:
                for tsid in part.live:
                    self.lru.pop(tsid, None)

    def _assign_restored(self, numbers: list[int]) -> None:
        began = time.monotonic()
        self._restore(numbers)
        topic = self.config.topics.repartition
        self.consumer.assign(
            [TopicPartition(topic, n, self.partitions[n].next_offset) for n in numbers]
        )
        self.metrics.restore_seconds.observe(time.monotonic() - began)

    def _restore(self, numbers: list[int]) -> None:
        """Load the latest snapshots of ``numbers`` and decide where to resume each partition.

        A partition resumes at its last checkpoint offset (or at its beginning, if it has none).
        Records from there up to the group's committed offset were processed before: they are
        replayed into the models with output suppressed. A series whose own snapshot is newer
        than the checkpoint (it was evicted later) skips the records its snapshot already holds.
        """
        if not numbers:
            return
        config = self.config
        latest = read_state(config, numbers, config.kafka.transaction_timeout / 1000 + 60)
        committed = self._call(
            lambda: self.consumer.committed(
                [TopicPartition(config.topics.repartition, n) for n in numbers], 60
            ),
            "reading committed offsets",
        )
        committed_by_partition = {tp.partition: tp.offset for tp in committed}
        for number in numbers:
            entries = latest.get(number, {})
            marker = entries.pop(CHECKPOINT_KEY, None)
            low, _high = self._call(
                partial(self.consumer.get_watermark_offsets,
                        TopicPartition(config.topics.repartition, number), 30, False),
                "reading the start offset",
            )
            clock = PartitionClock(self.pause_ms)
            start = low
            if marker is not None:
                checkpoint, clock_state = decode_checkpoint(marker)
                start = max(low, checkpoint)
                if clock_state is not None:
                    clock.restore(clock_state)
            committed_offset = max(committed_by_partition.get(number, -1), 0)
            part = _Partition(number, start, committed_offset, clock)
            part.stored = {
                key.decode(): value for key, value in entries.items() if value is not None
            }
            self._schedule_stored(part)
            self.partitions[number] = part
            log.info(
                "score: partition %d: %d series restored, replay %d..%d suppressed",
                number, len(part.stored), start, committed_offset,
            )
            if committed_offset > start:
                self.metrics.replayed.inc(committed_offset - start)

    def _schedule_stored(self, part: _Partition) -> None:
        """Put the restored series on the partition's schedule, from their snapshots' headers
        (windows and source), so that the silent ones among them close on time too."""
        for tsid, payload in part.stored.items():
            header = snapshot_header(payload)
            index = self.spec_index.get(header["detector"])
            if index is None:
                continue
            spec = self.config.detectors[index]
            windows = SeriesWindows(
                spec.interval_ms, spec.delay_ms, spec.aggregation, spec.empty, self.max_fill
            ).restore(header["windows"])
            next_close = windows.next_close_ms()
            if next_close is not None:
                part.clock.schedule(tsid, header.get("source", ""), next_close + spec.delay_ms)


def read_state(
    config: DetectConfig, numbers: list[int], timeout_s: float
) -> dict[int, dict[bytes, bytes | None]]:
    """The latest committed value per key in partitions ``numbers`` of the state topic."""
    topic = config.topics.state
    reader = Consumer(
        consumer_config(
            config.kafka.bootstrap,
            None,
            security=config.kafka.security,
            **{"enable.partition.eof": True, "fetch.max.bytes": MAX_RECORD_BYTES * 4},
        )
    )
    latest: dict[int, dict[bytes, bytes | None]] = {n: {} for n in numbers}
    try:
        pending = set()
        for number in numbers:
            low, high = retry(
                partial(reader.get_watermark_offsets, TopicPartition(topic, number), 30, False),
                f"restore: reading the offsets of {topic}[{number}]",
                backoff=Backoff(give_up_s=timeout_s),
            )
            if high > low:
                pending.add(number)
        if not pending:
            return latest
        reader.assign([TopicPartition(topic, n, OFFSET_BEGINNING) for n in pending])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"restoring from {topic} partitions {sorted(pending)} took over "
                    f"{timeout_s:.0f} s (an open transaction of a dead worker?)"
                )
            messages: list[Any] = reader.consume(1000, 0.5)
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(message.partition())
                        continue
                    if error.fatal() or error.code() == KafkaError._FATAL:
                        raise WorkerError(f"restoring from {topic}: {error}")
                    # A broker moment (transport, leader moving): the deadline bounds the wait.
                    log.warning("restoring from %s: %s", topic, error)
                latest[message.partition()][message.key()] = message.value()
        return latest
    finally:
        reader.close()


def _record_prefix(series: Series) -> bytes:
    """The constant fields of a series' result records, encoded once."""
    spec = series.spec
    return encode_head(
        spec.name, spec.measure, series.timeseries_id, series.dimensions, spec.threshold
    )


def _result_record(series: Series, window: ClosedWindow, result: Result, no_data: bool) -> bytes:
    """One result record of a scored window."""
    return encode_result(
        series.record_prefix, series.spec.measures, window.values, result.expected_values,
        score=result.anomaly_score, decision=result.anomaly_decision,
        confidence=result.confidence, stage=result.model_stage.value,
        processed=result.processed_data_points, start_ms=window.start_ms,
        end_ms=window.end_ms, raw_score=result.raw_score, no_data=no_data,
        last_data_ms=window.last_data_ms, attribution=result.attribution,
    )


STAGES: dict[str, type[RouteStage] | type[ScoreStage]] = {
    RouteStage.name: RouteStage,
    ScoreStage.name: ScoreStage,
}


class Worker:
    """The stages of one worker instance (both by default), one thread each.

    Both stages in one process share one interpreter lock; running ``stages=("route",)`` and
    ``stages=("score",)`` as two processes lets them use two cores.
    """

    def __init__(
        self,
        config: DetectConfig,
        instance_id: str | None = None,
        stages: tuple[str, ...] = tuple(STAGES),
    ) -> None:
        unknown = sorted(set(stages) - set(STAGES))
        if unknown or not stages:
            raise WorkerError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
        self.stage_names = tuple(dict.fromkeys(stages))
        self.config = config
        self.instance_id = instance_id or config.kafka.instance_id or default_instance_id()
        self.metrics = WorkerMetrics()
        self.stop = threading.Event()
        self.stages: list[_Stage] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def healthy(self) -> bool:
        """No stage failed, every loop turns, and none sits on lag without making progress."""
        return not self.errors and all(
            stage.heartbeat.alive() and not stage.stalled() for stage in self.stages
        )

    def ready(self) -> bool:
        return len(self.stages) == len(self.stage_names) and all(
            stage.ready for stage in self.stages
        )

    def start(self) -> None:
        ensure_topics(self.config)
        for stage_class in (STAGES[name] for name in self.stage_names):
            thread = threading.Thread(target=self._run_stage, args=(stage_class,),
                                      name=stage_class.name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run_stage(self, stage_class: type[RouteStage] | type[ScoreStage]) -> None:
        try:
            stage = stage_class(self.config, self.instance_id, self.metrics, self.stop)
            self.stages.append(stage)
            stage.run()
        except BaseException as error:  # one failed stage stops the worker, with the reason
            log.exception("%s stage failed", stage_class.name)
            self.errors.append(error)
            self.stop.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until both stages end; True if they did."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(thread.is_alive() for thread in self._threads)
