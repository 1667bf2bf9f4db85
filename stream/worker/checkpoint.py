"""Checkpoint and restore of the score stage's partitions on the compacted state topic: the
snapshot rounds written inside the transactions, and what a (re)assigned partition restores and
replays (docs/decisions/0002-exactly-once.md)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from functools import partial
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    TopicPartition,
)

from common.kafka_io import consumer_config
from common.retry import Backoff, retry
from stream.config import DetectConfig
from stream.metrics import WorkerMetrics
from stream.state import (
    CHECKPOINT_KEY,
    Series,
    decode_checkpoint,
    encode_checkpoint,
)
from stream.windowing import PartitionClock, SeriesWindows
from stream.worker.errors import WorkerError
from stream.worker.spill import SpillStore, spill_path
from stream.worker.topics import MAX_RECORD_BYTES
from stream.worker.transaction import Stage

log = logging.getLogger("anomstream.worker")

# A partition is quiet once its silence is this many times the longest pause its feed made
# lately: a feed of one-minute bars is not quiet in the half minute after its burst.
QUIET_PAUSE_FACTOR = 2.0


class Pauses:
    """The pauses of one partition's feed, and whether its silence now is longer than they are.

    A checkpoint round snapshots every changed series of a quiet partition, so that a restore
    replays nothing (``CheckpointedStage._begin_round``). Quiet is a silence of at least
    ``floor_s`` and of ``QUIET_PAUSE_FACTOR`` times the longest pause of the last ``horizon_s``
    (that part capped at ``horizon_s``): a feed that sends all its records once per interval,
    with an interval longer than ``floor_s``, pauses between its bursts without being quiet.

    >>> pauses = Pauses(0, floor_s=30, horizon_s=3600)
    >>> for second, offset in [(0, 10), (0.5, 20), (60, 30), (60.5, 40), (120, 50)]:
    ...     pauses.heard(offset, second)  # one-minute bars, each a burst of two batches
    >>> pauses.quiet(150), pauses.quiet(215), pauses.quiet(241)
    (False, False, True)
    >>> steady = Pauses(0, floor_s=30, horizon_s=3600)
    >>> for tenth in range(1, 100):
    ...     steady.heard(tenth, tenth / 10)  # a record every 100 ms, then silence
    >>> steady.quiet(29.9 + 9.9), steady.quiet(30 + 9.9)
    (False, True)
    """

    __slots__ = ("floor_s", "heard_at", "horizon_s", "longest_at", "longest_s", "offset")

    def __init__(self, offset: int, floor_s: float, horizon_s: float) -> None:
        self.floor_s = floor_s
        self.horizon_s = horizon_s
        self.offset = offset  # the partition's next offset when it last moved
        # When that was seen; None before it first moved: a pause is between two moves, not
        # from an assignment to the feed's first record.
        self.heard_at: float | None = None
        self.longest_s = 0.0  # the longest pause lately, and when it, or one like it, ended
        self.longest_at = 0.0

    def heard(self, offset: int, now: float) -> None:
        """Note the partition's next offset at ``now``: a pause ends where it moved."""
        if offset == self.offset:
            return
        if self.heard_at is not None:
            pause = now - self.heard_at
            if pause >= self.longest_s or now - self.longest_at > self.horizon_s:
                self.longest_s, self.longest_at = pause, now
            elif pause >= self.longest_s / QUIET_PAUSE_FACTOR:
                self.longest_at = now  # the feed still pauses that long: keep the longest
        self.offset, self.heard_at = offset, now

    def quiet(self, now: float) -> bool:
        """Whether the silence since the feed last moved is longer than its pauses."""
        if self.heard_at is None:
            return True
        usual = self.longest_s if now - self.longest_at <= self.horizon_s else 0.0
        wait = max(self.floor_s, min(QUIET_PAUSE_FACTOR * usual, self.horizon_s))
        return now - self.heard_at >= wait


