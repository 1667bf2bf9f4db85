"""Merge the small files of closed days: one file per day, topic and partition.

Safe while the sink writes and while readers read (docs/decisions/0003):

1. the merged rows are written to ``.compacted+...tmp``, fsynced and renamed to
   ``compacted+<topic>+<partition>+<minOffset>-<maxOffset>.parquet``: from that instant the lake
   listing hides the inputs (their offsets lie in the compacted range), so readers that list
   afterwards read the merged file only, and readers that listed before still read the inputs;
2. the inputs are deleted only after ``grace_s``, so a reader holding an older listing can finish;
3. the sink never writes offsets the lake already holds (it resumes after the lake's last offset),
   so a new file in a compacted day starts after the compacted range and stays visible beside it;
   the next compaction merges it in.

A day is closed when a newer day exists in the lake (or it is before ``before``). Compacting an
open day would still be correct, only wasteful.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract.records import KAFKA_OFFSET
from sinks.lake_files import (
    LakeFile,
    compacted_file_name,
    covered_files,
    day_dir,
    list_files,
    visible_files,
    write_atomically,
)
from sinks.result_table import concat

log = logging.getLogger("anomstream.sink.compact")

DEFAULT_GRACE_S = 30.0


@dataclass
class CompactionReport:
    merged_days: list[str] = field(default_factory=list)
    files_in: int = 0
    files_out: int = 0
    rows: int = 0
    deleted: int = 0


@contextmanager
def _exclusive(lake: Path) -> Iterator[None]:
    lake.mkdir(parents=True, exist_ok=True)
    with open(lake / ".compact.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another compaction is running on {lake}") from None
        yield


def compact(
    lake: Path, *, before: str | None = None, grace_s: float = DEFAULT_GRACE_S
) -> CompactionReport:
    """Merge every closed day's files per topic and partition; return what was done."""
    report = CompactionReport()
    with _exclusive(lake):
        for leftover in lake.glob("dt=*/.compacted+*.tmp"):
            leftover.unlink(missing_ok=True)
        files = list_files(lake)
        # Inputs of a compaction killed before it could delete them: hidden, delete after grace.
        to_delete = covered_files(files)
        days = sorted({f.day for f in files})
        cutoff = before or (days[-1] if days else "")
        groups: dict[tuple[str, str, int], list[LakeFile]] = defaultdict(list)
        for item in visible_files(files):
            if item.day < cutoff:
                groups[(item.day, item.topic, item.partition)].append(item)
        for (day, topic, partition), members in sorted(groups.items()):
            if len(members) < 2:
                continue
            members.sort(key=lambda f: f.first)
            merged = concat([pq.read_table(m.path) for m in members])
            merged = merged.take(pc.sort_indices(merged, [(KAFKA_OFFSET, "ascending")]))
            offsets = merged.column(KAFKA_OFFSET)
            first, last = offsets[0].as_py(), offsets[-1].as_py()
            path = day_dir(lake, day) / compacted_file_name(topic, partition, first, last)
            write_atomically(
                merged,
                path,
                {
                    "topic": topic,
                    "partition": str(partition),
                    "firstOffset": str(first),
                    "lastOffset": str(last),
                    "rows": str(merged.num_rows),
                    "compactedFiles": str(len(members)),
                },
            )
            log.info(
                "compact %s/%s rows=%d from %d files",
                path.parent.name,
                path.name,
                merged.num_rows,
                len(members),
            )
            if day not in report.merged_days:
                report.merged_days.append(day)
            report.files_in += len(members)
            report.files_out += 1
            report.rows += merged.num_rows
            to_delete.extend(members)
        if to_delete:
            time.sleep(grace_s)
            for item in to_delete:
                item.path.unlink(missing_ok=True)
                report.deleted += 1
    return report
