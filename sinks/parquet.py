"""The Parquet sink: result topic -> date-partitioned Parquet lake, exactly once.

Per assigned partition, records are buffered and cut into files by a rule that depends on the
records only (``RotationPolicy``): a file closes before a record that would make it hold more
than ``max_records`` rows, span more than ``max_span_ms`` of detection time, or cross into another
UTC day. The sink also publishes its buffers when the topic has been idle for
``idle_flush_s`` (so that the lake stays fresh) and when it stops gracefully.

Each file is written under a temporary name, fsynced, renamed to
``dt=<day>/<topic>+<partition>+<firstOffset>.parquet``, the directory fsynced, and only then the
offset after the file's last record is committed (synchronously: a file is never followed by
another before its commit has succeeded).

On assignment the sink starts from the committed offset or, if the lake already holds records
beyond it (killed between rename and commit; or a compacted day), right after the last offset in
the lake, read back from the files' metadata. So a restart never writes a row the lake already
has, whatever the cut points of the earlier run were. See docs/decisions/0003.

>>> policy = RotationPolicy(max_records=3, max_span_ms=60_000)
>>> import numpy as np
>>> cut_points(policy, np.array([0, 1, 2, 3, 4]), state=None)[0]  # 3 rows per file
[3]
>>> cut_points(policy, np.array([0, 1, 70_000, 70_001]), state=None)[0]  # span over 60 s
[2]
>>> cut_points(policy, np.array([86_399_999, 86_400_000]), state=None)[0]  # next UTC day
[1]
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pyarrow as pa

from common.kafka_security import PLAINTEXT, KafkaSecurity
from common.logs import DeadLetterLog, ThrottledLog
from common.retry import Backoff, RebuildBudget, is_fatal, is_transient, retry
from contract.records import KAFKA_OFFSET
from sinks.lake_files import lake_end, publish_sink_file, remove_temp_files
from sinks.result_table import MS_PER_DAY, concat, day_name, epoch_millis, parse_results

log = logging.getLogger("anomstream.sink.parquet")

DEFAULT_GROUP = "anomstream-parquet-sink"
JOIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RotationPolicy:
    """When a file closes; a pure function of the partition's records (never wall-clock)."""

    max_records: int = 100_000
    max_span_ms: int = 3_600_000

    def __post_init__(self) -> None:
        if self.max_records < 1:
            raise ValueError("max_records must be at least 1")
        if self.max_span_ms < 0:
            raise ValueError("max_span_ms must not be negative")


@dataclass
class OpenFile:
    """What the rotation rule needs to know about the file being filled."""

    rows: int
    day: int
    min_ms: int
    max_ms: int


def cut_points(
    policy: RotationPolicy,
    millis: np.ndarray,
    days: np.ndarray | None = None,
    *,
    state: OpenFile | None,
) -> tuple[list[int], OpenFile | None]:
    """Row indices before which a file closes, and the open file's state after the rows.

    ``millis`` are detection start times (epoch ms) in offset order; ``state`` is the file left
    open by earlier rows (None when nothing is buffered).
    """
    if days is None:
        days = millis // MS_PER_DAY
    cuts: list[int] = []
    n = len(millis)
    index = 0
    while index < n:
        if state is None:
            t = int(millis[index])
            state = OpenFile(1, int(days[index]), t, t)
            index += 1
            continue
        # Vectorised over the rows that could still join the open file: the first one that
        # changes day or stretches the span too far, or the first one past max_records.
        window_end = min(n, index + max(policy.max_records - state.rows, 0))
        low = np.minimum.accumulate(np.minimum(millis[index:window_end], state.min_ms))
        high = np.maximum.accumulate(np.maximum(millis[index:window_end], state.max_ms))
        breaks = (days[index:window_end] != state.day) | (high - low > policy.max_span_ms)
        stop = index + int(np.argmax(breaks)) if breaks.any() else window_end
        if stop > index:
            state.rows += stop - index
            state.min_ms = int(low[stop - index - 1])
            state.max_ms = int(high[stop - index - 1])
        if stop < n:
            cuts.append(stop)
            state = None
        index = stop
    return cuts, state


