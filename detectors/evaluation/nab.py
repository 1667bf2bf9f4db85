"""The NAB scoring rules (Numenta Anomaly Benchmark v1.1), vectorised for threshold sweeps.

The rules, as stated in ``docs/nab-scoring.md`` of the shared docs: the first
``min(floor(0.15 N), 750)`` rows of a file are not scored; inside a labelled window the earliest
row whose score reaches the threshold earns ``tpWeight * sigma(-(r - i + 1) / w) / sigma(-1)``;
a window without one costs ``fnWeight``; a firing row outside every window costs
``fpWeight * sigma(|i - p| / (w_p - 1))`` relative to the previous window (``-fpWeight`` with
none); one threshold per profile is chosen for the whole corpus among the detector's own scores;
``score = 100 (raw - null) / (perfect - null)``. Scores are our 0–100 ``anomalyScore``.

The sweep is exact and needs one sort: the corpus raw score is a step function of the threshold
that changes only at a few "event" values (every scored false-positive candidate row, and every
new running maximum inside a window), so a cumulative sum over events sorted by value gives the
raw score at every candidate threshold at once.

>>> import numpy as np
>>> from detectors.evaluation.corpus import CorpusFile
>>> rows = 1000
>>> corpus = [CorpusFile("demo", "a.csv", np.arange(rows, dtype=float), np.zeros(rows),
...                      np.array([[600, 649]]))]
>>> scores = np.zeros(rows)
>>> scores[[100, 400, 610]] = [90.0, 40.0, 80.0]  # 100 is in the probation
>>> result = score_corpus({"demo/a.csv": scores}, corpus, "standard")
>>> result.threshold, round(result.score, 1), (result.tp, result.fp, result.fn)
(80.0, 98.9, (1, 0, 0))
>>> at_40 = score_corpus({"demo/a.csv": scores}, corpus, "standard", threshold=40.0)
>>> round(at_40.score, 1), (at_40.tp, at_40.fp, at_40.fn)
(93.4, (1, 1, 0))
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detectors.evaluation.corpus import CorpusFile

PROBATION_CAP = 750
# Raw scores that differ by less than this are ties; the highest tied threshold wins, because
# among equally good thresholds the one that alerts least is the kinder one to deploy.
_TIE = 1e-9


@dataclass(frozen=True, slots=True)
class Profile:
    """Weights of one NAB application profile."""

    name: str
    tp_weight: float
    fn_weight: float
    fp_weight: float


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile("standard", tp_weight=1.0, fn_weight=1.0, fp_weight=0.11),
        Profile("reward_low_FP_rate", tp_weight=1.0, fn_weight=1.0, fp_weight=0.22),
        Profile("reward_low_FN_rate", tp_weight=1.0, fn_weight=2.0, fp_weight=0.11),
    )
}


def scaled_sigmoid(x: np.ndarray | float) -> np.ndarray:
    """NAB's ``sigma``: ``2 / (1 + exp(5x)) - 1``, and ``-1`` beyond ``x = 3``.

    >>> scaled_sigmoid(np.array([-1.0, 0.0, 3.5])).round(4).tolist()
    [0.9866, 0.0, -1.0]
    """
    x = np.asarray(x, dtype=np.float64)
    # Clipping keeps exp() finite; the clipped region is overwritten by -1 anyway.
    curve = 2.0 / (1.0 + np.exp(5.0 * np.minimum(x, 3.0))) - 1.0
    return np.where(x > 3.0, -1.0, curve)


_SIGMA_MINUS_ONE = float(scaled_sigmoid(-1.0))


def probation_rows(rows: int) -> int:
    """Rows at the start of a file that are not scored.

    >>> probation_rows(4032), probation_rows(22695)
    (604, 750)
    """
    return min(rows * 15 // 100, PROBATION_CAP)  # floor(0.15 N)


def normalized_score(raw: float, windows: int, profile: Profile) -> float | None:
    """``100 (raw - null) / (perfect - null)``; ``None`` when there is no window to score."""
    if windows == 0:
        return None
    perfect, null = profile.tp_weight * windows, -profile.fn_weight * windows
    return 100.0 * (raw - null) / (perfect - null)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Everything about a file's scoring that does not depend on the scores."""

    probation: int
    outside: np.ndarray  # scored rows outside every window
    fp_unit: np.ndarray  # their cost per unit of fpWeight, in [-1, 0]
    spans: np.ndarray  # (k, 2): first scored row and last row of each scored window
    tp_unit: tuple[np.ndarray, ...]  # per window, credit per unit of tpWeight of each span row


