"""Time-bounded silences: from the config, and from ``anomstream alert silence`` at run time.

A silence made on the command line is one JSON file in ``<state_dir>/silences/``, written
atomically; the running alerter rescans that directory on every loop turn (a stat of a handful of
files), so a new silence holds at once, without a restart or a signal.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from common.files import write_text_atomically
from sinks.alerting.config import SilenceSpec
from sinks.alerting.rules import labels_match

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Silence:
    matchers: dict[str, str]
    starts_at: float | None
    ends_at: float | None
    comment: str = ""
    id: str = ""

    def active(self, now: float) -> bool:
        return (self.starts_at is None or self.starts_at <= now) and (
            self.ends_at is None or now < self.ends_at
        )

    def matches(self, labels: Mapping[str, str], now: float) -> bool:
        return self.active(now) and labels_match(self.matchers, labels)

    @classmethod
    def from_spec(cls, spec: SilenceSpec, index: int) -> Silence:
        return cls(
            dict(spec.matchers), spec.starts_at, spec.ends_at, spec.comment, f"config-{index}"
        )


def parse_matchers(items: Iterable[str]) -> dict[str, str]:
    """``["detector=cpu", "host=web-*"]`` -> ``{"detector": "cpu", "host": "web-*"}``."""
    matchers = {}
    for item in items:
        name, sep, pattern = item.partition("=")
        if not sep or not name.strip() or not pattern.strip():
            raise ValueError(f"matcher {item!r} must look like label=value (globs allowed)")
        matchers[name.strip()] = pattern.strip()
    if not matchers:
        raise ValueError("a silence needs at least one --match label=value")
    return matchers


def write_silence(directory: Path, silence: Silence) -> Path:
    """Write one silence file atomically so a running alerter never reads half of it."""
    silence_id = silence.id or uuid.uuid4().hex[:12]
    target = directory / f"{silence_id}.json"
    payload = json.dumps({**asdict(silence), "id": silence_id}, indent=2)
    write_text_atomically(target, payload)
    return target


class SilenceSet:
    """The config's silences plus the directory's, reloaded whenever a file changes."""

    def __init__(self, configured: Iterable[Silence], directory: Path | None) -> None:
        self.configured = list(configured)
        self.directory = directory
        self._fingerprint: tuple[tuple[str, int, int], ...] = ()
        self._from_files: list[Silence] = []

    @property
    def all(self) -> list[Silence]:
        return self.configured + self._from_files

    def refresh(self) -> bool:
        """Reload the directory if its files changed; True when it did."""
        if self.directory is None or not self.directory.is_dir():
            changed = bool(self._from_files)
            self._from_files, self._fingerprint = [], ()
            return changed
        entries = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((path.name, stat.st_mtime_ns, stat.st_size))
        fingerprint = tuple(entries)
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        loaded = []
        for name, _, _ in entries:
            path = self.directory / name
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                loaded.append(
                    Silence(
                        matchers={str(k): str(v) for k, v in data["matchers"].items()},
                        starts_at=data.get("starts_at"),
                        ends_at=data.get("ends_at"),
                        comment=str(data.get("comment", "")),
                        id=str(data.get("id") or path.stem),
                    )
                )
            except (OSError, ValueError, KeyError, AttributeError) as error:
                log.warning("ignoring unreadable silence file %s: %s", path, error)
        self._from_files = loaded
        log.info("silences reloaded: %d from %s", len(loaded), self.directory)
        return True

    def matcher(self, now: float | None = None) -> SilenceMatcher:
        return SilenceMatcher(self.all, time.time() if now is None else now)


class SilenceMatcher:
    """A callable ``labels -> silenced?`` at a fixed wall-clock moment."""

    def __init__(self, silences: list[Silence], now: float) -> None:
        self._active = [s for s in silences if s.active(now)]
        self._now = now
        self.hits: list[tuple[str, dict[str, str]]] = []

    def __call__(self, labels: dict[str, str]) -> bool:
        for silence in self._active:
            if silence.matches(labels, self._now):
                self.hits.append((silence.id, labels))
                return True
        return False
