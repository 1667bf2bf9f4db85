"""The score stage's local store of the snapshots it holds but not as live models: evicted series
and restored series whose next record has not come yet (docs/decisions/0009-spill-store.md).

A cache, not a source of truth: the compacted state topic is. The file is made anew when the
stage starts and a partition's rows are rewritten from the topic whenever it is restored, so the
store needs no durability of its own (no journal, no fsync) and a ``kill -9`` cannot leave it
wrong.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from stream.state import snapshot_header_json
from stream.worker.errors import WorkerError


def spill_path(directory: Path, group_id: str, instance_id: str) -> Path:
    """One file per score stage: its consumer group and instance id name it (both stable across
    restarts, so a restarted worker replaces the file its killed predecessor left)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{group_id}.{instance_id}")
    return directory / f"{name}.sqlite"


class SpillStore:
    """Series snapshots on disk: timeseriesId -> (partition, header, snapshot)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A new file, not the old one: a process that still has the old one open (a second
            # worker with the same instance id, about to be fenced) keeps its own inode.
            path.unlink(missing_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=OFF")
            self.db.execute("PRAGMA synchronous=OFF")
            # The header (for scheduling the series' windows) before the snapshot, so that
            # reading it does not touch the snapshot's overflow pages.
            self.db.execute(
                "CREATE TABLE snapshot (tsid TEXT PRIMARY KEY, partition INTEGER NOT NULL, "
                "header BLOB NOT NULL, payload BLOB NOT NULL)"
            )
            self.db.execute("CREATE INDEX snapshot_partition ON snapshot (partition)")
        except (OSError, sqlite3.Error) as error:
            raise self._failed(error) from error

    def _failed(self, error: Exception) -> WorkerError:
        return WorkerError(
            f"the spill store {self.path} failed: {error} (a local cache of the state topic; "
            "give worker.spill_dir a directory on a disk with room)"
        )

    def _execute(self, sql: str, parameters: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, parameters)
        except sqlite3.Error as error:  # a full disk among them: the worker cannot go on
            raise self._failed(error) from error

    def put(self, partition: int, tsid: str, payload: bytes) -> None:
        self._execute(
            "INSERT OR REPLACE INTO snapshot VALUES (?, ?, ?, ?)",
            (tsid, partition, snapshot_header_json(payload), payload),
        )

    def get(self, tsid: str) -> bytes | None:
        row = self._execute("SELECT payload FROM snapshot WHERE tsid = ?", (tsid,)).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, tsid: str) -> None:
        self._execute("DELETE FROM snapshot WHERE tsid = ?", (tsid,))

    def take(self, tsid: str) -> bytes | None:
        """The snapshot of ``tsid``, removed from the store; None if it holds none."""
        payload = self.get(tsid)
        if payload is not None:
            self.delete(tsid)
        return payload

    def headers(self, partition: int) -> list[tuple[str, bytes]]:
        """(timeseriesId, header JSON) of every series of ``partition`` in the store."""
        rows = self._execute(
            "SELECT tsid, header FROM snapshot WHERE partition = ?", (partition,)
        ).fetchall()
        return [(tsid, bytes(header)) for tsid, header in rows]

    def drop_partition(self, partition: int) -> None:
        self._execute("DELETE FROM snapshot WHERE partition = ?", (partition,))

    def count(self, partition: int | None = None) -> int:
        if partition is None:
            row = self._execute("SELECT count(*) FROM snapshot").fetchone()
        else:
            row = self._execute(
                "SELECT count(*) FROM snapshot WHERE partition = ?", (partition,)
            ).fetchone()
        return int(row[0])

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for the writes inside (a restore writes thousands of snapshots)."""
        self._execute("BEGIN")
        try:
            yield
        finally:
            self._execute("COMMIT")

    def close(self) -> None:
        """Close and remove the file: the next start rebuilds it from the state topic."""
        self.db.close()
        self.path.unlink(missing_ok=True)
