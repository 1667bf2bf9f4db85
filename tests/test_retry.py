"""The retry policy, the rebuild budget and the log summaries, without a broker."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError, KafkaException

from common.logs import DeadLetterLog, ThrottledLog
from common.retry import (
    Backoff,
    RebuildBudget,
    TooManyFailures,
    is_fatal,
    is_transient,
    retry,
)
from stream.config import DetectorSpec
from stream.routing import NON_FINITE, Router


class Clock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def kafka_error(code: int, *, fatal: bool = False, retriable: bool = False,
                txn_requires_abort: bool = False) -> KafkaException:
    return KafkaException(KafkaError(code, "test", fatal=fatal, retriable=retriable,
                                     txn_requires_abort=txn_requires_abort))


def test_transient_errors_are_retried_with_doubling_back_off_until_they_pass() -> None:
    clock = Clock()
    failures = [kafka_error(KafkaError._WAIT_COORD), kafka_error(KafkaError._TIMED_OUT),
                kafka_error(KafkaError.COORDINATOR_LOAD_IN_PROGRESS),
                kafka_error(KafkaError.UNKNOWN, retriable=True)]

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "committed"

    backoff = Backoff(first_s=0.1, max_s=0.3, give_up_s=60)
    assert retry(call, "commit", backoff=backoff, sleep=clock.sleep, clock=clock) == "committed"
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.3, 0.3])


def test_a_transient_error_that_outlasts_the_budget_is_raised() -> None:
    clock = Clock()
    calls = []

    def call() -> None:
        calls.append(clock.now)
        raise kafka_error(KafkaError._ALL_BROKERS_DOWN)

    with pytest.raises(KafkaException) as raised:
        retry(call, "commit", backoff=Backoff(first_s=1, max_s=5, give_up_s=30),
              sleep=clock.sleep, clock=clock)
    assert raised.value.args[0].code() == KafkaError._ALL_BROKERS_DOWN
    assert clock.now == pytest.approx(30)  # waited exactly the budget, not past it
    assert len(calls) == 9  # 0, 1, 3, 7, 12, 17, 22, 27, 30


@pytest.mark.parametrize(
    "error",
    [
        kafka_error(KafkaError._FATAL, fatal=True),
        kafka_error(KafkaError._FENCED, fatal=True),
        kafka_error(KafkaError._TIMED_OUT, txn_requires_abort=True),
        kafka_error(KafkaError.FENCED_INSTANCE_ID),
        ValueError("a bug"),
    ],
    ids=["fatal", "fenced", "abortable", "fenced-member", "other"],
)
def test_errors_waiting_cannot_cure_are_raised_at_once(error: Exception) -> None:
    clock = Clock()
    calls = []

    def call() -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        retry(call, "commit", sleep=clock.sleep, clock=clock)
    assert calls == [1] and clock.sleeps == []


def test_fatal_means_a_fatal_flag_or_the_fatal_code() -> None:
    assert is_fatal(kafka_error(KafkaError._FATAL))
    assert is_fatal(kafka_error(KafkaError._FENCED, fatal=True))
    assert not is_fatal(kafka_error(KafkaError._TIMED_OUT))
    assert not is_transient(kafka_error(KafkaError._TIMED_OUT, fatal=True))
    assert is_transient(kafka_error(KafkaError.NOT_COORDINATOR))


def test_retry_logs_the_first_failure_and_the_recovery_not_every_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    remaining = [kafka_error(KafkaError._TRANSPORT)] * 20

    def call() -> None:
        if remaining:
            raise remaining.pop()

    with caplog.at_level(logging.INFO, logger="anomstream.retry"):
        retry(call, "sink commit", backoff=Backoff(give_up_s=600), sleep=clock.sleep, clock=clock)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("sink commit failed (")
    assert messages[1].startswith("sink commit succeeded after 20 retries")


def test_the_rebuild_budget_allows_a_few_failures_per_window() -> None:
    clock = Clock()
    budget = RebuildBudget("score", limit=2, window_s=60, clock=clock)
    error = kafka_error(KafkaError._FENCED, fatal=True)
    budget.spend(error)
    budget.spend(error)
    clock.now = 61  # the first two are out of the window
    budget.spend(error)
    budget.spend(error)
    with pytest.raises(TooManyFailures, match="3 client failures within 60 s"):
        budget.spend(error)


def test_dead_letters_are_summarised_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("test.deadletters")
    summary = DeadLetterLog(logger, "route", interval_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.deadletters"):
        for _ in range(800):
            summary.count("non_finite")
            summary.report()
        summary.count("not_json", 2)
        clock.now = 10
        summary.report()
        summary.report()  # nothing new: no line
        summary.count("late")
        summary.report(force=True)
    assert [r.getMessage() for r in caplog.records] == [
        "route: dead-lettered 802 records: non_finite (800), not_json (2)",
        "route: dead-lettered 1 records: late (1)",
    ]


def test_a_repeated_error_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("test.throttled")
    throttled = ThrottledLog(logger, "route", interval_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.throttled"):
        for second in range(25):
            clock.now = second
            throttled.warn("all brokers down")
            throttled.warn("all brokers down")
        throttled.warn("coordinator moved")
    assert [r.getMessage() for r in caplog.records] == [
        "route: all brokers down", "route: all brokers down", "route: all brokers down",
        "route: coordinator moved",
    ]


def test_integers_beyond_the_float_range_are_non_finite() -> None:
    router = Router([DetectorSpec(name="cpu", input="m", measures=("v",), dimensions=("host",),
                                  interval="60s")])
    huge = "9" * 400
    points, rejections = router.route("m", f'{{"timestamp": 0, "v": {huge}, "host": "a"}}'.encode())
    assert points == []
    assert [(r.reason, r.detail) for r in rejections] == [
        (NON_FINITE, "measure 'v' is an integer of 400 digits, beyond the float range")
    ]
    negative = f'{{"timestamp": 0, "v": -{huge}, "host": "a"}}'.encode()
    assert router.route("m", negative)[1][0].reason == NON_FINITE
    late_timestamp = f'{{"timestamp": {huge}, "v": 1, "host": "a"}}'.encode()
    rejection = router.route("m", late_timestamp)[1][0]
    assert rejection.reason == "bad_timestamp" and "400 digits" in rejection.detail
