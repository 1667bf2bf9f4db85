"""The imperative shell: Kafka in, durable state, notifications out.

One loop turn: read a batch of result records (read_committed), feed the pure engine, close due
groups into messages queued in the outbox, save state + outbox + offsets atomically, commit the
offsets to Kafka, then hand due outbox entries to the per-receiver delivery workers. A record's
offset is therefore committed only once every notification it caused is durably queued.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import Counter, Gauge

from contract.records import decode
from sinks.alerting import store
from sinks.alerting.config import AlertConfig
from sinks.alerting.messages import render
from sinks.alerting.notifier import AppriseSender, Dispatcher, OutboxEntry, Send
from sinks.alerting.redact import Redactor
from sinks.alerting.rules import Observation
from sinks.alerting.silences import Silence, SilenceSet
from sinks.alerting.state import AlertEngine, Group, Grouper

log = logging.getLogger(__name__)

RECORDS = Counter("anomstream_alert_records_total", "Result records read by the alerter.")
BAD_RECORDS = Counter(
    "anomstream_alert_bad_records_total", "Result records skipped because they break the contract."
)
EVENTS = Counter("anomstream_alert_events_total", "Alert transitions notified, by kind.", ["kind"])
SILENCED = Counter("anomstream_alert_silenced_total", "Alert transitions held back by a silence.")
FIRING = Gauge("anomstream_alert_firing", "(rule, series) pairs currently firing.")

_BATCH = 500
_POLL_S = 0.2


class Alerter:
    def __init__(
        self,
        config: AlertConfig,
        redactor: Redactor,
        senders: dict[str, Send] | None = None,
    ) -> None:
        self.config = config
        snapshot = store.load(config.state_file)
        self.offsets: dict[str, dict[int, int]] = snapshot.offsets
        self.watermark = snapshot.watermark
        self.engine = AlertEngine(config.rules, AlertEngine.states_from_json(snapshot.series))
        # Groups saved before a stop go out first: their window has passed during the downtime.
        self.grouper = Grouper(
            config.grouping.window,
            config.grouping.by,
            closed=[Group.from_json(g) for g in snapshot.groups],
        )
        if senders is None:
            senders = {
                r.name: AppriseSender(r, config.delivery.timeout, redactor)
                for r in config.receivers
            }
        self.dispatcher = Dispatcher(
            senders,
            config.receivers,
            config.delivery,
            [OutboxEntry.from_json(e) for e in snapshot.outbox],
            snapshot.next_id,
        )
        self.silences = SilenceSet(
            [Silence.from_spec(s, i) for i, s in enumerate(config.silences)], config.silences_dir
        )
        self._silenced_logged: set[tuple[str, str, str]] = set()
        FIRING.set(self.engine.firing_count())
        if snapshot.outbox or snapshot.groups:
            log.info(
                "resuming with %d undelivered notification(s) and %d open group(s)",
                len(snapshot.outbox), len(snapshot.groups),
            )

    # --- the pure-ish part of a loop turn, also driven directly by tests -----------------------
    def handle(self, payloads: list[tuple[str, int, int, bytes | None]], now: float) -> int:
        """Feed (topic, partition, offset, value) records to the engine and the grouper; queue
        the messages of the groups that are complete. Returns how many were queued."""
        self.silences.refresh()
        is_silenced = self.silences.matcher(now)
        for topic, partition, offset, value in payloads:
            RECORDS.inc()
            try:
                observation = Observation.from_record(decode(value or b""))
            except ValueError as error:
                BAD_RECORDS.inc()
                log.warning("skipping record %s[%d]@%d: %s", topic, partition, offset, error)
            else:
                self.watermark = max(self.watermark, observation.end)
                for event in self.engine.observe(observation, is_silenced):
                    EVENTS.labels(event.kind.value).inc()
                    self.grouper.add(event, now)
            # Advanced only once the record's effects are in the state.
            self.offsets.setdefault(topic, {})[partition] = offset + 1
        for silence_id, labels in is_silenced.hits:
            SILENCED.inc()
            # Once per silence and series, not once per interval of a long silenced incident.
            seen = (silence_id, labels["rule"], labels["series"])
            if seen not in self._silenced_logged:
                if len(self._silenced_logged) > 10_000:
                    self._silenced_logged.clear()
                self._silenced_logged.add(seen)
                log.info(
                    "silenced by %s: %s", silence_id,
                    ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "series"),
                )
        FIRING.set(self.engine.firing_count())
        queued = 0
        for group in self.grouper.due(self.watermark, now):
            message = render(group, self.config.dashboard_url)
            receivers = [r.name for r in self.config.receivers_for(group.severity)]
            if not receivers:
                log.warning(
                    "no receiver has a tag routed from severity %s; message dropped: %s",
                    group.severity, message.title,
                )
                continue
            log.info("queued for %s: %s", ", ".join(receivers), message.title)
            queued += len(self.dispatcher.enqueue(message, receivers, now))
        return queued

    def snapshot(self) -> store.Snapshot:
        return store.Snapshot(
            offsets=self.offsets,
            series=self.engine.to_json(),
            groups=[g.to_json() for g in self.grouper.pending()],
            outbox=[e.to_json() for e in self.dispatcher.entries],
            next_id=self.dispatcher.next_id,
            watermark=self.watermark,
        )

    def save(self) -> None:
        store.save(self.config.state_file, self.snapshot())

    def quiet(self) -> bool:
        """Nothing left to do but wait for records."""
        return not self.grouper.pending() and self.dispatcher.idle()

    # --- the Kafka loop --------------------------------------------------------------------------
    def run(self, stop: threading.Event, until_idle: float | None = None) -> None:
        from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

        from common.kafka_io import consumer_config

        config = self.config
        consumer = Consumer(
            consumer_config(
                config.bootstrap_servers,
                group_id=config.group_id,
                security=config.kafka_security,
                **{
                    "auto.offset.reset": config.auto_offset_reset,
                    "group.instance.id": config.instance_id,
                    "session.timeout.ms": 10000,
                },
            )
        )

        last_activity, assigned = time.monotonic(), False

        def on_assign(_: Any, partitions: list[TopicPartition]) -> None:
            nonlocal last_activity, assigned
            # The state file, not Kafka's committed offset, says what the state has seen.
            for tp in partitions:
                saved = self.offsets.get(tp.topic, {}).get(tp.partition)
                if saved is not None:
                    tp.offset = saved
            consumer.assign(partitions)
            # Idleness counts only once there are partitions to read.
            last_activity, assigned = time.monotonic(), True
            log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

        consumer.subscribe([config.result_topic], on_assign=on_assign)
        log.info(
            "alerting on %s as group %s with %d rule(s) and %d receiver(s)",
            config.result_topic, config.group_id, len(config.rules), len(config.receivers),
        )
        try:
            while not stop.is_set():
                messages = consumer.consume(num_messages=_BATCH, timeout=_POLL_S)
                payloads = []
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("Kafka: %s", error)
                        continue
                    where = (message.topic(), message.partition(), message.offset())
                    topic, partition, offset = where
                    if topic is not None and partition is not None and offset is not None:
                        payloads.append((topic, partition, offset, message.value()))
                now = time.time()
                queued = self.handle(payloads, now)
                delivered_or_failed = self.dispatcher.collect(now)
                if payloads or queued or delivered_or_failed:
                    self.save()
                if payloads:
                    try:
                        consumer.commit(
                            offsets=[
                                TopicPartition(config.result_topic, partition, offset)
                                for partition, offset in self.offsets.get(
                                    config.result_topic, {}
                                ).items()
                            ],
                            asynchronous=False,
                        )
                    except KafkaException as error:
                        # Harmless: the state file holds the offsets we resume from.
                        log.warning("offset commit failed (state file is authoritative): %s", error)
                self.dispatcher.dispatch(now)
                if payloads or not self.quiet():
                    last_activity = time.monotonic()
                elif (
                    until_idle is not None
                    and assigned
                    and time.monotonic() - last_activity >= until_idle
                ):
                    log.info("idle for %.0fs with nothing pending; stopping", until_idle)
                    break
                # With deliveries under way, wait on them rather than spin.
                if (
                    not payloads
                    and self.dispatcher.pending()
                    and self.dispatcher.collect(time.time(), wait=_POLL_S)
                ):
                    self.save()
        finally:
            self.dispatcher.collect(time.time())
            self.save()
            consumer.close()
            self.dispatcher.close()
            log.info("alerter stopped; %d notification(s) still queued", self.dispatcher.pending())