class Partition:
    """What the score stage holds for one owned repartition partition."""

    __slots__ = ("checkpoint_offset", "checkpoint_time", "checkpointed_at", "clock",
                 "clock_points", "committed", "live", "next_offset", "number", "pauses",
                 "replay_end", "round_clock", "round_deadline", "round_offset", "round_paced_at",
                 "round_pending")

    def __init__(
        self, number: int, start: int, committed: int, clock: PartitionClock, pauses: Pauses
    ) -> None:
        self.number = number
        self.clock = clock  # stream time per input partition, after the records below next_offset
        self.next_offset = start  # one past the last record applied
        self.committed = committed  # records below were processed and committed already
        # Records below were replayed on this restore: what the next restore would replay again.
        self.replay_end = committed
        now = time.monotonic()
        self.checkpoint_offset = start  # the committed marker: a restore replays from here
        self.checkpoint_time = now  # when the partition was at that offset
        self.checkpointed_at = now  # when the last round ended
        # Where the partition was (offset, time, clock) when each round since the marker began:
        # the offsets a later marker can take, with the clock it must then carry.
        self.clock_points: list[tuple[int, float, dict[str, Any]]] = [
            (start, now, clock.to_dict())
        ]
        self.live: dict[str, Series] = {}  # the others are in the stage's spill store
        self.pauses = pauses  # of the feed: when the partition is quiet
        self.round_offset: int | None = None  # offset of the checkpoint being written
        self.round_clock: dict[str, Any] = {}  # the clock at that offset
        self.round_pending: list[str] = []  # series still to snapshot in that checkpoint
        self.round_deadline = 0.0  # the round's snapshots are paced to end by then
        self.round_paced_at = 0.0  # the last commit that took some of them



