"""One retry policy for every call a broker outage can interrupt (docs/decisions/0006).

A Kafka call fails for a while when the broker restarts, a coordinator moves or a request times
out; those errors are *transient* and the call is repeated with exponential back-off until it
succeeds or ``Backoff.give_up_s`` has passed (a broker down for 5 minutes must not end a
process; one down for much longer is an outage a supervisor should see). Anything else is raised
at once: a fatal error (fenced, ``_FATAL``) calls for a new client, an abortable transaction error
for an abort, and a programming error for a traceback.

>>> calls = []
>>> def flaky() -> str:
...     calls.append(1)
...     if len(calls) < 3:
...         raise TimeoutError("not yet")
...     return "done"
>>> retry(flaky, "flaky call", transient=lambda e: isinstance(e, TimeoutError),
...       backoff=Backoff(first_s=0.001), sleep=lambda s: None)
'done'
>>> len(calls)
3
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import KafkaError, KafkaException

log = logging.getLogger("anomstream.retry")

T = TypeVar("T")

# Codes librdkafka does not always flag ``retriable()`` although waiting cures them: no broker,
# a coordinator being looked up (``_WAIT_COORD``) or moved, a leader being elected, a topic just
# created.
TRANSIENT_CODES = frozenset({
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._WAIT_COORD,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_LEADER_EPOCH,
    KafkaError.FENCED_LEADER_EPOCH,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.CONCURRENT_TRANSACTIONS,
})


@dataclass(frozen=True)
class Backoff:
    """Waits of ``first_s``, doubling up to ``max_s``, for at most ``give_up_s`` in all."""

    first_s: float = 0.1
    max_s: float = 5.0
    give_up_s: float = 600.0


def is_fatal(error: BaseException) -> bool:
    """A Kafka error after which the client is unusable: only a new client can go on."""
    if not isinstance(error, KafkaException) or not error.args:
        return False
    kafka_error = error.args[0]
    return isinstance(kafka_error, KafkaError) and (
        bool(kafka_error.fatal()) or kafka_error.code() == KafkaError._FATAL
    )


def is_transient(error: BaseException) -> bool:
    """A Kafka error that waiting cures (never a fatal one, never one that needs an abort)."""
    if not isinstance(error, KafkaException) or not error.args or is_fatal(error):
        return False
    kafka_error = error.args[0]
    if not isinstance(kafka_error, KafkaError) or kafka_error.txn_requires_abort():
        return False
    return bool(kafka_error.retriable()) or kafka_error.code() in TRANSIENT_CODES


def _kind(error: BaseException) -> object:
    """What makes two failures the same for the log: the Kafka error code, else the type."""
    if isinstance(error, KafkaException) and error.args and isinstance(error.args[0], KafkaError):
        return error.args[0].code()
    return type(error)


def retry(
    call: Callable[[], T],
    what: str,
    *,
    transient: Callable[[BaseException], bool] = is_transient,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call()``, repeated while it raises a ``transient`` error, with back-off.

    Logs a warning when the first attempt fails (and when the error changes) and one line when a
    later one succeeds, not a line per attempt (an outage of minutes would otherwise flood the
    log). Once ``backoff.give_up_s`` have passed the last error is raised (so a transient error
    escaping this function means "gave up"); other errors propagate at once.
    """
    began = clock()
    wait = backoff.first_s
    attempts = 0
    last_kind: object = None
    while True:
        try:
            result = call()
        except Exception as error:
            if not transient(error):
                raise
            attempts += 1
            elapsed = clock() - began
            if elapsed >= backoff.give_up_s:
                log.error("%s: giving up after %.0f s (%d attempts): %s", what, elapsed,
                          attempts, error)
                raise
            kind = _kind(error)
            if kind != last_kind:  # the first failure, and each change of error
                last_kind = kind
                log.warning("%s failed (%s); retrying for up to %.0f s", what, error,
                            backoff.give_up_s)
            sleep(min(wait, max(0.0, backoff.give_up_s - elapsed)))
            wait = min(wait * 2, backoff.max_s)
            continue
        if attempts:
            log.info("%s succeeded after %d retries (%.1f s)", what, attempts, clock() - began)
        return result


class TooManyFailures(Exception):
    """Fatal client errors came faster than new clients can cure; exit for a supervisor."""


class RebuildBudget:
    """How many fatal client errors a process answers with new clients before giving up.

    A fenced client is replaced and rejoins; but one fenced again and again (a second live copy
    with the same instance id) would rejoin forever, doing nothing. More than ``limit`` failures
    within ``window_s`` raise ``TooManyFailures``.
    """

    def __init__(self, what: str, limit: int = 10, window_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._times: list[float] = []

    def spend(self, error: BaseException) -> None:
        now = self.clock()
        self._times = [t for t in self._times if now - t < self.window_s] + [now]
        if len(self._times) > self.limit:
            raise TooManyFailures(
                f"{self.what}: {len(self._times)} client failures within {self.window_s:.0f} s "
                f"(another live process with the same instance id?), the last: {error}"
            ) from error