@dataclass
class PartitionBuffer:
    """Rows of one partition not yet in the lake."""

    partition: int
    policy: RotationPolicy
    pieces: list[pa.Table] = field(default_factory=list)
    state: OpenFile | None = None
    next_offset: int | None = None  # after the last record consumed (parsed or rejected)

    def add(self, table: pa.Table, next_offset: int) -> list[pa.Table]:
        """Buffer rows (offset order); return the files the rotation rule closed."""
        self.next_offset = next_offset
        if table.num_rows == 0:
            return []
        millis = epoch_millis(table)
        cuts, state = cut_points(self.policy, millis, state=self.state)
        closed: list[pa.Table] = []
        start = 0
        for cut in cuts:
            if cut > start:
                self.pieces.append(table.slice(start, cut - start))
            closed.append(self._take())
            start = cut
        self.pieces.append(table.slice(start))
        self.state = state
        return closed

    def take_all(self) -> pa.Table | None:
        """The buffered rows as one file (idle or shutdown flush), or None if empty."""
        if not self.pieces:
            return None
        self.state = None
        return self._take()

    def _take(self) -> pa.Table:
        table = concat(self.pieces) if len(self.pieces) > 1 else self.pieces[0]
        self.pieces = []
        return table


@dataclass
class SinkConfig:
    lake: Path
    topic: str = "results"
    bootstrap: str = "127.0.0.1:9092"
    group: str = DEFAULT_GROUP
    policy: RotationPolicy = field(default_factory=RotationPolicy)
    idle_flush_s: float = 5.0
    stop_after_idle_s: float | None = None
    batch_size: int = 10_000
    dead_letter_topic: str | None = None
    metrics_every_s: float = 10.0
    # Static group membership: a restarted sink takes its partitions back at once instead of
    # waiting for the killed one's session to expire, and a second live copy is fenced off.
    instance_id: str | None = None
    # How long transient Kafka errors (broker down, coordinator moving) are retried before the
    # sink gives up and exits non-zero (docs/decisions/0006).
    retry_timeout_s: float = 600.0
    security: KafkaSecurity = PLAINTEXT

    @property
    def dead_letters(self) -> str:
        return self.dead_letter_topic or f"{self.topic}-parquet-dlq"


@dataclass
class SinkStats:
    rows: int = 0
    files: int = 0
    rejected: int = 0
    started: float = field(default_factory=time.monotonic)
    first_record_at: float | None = None
    last_publish_at: float | None = None

    def line(self) -> str:
        return (
            f"parquet-sink rows={self.rows} files={self.files} rejected={self.rejected} "
            f"rows_per_s={self.rows_per_s():.0f}"
        )

    def rows_per_s(self) -> float:
        """Rows published per second, from the first record received to the last publish."""
        if self.first_record_at is None or self.last_publish_at is None:
            return 0.0
        return self.rows / max(self.last_publish_at - self.first_record_at, 1e-9)


