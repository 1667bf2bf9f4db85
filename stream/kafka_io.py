"""Small shared Kafka helpers on top of confluent-kafka: client configs, topic creation, reading
a topic to its end.

Every module that talks to Kafka builds its clients from ``producer_config``/``consumer_config``
so that delivery guarantees (idempotence, ``acks=all``, ``read_committed``) are the same
everywhere and are changed in one place.

>>> producer_config("127.0.0.1:9092", **{"transactional.id": "worker-0"})["acks"]
'all'
>>> consumer_config("127.0.0.1:9092", group_id="detectors")["isolation.level"]
'read_committed'
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from stream.retry import Backoff, is_transient, retry

DEFAULT_TIMEOUT_S = 30.0


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Producer settings that neither lose nor duplicate records on retries.

    Pass librdkafka keys with dots through a dict: ``producer_config(b, **{"linger.ms": 0})``.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        # Idempotence makes retries safe (no duplicates, order kept per partition).
        "enable.idempotence": True,
        "acks": "all",
        # A few ms of batching buys most of the throughput at negligible latency.
        "linger.ms": 5,
        "compression.type": "lz4",
    }
    config.update(overrides)
    return config


def consumer_config(
    bootstrap: str, group_id: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """Consumer settings for exactly-once pipelines: only committed records, explicit commits.

    Without ``group_id`` a throwaway group is used (for ``assign``-based readers that never commit).
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id or f"anomstream-reader-{uuid.uuid4().hex}",
        # Records of aborted or still-open transactions must never reach a detector.
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        # Offsets are committed by the application together with its results, never on a timer.
        "enable.auto.commit": False,
    }
    config.update(overrides)
    return config


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    compacted: bool = False,
    config: Mapping[str, str] | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Create ``names`` (single replica) unless they exist, and wait until all have leaders.

    Idempotent: topics that already exist are left as they are (their partition count is not
    changed). ``compacted`` sets ``cleanup.policy=compact`` (for keyed state/latest-value topics).
    """
    names = list(names)
    if not names:
        return
    topic_config = dict(config or {})
    if compacted:
        topic_config["cleanup.policy"] = "compact"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new_topics = [
        NewTopic(name, num_partitions=partitions, replication_factor=1, config=topic_config)
        for name in names
    ]
    futures = admin.create_topics(
        new_topics, operation_timeout=timeout_s, request_timeout=timeout_s
    )
    for future in futures.values():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    _wait_until_ready(admin, names, timeout_s)


def _wait_until_ready(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    """Creation returns before the topic serves: metadata may lack it, and for a moment after
    metadata names a leader that broker still answers NOT_LEADER to offset queries. Wait until
    every partition answers a ListOffsets, so callers can use the topic at once."""
    deadline = time.monotonic() + timeout_s
    last_problem = "no metadata yet"
    while time.monotonic() < deadline:
        metadata = admin.list_topics(timeout=timeout_s)
        partitions = []
        for name in names:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None or not topic.partitions:
                last_problem = f"{name}: {topic.error if topic else 'not in metadata'}"
                break
            partitions += [KafkaTopicPartition(name, p) for p in topic.partitions]
        else:
            futures = admin.list_offsets({tp: OffsetSpec.latest() for tp in partitions},
                                         request_timeout=timeout_s)
            # Collect every answer (an abandoned future leaves events queued in the client).
            errors = [f.exception(timeout=timeout_s) for f in futures.values()]
            failures = [e for e in errors if e is not None]
            if not failures:
                return
            for failure in failures:
                if not is_transient(failure):
                    raise failure
            last_problem = str(failures[0])
        time.sleep(0.05)
    raise TimeoutError(f"topics {names} not ready after {timeout_s:.0f} s: {last_problem}")


def _end_offsets(
    consumer: Consumer, topic: str, partitions: Iterable[int], deadline: float
) -> dict[int, int]:
    """Partition -> end offset (LSO under read_committed) for non-empty partitions."""
    ends: dict[int, int] = {}
    for partition in partitions:
        remaining = max(0.0, deadline - time.monotonic())
        low, high = retry(
            partial(consumer.get_watermark_offsets, KafkaTopicPartition(topic, partition),
                    timeout=max(0.1, remaining), cached=False),
            f"reading the end offset of {topic}[{partition}]",
            backoff=Backoff(first_s=0.05, max_s=1.0, give_up_s=remaining),
        )
        if high > low:
            ends[partition] = high
    return ends


def consume_all(
    bootstrap: str,
    topic: str,
    *,
    read_committed: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Message]:
    """Read ``topic`` from the beginning up to its end as of the call, then return.

    The end per partition is taken first (the last stable offset under ``read_committed``, so
    aborted and still-open transactions are neither returned nor waited for); records written
    after that are left out. The result is ordered by partition, then offset. Raises
    ``TimeoutError`` if the end is not reached within ``timeout_s``.
    """
    isolation = "read_committed" if read_committed else "read_uncommitted"
    settings: dict[str, Any] = {"isolation.level": isolation, "enable.partition.eof": True}
    consumer = Consumer(consumer_config(bootstrap, **settings))
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        topic_metadata = metadata.topics[topic]
        if topic_metadata.error is not None:
            raise KafkaException(topic_metadata.error)
        deadline = time.monotonic() + timeout_s
        ends = _end_offsets(consumer, topic, topic_metadata.partitions, deadline)
        if not ends:
            return []
        consumer.assign([KafkaTopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        messages: list[Message] = []
        pending = set(ends)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {topic!r} to its end took over {timeout_s:.0f} s; "
                    f"partitions still short of their end: {sorted(pending)}"
                )
            message = consumer.poll(0.5)
            if message is None:
                continue
            partition = message.partition()
            offset = message.offset()
            error = message.error()
            if error is not None:
                # End of partition: a transaction marker may sit at the end, past the last record.
                if error.code() == KafkaError._PARTITION_EOF and partition is not None:
                    pending.discard(partition)
                    continue
                raise KafkaException(error)
            if partition is None or offset is None or partition not in ends:
                continue
            if offset < ends[partition]:
                messages.append(message)
            # A record at or past the end also means done: when a transaction marker sits last
            # before the end, no record has the end's offset - 1, and a topic that producers
            # keep writing to may never report the partition's end.
            if offset >= ends[partition] - 1:
                pending.discard(partition)
        messages.sort(key=lambda m: (m.partition(), m.offset()))
        return messages
    finally:
        consumer.close()
