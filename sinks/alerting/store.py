"""The alerter's durable state: one JSON file, replaced atomically.

It holds, together, the per-series alert states, the open groups, the outbox of notifications not
yet delivered, and the Kafka offsets all of that reflects. Writing them in one atomic rename is
what makes a kill -9 safe: after a restart the alerter resumes from exactly the offsets its state
has seen, so an incident is neither paged twice nor missed. Kafka's committed offsets are written
after this file and serve monitoring (consumer lag); this file wins when they disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import write_text_atomically

FORMAT_VERSION = 1


@dataclass
class Snapshot:
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)  # topic -> partition -> next
    series: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    next_id: int = 1
    watermark: float = 0.0


def save(path: Path, snapshot: Snapshot) -> None:
    payload = {
        "version": FORMAT_VERSION,
        "offsets": {
            topic: {str(p): o for p, o in parts.items()}
            for topic, parts in snapshot.offsets.items()
        },
        "series": snapshot.series,
        "groups": snapshot.groups,
        "outbox": snapshot.outbox,
        "next_id": snapshot.next_id,
        "watermark": snapshot.watermark,
    }
    write_text_atomically(path, json.dumps(payload, separators=(",", ":")))


def load(path: Path) -> Snapshot:
    """The last saved snapshot, or an empty one on first start."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Snapshot()
    except (OSError, json.JSONDecodeError) as error:
        # Never silently start from scratch: that could page every ongoing incident again.
        raise ValueError(
            f"{path}: the alert state is unreadable ({error}); restore it, or move it away to "
            "start with empty state from the committed offsets"
        ) from None
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown state format version {data.get('version')!r}")
    return Snapshot(
        offsets={
            topic: {int(p): int(o) for p, o in parts.items()}
            for topic, parts in data.get("offsets", {}).items()
        },
        series=list(data.get("series", [])),
        groups=list(data.get("groups", [])),
        outbox=list(data.get("outbox", [])),
        next_id=int(data.get("next_id", 1)),
        watermark=float(data.get("watermark", 0.0)),
    )
