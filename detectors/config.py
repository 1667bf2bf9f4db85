"""Detector configuration: every knob with the default that the NAB evaluation chose."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Parameters of one per-series detector.

    Unknown keys in ``from_dict`` raise ``ValueError`` naming the key and the known ones, so a
    typo in a YAML file is reported instead of silently ignored.
    """

    num_trees: int = 30
    sample_size: int = 128
    shingle_size: int = 1
    warmup: int = 64
    time_decay: float = 1 / 2560
    bounding_box_cache_fraction: float = 0.0
    threshold: float = 70.0
    absolute_margin: float = 0.0
    ratio_margin: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "num_trees": self.num_trees >= 1,
            "sample_size": self.sample_size >= 8,
            "shingle_size": self.shingle_size >= 1,
            "warmup": self.warmup >= 1,
            "time_decay": 0.0 < self.time_decay < 1.0,
            "bounding_box_cache_fraction": 0.0 <= self.bounding_box_cache_fraction <= 1.0,
            "threshold": 0.0 <= self.threshold <= 100.0,
            "absolute_margin": self.absolute_margin >= 0.0,
            "ratio_margin": self.ratio_margin >= 0.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid detector parameter(s): {shown}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown detector parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
