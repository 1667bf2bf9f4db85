"""Keep apprise URLs out of logs: they carry tokens and passwords.

Every log line of the alerter goes through ``Redactor``: the configured URLs and each of their
secret-looking parts (password, user, path segments, query values) are replaced, and any other
``scheme://user:password@`` is stripped of its credentials. Exception texts from apprise pass
through the same formatter, so a failing receiver cannot leak its token either.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@]+@")
# Path parts and query values shorter than this are words like "json" or "no", not tokens.
_MIN_SECRET_LENGTH = 6
MASK = "***"
# Query parameters of apprise URLs that address rather than authenticate; their values (hosts,
# e-mail addresses, modes) stay readable in logs.
_PUBLIC_PARAMETERS = frozenset({
    "smtp", "from", "to", "cc", "bcc", "reply", "mode", "format", "overflow", "name", "method",
    "verify", "rto", "cto", "region", "lang", "priority", "secure",
})


def redacted_url(url: str) -> str:
    """Scheme and host (and port) only: what a person needs to recognise the receiver.

    >>> redacted_url("json://user:s3cret@127.0.0.1:8080/hook?token=abc")
    'json://127.0.0.1:8080/***'
    >>> redacted_url("slack://T000/B000/XXXX")  # a host name is shown lower-case
    'slack://t000/***'
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return MASK
    tail = "/***" if (parts.path not in ("", "/") or parts.query or parts.username) else ""
    return f"{parts.scheme}://{host}{port}{tail}"


def secret_fragments(url: str) -> set[str]:
    """The parts of an apprise URL that may be secrets, in raw and percent-decoded form."""
    fragments: set[str] = set()
    try:
        parts = urlsplit(url)
        candidates = [parts.password or "", parts.username or ""]
    except ValueError:
        return fragments
    candidates += [segment for segment in parts.path.split("/") if segment]
    candidates += [
        value
        for key, value in parse_qsl(parts.query, keep_blank_values=False)
        if key.lower() not in _PUBLIC_PARAMETERS
    ]
    for candidate in candidates:
        for form in (candidate, unquote(candidate)):
            if form == parts.hostname:
                continue  # shown anyway, and masking it would hide which receiver is meant
            if len(form) >= _MIN_SECRET_LENGTH or (form and form == parts.password):
                fragments.add(form)
    return fragments


class Redactor:
    def __init__(self, urls: Iterable[str]) -> None:
        urls = [u for u in urls if u]
        self._replacements: list[tuple[str, str]] = [(u, redacted_url(u)) for u in urls]
        fragments = set().union(*(secret_fragments(u) for u in urls)) if urls else set()
        # Longest first so that a token is not half-replaced by one of its substrings.
        self._fragments = sorted(fragments, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for url, shown in self._replacements:
            text = text.replace(url, shown)
        for fragment in self._fragments:
            text = text.replace(fragment, MASK)
        return _CREDENTIALS.sub(rf"\g<scheme>{MASK}@", text)


class RedactingFormatter(logging.Formatter):
    """Redacts the whole formatted line, traceback and exception text included."""

    def __init__(self, redactor: Redactor, fmt: str | None = None) -> None:
        super().__init__(fmt or "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def install_logging(redactor: Redactor, level: int = logging.INFO) -> None:
    """Route every logger (apprise's included) through one redacting handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(redactor))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # apprise attaches its own handlers in some modes; make it use ours only.
    apprise_logger = logging.getLogger("apprise")
    for existing in list(apprise_logger.handlers):
        apprise_logger.removeHandler(existing)
    apprise_logger.propagate = True