_layouts: weakref.WeakKeyDictionary[CorpusFile, _Layout] = weakref.WeakKeyDictionary()


def _layout(corpus_file: CorpusFile) -> _Layout:
    cached = _layouts.get(corpus_file)
    if cached is None:
        cached = _layouts[corpus_file] = _build_layout(corpus_file.rows, corpus_file.windows)
    return cached


def _build_layout(rows: int, windows: np.ndarray) -> _Layout:
    probation = probation_rows(rows)
    starts, ends = windows[:, 0], windows[:, 1]
    inside = np.zeros(rows, dtype=bool)
    for start, end in windows:
        inside[start : end + 1] = True
    outside = np.flatnonzero(~inside)
    outside = outside[outside >= probation]
    # The previous window of an outside row is the last one ending before it.
    previous = np.searchsorted(ends, outside, side="left") - 1
    has_previous = previous >= 0
    fp_unit = np.full(outside.shape, -1.0)
    if has_previous.any():
        prev = previous[has_previous]
        width = (ends[prev] - starts[prev] + 1).astype(np.float64)
        distance = np.abs(outside[has_previous] - ends[prev]).astype(np.float64)
        # A one-row window has no width to scale by; NAB would divide by zero, we charge fully.
        with np.errstate(divide="ignore"):
            fp_unit[has_previous] = scaled_sigmoid(distance / (width - 1.0))
    # Windows ending inside the probation can never be scored and do not count (as in NAB).
    scored = ends >= probation
    spans = np.column_stack([np.maximum(starts[scored], probation), ends[scored]])
    widths = (ends[scored] - starts[scored] + 1).astype(np.float64)
    tp_unit = tuple(
        scaled_sigmoid(-(end - np.arange(first, end + 1) + 1) / width) / _SIGMA_MINUS_ONE
        for (first, end), width in zip(spans, widths, strict=True)
    )
    return _Layout(probation, outside, fp_unit, spans.reshape(-1, 2), tp_unit)


def _scores_for(corpus_file: CorpusFile, scores_by_file: Mapping[str, np.ndarray]) -> np.ndarray:
    try:
        scores = np.asarray(scores_by_file[corpus_file.key], dtype=np.float64)
    except KeyError:
        raise ValueError(f"no scores for {corpus_file.key}") from None
    if scores.shape != (corpus_file.rows,):
        raise ValueError(
            f"{corpus_file.key}: expected {corpus_file.rows} scores (one per row), "
            f"got shape {scores.shape}"
        )
    if np.isinf(scores).any():
        raise ValueError(f"{corpus_file.key}: scores must be finite (NaN means no score)")
    return scores


def _profile(profile: Profile | str) -> Profile:
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}") from None


