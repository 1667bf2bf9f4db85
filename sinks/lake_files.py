"""The files of the Parquet lake: names, atomic writes, consistent listings.

Layout (Kafka Connect storage-sink style, names are functions of topic, partition and offsets)::

    <lake>/dt=YYYY-MM-DD/<topic>+<partition>+<firstOffset:020d>.parquet             (sink file)
    <lake>/dt=YYYY-MM-DD/compacted+<topic>+<partition>+<min:020d>-<max:020d>.parquet  (compacted)

A file under construction is called ``.<name>.tmp``: no ``*.parquet`` glob matches it. It is
fsynced, renamed into place atomically, and the directory is fsynced, so a reader or a kill -9
never meets a partial file.

Every file carries its offset range in the Parquet key-value metadata (``anomstream.*``), so the
sink can recover where the lake ends from the lake itself (see docs/decisions/0003).

A compacted file of day D and partition p *covers* offsets ``min..max`` of p: any other file of
(D, p) whose offsets fall in that range holds rows that the compacted file holds too, and
``visible_files`` hides it. That rule is what lets the compactor publish a merged file before it
deletes the inputs without any reader seeing a row twice.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.retry import Backoff, retry
from contract.records import KAFKA_OFFSET

OFFSET_DIGITS = 20
METADATA_PREFIX = "anomstream."
_SINK_NAME = re.compile(r"^(?P<topic>[^+/]+)\+(?P<partition>\d+)\+(?P<first>\d{20})\.parquet$")
_COMPACTED_NAME = re.compile(
    r"^compacted\+(?P<topic>[^+/]+)\+(?P<partition>\d+)\+(?P<first>\d{20})-(?P<last>\d{20})\.parquet$"
)
_DAY_DIR = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
# A listing raced by the compactor is repeated for a few seconds at most.
_RELIST = Backoff(first_s=0.05, max_s=0.2, give_up_s=5.0)


@dataclass(frozen=True)
class LakeFile:
    """One published file of the lake. ``last`` is known from the name for compacted files only."""

    day: str
    topic: str
    partition: int
    first: int
    last: int | None
    path: Path

    @property
    def compacted(self) -> bool:
        return self.last is not None

    def sort_key(self) -> tuple[str, str, int, int, int, str]:
        return (self.day, self.topic, self.partition, self.first, self.last or -1, self.path.name)


def sink_file_name(topic: str, partition: int, first_offset: int) -> str:
    """``results+3+00000000000000001234.parquet``.

    >>> sink_file_name("results", 3, 1234)
    'results+3+00000000000000001234.parquet'
    """
    if "+" in topic or "/" in topic:
        raise ValueError(f"topic name {topic!r} cannot be used in a lake file name")
    return f"{topic}+{partition}+{first_offset:0{OFFSET_DIGITS}d}.parquet"


def compacted_file_name(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    """``compacted+results+3+<first>-<last>.parquet`` (offsets zero-padded to 20 digits)."""
    return (
        f"compacted+{topic}+{partition}+{first_offset:0{OFFSET_DIGITS}d}"
        f"-{last_offset:0{OFFSET_DIGITS}d}.parquet"
    )


def temp_name(final_name: str) -> str:
    return f".{final_name}.tmp"


def day_dir(lake: Path, day: str) -> Path:
    return lake / f"dt={day}"


def parse_name(day: str, path: Path) -> LakeFile | None:
    """The LakeFile a published file name describes, or None for anything else."""
    match = _SINK_NAME.match(path.name)
    if match:
        return LakeFile(
            day, match["topic"], int(match["partition"]), int(match["first"]), None, path
        )
    match = _COMPACTED_NAME.match(path.name)
    if match:
        return LakeFile(
            day,
            match["topic"],
            int(match["partition"]),
            int(match["first"]),
            int(match["last"]),
            path,
        )
    return None


def write_atomically(table: pa.Table, path: Path, metadata: dict[str, str]) -> None:
    """Write ``table`` to ``path`` so that no reader and no crash ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    schema_metadata = dict(table.schema.metadata or {})
    schema_metadata.update(
        {(METADATA_PREFIX + k).encode(): v.encode() for k, v in metadata.items()}
    )
    table = table.replace_schema_metadata(schema_metadata)
    # Row groups of ~128k rows keep DuckDB's min/max pruning useful on day files of millions.
    pq.write_table(table, tmp, compression="zstd", row_group_size=131_072)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_metadata(path: Path) -> dict[str, str]:
    """The ``anomstream.*`` key-value metadata of a lake file (prefix stripped)."""
    raw = pq.read_schema(path).metadata or {}
    prefix = METADATA_PREFIX.encode()
    return {k[len(prefix) :].decode(): v.decode() for k, v in raw.items() if k.startswith(prefix)}


