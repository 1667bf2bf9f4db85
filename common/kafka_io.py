"""Small shared Kafka helpers on top of confluent-kafka: client configs, a connection check,
topic creation, reading a topic to its end.

Every module that talks to Kafka builds its clients from ``producer_config``/``consumer_config``
(admin clients from ``client_config``) so that delivery guarantees (idempotence, ``acks=all``,
``read_committed``), the security settings (``common/kafka_security.py``) and the routing of
librdkafka's own log lines are the same everywhere and are changed in one place.

>>> producer_config("127.0.0.1:9092", **{"transactional.id": "worker-0"})["acks"]
'all'
>>> consumer_config("127.0.0.1:9092", group_id="detectors")["isolation.level"]
'read_committed'
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from common.kafka_security import PLAINTEXT, KafkaSecurity
from common.retry import Backoff, is_transient, retry

DEFAULT_TIMEOUT_S = 30.0
# How long a command tries to reach the cluster before it gives up with one line saying why.
# librdkafka retries a refused connection every second or so; ten seconds rides out a broker that
# is just restarting and still leaves the whole failure well under half a minute.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# The same librdkafka line (minus its thread and timing) is logged at most this often.
CLIENT_LOG_REPEAT_S = 60.0


class ClientLog:
    """librdkafka's log lines through Python logging, each distinct line once per interval.

    Given to clients as confluent-kafka's ``logger`` setting. Without it librdkafka writes to
    stderr by itself, and a client that cannot connect repeats the same line many times a second
    (an unreachable broker gave ~500 lines in a few seconds). Lines are keyed without their
    ``[thrd:...]`` prefix and ``(after 3ms in state CONNECT...)`` suffix, which vary per retry.
    """

    _VARYING = re.compile(r"^\[thrd:[^\]]*\]: |\s*\(after \d+ms in state [^)]*\)")

    def __init__(
        self,
        logger: logging.Logger,
        repeat_s: float = CLIENT_LOG_REPEAT_S,
        level: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.repeat_s = repeat_s
        self.clock = clock
        # Set: every line at this level instead of librdkafka's own (a probe's lines are DEBUG).
        self.level = level
        # The latest warning or error, for a probe whose errors say less (a PLAINTEXT client on
        # a TLS port gets only "transport failure" as an error, the reason only in the log).
        self.last_problem = ""
        self._last: dict[tuple[int, str], float] = {}
        self._suppressed: dict[tuple[int, str], int] = {}
        # Clients in several threads (a worker's stages) share this object.
        self._lock = threading.Lock()

    def log(self, level: int, message: str, *args: Any) -> None:
        """The ``logging.Logger.log`` signature, as confluent-kafka calls it."""
        text = message % args if args else message
        if level >= logging.WARNING:
            self.last_problem = text
        key = (level, self._VARYING.sub("", text))
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.repeat_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            if len(self._last) > 1000:  # bounded: a long run sees many distinct lines
                self._last.clear()
            self._last[key] = now
            repeated = self._suppressed.pop(key, 0)
        suffix = f" (and {repeated} more like it in {self.repeat_s:.0f} s)" if repeated else ""
        self.logger.log(self.level or level, "%s%s", text, suffix)


CLIENT_LOG = ClientLog(logging.getLogger("anomstream.kafka.client"))


def produce_when_room(producer: Any, topic: str, *args: Any, wait_s: float = 0.05,
                      **kwargs: Any) -> None:
    """``producer.produce(topic, ...)``, waiting while the client's local queue is full.

    A full queue (``BufferError``) is not a failure: librdkafka is sending; ``poll`` lets it
    drain (and serves delivery callbacks) before the record is handed over again.
    """
    while True:
        try:
            producer.produce(topic, *args, **kwargs)
            return
        except BufferError:
            producer.poll(wait_s)


def client_config(bootstrap: str, security: KafkaSecurity = PLAINTEXT) -> dict[str, Any]:
    """What every client needs: where the cluster is, how to authenticate, where logs go.

    Holds secrets when ``security`` has any: never log the result.
    """
    return {
        "bootstrap.servers": bootstrap,
        "logger": CLIENT_LOG,
        **security.client_settings(),
    }


def producer_config(
    bootstrap: str, *, security: KafkaSecurity = PLAINTEXT, **overrides: Any
) -> dict[str, Any]:
    """Producer settings that neither lose nor duplicate records on retries.

    Pass librdkafka keys with dots through a dict: ``producer_config(b, **{"linger.ms": 0})``.
    """
    config: dict[str, Any] = {
        **client_config(bootstrap, security),
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
    bootstrap: str,
    group_id: str | None = None,
    *,
    security: KafkaSecurity = PLAINTEXT,
    **overrides: Any,
) -> dict[str, Any]:
    """Consumer settings for exactly-once pipelines: only committed records, explicit commits.

    Without ``group_id`` a throwaway group is used (for ``assign``-based readers that never commit).
    """
    config: dict[str, Any] = {
        **client_config(bootstrap, security),
        "group.id": group_id or f"anomstream-reader-{uuid.uuid4().hex}",
        # Records of aborted or still-open transactions must never reach a detector.
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        # Offsets are committed by the application together with its results, never on a timer.
        "enable.auto.commit": False,
    }
    config.update(overrides)
    return config


class KafkaUnavailable(Exception):
    """The cluster cannot be used: unreachable, refused our credentials, TLS failed. The message
    is one line naming the address and the reason, fit for an operator."""


# Errors that retrying will not mend: the broker answered and said no.
_REFUSALS = frozenset({
    KafkaError._AUTHENTICATION,
    KafkaError._SSL,
    KafkaError.SASL_AUTHENTICATION_FAILED,
})


def _is_refusal(error: KafkaError) -> bool:
    # A TLS alert from the broker (e.g. "bad certificate" for a client without one on a mutual-TLS
    # listener) arrives as a transport error, but it is the broker's answer, not a network fault.
    return error.code() in _REFUSALS or "ssl/tls alert" in error.str()


# Parts of librdkafka's error text that vary per retry or repeat what the message already says.
_TIMING = re.compile(r"\s*\((?:after \d+ms in state [^)]*|\d+ identical error\(s\) suppressed)\)"
                     r"|^\S+/(?:bootstrap|\d+): ")


def check_connection(
    bootstrap: str,
    security: KafkaSecurity = PLAINTEXT,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> None:
    """Fetch the cluster's metadata once; raise ``KafkaUnavailable`` with the reason if we can't.

    Commands call this before they build their clients: a broker that refuses our password or
    certificate fails at once, an unreachable one after ``timeout_s``, either way with one line
    instead of minutes of retries and the client library's log. The probe's own librdkafka lines
    go to DEBUG; its collected errors make the message.
    """
    try:
        settings = client_config(bootstrap, security)
    except ValueError as error:  # a secret's variable or file is missing
        raise KafkaUnavailable(f"cannot connect to Kafka at {bootstrap}: {error}") from None
    errors: list[KafkaError] = []
    probe_log = ClientLog(CLIENT_LOG.logger, level=logging.DEBUG)
    settings["logger"] = probe_log
    settings["error_cb"] = errors.append
    try:
        admin = AdminClient(settings)
    except KafkaException as error:  # librdkafka rejected a setting (e.g. an unreadable CA file)
        raise KafkaUnavailable(
            f"cannot connect to Kafka at {bootstrap}: {error.args[0].str()}"
        ) from None
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            admin.list_topics(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            return
        except KafkaException as error:
            last = error.args[0].str()
        admin.poll(0)  # delivers the connection errors to error_cb
        refusal = next((e for e in errors if _is_refusal(e)), None)
        if refusal is not None or time.monotonic() >= deadline:
            reason = _reason(refusal, errors, probe_log.last_problem, last)
            waited = "" if refusal is not None else f" within {timeout_s:.0f} s"
            raise KafkaUnavailable(
                f"cannot connect to Kafka at {bootstrap} ({security.describe()}){waited}: {reason}"
            )


def _reason(
    refusal: KafkaError | None, errors: list[KafkaError], logged: str, fallback: str
) -> str:
    """The most telling error: a refusal, else the latest connection error, else the latest
    problem the client logged, else ``fallback`` (the metadata request's own error)."""
    specific = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN]
    chosen = refusal or (specific[-1] if specific else None)
    text = chosen.str() if chosen is not None else logged
    return ClientLog._VARYING.sub("", _TIMING.sub("", text)).strip() or fallback


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    compacted: bool = False,
    config: Mapping[str, str] | None = None,
    *,
    replication_factor: int | None = None,
    min_insync_replicas: int | None = None,
    security: KafkaSecurity = PLAINTEXT,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Create ``names`` unless they exist, and wait until all have leaders.

    Idempotent: topics that already exist are left as they are (their partition count and
    replication are not changed). ``compacted`` sets ``cleanup.policy=compact`` (for keyed
    state/latest-value topics). ``replication_factor`` and ``min_insync_replicas`` left at None
    take the cluster's defaults (``default.replication.factor``, ``min.insync.replicas``); a
    replication factor above the cluster's broker count raises ``ReplicationError``.
    """
    names = list(names)
    if not names:
        return
    topic_config = dict(config or {})
    if compacted:
        topic_config["cleanup.policy"] = "compact"
    if min_insync_replicas is not None:
        topic_config["min.insync.replicas"] = str(min_insync_replicas)
    admin = AdminClient(client_config(bootstrap, security))
    if replication_factor is not None:
        _check_brokers(admin, bootstrap, names, replication_factor, timeout_s)
    new_topics = [
        # -1: the broker's default.replication.factor (Kafka 2.4+).
        NewTopic(name, num_partitions=partitions, replication_factor=replication_factor or -1,
                 config=topic_config)
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


class ReplicationError(ValueError):
    """Topics cannot get the replication factor asked for: the cluster has too few brokers."""


def _check_brokers(
    admin: AdminClient, bootstrap: str, names: list[str], replication_factor: int,
    timeout_s: float,
) -> None:
    """Say plainly why a topic to create cannot get ``replication_factor`` replicas (the broker's
    own answer, INVALID_REPLICATION_FACTOR, names neither the setting nor the fix)."""
    metadata = admin.list_topics(timeout=timeout_s)
    missing = [name for name in names if name not in metadata.topics]
    brokers = len(metadata.brokers)
    if missing and brokers < replication_factor:
        raise ReplicationError(
            f"cannot create {', '.join(missing)} with replication factor {replication_factor}: "
            f"the cluster at {bootstrap} has {brokers} broker(s); set a replication factor of at "
            f"most {brokers} or add brokers"
        )


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
    security: KafkaSecurity = PLAINTEXT,
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
    consumer = Consumer(consumer_config(bootstrap, security=security, **settings))
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