def crossing_floors(scores: np.ndarray) -> np.ndarray:
    """For each row, the score it must rise above to cross a threshold upward.

    A row fires at threshold ``t`` when ``scores[i] >= t > floor[i]``: it reaches ``t`` and the
    last scored row before it did not (a missing score, NaN, neither fires nor breaks a run:
    the floor is carried over it). The first row has floor ``-inf``.

    >>> crossing_floors(np.array([10.0, 80.0, np.nan, 90.0, 20.0])).tolist()
    [-inf, 10.0, 80.0, 80.0, 90.0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    # The last non-NaN score at or before each row (-inf before the first one).
    last_known = np.where(np.isnan(scores), -1, np.arange(len(scores)))
    np.maximum.accumulate(last_known, out=last_known)
    carried = np.where(last_known >= 0, scores[np.maximum(last_known, 0)], -np.inf)
    floors = np.full(scores.shape, -np.inf)
    floors[1:] = carried[:-1]
    return floors


class ThresholdSweep:
    """The corpus raw score at every candidate threshold, for any profile.

    A row fires at threshold ``t`` at an upward crossing (``crossing_floors``): a score held
    above the threshold is one detection, not one per row. Candidates are the distinct scores of
    scored rows, highest first, preceded by one threshold just above all of them (nothing
    fires). The raw score at a candidate ``t`` is exactly the one
    ``score_corpus(..., threshold=t)`` computes.

    Every contribution holds on a range of thresholds ``(low, high]``: a false-positive row
    costs on ``(floor, score]``, and a window earns the credit of its earliest row crossing
    ``t``, piecewise over ``t``. Each range becomes two events (``+w`` at ``high``, ``-w`` at
    ``low``) and the raw score at ``t`` is the sum over events with value ``>= t``: one sort.
    """

    def __init__(self, scores_by_file: Mapping[str, np.ndarray], corpus: Sequence[CorpusFile]):
        values: list[np.ndarray] = [np.zeros(0)]
        parts: list[np.ndarray] = [np.zeros((0, 3))]  # fp cost, tp credit, windows detected
        candidates: list[np.ndarray] = [np.zeros(0)]
        self.windows = 0
        for corpus_file in corpus:
            layout = _layout(corpus_file)
            scores = _scores_for(corpus_file, scores_by_file)
            floors = crossing_floors(scores)
            self.windows += len(layout.spans)
            scored = scores[layout.probation :]
            candidates.append(scored[~np.isnan(scored)])
            outside, floor = scores[layout.outside], floors[layout.outside]
            fires = outside > floor  # NaN compares False: never fires
            for edge, sign in ((outside, 1.0), (floor, -1.0)):
                values.append(edge[fires])
                weights = np.zeros((int(fires.sum()), 3))
                weights[:, 0] = sign * layout.fp_unit[fires]
                parts.append(weights)
            for (first, end), credit in zip(layout.spans, layout.tp_unit, strict=True):
                crossings = _earliest_crossings(scores[first : end + 1], floors[first : end + 1])
                for low, high, row in crossings:
                    values.append(np.array([high, low]))
                    parts.append(np.array([[0.0, credit[row], 1.0], [0.0, -credit[row], -1.0]]))
        all_values = np.concatenate(values)
        weights = np.concatenate(parts)
        keep = np.isfinite(all_values)  # a -inf edge never has t <= it: it adds nothing
        all_values, weights = all_values[keep], weights[keep]
        order = np.argsort(-all_values, kind="stable")
        ranked, running = all_values[order], np.cumsum(weights[order], axis=0)
        thresholds = np.unique(np.concatenate(candidates))[::-1]
        # Sum over events with value >= t: the running sum up to the last such event.
        count = np.searchsorted(-ranked, -thresholds, side="right")
        curves = np.vstack([np.zeros((1, 3)), running])[count]
        above_all = np.nextafter(thresholds[0], np.inf) if len(thresholds) else 100.0
        self.thresholds = np.concatenate([[above_all], thresholds])
        curves = np.vstack([np.zeros((1, 3)), curves])
        self._fp_cost, self._tp_credit, self._detected = curves.T

    def raw(self, profile: Profile | str) -> np.ndarray:
        """Corpus raw score at each of ``self.thresholds``."""
        p = _profile(profile)
        return (
            -p.fn_weight * self.windows
            + p.fp_weight * self._fp_cost
            + p.tp_weight * self._tp_credit
            + p.fn_weight * self._detected
        )

    def best(self, profile: Profile | str) -> tuple[float, float]:
        """The threshold with the highest corpus raw score (the highest one among ties)."""
        raw = self.raw(profile)
        index = int(np.argmax(raw >= raw.max() - _TIE))
        return float(self.thresholds[index]), float(raw[index])


def _earliest_crossings(span: np.ndarray, floors: np.ndarray) -> list[tuple[float, float, int]]:
    """``(low, high, row)``: on thresholds in ``(low, high]`` the earliest row of ``span`` to
    cross upward is ``row``. Each row claims the part of its range ``(floor, score]`` that no
    earlier row claimed."""
    claimed: list[tuple[float, float]] = []  # disjoint, sorted ranges (low, high]
    pieces: list[tuple[float, float, int]] = []
    for row, (low, high) in enumerate(zip(floors.tolist(), span.tolist(), strict=True)):
        if not high > low:  # also NaN
            continue
        cursor = low
        for claimed_low, claimed_high in claimed:
            if claimed_high <= cursor:
                continue
            if claimed_low >= high:
                break
            if claimed_low > cursor:
                pieces.append((cursor, claimed_low, row))
            cursor = max(cursor, claimed_high)
            if cursor >= high:
                break
        if cursor < high:
            pieces.append((cursor, high, row))
        claimed = _merge([*claimed, (low, high)])
    return pieces


def _merge(ranges: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def optimize_threshold(
    scores_by_file: Mapping[str, np.ndarray], corpus: Sequence[CorpusFile], profile: Profile | str
) -> tuple[float, float]:
    """``(threshold, raw)`` maximising the corpus raw score; see ``ThresholdSweep``."""
    return ThresholdSweep(scores_by_file, corpus).best(profile)


@dataclass(frozen=True, slots=True)
class Tally:
    """Raw score and counts: windows detected (tp), firing rows outside windows (fp), missed
    windows (fn), and the scored rows outside windows (where a firing row is a false report)."""

    raw: float = 0.0
    windows: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    outside_rows: int = 0

    @property
    def false_per_1000(self) -> float:
        """False reports per 1,000 scored rows outside the windows."""
        return 1000.0 * self.fp / self.outside_rows if self.outside_rows else 0.0

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.raw + other.raw,
            self.windows + other.windows,
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.outside_rows + other.outside_rows,
        )

    def as_dict(self, profile: Profile) -> dict[str, Any]:
        return {
            "score": normalized_score(self.raw, self.windows, profile),
            "raw": self.raw,
            "windows": self.windows,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "false_per_1000": self.false_per_1000,
        }


@dataclass(frozen=True, slots=True)
class CorpusScore:
    """A corpus scored at one threshold under one profile, with per-category and per-file
    tallies (keys ``"<category>/<file>.csv"``)."""

    profile: Profile
    threshold: float
    total: Tally
    categories: dict[str, Tally] = field(default_factory=dict)
    files: dict[str, Tally] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        return normalized_score(self.total.raw, self.total.windows, self.profile)

    @property
    def raw(self) -> float:
        return self.total.raw

    @property
    def raw_null(self) -> float:
        return -self.profile.fn_weight * self.total.windows

    @property
    def raw_perfect(self) -> float:
        return self.profile.tp_weight * self.total.windows

    @property
    def tp(self) -> int:
        return self.total.tp

    @property
    def fp(self) -> int:
        return self.total.fp

    @property
    def fn(self) -> int:
        return self.total.fn

    def category_score(self, category: str) -> float | None:
        return normalized_score(
            self.categories[category].raw, self.categories[category].windows, self.profile
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "profile": self.profile.name,
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            **self.total.as_dict(self.profile),
            "raw_null": self.raw_null,
            "raw_perfect": self.raw_perfect,
            "categories": {
                name: tally.as_dict(self.profile) for name, tally in self.categories.items()
            },
            "files": {name: tally.as_dict(self.profile) for name, tally in self.files.items()},
        }


def score_file(
    corpus_file: CorpusFile, scores: np.ndarray, profile: Profile | str, threshold: float
) -> Tally:
    """One file's raw score and counts at a threshold: a row fires where the score crosses
    ``threshold`` upward (``crossing_floors``); the rows after it, held above, do not."""
    p = _profile(profile)
    layout = _layout(corpus_file)
    scores = _scores_for(corpus_file, {corpus_file.key: scores})
    with np.errstate(invalid="ignore"):
        fires = (scores >= threshold) & (crossing_floors(scores) < threshold)
    fp_fires = fires[layout.outside]
    raw = p.fp_weight * float(layout.fp_unit[fp_fires].sum())
    tp = 0
    for (first, end), credit in zip(layout.spans, layout.tp_unit, strict=True):
        hits = np.flatnonzero(fires[first : end + 1])
        if hits.size:
            tp += 1
            raw += p.tp_weight * float(credit[hits[0]])
        else:
            raw -= p.fn_weight
    windows = len(layout.spans)
    return Tally(raw, windows, tp, int(fp_fires.sum()), windows - tp, len(layout.outside))


def score_corpus(
    scores_by_file: Mapping[str, np.ndarray],
    corpus: Sequence[CorpusFile],
    profile: Profile | str,
    threshold: float | None = None,
    sweep: ThresholdSweep | None = None,
) -> CorpusScore:
    """Score ``corpus`` at ``threshold``, or at the optimal one when it is ``None``.

    ``scores_by_file`` maps each file's key to one score per row (0–100, NaN for none). Pass a
    ``sweep`` built from the same scores to reuse it across profiles.
    """
    p = _profile(profile)
    if threshold is None:
        threshold, _ = (sweep or ThresholdSweep(scores_by_file, corpus)).best(p)
    files = {
        corpus_file.key: score_file(
            corpus_file, _scores_for(corpus_file, scores_by_file), p, threshold
        )
        for corpus_file in corpus
    }
    categories: dict[str, Tally] = {}
    for corpus_file in corpus:
        categories[corpus_file.category] = (
            categories.get(corpus_file.category, Tally()) + files[corpus_file.key]
        )
    return CorpusScore(p, threshold, _sum(files.values()), categories, files)


def _sum(tallies: Iterable[Tally]) -> Tally:
    total = Tally()
    for tally in tallies:
        total = total + tally
    return total