def _list_once(lake: Path) -> list[LakeFile]:
    found: list[LakeFile] = []
    try:
        days = list(os.scandir(lake))
    except FileNotFoundError:
        return found
    for entry in days:
        match = _DAY_DIR.match(entry.name)
        if not match or not entry.is_dir():
            continue
        try:
            files = [f.name for f in os.scandir(entry.path) if f.is_file()]
        except FileNotFoundError:
            continue
        for name in files:
            parsed = parse_name(match[1], Path(entry.path) / name)
            if parsed is not None:
                found.append(parsed)
    return sorted(found, key=LakeFile.sort_key)


def list_files(lake: Path, attempts: int = 10) -> list[LakeFile]:
    """Every published file, listed until two listings in a row agree.

    A single directory listing racing a rename may miss a file created during the listing while
    returning a later one; two equal listings in a row make the snapshot consistent.
    """
    previous = _list_once(lake)
    for _ in range(attempts):
        current = _list_once(lake)
        if current == previous:
            return current
        previous = current
    return previous


def visible_files(files: Iterable[LakeFile]) -> list[LakeFile]:
    """The files a reader should read: those not covered by a compacted file of the same day,
    topic and partition (see the module docstring)."""
    groups: dict[tuple[str, str, int], list[LakeFile]] = defaultdict(list)
    for item in files:
        groups[(item.day, item.topic, item.partition)].append(item)
    visible: list[LakeFile] = []
    for members in groups.values():
        compacted = [m for m in members if m.last is not None]
        for item in members:
            if not any(_covers(c, item) for c in compacted if c is not item):
                visible.append(item)
    return sorted(visible, key=LakeFile.sort_key)


def _covers(compacted: LakeFile, other: LakeFile) -> bool:
    assert compacted.last is not None
    if other.last is None:
        return compacted.first <= other.first <= compacted.last
    return (
        compacted.first <= other.first
        and other.last <= compacted.last
        and ((compacted.first, compacted.last) != (other.first, other.last))
    )


def covered_files(files: Iterable[LakeFile]) -> list[LakeFile]:
    """Files hidden by a compacted file: safe to delete once no reader can still hold them."""
    items = list(files)
    shown = set(visible_files(items))
    return [item for item in items if item not in shown]


def lake_end(lake: Path, topic: str, partition: int) -> int | None:
    """The last Kafka offset of ``topic``/``partition`` stored in the lake, or None if none.

    Files of one partition hold disjoint, contiguous offset ranges, so the end is the larger of
    the last offset of the sink file that starts last and the ends of the compacted files.
    """

    def once() -> int | None:
        files = [f for f in list_files(lake) if f.topic == topic and f.partition == partition]
        ends = [f.last for f in files if f.last is not None]
        sink_files = [f for f in files if f.last is None]
        if sink_files:
            # FileNotFoundError: the compactor deleted it between listing and reading; its rows
            # are now in a compacted file, so the next listing finds them.
            newest = max(sink_files, key=lambda f: f.first)
            ends.append(int(file_metadata(newest.path)["lastOffset"]))
        return max(ends) if ends else None

    try:
        return retry(once, f"finding the end of {topic}/{partition} in the lake at {lake}",
                     transient=lambda error: isinstance(error, FileNotFoundError),
                     backoff=_RELIST)
    except FileNotFoundError:
        raise RuntimeError(
            f"the lake at {lake} keeps changing; cannot find where it ends"
        ) from None


def remove_temp_files(directory: Path, prefix: str) -> int:
    """Delete leftovers ``.<prefix>*.tmp`` of a killed writer under every day of the lake."""
    removed = 0
    for temp in directory.glob(f"dt=*/.{prefix}*.tmp"):
        temp.unlink(missing_ok=True)
        removed += 1
    return removed


def publish_sink_file(lake: Path, topic: str, partition: int, day: str, table: pa.Table) -> Path:
    """Write the rows of one partition and one day (ordered by offset) as a sink file."""
    offsets = table.column(KAFKA_OFFSET)
    first, last = offsets[0].as_py(), offsets[-1].as_py()
    path = day_dir(lake, day) / sink_file_name(topic, partition, first)
    metadata = {
        "topic": topic,
        "partition": str(partition),
        "firstOffset": str(first),
        "lastOffset": str(last),
        "rows": str(table.num_rows),
    }
    write_atomically(table, path, metadata)
    return path