class CheckpointedStage(Stage):
    """A stage that owns repartition partitions and checkpoints their series' state."""

    def __init__(
        self, config: DetectConfig, instance_id: str, metrics: WorkerMetrics,
        stop: threading.Event, group_id: str, topics: list[str],
    ) -> None:
        super().__init__(config, instance_id, metrics, stop, group_id, topics)
        self.spec_index = {spec.name: i for i, spec in enumerate(config.detectors)}
        self.partitions: dict[int, Partition] = {}
        self.lru: OrderedDict[str, Series] = OrderedDict()
        # Snapshots of the owned series that are not live, on disk (decision 0009).
        self.spill = SpillStore(spill_path(config.worker.spill_dir, group_id, instance_id))
        self.max_fill = config.worker.max_fill_intervals
        self.snapshot_interval_s = config.worker.snapshot_interval_ms / 1000
        self.snapshots_per_commit = config.worker.snapshots_per_commit
        self.snapshot_min_changes = config.worker.snapshot_min_changes
        self.snapshot_max_age_s = config.worker.snapshot_max_age / 1000
        self.snapshot_max_replay = config.worker.snapshot_max_replay
        # A jump of an input's stream time this long is the whole input pausing (PartitionClock).
        self.pause_ms = min(
            (spec.no_data_after for spec in config.detectors if spec.no_data_after), default=None
        )

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.spill.close()

    # -- commits and checkpoints --------------------------------------------------------------

    def prepare_commit(self, checkpoint: Iterable[int] = ()) -> None:
        """Snapshot work for this transaction.

        Every ``snapshot_interval`` a partition starts a checkpoint round at its next offset.
        The round picks the changed series whose snapshot pays (``_begin_round``) and spreads
        them over the commits of the first half of the interval, paced by time (``_quota``), so
        that no commit stalls scoring for long and a round ends within its interval. Each
        snapshot carries its own, newer offset, so a replay from the marker skips what it holds.
        The marker written with the last of them (``_end_round``) is the latest round offset
        below every change that is still in no snapshot. Revoked partitions are checkpointed
        whole at once.
        """
        forced = [self.partitions[p] for p in checkpoint if p in self.partitions]
        for part in forced:
            self._checkpoint_now(part)
        now = time.monotonic()
        bursting = self.bursting()
        for part in sorted(self.partitions.values(), key=lambda p: p.checkpointed_at):
            part.pauses.heard(part.next_offset, now)
            if part.round_offset is None:
                if (part.next_offset <= part.checkpoint_offset
                        or now - part.checkpointed_at < self.snapshot_interval_s):
                    continue
                self._begin_round(part, now)
            if bursting and now < part.round_deadline:
                # The burst's results go out first; its share of the round (pacing counts the
                # time since the last paced commit) falls to the next commit after it.
                continue
            quota = self._quota(part, now)
            while part.round_pending and quota > 0:
                series = part.live.get(part.round_pending.pop())
                # Gone: evicted (its snapshot was written then) or dropped with the partition.
                if series is not None and series.dirty:
                    self._snapshot(part, series, "checkpoint")
                    quota -= 1
            part.round_paced_at = now
            if not part.round_pending:
                self._end_round(part)

    def bursting(self) -> bool:
        """Whether the stage is scoring a burst of windows that closed together while it was
        caught up with its input: their results wait on nothing else (no snapshots)."""
        return False

    def _begin_round(self, part: Partition, now: float) -> None:
        """Fix the round's offset and clock and choose the series to snapshot: those with at
        least ``snapshot_min_changes`` windows scored since their last snapshot, those whose
        first unsaved change lies before the replay floor (older than ``snapshot_max_age``, or
        more than ``snapshot_max_replay`` records back) or among the records replayed on this
        restore (so that each restart that lives through one round moves the marker past what
        it replayed: a worker restarted again and again does not replay ever more), and every
        changed series of a quiet partition (``Pauses``: quiet time is free)."""
        offset = part.next_offset
        quiet = part.pauses.quiet(now)
        part.round_offset = offset
        part.round_clock = part.clock.to_dict()
        part.clock_points.append((offset, now, part.round_clock))
        floor = next(
            point_offset for point_offset, at, _clock in part.clock_points
            if now - at <= self.snapshot_max_age_s
            and offset - point_offset <= self.snapshot_max_replay
        )
        floor = max(floor, part.replay_end)
        min_changes = self.snapshot_min_changes
        part.round_pending = [
            tsid for tsid, series in part.live.items()
            if series.dirty and (quiet or series.changes >= min_changes
                                 or series.unsaved_from < floor)
        ]
        part.round_deadline = now + self.snapshot_interval_s / 2
        part.round_paced_at = now

    def _quota(self, part: Partition, now: float) -> int:
        """Snapshots for this commit: the round's remaining ones spread evenly over the time
        left until its deadline (all of them once it has passed)."""
        pending = len(part.round_pending)
        elapsed = now - part.round_paced_at
        left = part.round_deadline - now
        if left <= elapsed:
            return pending
        return max(self.snapshots_per_commit, math.ceil(pending * elapsed / left))

    def _end_round(self, part: Partition) -> None:
        """Write the marker: the latest round offset at or below the first unsaved change of
        every series the rounds left out (their records from there on are replayed)."""
        assert part.round_offset is not None
        target = min(
            (series.unsaved_from for series in part.live.values() if series.dirty),
            default=part.round_offset,
        )
        target = min(target, part.round_offset)
        marker = part.clock_points[0]
        for point in part.clock_points:
            if point[0] <= target:
                marker = point
        self._mark(part, marker)

    def _snapshot(self, part: Partition, series: Series, cause: str) -> bytes:
        # Learning the scored windows is the scoring's work, due anyway: not the snapshot's.
        series.detector.learn_pending()
        began, cpu = time.perf_counter(), time.thread_time()
        payload = series.snapshot(part.next_offset)
        self.produce(self.config.topics.state, payload, series.timeseries_id,
                     partition=part.number)
        series.dirty = False
        series.changes = 0
        self.metrics.snapshots.labels(cause).inc()
        self.metrics.snapshot_bytes.inc(len(payload))
        self.metrics.snapshot_cpu_seconds.inc(time.thread_time() - cpu)
        self.metrics.snapshot_seconds.observe(time.perf_counter() - began)
        return payload

    def _checkpoint_now(self, part: Partition) -> None:
        for series in part.live.values():
            if series.dirty:
                self._snapshot(part, series, "checkpoint")
        self._mark(part, (part.next_offset, time.monotonic(), part.clock.to_dict()))

    def _mark(self, part: Partition, point: tuple[int, float, dict[str, Any]]) -> None:
        offset, at, clock = point
        if offset > part.checkpoint_offset:
            self.produce(self.config.topics.state, encode_checkpoint(offset, clock),
                         CHECKPOINT_KEY, partition=part.number)
            part.checkpoint_offset = offset
            part.checkpoint_time = at
        part.clock_points = [p for p in part.clock_points if p[0] >= part.checkpoint_offset]
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

    def _drop(self, numbers: Iterable[int]) -> None:
        for number in numbers:
            part = self.partitions.pop(number, None)
            if part is not None:
                for tsid in part.live:
                    self.lru.pop(tsid, None)
            self.spill.drop_partition(number)

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
        for number in numbers:  # rebuilt from the state topic, whatever the store held
            self.spill.drop_partition(number)
        markers = read_state(
            config, numbers, config.kafka.transaction_timeout / 1000 + 60, self.spill
        )
        committed = self._call(
            lambda: self.consumer.committed(
                [TopicPartition(config.topics.repartition, n) for n in numbers], 60
            ),
            "reading committed offsets",
        )
        committed_by_partition = {tp.partition: tp.offset for tp in committed}
        for number in numbers:
            marker = markers.get(number)
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
            pauses = Pauses(start, self.snapshot_interval_s, self.snapshot_max_age_s)
            part = Partition(number, start, committed_offset, clock, pauses)
            self._schedule_stored(part)
            self.partitions[number] = part
            log.info(
                "score: partition %d: %d series restored, replay %d..%d suppressed",
                number, self.spill.count(number), start, committed_offset,
            )
            if committed_offset > start:
                self.metrics.replayed.inc(committed_offset - start)

    def _schedule_stored(self, part: Partition) -> None:
        """Put the restored series on the partition's schedule, from their snapshots' headers
        (windows and source), so that the silent ones among them close on time too."""
        for tsid, header_json in self.spill.headers(part.number):
            header = json.loads(header_json)
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
    config: DetectConfig, numbers: list[int], timeout_s: float, store: SpillStore
) -> dict[int, bytes]:
    """Read partitions ``numbers`` of the state topic (committed records) to their end: the
    latest snapshot of each series goes into ``store`` (a tombstone removes it), and the latest
    checkpoint marker per partition is returned."""
    topic = config.topics.state
    reader = Consumer(
        consumer_config(
            config.kafka.bootstrap,
            None,
            security=config.kafka.security,
            **{"enable.partition.eof": True, "fetch.max.bytes": MAX_RECORD_BYTES * 4},
        )
    )
    markers: dict[int, bytes] = {}
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
            return markers
        reader.assign([TopicPartition(topic, n, OFFSET_BEGINNING) for n in pending])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"restoring from {topic} partitions {sorted(pending)} took over "
                    f"{timeout_s:.0f} s (an open transaction of a dead worker?)"
                )
            messages: list[Any] = reader.consume(1000, 0.5)
            with store.batch():
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            pending.discard(message.partition())
                            continue
                        if error.fatal() or error.code() == KafkaError._FATAL:
                            raise WorkerError(f"restoring from {topic}: {error}")
                        # A broker moment (transport, leader moving): the deadline bounds it.
                        log.warning("restoring from %s: %s", topic, error)
                        continue
                    key, value = message.key(), message.value()
                    if key == CHECKPOINT_KEY:
                        markers[message.partition()] = value
                    elif value is None:
                        store.delete(key.decode())
                    else:
                        store.put(message.partition(), key.decode(), value)
        return markers
    finally:
        reader.close()
