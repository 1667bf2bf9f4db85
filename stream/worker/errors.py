"""Why a worker stops or replaces its clients."""

from __future__ import annotations

import logging

log = logging.getLogger("anomstream.worker")

class WorkerError(Exception):
    """The worker cannot go on (fenced by a newer instance, broker unreachable, bad topics)."""


class TransactionLost(Exception):
    """A transaction outlived transaction.timeout.ms uncommitted (the broker aborts it)."""
