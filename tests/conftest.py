"""Session-wide fixtures that need the real local Kafka broker.

One broker serves the whole test session (starting a JVM per test would dominate the run);
tests stay independent by working on their own uniquely named topics from ``topic_factory``.
Mark tests that use these fixtures with ``@pytest.mark.kafka``.

To skip the broker start while iterating, run one with ``anomstream kafka up`` and point the
tests at it: ``ANOMSTREAM_TEST_BOOTSTRAP=127.0.0.1:9092 .venv/bin/pytest ...``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping

import pytest

from app.kafka_local import LocalKafka, free_port
from common.kafka_io import create_topics

TopicFactory = Callable[..., str]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``"127.0.0.1:<port>"`` of a broker started for this session on free ports."""
    external = os.environ.get("ANOMSTREAM_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    data_dir = tmp_path_factory.mktemp("kafka")
    broker_port = free_port()
    controller_port = free_port()
    while controller_port == broker_port:
        controller_port = free_port()
    with LocalKafka(data_dir, port=broker_port, controller_port=controller_port) as kafka:
        yield kafka.bootstrap


@pytest.fixture
def topic_factory(kafka_bootstrap: str, request: pytest.FixtureRequest) -> TopicFactory:
    """Create topics with unique names: ``topic_factory("prices", partitions=3, compacted=True)``.

    The name starts with the given prefix (default: the test's name) so broker logs stay readable.
    """

    def make(
        prefix: str | None = None,
        *,
        partitions: int = 1,
        compacted: bool = False,
        config: Mapping[str, str] | None = None,
    ) -> str:
        base = prefix or request.node.name
        # Kafka topic names allow [a-zA-Z0-9._-] up to 249 chars.
        safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in base)[:150]
        name = f"{safe}-{uuid.uuid4().hex[:10]}"
        create_topics(kafka_bootstrap, [name], partitions=partitions, compacted=compacted,
                      config=config)
        return name

    return make
