"""The worker's own topics (repartition, state, results, dead letters) and the layout of a
repartition record, which the route stage writes and the score stage reads."""

from __future__ import annotations

import logging
import struct
from typing import Any

from confluent_kafka import (
    Consumer,
)

from common.kafka_io import consumer_config, create_topics
from stream.config import DetectConfig
from stream.worker.errors import WorkerError

log = logging.getLogger("anomstream.worker")

# Snapshots of big forests exceed Kafka's default 1 MB record limit.
MAX_RECORD_BYTES = 16 * 1024 * 1024
# The event time packed into a repartition record's ``event`` header (followed by the values).
EVENT = struct.Struct(">q")
# Header positions of a repartition record, written by RouteStage, read by ScoreStage.
H_DETECTOR, H_EVENT, H_SOURCE_TOPIC, H_SOURCE_PARTITION, H_SOURCE_OFFSET = range(5)


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
