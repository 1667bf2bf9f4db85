"""Per-series state (windows + detector) and its snapshot record on the compacted state topic.

The detector is any ``detectors.protocol.Detector``, made and restored by ``DETECTORS``.

State topic layout (see docs/decisions/0002-exactly-once.md): partition ``p`` of the state topic
holds the snapshots of the series owned through partition ``p`` of the repartition topic.
- key = timeseriesId, value = ``encode_snapshot``: the series' state after every record of its
  repartition partition below ``offset``;
- key = ``CHECKPOINT_KEY``, value = ``{"offset": X, "clock": ...}``: every series of the partition
  that has a record below ``X`` has a snapshot at or after its last such record, so a restore may
  start replaying the partition at ``X``; ``clock`` is the partition's stream time per input
  partition after the records below ``X`` (``windowing.PartitionClock``), which a replay from
  ``X`` needs to close the same windows at the same records.
Both are written inside the transaction that commits the input offsets they match.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from detectors.protocol import DETECTORS, Detector
from stream.config import DetectorSpec
from stream.windowing import SeriesWindows

CHECKPOINT_KEY = b"__checkpoint__"
_MAGIC = b"ASS1"


@dataclass(slots=True)
class Snapshot:
    detector_name: str
    dimensions: dict[str, str]
    windows: dict[str, Any]
    model: bytes
    offset: int  # the state includes every record of the partition below this offset
    source: str = ""  # input partition of the series' latest record ("" before there was one)


def encode_snapshot(snapshot: Snapshot) -> bytes:
    header = json.dumps(
        {
            "detector": snapshot.detector_name,
            "dimensions": snapshot.dimensions,
            "windows": snapshot.windows,
            "offset": snapshot.offset,
            "source": snapshot.source,
        },
        separators=(",", ":"),
    ).encode()
    return _MAGIC + struct.pack(">I", len(header)) + header + snapshot.model


def decode_snapshot(payload: bytes) -> Snapshot:
    if not payload.startswith(_MAGIC):
        raise ValueError("not an anomstream series snapshot")
    (length,) = struct.unpack_from(">I", payload, len(_MAGIC))
    start = len(_MAGIC) + 4
    header = json.loads(payload[start : start + length])
    return Snapshot(
        detector_name=header["detector"],
        dimensions=header["dimensions"],
        windows=header["windows"],
        model=payload[start + length :],
        offset=int(header["offset"]),
        source=header.get("source", ""),
    )


def snapshot_header(payload: bytes) -> dict[str, Any]:
    """The header of a snapshot (detector, dimensions, windows, offset, source), without copying
    its model."""
    header: dict[str, Any] = json.loads(snapshot_header_json(payload))
    return header


def snapshot_header_json(payload: bytes) -> bytes:
    """The header of a snapshot as its JSON bytes (``snapshot_header`` parses them)."""
    (length,) = struct.unpack_from(">I", payload, len(_MAGIC))
    start = len(_MAGIC) + 4
    return payload[start : start + length]


def encode_checkpoint(offset: int, clock: dict[str, Any]) -> bytes:
    return json.dumps({"offset": offset, "clock": clock}, separators=(",", ":")).encode()


def decode_checkpoint(payload: bytes) -> tuple[int, dict[str, Any] | None]:
    """The offset and the partition clock (None in markers written before there was one)."""
    data = json.loads(payload)
    return int(data["offset"]), data.get("clock")


class Series:
    """One live series: its spec, dimensions, windows and model, and what it last persisted."""

    __slots__ = (
        "changes",
        "detector",
        "dimensions",
        "dirty",
        "partition",
        "record_prefix",
        "skip_below",
        "source",
        "spec",
        "timeseries_id",
        "unsaved_from",
        "window_records",
        "windows",
    )

    def __init__(
        self,
        timeseries_id: str,
        spec: DetectorSpec,
        dimensions: dict[str, str],
        partition: int,
        max_fill: int,
        detector: Detector | None = None,
    ) -> None:
        self.timeseries_id = timeseries_id
        self.spec = spec
        self.dimensions = dimensions
        self.partition = partition
        self.windows = SeriesWindows(
            spec.interval_ms, spec.delay_ms, spec.aggregation, spec.empty, max_fill
        )
        self.detector = detector or DETECTORS.create(spec.detector_config(), len(spec.measures))
        self.dirty = False  # changed since its last snapshot
        # Since its last snapshot: the partition offset of the first record that changed it, and
        # the windows it scored (what a replay would redo): the checkpoint rounds use both.
        self.unsaved_from = 0
        self.changes = 0
        self.record_prefix = b""  # the constant head of its result records, set by the worker
        # Records of its partition below this offset are already in the state (its snapshot is
        # newer than the partition's checkpoint): a replay must not apply them twice.
        self.skip_below = 0
        self.source = ""  # input partition of its latest record: its windows close on its time
        # Records in its last closed window that had any: an open window with as many is
        # likely complete, and worth scoring ahead (``ScoreStage``). Not saved.
        self.window_records = 0

    def snapshot(self, offset: int) -> bytes:
        return encode_snapshot(
            Snapshot(
                self.spec.name,
                self.dimensions,
                self.windows.to_dict(),
                self.detector.to_bytes(),
                offset,
                self.source,
            )
        )

    @classmethod
    def from_snapshot(
        cls,
        snapshot: Snapshot,
        timeseries_id: str,
        spec: DetectorSpec,
        partition: int,
        max_fill: int,
    ) -> Series:
        # The configured threshold, margins and calibration apply to restored series too.
        series = cls(
            timeseries_id,
            spec,
            snapshot.dimensions,
            partition,
            max_fill,
            DETECTORS.restore(snapshot.model, spec.detector_config()),
        )
        series.windows.restore(snapshot.windows)
        series.source = snapshot.source
        return series
