"""Detector configuration: every knob with the default that the NAB evaluation chose."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# What a detector has learned depends on these: a restored detector keeps the values it was
# made with (a new forest size, sampling, seed, daily history or transform needs a new model).
LEARNED_PARAMETERS = (
    "num_trees",
    "sample_size",
    "shingle_size",
    "warmup",
    "time_decay",
    "bounding_box_cache_fraction",
    "seed",
    "seasonal_days",
    "transform",
)


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Parameters of one per-series detector.

    Unknown keys in ``from_dict`` raise ``ValueError`` naming the key and the known ones, so a
    typo in a YAML file is reported instead of silently ignored.
    """

    # The forest (krcf).
    num_trees: int = 30
    sample_size: int = 128
    shingle_size: int = 1
    warmup: int = 32
    time_decay: float = 1 / 2560
    bounding_box_cache_fraction: float = 0.0
    seed: int = 0
    # Daily-seasonal residual: compare with the same time of day over this many past days.
    seasonal_days: int = 8
    # Calibration (see detectors/calibration.py): a score of 70 means the point's evidence is
    # as rare, on this series' own history, as one point in 10 ** rarity.
    rarity: float = 2.8
    # The forest's score is smoothed over this many points before its tail judges it: the mean
    # of 5 is closer to normal than that of 3, so its tail fits better (a fifth as many
    # reports on Gaussian noise; docs/detector.md).
    score_window: int = 5
    score_decay: float = 0.001
    score_warmup: int = 150
    settle: int = 50
    noise_floor: float = 1e-3
    # Input: "log" models log(1 + |x|) (with x's sign) for series whose noise grows with their
    # level (volumes, prices, latencies, spreads); values, expected values and margins stay in
    # input units.
    transform: str = "none"
    # Reporting.
    threshold: float = 70.0
    absolute_margin: float = 0.0
    ratio_margin: float = 0.0

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
            "seasonal_days": self.seasonal_days >= 1,
            "score_window": self.score_window >= 1,
            "score_decay": 0.0 < self.score_decay < 1.0,
            "score_warmup": self.score_warmup >= 1,
            "rarity": self.rarity > 0.0,
            "settle": self.settle >= 0,
            "transform": self.transform in ("none", "log"),
            "noise_floor": self.noise_floor >= 0.0,
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

    @classmethod
    def upgraded(cls, values: dict[str, Any]) -> DetectorConfig:
        """A configuration saved by an earlier release: parameters it no longer has are
        dropped (their jobs are done by the calibration now), the rest kept."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def adopting(self, new: DetectorConfig) -> DetectorConfig:
        """This configuration with every parameter of ``new`` that a detector can take up
        without relearning (threshold, margins, calibration), keeping its learned ones.

        >>> saved = DetectorConfig(num_trees=50, threshold=70.0)
        >>> merged = saved.adopting(DetectorConfig(num_trees=30, threshold=85.0))
        >>> merged.num_trees, merged.threshold
        (50, 85.0)
        >>> saved.learned_differences(DetectorConfig(num_trees=30))
        ['num_trees']
        """
        learned = {name: getattr(self, name) for name in LEARNED_PARAMETERS}
        return replace(new, **learned)

    def learned_differences(self, other: DetectorConfig) -> list[str]:
        """The learned parameters in which ``other`` differs from this configuration."""
        return [name for name in LEARNED_PARAMETERS if getattr(self, name) != getattr(other, name)]
