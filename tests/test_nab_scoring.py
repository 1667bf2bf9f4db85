"""The NAB scorer on hand-built corpora, and its fast sweep against a slow, literal reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from app.corpus import load_corpus
from detectors.evaluation.corpus import CorpusFile
from detectors.evaluation.nab import (
    PROFILES,
    Profile,
    ThresholdSweep,
    optimize_threshold,
    probation_rows,
    score_corpus,
)


def make_file(rows: int, windows: list[tuple[int, int]], name: str = "f.csv", category: str = "c"):
    return CorpusFile(
        category,
        name,
        timestamps=60.0 * np.arange(rows),
        values=np.zeros(rows),
        windows=np.array(windows, dtype=np.int64).reshape(-1, 2),
    )


def perfect_scores(corpus_file: CorpusFile) -> np.ndarray:
    scores = np.zeros(corpus_file.rows)
    scores[corpus_file.windows[:, 0]] = 100.0
    return scores


@pytest.fixture
def corpus() -> list[CorpusFile]:
    # 1000 rows: probation is the first 150.
    return [
        make_file(1000, [(300, 349), (700, 749)], "two.csv", "alpha"),
        make_file(1000, [(500, 599)], "one.csv", "alpha"),
        make_file(1000, [], "none.csv", "beta"),
    ]


# --- the slow reference: the rules of docs/nab-scoring.md, row by row --------------------------


def sigma(x: float) -> float:
    return -1.0 if x > 3 else 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def reference_raw(corpus_file: CorpusFile, scores: np.ndarray, profile: Profile, t: float) -> float:
    rows, windows = corpus_file.rows, [tuple(map(int, w)) for w in corpus_file.windows]
    probation = min(math.floor(0.15 * rows), 750)
    raw = 0.0
    best: dict[int, float] = {}
    previous = -math.inf  # the last non-NaN score before row i
    for i in range(rows):
        crossed = scores[i] >= t and not previous >= t  # a detection is an upward crossing
        if not math.isnan(scores[i]):
            previous = scores[i]
        if i < probation or not crossed:
            continue
        containing = [k for k, (start, end) in enumerate(windows) if start <= i <= end]
        if containing:
            k = containing[0]
            start, end = windows[k]
            if k not in best:  # the earliest firing row of the window
                best[k] = profile.tp_weight * sigma(-(end - i + 1) / (end - start + 1)) / sigma(-1)
            continue
        earlier = [(start, end) for start, end in windows if end < i]
        if not earlier:
            raw -= profile.fp_weight
        else:
            start, end = earlier[-1]
            raw += profile.fp_weight * sigma(abs(i - end) / (end - start + 1 - 1))
    for k, (_, end) in enumerate(windows):
        if end >= probation:
            raw += best.get(k, -profile.fn_weight)
    return raw


def reference_corpus_raw(corpus, scores_by_file, profile, t) -> float:
    return sum(reference_raw(f, scores_by_file[f.key], profile, t) for f in corpus)


# --- hand-built cases --------------------------------------------------------------------------


def test_a_score_held_above_the_threshold_is_one_detection():
    corpus_file = make_file(1000, [(500, 549)])
    held = np.zeros(1000)
    held[200:230] = 90.0  # one false incident, held for 30 rows: one false positive
    held[505:700] = 90.0  # detected at 505 and held past the window's end: no false positive
    flapping = held.copy()
    flapping[210:230:2] = 10.0  # the same false incident, crossing the threshold 10 times
    scores = {corpus_file.key: held}
    result = score_corpus(scores, [corpus_file], "standard", threshold=70.0)
    assert (result.tp, result.fp, result.fn) == (1, 1, 0)
    flapped = score_corpus({corpus_file.key: flapping}, [corpus_file], "standard", threshold=70.0)
    assert (flapped.tp, flapped.fp, flapped.fn) == (1, 11, 0)
    assert flapped.raw < result.raw
    # A crossing before the window, held into it, is a false positive and the window is missed.
    early = np.zeros(1000)
    early[480:560] = 90.0
    late = score_corpus({corpus_file.key: early}, [corpus_file], "standard", threshold=70.0)
    assert (late.tp, late.fp, late.fn) == (0, 1, 1)


@pytest.mark.parametrize("profile", PROFILES)
def test_perfect_detector_scores_100(corpus, profile):
    scores = {f.key: perfect_scores(f) for f in corpus}
    optimized = score_corpus(scores, corpus, profile)
    assert optimized.score == pytest.approx(100.0)
    assert (optimized.tp, optimized.fp, optimized.fn) == (3, 0, 0)
    assert score_corpus(scores, corpus, profile, threshold=70.0).score == pytest.approx(100.0)
    assert optimized.category_score("alpha") == pytest.approx(100.0)
    assert optimized.category_score("beta") is None  # no window to score there


@pytest.mark.parametrize("profile", PROFILES)
def test_silent_detector_scores_0(corpus, profile):
    scores = {f.key: np.zeros(f.rows) for f in corpus}
    assert score_corpus(scores, corpus, profile, threshold=70.0).score == pytest.approx(0.0)
    optimized = score_corpus(scores, corpus, profile)
    # Firing on every row would only add false positives, so the optimum is to fire nowhere.
    assert optimized.score == pytest.approx(0.0)
    assert (optimized.tp, optimized.fp, optimized.fn) == (0, 0, 3)


def test_early_hit_beats_late_hit_in_the_same_window():
    corpus_file = make_file(1000, [(500, 599)])
    early, late = np.zeros(1000), np.zeros(1000)
    early[510], late[590] = 90.0, 90.0
    both = early + late

    def raw(scores):
        return score_corpus({corpus_file.key: scores}, [corpus_file], "standard", 70.0).raw

    assert raw(early) > raw(late) > -1.0
    # A later second hit in the same window adds nothing.
    assert raw(both) == pytest.approx(raw(early))
    # The earliest row of a window earns the full tpWeight.
    first = np.zeros(1000)
    first[500] = 90.0
    assert raw(first) == pytest.approx(1.0)


@pytest.mark.parametrize("name", PROFILES)
def test_false_positive_far_from_any_window_costs_full_weight(name):
    profile = PROFILES[name]
    corpus_file = make_file(1000, [(500, 519)])  # width 20: sigma reaches -1 at 3 * 19 rows
    key = corpus_file.key
    base = perfect_scores(corpus_file)
    before_any_window, far_after = base.copy(), base.copy()
    before_any_window[200] = 100.0
    far_after[519 + 3 * 19 + 1] = 100.0

    def raw(scores):
        return score_corpus({key: scores}, [corpus_file], profile, threshold=50.0).raw

    assert raw(base) == pytest.approx(profile.tp_weight)
    assert raw(before_any_window) - raw(base) == pytest.approx(-profile.fp_weight)
    assert raw(far_after) - raw(base) == pytest.approx(-profile.fp_weight)


def test_false_positive_just_after_a_window_costs_less_than_a_far_one():
    corpus_file = make_file(1000, [(500, 519)])
    key = corpus_file.key
    near, middle, far = (perfect_scores(corpus_file) for _ in range(3))
    near[521], middle[540], far[900] = 100.0, 100.0, 100.0
    raws = [
        score_corpus({key: s}, [corpus_file], "standard", 50.0).raw for s in (near, middle, far)
    ]
    assert raws[0] > raws[1] > raws[2]
    assert raws[0] < 1.0  # still a cost


def test_probation_rows_never_count():
    assert probation_rows(1000) == 150 and probation_rows(100_000) == 750
    corpus_file = make_file(1000, [(100, 120), (500, 519)])  # the first window is in probation
    key = corpus_file.key
    scores = perfect_scores(corpus_file)
    noisy = scores.copy()
    noisy[:150] = 100.0  # fires all through the probation, the first window included
    for s in (scores, noisy):
        result = score_corpus({key: s}, [corpus_file], "standard")
        assert result.score == pytest.approx(100.0)
        assert (result.tp, result.fp, result.fn, result.total.windows) == (1, 0, 0, 1)
    # A window straddling the probation's end is scored from the first scored row on.
    straddling = make_file(1000, [(140, 159)])
    hit = np.zeros(1000)
    hit[145] = 100.0
    missed = score_corpus({straddling.key: hit}, [straddling], "standard", 50.0)
    assert (missed.tp, missed.fn) == (0, 1)


def test_optimized_threshold_is_never_worse_than_a_fixed_one(corpus):
    rng = np.random.default_rng(7)
    scores = {f.key: np.round(100 * rng.random(f.rows) ** 6, 1) for f in corpus}
    for profile in PROFILES:
        optimized = score_corpus(scores, corpus, profile)
        for threshold in [*np.linspace(0, 100, 41), 70.0, optimized.threshold + 0.05]:
            fixed = score_corpus(scores, corpus, profile, threshold=float(threshold))
            assert optimized.raw >= fixed.raw - 1e-9
        threshold, raw = optimize_threshold(scores, corpus, profile)
        assert (threshold, raw) == (optimized.threshold, pytest.approx(optimized.raw))


def test_repeated_and_backward_timestamps_are_aligned_by_row(tmp_path: Path):
    stamps = [f"2024-03-01 00:{m:02d}:00" for m in range(60)]
    stamps += [f"2024-03-01 01:{m:02d}:00" for m in range(60)]
    stamps[70] = stamps[69]  # a repeated timestamp
    stamps[80] = "2024-03-01 00:30:00"  # one step backwards, onto an earlier row's timestamp
    stamps += [f"2024-03-01 02:{m:02d}:00" for m in range(60)]
    (tmp_path / "cat").mkdir()
    body = "timestamp,value\n" + "".join(f"{s},{i}\n" for i, s in enumerate(stamps))
    (tmp_path / "cat" / "odd.csv").write_text(body)
    # 01:09 appears twice (rows 69, 70); the window starts at the first of them. Its end, 01:25,
    # comes after the step back; 00:30 must not pull the window back to row 30.
    labels = {"cat/odd.csv": [["2024-03-01 01:09:00.000000", "2024-03-01 01:25:00.000000"]]}
    (tmp_path / "windows.json").write_text(json.dumps(labels))
    [corpus_file] = load_corpus(tmp_path, tmp_path / "windows.json")
    assert corpus_file.rows == 180
    assert corpus_file.windows.tolist() == [[69, 85]]
    scores = perfect_scores(corpus_file)
    assert score_corpus({corpus_file.key: scores}, [corpus_file], "standard").score == 100.0


def test_load_corpus_reports_file_line_and_field(tmp_path: Path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.csv").write_text(
        "timestamp,value\n2024-01-01 00:00:00,1\n2024-01-01 00:01:00,oops\n"
    )
    (tmp_path / "w.json").write_text(json.dumps({"cat/bad.csv": []}))
    with pytest.raises(ValueError, match=r"bad\.csv:3: field 'value'"):
        load_corpus(tmp_path, tmp_path / "w.json")
    (tmp_path / "cat" / "bad.csv").write_text("timestamp,value\n2024-01-01 00:00:00,\n")
    [corpus_file] = load_corpus(tmp_path, tmp_path / "w.json")
    assert np.isnan(corpus_file.values).all()  # an empty value is a missing point


def test_scores_must_match_rows(corpus):
    scores = {f.key: np.zeros(f.rows) for f in corpus}
    scores[corpus[0].key] = np.zeros(10)
    with pytest.raises(ValueError, match="expected 1000 scores"):
        score_corpus(scores, corpus, "standard")
    del scores[corpus[0].key]
    with pytest.raises(ValueError, match="no scores for"):
        score_corpus(scores, corpus, "standard", threshold=70.0)


# --- the vectorised sweep against the reference ------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_sweep_matches_slow_reference_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    corpus = []
    for number in range(3):
        rows = int(rng.integers(200, 400))
        cuts = np.sort(rng.choice(np.arange(10, rows - 10), size=6, replace=False))
        windows = [(int(a), int(b)) for a, b in cuts.reshape(-1, 2)[: int(rng.integers(0, 4))]]
        corpus.append(make_file(rows, windows, f"f{number}.csv", "random"))
    # Coarse rounding makes ties; a few NaN rows carry no score.
    scores = {f.key: np.round(100 * rng.random(f.rows) ** 3, 0) for f in corpus}
    scores[corpus[0].key][rng.integers(0, corpus[0].rows, 20)] = np.nan

    sweep = ThresholdSweep(scores, corpus)
    candidates = np.unique(np.concatenate(list(scores.values())))
    candidates = candidates[~np.isnan(candidates)]
    assert set(sweep.thresholds[1:]) <= set(candidates)
    for profile in PROFILES.values():
        swept = sweep.raw(profile)
        for threshold, raw in zip(sweep.thresholds, swept, strict=True):
            assert raw == pytest.approx(reference_corpus_raw(corpus, scores, profile, threshold))
        # The optimum over every distinct score (and "never fire") is what the sweep found.
        brute = max(
            reference_corpus_raw(corpus, scores, profile, t)
            for t in [*candidates, candidates.max() + 1]
        )
        threshold, raw = sweep.best(profile)
        assert raw == pytest.approx(brute)
        assert reference_corpus_raw(corpus, scores, profile, threshold) == pytest.approx(brute)
