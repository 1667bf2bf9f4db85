"""Delivery through apprise to real receivers on 127.0.0.1: retries, independence, secrecy."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import REGISTRY

from sinks.alerting.config import Delivery, RateLimit, Receiver
from sinks.alerting.messages import Message
from sinks.alerting.notifier import AppriseSender, Dispatcher, Send
from sinks.alerting.redact import Redactor
from tests.alerting_support import HttpReceiver, SmtpReceiver

MAIL_PASSWORD = "MailPassw0rd-7f3a"
HOOK_TOKEN = "HookToken-c2d9e8"
HOOK_PATH = "hooks/PathSecret-41b7"


def metric(name: str, receiver: str) -> float:
    return REGISTRY.get_sample_value(name, {"receiver": receiver}) or 0.0


def drive(dispatcher: Dispatcher, until: object, timeout: float = 60.0) -> None:
    """The service's delivery half of a loop turn, until ``until()`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not until():  # type: ignore[operator]
        assert time.monotonic() < deadline, "delivery did not finish in time"
        dispatcher.collect(time.time(), wait=0.05)
        dispatcher.dispatch(time.time())


def test_failing_receiver_is_retried_while_the_others_get_their_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with SmtpReceiver("alerts", MAIL_PASSWORD) as smtp, \
            HttpReceiver("hook", HOOK_TOKEN) as http:
        http.failing = True
        receivers = [
            Receiver(name="mail", url=smtp.url("alerts", MAIL_PASSWORD), tags=["page"]),
            Receiver(name="hook", url=http.url("hook", HOOK_TOKEN, HOOK_PATH), tags=["page"]),
        ]
        redactor = Redactor(r.resolved_url() for r in receivers)
        senders: dict[str, Send] = {r.name: AppriseSender(r, 10, redactor) for r in receivers}
        failures_before = metric("anomstream_alert_delivery_failures_total", "hook")
        dispatcher = Dispatcher(
            senders, receivers, Delivery(initial_backoff=0.2, max_backoff=1.0)
        )
        try:
            with caplog.at_level(logging.DEBUG):
                for n in range(3):
                    dispatcher.enqueue(
                        Message(f"[FIRING] test {n}", f"body {n}", "failure"),
                        ["mail", "hook"], time.time(),
                    )
                drive(dispatcher, lambda: len(smtp.received()) == 3 and http.failures >= 3)
                # The mail receiver got all three while the webhook kept failing.
                assert http.received() == []
                http.failing = False
                drive(dispatcher, lambda: dispatcher.pending() == 0)
        finally:
            dispatcher.close()
        assert [m.title for m in smtp.received()] == [f"[FIRING] test {n}" for n in range(3)]
        # Retried in order, nothing lost or duplicated.
        assert [m.title for m in http.received()] == [f"[FIRING] test {n}" for n in range(3)]
        assert smtp.logins and all(login == ("alerts", MAIL_PASSWORD) for login in smtp.logins)
        failures = metric("anomstream_alert_delivery_failures_total", "hook") - failures_before
        assert failures == http.failures >= 3
        assert metric("anomstream_alert_outbox_pending", "hook") == 0
        retries = [r for r in caplog.records if "retrying" in r.getMessage()]
        assert len(retries) == http.failures
        formatter = logging.Formatter("%(message)s")
        logged = "\n".join(redactor(formatter.format(r)) for r in caplog.records)
        assert "500" in logged  # the reason is logged...
        for secret in (MAIL_PASSWORD, HOOK_TOKEN, "PathSecret-41b7"):
            assert secret not in logged  # ...the tokens are not


def test_rate_limit_holds_messages_back_without_dropping_them() -> None:
    with HttpReceiver("hook", HOOK_TOKEN) as http:
        receiver = Receiver(
            name="hook", url=http.url("hook", HOOK_TOKEN, "x"),
            rate_limit=RateLimit(messages=2, per=3600),
        )
        dispatcher = Dispatcher(
            {"hook": AppriseSender(receiver, 10, Redactor([]))}, [receiver], Delivery()
        )
        try:
            for n in range(4):
                dispatcher.enqueue(Message(f"m{n}", "b", "warning"), ["hook"], time.time())
            drive(dispatcher, lambda: len(http.received()) == 2)
            for _ in range(10):  # more turns change nothing: the bucket is empty for an hour
                dispatcher.collect(time.time(), wait=0.05)
                dispatcher.dispatch(time.time())
            assert [m.title for m in http.received()] == ["m0", "m1"]
            assert dispatcher.pending() == 2
        finally:
            dispatcher.close()