class ParquetSink:
    """Consume ``config.topic`` (read_committed, manual commits) into the lake."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.stats = SinkStats()
        self._buffers: dict[int, PartitionBuffer] = {}
        self._committed: dict[int, int] = {}
        self._stopping = False
        self._assigned_at: float | None = None
        self._at_end: set[int] = set()
        self._undelivered: list[str] = []
        self._rebuilds = RebuildBudget("parquet-sink")
        self._dead_letter_log = DeadLetterLog(log, "parquet-sink")

    def stop(self) -> None:
        """Ask the run loop to flush its buffers and return (signal-safe)."""
        self._stopping = True

    def run(self) -> SinkStats:
        from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

        from common.kafka_io import consumer_config, create_topics, producer_config

        config = self.config

        def connect() -> Any:
            return Consumer(
                consumer_config(
                    config.bootstrap,
                    group_id=config.group,
                    security=config.security,
                    **{
                        "client.id": "anomstream-parquet-sink",
                        "enable.auto.offset.store": False,
                        "group.instance.id": config.instance_id
                        or f"{config.group}-{socket.gethostname()}",
                        "session.timeout.ms": 10_000,
                        # Larger fetches per partition: the sink reads in bulk, not record by
                        # record.
                        "max.partition.fetch.bytes": 8 * 1024 * 1024,
                        # End-of-partition events tell --stop-after-idle that the sink caught up.
                        "enable.partition.eof": True,
                    },
                )
            )

        consumer = connect()
        producer: Any = None
        backoff = Backoff(give_up_s=config.retry_timeout_s)
        consumer_errors = ThrottledLog(log, "parquet-sink consumer")

        def on_assign(client: Any, partitions: list[Any]) -> None:
            committed = retry(lambda: client.committed(partitions, timeout=30),
                              "parquet-sink reading committed offsets", backoff=backoff)
            for tp in committed:
                remove_temp_files(config.lake, f"{config.topic}+{tp.partition}+")
                start = max(tp.offset, 0)
                end = lake_end(config.lake, config.topic, tp.partition)
                if end is not None and end + 1 > start:
                    log.info(
                        "parquet-sink partition=%d resumes after lake offset %d (committed %d)",
                        tp.partition,
                        end,
                        tp.offset,
                    )
                    start = end + 1
                tp.offset = start
                self._buffers[tp.partition] = PartitionBuffer(tp.partition, config.policy)
                self._buffers[tp.partition].next_offset = start
                self._committed[tp.partition] = -1
            client.assign(committed)
            self._assigned_at = time.monotonic()

        def on_revoke(client: Any, partitions: list[Any]) -> None:
            # Buffered rows were never committed: the next owner reads them again.
            for tp in partitions:
                self._buffers.pop(tp.partition, None)
                self._committed.pop(tp.partition, None)
                self._at_end.discard(tp.partition)

        def commit(partition: int, offset: int | None) -> None:
            # Only ever the offset after a published file's last record, or after records that
            # were consumed with nothing left buffered: never past a row not yet in the lake.
            if offset is None or offset <= self._committed.get(partition, -1):
                return
            if producer is not None:
                self._flush_dead_letters(producer)
            try:
                retry(
                    lambda: consumer.commit(
                        offsets=[TopicPartition(config.topic, partition, offset)],
                        asynchronous=False,
                    ),
                    f"parquet-sink committing {config.topic}[{partition}]@{offset}",
                    backoff=backoff,
                )
            except KafkaException as error:
                if is_fatal(error) or is_transient(error):
                    raise  # a new consumer (fatal) or a supervisor (gave up) takes over
                # Not a member any more (rebalance, expired session): the rows are in the lake
                # and whoever gets the partition resumes after the lake's last offset.
                log.warning("parquet-sink commit of %s[%d]@%d refused: %s", config.topic,
                            partition, offset, error)
                return
            self._committed[partition] = offset

        def publish(partition: int, table: pa.Table) -> None:
            day = day_name(int(epoch_millis(table.slice(0, 1))[0] // MS_PER_DAY))
            path = publish_sink_file(config.lake, config.topic, partition, day, table)
            self.stats.rows += table.num_rows
            self.stats.files += 1
            self.stats.last_publish_at = time.monotonic()
            log.info(
                "parquet-sink wrote %s rows=%d offsets=%d-%d",
                path.relative_to(config.lake),
                table.num_rows,
                table.column(KAFKA_OFFSET)[0].as_py(),
                table.column(KAFKA_OFFSET)[-1].as_py(),
            )
            commit(partition, int(table.column(KAFKA_OFFSET)[-1].as_py()) + 1)

        def subscribe() -> None:
            consumer.subscribe(
                [config.topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke
            )

        def replace_consumer(error: KafkaException) -> None:
            """A fatal error (fenced, ``_FATAL``): a new consumer rejoins; buffered rows are
            dropped as on a revoke and read again from the lake's end on the next assignment."""
            nonlocal consumer
            self._rebuilds.spend(error)
            log.warning("parquet-sink consumer failed (%s); replacing it and rejoining", error)
            on_revoke(consumer, [TopicPartition(config.topic, p) for p in list(self._buffers)])
            try:
                consumer.close()
            except Exception as close_error:  # the failed client may refuse; dropped anyway
                log.info("parquet-sink closing the failed consumer: %s", close_error)
            consumer = connect()
            subscribe()

        subscribe()
        last_record = time.monotonic()
        last_metrics = last_record
        flushed_since_idle = True

        def step() -> bool:
            """One consume and what follows; True when ``--stop-after-idle`` is satisfied."""
            nonlocal producer, last_record, last_metrics, flushed_since_idle
            messages = consumer.consume(config.batch_size, timeout=0.2)
            now = time.monotonic()
            by_partition: dict[int, list[Any]] = defaultdict(list)
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        self._at_end.add(int(message.partition() or 0))
                        continue
                    if error.fatal() or error.code() == KafkaError._FATAL:
                        raise KafkaException(error)
                    consumer_errors.warn(str(error))
                    continue
                by_partition[int(message.partition() or 0)].append(message)
                self._at_end.discard(int(message.partition() or 0))
            for partition, batch in by_partition.items():
                buffer = self._buffers.get(partition)
                if buffer is None:
                    continue  # revoked meanwhile
                parsed = parse_results(
                    [m.value() for m in batch], partition, [m.offset() for m in batch]
                )
                if parsed.rejected:
                    if producer is None:
                        create_topics(config.bootstrap, [config.dead_letters],
                                      security=config.security)
                        producer = Producer(
                            producer_config(config.bootstrap, security=config.security)
                        )
                    self._dead_letter(producer, batch, parsed.rejected)
                for closed in buffer.add(parsed.table, batch[-1].offset() + 1):
                    publish(partition, closed)
                if not buffer.pieces:
                    commit(partition, buffer.next_offset)
            if by_partition:
                last_record = now
                if self.stats.first_record_at is None:
                    self.stats.first_record_at = now
                flushed_since_idle = False
            elif not flushed_since_idle and now - last_record >= config.idle_flush_s:
                self._flush_all(publish)
                flushed_since_idle = True
            if now - last_metrics >= config.metrics_every_s:
                log.info("%s", self.stats.line())
                last_metrics = now
            self._dead_letter_log.report()
            return config.stop_after_idle_s is not None and self._caught_up(
                now, last_record, config.stop_after_idle_s
            )

        try:
            while not self._stopping:
                try:
                    if step():
                        break
                except KafkaException as error:
                    if not is_fatal(error):
                        raise
                    replace_consumer(error)
            self._flush_all(publish)
        finally:
            log.info("%s", self.stats.line())
            self._dead_letter_log.report(force=True)
            consumer.close()
        return self.stats

    def _caught_up(self, now: float, last_record: float, idle_s: float) -> bool:
        """Every assigned partition is read to its end and nothing arrived for ``idle_s``."""
        if self._assigned_at is None:
            if now - self.stats.started > JOIN_TIMEOUT_S:
                raise RuntimeError(
                    f"no partition of {self.config.topic!r} assigned within {JOIN_TIMEOUT_S:.0f} s"
                )
            return False
        return (
            self._at_end >= set(self._buffers)
            and now - max(last_record, self._assigned_at) >= idle_s
        )

    def _flush_all(self, publish: Callable[[int, pa.Table], None]) -> None:
        for partition, buffer in list(self._buffers.items()):
            table = buffer.take_all()
            if table is not None:
                publish(partition, table)

    def _flush_dead_letters(self, producer: Any) -> None:
        """Dead letters must be stored before the offsets past them are committed."""
        remaining = producer.flush(30)
        if remaining or self._undelivered:
            raise RuntimeError(
                f"could not store {remaining + len(self._undelivered)} dead letter(s) in "
                f"{self.config.dead_letters!r}: {self._undelivered[:3]}"
            )

    def _on_delivery(self, error: Any, message: Any) -> None:
        del message
        if error is not None:
            self._undelivered.append(str(error))

    def _dead_letter(
        self, producer: Any, batch: list[Any], rejected: list[tuple[int, str]]
    ) -> None:
        for index, reason in rejected:
            message = batch[index]
            producer.produce(
                self.config.dead_letters,
                key=message.key(),
                value=message.value(),
                headers=[
                    ("error", reason.encode()),
                    ("source.topic", message.topic().encode()),
                    ("source.partition", str(message.partition()).encode()),
                    ("source.offset", str(message.offset()).encode()),
                ],
                on_delivery=self._on_delivery,
            )
            # The reason up to its first detail: one count per kind of problem.
            self._dead_letter_log.count(reason.split(":")[0])
        self.stats.rejected += len(rejected)
        producer.poll(0)


def install_signal_handlers(sink: ParquetSink) -> None:
    """SIGTERM / SIGINT: publish the buffers, commit, and exit cleanly."""

    def handler(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        sink.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
