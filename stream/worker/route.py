"""The route stage: input records -> validated series points on the repartition topic (keyed by
timeseriesId, so each series has one owner), bad records -> the dead-letter topic."""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    TopicPartition,
)

from stream.config import DetectConfig
from stream.metrics import WorkerMetrics
from stream.routing import (
    UNEXPECTED,
    Rejection,
    Router,
)
from stream.worker.topics import EVENT
from stream.worker.transaction import Headers, Stage

log = logging.getLogger("anomstream.worker")

@functools.cache
def _event_struct(count: int) -> struct.Struct:
    """A repartitioned record's ``event`` header: event time (``EVENT``), then the values."""
    return struct.Struct(EVENT.format + "d" * count)


class RouteStage(Stage):
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
        headers: Headers = [("detector", b""), ("event", EVENT.pack(event_ms)), *source]
        repartition = self.config.topics.repartition
        for number in self.repartition_partitions:
            self.produce(repartition, None, None, headers, partition=number)

    def process(self, messages: list[Any]) -> None:
        repartition = self.config.topics.repartition
        detectors = self.router.detectors
        send = self.producer.produce
        forwarded = 0
        consumed: dict[str, int] = {}
        for message in messages:
            if message.error() is not None:
                self.consumer_error(message)
                continue
            if not self.in_transaction:
                self.begin()  # once per transaction, not per record
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
                event = _event_struct(len(point.values)).pack(point.event_ms, *point.values)
                headers = [("detector", detectors[point.detector].name), ("event", event),
                           *source]
                try:
                    send(repartition, value, point.timeseries_id, headers=headers)
                except BufferError:  # local queue full: ``produce`` waits for room
                    self.produce(repartition, value, point.timeseries_id, headers)
            forwarded += len(points)
            if points:
                self._tick(topic, partition, max(point.event_ms for point in points), source)
            if rejections:
                first = rejections[0]
                headers = [
                    ("reason", first.reason),
                    ("detail", "; ".join(r.detail for r in rejections)),
                    *source,
                ]
                if first.detector:
                    headers.append(("detector", first.detector))
                self.produce(self.config.topics.dead_letter, value, message.key(), headers)
                self.metrics.dead_letters.labels(first.reason).inc()
                self.dead_letter_log.count(first.reason)
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
