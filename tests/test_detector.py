"""Behaviour of the per-series detector: stages, calibration, corrections, snapshots."""

from __future__ import annotations

import itertools
import json
import math
import random
import struct
from pathlib import Path

import pytest

from detectors import DetectorConfig, ModelStage, RcfDetector, Result
from detectors.rcf import confidence, zstd

MINUTE = 60.0


def daily_series(days: int, step: float = 300.0, noise: float = 1.0, seed: int = 0) -> list[float]:
    """A daily cycle (peak at midday) with Gaussian noise, sampled every ``step`` seconds."""
    rng = random.Random(seed)
    per_day = int(86_400 / step)
    return [
        100.0 + 40.0 * math.sin(2 * math.pi * (i % per_day) / per_day) + rng.gauss(0.0, noise)
        for i in range(days * per_day)
    ]


def feed(detector: RcfDetector, values: list[float], step: float = 300.0) -> list[Result]:
    return [detector.update(i * step, value) for i, value in enumerate(values)]


def test_learning_then_inference_with_zero_scores_while_learning() -> None:
    detector = RcfDetector(DetectorConfig(warmup=32))
    results = feed(detector, daily_series(1))
    learning = [r for r in results if r.model_stage is ModelStage.LEARNING]
    assert 30 <= len(learning) <= 40
    assert all(r.anomaly_score == 0.0 and r.anomaly_decision == 0 for r in learning)
    assert results[-1].model_stage is ModelStage.INFERENCE
    assert results[-1].processed_data_points == len(results)


def test_confidence_follows_the_decay_formula_and_grows() -> None:
    detector = RcfDetector()
    results = feed(detector, daily_series(2))
    confidences = [r.confidence for r in results]
    assert confidences[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(confidences))
    n = len(results)
    expected = 100.0 * confidence(detector.config.time_decay, n, detector.config.warmup)
    assert confidences[-1] == pytest.approx(expected, rel=1e-9)
    assert confidence(1 / 2560, 64, 64) == 0.0
    assert confidence(1 / 2560, 100_000, 64) == 1.0


def test_missing_values_are_imputed_not_learned_and_lower_confidence() -> None:
    detector = RcfDetector()
    feed(detector, daily_series(2))
    before = detector.update(2 * 86_400.0, 100.0)
    seen = detector.processed_data_points
    for offset, bad in enumerate([None, math.nan, math.inf, -math.inf, 1e40], start=1):
        result = detector.update(2 * 86_400.0 + offset * 300.0, bad)
        assert result.missing and result.anomaly_score == 0.0 and result.anomaly_decision == 0
        assert math.isfinite(result.expected_value)
    assert detector.processed_data_points == seen
    after = detector.update(2 * 86_400.0 + 6 * 300.0, 100.0)
    assert after.confidence < before.confidence
    assert math.isfinite(after.raw_score) and after.model_stage is ModelStage.INFERENCE


def test_wrong_number_of_values_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected 2 value"):
        RcfDetector(dimensions=2).update(0.0, 1.0)


def test_same_seed_same_results_other_seed_other_raw_scores() -> None:
    values = daily_series(2)
    first = feed(RcfDetector(DetectorConfig(seed=3)), values)
    again = feed(RcfDetector(DetectorConfig(seed=3)), values)
    other = feed(RcfDetector(DetectorConfig(seed=4)), values)
    assert first == again
    assert [r.raw_score for r in first] != [r.raw_score for r in other]


@pytest.mark.parametrize("dimensions", [1, 2])
def test_when_the_forest_learns_or_scores_ahead_changes_no_result(dimensions: int) -> None:
    """``update`` leaves the forest's learning of its point for later (``learn_pending``, or
    the next use), and ``prepare`` scores a point ahead: learning at once, never, or at random
    moments, with points scored ahead right, wrong or not at all, gives the same results,
    including the attribution of reports, and snapshots that continue the same."""
    rng = random.Random(dimensions)
    values = daily_series(3, noise=2.0)
    values[700] += 300.0  # a report, whose attribution reads the forest
    values[650] = math.nan  # a missing point reads the model stage
    points = [v if dimensions == 1 else [v, rng.gauss(0.0, 1.0)] for v in values]
    runs = []
    for learn_when in (lambda: True, lambda: False, lambda: rng.random() < 0.5):
        detector = RcfDetector(DetectorConfig(warmup=32), dimensions)
        results = []
        for i, point in enumerate(points):
            if rng.random() < 0.5:  # the window's value so far: the final one, or not yet
                ahead = point if rng.random() < 0.7 else values[i] + 1.0
                detector.prepare(i * 300.0, ahead)
            results.append(detector.update(i * 300.0, point))
            if learn_when():
                detector.learn_pending()
            if i == 500:  # a snapshot with the point unlearned, or learned
                detector = RcfDetector.from_bytes(detector.to_bytes())
        runs.append(results)
    assert runs[0] == runs[1] == runs[2]
    assert any(r.anomaly_decision and r.attribution for r in runs[0])


@pytest.mark.parametrize("cut", [20, 300, 340, 700])
def test_restored_snapshot_continues_exactly(cut: int) -> None:
    """Cut points (300-s steps): learning, before the daily reference, settling, after it."""
    values = daily_series(4, noise=2.0)
    values[900] += 200.0  # an anomaly after the cut, so reports and suppression are exercised
    original = RcfDetector()
    feed(original, values[:cut])
    restored = RcfDetector.from_bytes(original.to_bytes())
    tail = [(i * 300.0, v) for i, v in enumerate(values) if i >= cut]
    assert [original.update(t, v) for t, v in tail] == [restored.update(t, v) for t, v in tail]
    assert any(r.anomaly_decision for r in [original.update(len(values) * 300.0, 500.0)])


def test_snapshot_rejects_foreign_bytes() -> None:
    with pytest.raises(ValueError, match="snapshot"):
        RcfDetector.from_bytes(b"not a snapshot")


def incidents(results: list[Result]) -> list[tuple[int, int]]:
    """Runs of points at or above the threshold: ``(first, last)`` indexes."""
    runs: list[tuple[int, int]] = []
    for i, result in enumerate(results):
        if result.anomaly_decision:
            if runs and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
    return runs


def test_a_spike_is_one_short_incident_with_an_expected_value_near_normal() -> None:
    values = daily_series(3)
    spike_at = len(values) - 100
    values[spike_at] = 400.0
    results = feed(RcfDetector(), values)
    spike = results[spike_at]
    assert spike.anomaly_decision == 1 and spike.anomaly_score >= 70.0
    assert abs(spike.expected_value - values[spike_at - 288]) < 10.0
    [(first, last)] = [run for run in incidents(results) if run[1] >= spike_at - 5]
    assert first == spike_at and last <= spike_at + 6  # back under within a few points


def test_a_lasting_level_shift_is_one_incident_from_its_start() -> None:
    rng = random.Random(1)
    values = [50.0 + rng.gauss(0, 1) for _ in range(800)]
    values += [90.0 + rng.gauss(0, 1) for _ in range(200)]
    results = feed(RcfDetector(), values, step=MINUTE)
    runs = incidents(results)
    assert runs and runs[0][0] in range(800, 805)
    assert len(runs) == 1


def test_a_runaway_value_is_one_incident_while_it_climbs() -> None:
    rng = random.Random(3)
    values = [50.0 + rng.gauss(0, 1) for _ in range(800)]
    values += [60.0 + 5.0 * k for k in range(60)]
    results = feed(RcfDetector(), values, step=MINUTE)
    runs = incidents(results)
    assert len(runs) == 1 and runs[0][0] in range(800, 805)
    assert runs[0][1] == len(values) - 1  # still anomalous at the end of the climb


def gpu_utilisation(points: int, seed: int) -> list[float]:
    """A busy GPU: 70-95 % with bursts, one point a minute."""
    rng = random.Random(seed)
    return [
        min(100.0, 82.0 + 6.0 * math.sin(i / 23.0) + rng.gauss(0.0, 3.0)) for i in range(points)
    ]


@pytest.mark.parametrize("seed", range(3))
def test_a_gpu_stuck_at_zero_stays_reported_while_it_lasts(seed: int) -> None:
    values = gpu_utilisation(1200, seed)
    outage = range(1000, 1015)
    for i in outage:
        values[i] = 0.0
    results = feed(RcfDetector(DetectorConfig(seed=seed)), values, step=MINUTE)
    held = sum(results[i].anomaly_score >= 70.0 for i in outage)
    assert held >= 12, [round(results[i].anomaly_score) for i in outage]
    assert [run for run in incidents(results) if run[1] >= 900] == [
        (1000, incidents(results)[-1][1])
    ]
    # Back under by the second normal interval: the forest's smoothed score still holds the
    # outage's last points at the first one.
    assert incidents(results)[-1][1] <= 1015


@pytest.mark.parametrize("seed", range(3))
def test_a_three_hour_gap_is_not_an_anomaly(seed: int) -> None:
    values = daily_series(4, step=300.0, noise=1.0, seed=seed)
    timestamps = [300.0 * i for i in range(len(values))]
    gap = range(3 * 288 + 30, 3 * 288 + 30 + 36)  # three hours of 5-minute points missing
    detector = RcfDetector(DetectorConfig(seed=seed))
    results = [
        detector.update(t, v)
        for i, (t, v) in enumerate(zip(timestamps, values, strict=True))
        if i not in gap
    ]
    after = results[gap.start - 288 :]  # the day before the gap and everything after it
    assert not [r for r in after if r.anomaly_decision]
    # Time of day still lines up: the expected value after the gap is the usual one.
    first_after = results[gap.start]
    assert first_after.timestamp == timestamps[gap.stop]
    assert abs(first_after.expected_value - values[gap.stop]) < 5.0


@pytest.mark.parametrize("seed", range(3))
def test_a_frozen_price_is_reported_within_ten_intervals(seed: int) -> None:
    values = random_walk(2000, seed)
    frozen_at = 1800
    for i in range(frozen_at, frozen_at + 30):  # the feed repeats its last price for 30 minutes
        values[i] = values[frozen_at - 1]
    results = feed(RcfDetector(DetectorConfig(seed=seed)), values, step=MINUTE)
    # Before the freeze: no more than the calibrated rate (about one point in 10 ** 2.9).
    assert len([run for run in incidents(results) if 1000 <= run[0] < frozen_at]) <= 1
    reported = [i for i in range(frozen_at, frozen_at + 30) if results[i].anomaly_decision]
    assert reported and reported[0] < frozen_at + 10
    assert all(results[i].anomaly_decision for i in range(reported[0], frozen_at + 30))


@pytest.mark.parametrize("seed", range(3))
def test_a_second_freeze_is_reported_as_soon_as_the_first(seed: int) -> None:
    """A reported freeze is not a run the series makes: it does not excuse the next one."""
    values = random_walk(3000, seed)
    freezes = (1200, 2500)
    for start in freezes:
        for i in range(start, start + 40):
            values[i] = values[start - 1]
    results = feed(RcfDetector(DetectorConfig(seed=seed)), values, step=MINUTE)
    first = [
        next(i for i in range(start, start + 40) if results[i].anomaly_decision) - start
        for start in freezes
    ]
    assert first[0] < 10 and first[1] <= first[0], first


def test_an_idle_count_that_often_sits_at_zero_is_not_stale() -> None:
    """Long runs of the same value are this series' habit: no report for them."""
    rng = random.Random(7)
    values = [0.0 if rng.random() < 0.7 else float(rng.randint(1, 5)) for _ in range(3000)]
    for start in range(2000, 2900, 150):  # idle spells like those it had before
        for i in range(start, start + 8):
            values[i] = 0.0
    results = feed(RcfDetector(), values, step=MINUTE)
    spells = [i for start in range(2000, 2900, 150) for i in range(start + 2, start + 8)]
    assert not [i for i in spells if results[i].anomaly_decision]
    # Elsewhere no more than the calibrated rate (about one point in 10 ** 2.9 per evidence).
    assert len(incidents(results[1000:])) <= 2


@pytest.mark.parametrize("seed", range(3))
def test_a_spike_in_the_smaller_scale_variable_is_reported(seed: int) -> None:
    """Requests per second in thousands and an error ratio in thousandths: a 20-sigma error
    spike counts although it is tiny next to the request rate."""
    rng = random.Random(seed)
    points = [[5000.0 + rng.gauss(0, 200.0), 0.002 + rng.gauss(0, 0.0002)] for _ in range(1200)]
    detector = RcfDetector(DetectorConfig(seed=seed), dimensions=2)
    quiet = [detector.update(i * MINUTE, p) for i, p in enumerate(points)]
    # 70 is "one point in a thousand" per kind of evidence: at most one false incident here.
    assert len([run for run in incidents(quiet) if run[0] >= 300]) <= 1
    spike = detector.update(1200 * MINUTE, [5000.0, 0.002 + 20 * 0.0002])
    assert spike.anomaly_score >= 70.0 and spike.anomaly_decision == 1
    assert spike.attribution is not None and spike.attribution[1] > 0.5


def test_scores_rank_stronger_anomalies_higher_and_never_tie_at_100() -> None:
    rng = random.Random(11)
    values = [50.0 + rng.gauss(0, 1) for _ in range(1200)]
    scores = []
    for size in (10.0, 30.0, 100.0, 1000.0):
        detector = RcfDetector()
        feed(detector, values, step=MINUTE)
        scores.append(detector.update(1200 * MINUTE, 50.0 + size).anomaly_score)
    assert scores == sorted(scores) and len(set(scores)) == 4
    assert scores[0] >= 70.0 and scores[-1] < 100.0


@pytest.mark.parametrize("name", ["univariate", "multivariate"])
def test_a_snapshot_of_the_previous_release_restores_without_relearning(name: str) -> None:
    """tests/data holds snapshots written by the first release (format 3): a 5-minute daily
    series two days in, and a 2-measure series."""
    data = (Path(__file__).parent / "data" / f"detector-v3-{name}.snapshot").read_bytes()
    detector = RcfDetector.from_bytes(data)
    assert detector.model_stage is ModelStage.INFERENCE
    seen = detector.processed_data_points
    start = 1_700_000_000  # where the snapshots' series began (see above)
    if name == "univariate":
        points = [50 + 10 * math.sin(2 * math.pi * t / 288) + (t * 7 % 5) for t in range(600, 900)]
        step = 300.0
    else:
        points = [[100 + (t * 7 % 11), 0.5 + 0.01 * (t * 3 % 7)] for t in range(400, 700)]
        step = 60.0
    offset = 600 if name == "univariate" else 400
    results = [detector.update(start + step * (offset + k), p) for k, p in enumerate(points)]
    assert all(r.model_stage is ModelStage.INFERENCE for r in results)
    assert results[-1].processed_data_points == seen + len(points)
    assert not [r for r in results if r.anomaly_decision]  # the same pattern goes on: no report
    again = RcfDetector.from_bytes(detector.to_bytes())  # and it saves in the current format
    after = start + step * (offset + len(points))
    assert again.update(after, points[0]) == detector.update(after, points[0])


@pytest.mark.parametrize("version", [4, 5])
def test_a_format_4_or_5_snapshot_continues_as_the_release_that_wrote_it(version: int) -> None:
    """tests/data/detector-v<version>-univariate.snapshot: a 5-minute daily series 700 points in
    (its daily reference in use), written by the releases before format 5 and before format 6;
    the .next.json beside each holds what that release's detector returned for the next 60
    points (a +40 at the 31st). The forest, the daily reference and the confidence carry over
    exactly; the calibration is format 6's (a relative deviation tail made from the deviation
    tail), and it reports what that release reported."""
    data = Path(__file__).parent / "data"
    snapshot = (data / f"detector-v{version}-univariate.snapshot").read_bytes()
    detector = RcfDetector.from_bytes(snapshot)
    assert detector.model_stage is ModelStage.INFERENCE
    written: list[list[float]] = json.loads(
        (data / f"detector-v{version}-univariate.next.json").read_text()
    )
    start = 1_700_000_000

    def value(t: int) -> float:
        return 50 + 10 * math.sin(2 * math.pi * t / 288) + (t * 7 % 5) + (40.0 if t == 730 else 0)

    resaved = RcfDetector.from_bytes(detector.to_bytes())  # format 6 from here on
    reported = []
    for k, (_score, raw, expected, confidence_then, _decision) in enumerate(written):
        t = 700 + k
        result = detector.update(start + 300.0 * t, value(t))
        assert (result.raw_score, result.confidence) == (raw, confidence_then)
        if t < 730:
            assert result.expected_values[0] == expected
        if result.anomaly_decision:
            reported.append(t)
        assert resaved.update(start + 300.0 * t, value(t)) == result
    written_reports = [700 + k for k, row in enumerate(written) if row[4]]
    assert written_reports[0] == reported[0] == 730  # the +40, and nothing before it
    assert max(reported) < 735  # the incident ends within a few points, as it did


def test_snapshot_format_6_keeps_the_daily_buffers_out_of_the_json() -> None:
    """A minute series' 8 days of references travel as float32 bytes, not as hex text."""
    detector = RcfDetector()
    feed(detector, daily_series(2, step=MINUTE), step=MINUTE)
    snapshot = detector.to_bytes()
    assert snapshot[:4] == b"ASD\x06"
    body = zstd.decompress(snapshot[4:])
    header_length, buffers_length = struct.unpack_from(">II", body)
    assert buffers_length == 4 * 1440 * DetectorConfig().seasonal_days
    assert len(body[8 : 8 + header_length]) < 4000  # the JSON state holds no buffer
    restored = RcfDetector.from_bytes(snapshot)
    assert restored.to_bytes() == snapshot


def test_a_lasting_volatile_regime_is_reported_at_its_onset_and_then_accepted() -> None:
    """A calm series (noise 1) turns five times as volatile for good: its first moves are
    reported, and once the volatility is the series' recent normal its moves are judged in
    its units and are no longer reported (judged against the long calm alone, tens of them
    were)."""
    onsets, later = [], 0
    for seed in range(4):
        rng = random.Random(seed)
        detector = RcfDetector(DetectorConfig(seed=seed))
        results = [
            detector.update(60.0 * t, 100 + rng.gauss(0, 5.0 if t >= 2000 else 1.0))
            for t in range(4000)
        ]
        onsets.append(sum(r.anomaly_decision for r in results[2000:2030]))
        later += sum(r.anomaly_decision for r in results[2030:])
    assert min(onsets) >= 5, onsets
    assert later <= 20, later  # of 7,880 points (40 judged against the calm tail alone)


def test_a_restored_detector_takes_up_new_settings_and_keeps_its_model() -> None:
    """An operator raises the threshold and changes the forest size: a detector restored with
    the new configuration reports by the new threshold and keeps its 30-tree forest (a new size
    would need a new model), continuing exactly as before otherwise."""
    detector = RcfDetector(DetectorConfig())
    feed(detector, daily_series(1, step=MINUTE), step=MINUTE)
    snapshot = detector.to_bytes()
    changed = DetectorConfig(threshold=95.0, num_trees=50)
    restored = RcfDetector.from_bytes(snapshot, changed)
    assert restored.config.threshold == 95.0
    assert restored.config.num_trees == 30
    assert restored.config.learned_differences(changed) == ["num_trees"]
    as_saved = RcfDetector.from_bytes(snapshot)
    spike = 1440 * MINUTE, 130.0
    before, after = as_saved.update(*spike), restored.update(*spike)
    assert (after.anomaly_score, after.raw_score) == (before.anomaly_score, before.raw_score)
    assert before.anomaly_decision == 1 and before.threshold == 70.0
    assert (after.anomaly_decision, after.threshold) == (int(after.anomaly_score >= 95.0), 95.0)
    assert after.anomaly_score < 95.0  # so the new threshold is what decided


def test_no_alarm_on_a_clean_daily_cycle_including_its_first_day() -> None:
    """New highs during the first day are not "outside everything seen": nothing is reported."""
    for seed in range(2):
        values = daily_series(3, step=MINUTE, seed=seed)
        results = feed(RcfDetector(DetectorConfig(seed=seed)), values, step=MINUTE)
        assert not [i for i, r in enumerate(results) if r.anomaly_decision]


def test_plain_gaussian_noise_is_rarely_reported() -> None:
    """Noise has no incidents: 70 promises points as rare as one in 10 ** 2.8 (1.6 per 1,000),
    and on independent Gaussian noise the detector reports at most a fifth of that."""
    reports = points = 0
    for seed in range(4):
        rng = random.Random(seed)
        values = [100.0 + rng.gauss(0.0, 1.0) for _ in range(5_500)]
        results = feed(RcfDetector(DetectorConfig(seed=seed)), values, step=MINUTE)
        scored = results[500:]  # after learning and the tails' warm-up
        points += len(scored)
        reports += sum(
            now.anomaly_score >= 70.0 > before.anomaly_score
            for before, now in itertools.pairwise(scored)
        )
    assert reports / points * 1000 <= 0.32, reports


def test_a_missing_daily_peak_is_found_against_the_previous_days() -> None:
    """Values that stay within the usual range but break the daily pattern."""
    values = daily_series(10, noise=0.5)
    per_day = 288
    start = 9 * per_day + 40
    for i in range(start, start + 40):  # the midday peak flattened to the daily mean
        values[i] = 100.0 + (values[i] - 100.0) * 0.1
    results = feed(RcfDetector(), values)
    assert any(r.anomaly_decision for r in results[start : start + 40])
    assert not any(r.anomaly_decision for r in results[per_day : start - 1])


def test_multivariate_attribution_points_at_the_variable_that_moved() -> None:
    rng = random.Random(2)
    detector = RcfDetector(dimensions=3)
    for i in range(600):
        detector.update(i * MINUTE, [10 + rng.gauss(0, 0.5), 20 + rng.gauss(0, 0.5), 5.0])
    result = detector.update(600 * MINUTE, [10.0, 80.0, 5.0])
    assert result.anomaly_decision == 1 and result.attribution is not None
    assert len(result.attribution) == 3
    assert sum(result.attribution) == pytest.approx(1.0)
    assert max(range(3), key=lambda k: result.attribution[k]) == 1  # type: ignore[index]


def test_ratio_margin_suppresses_reports_close_to_the_expected_value() -> None:
    rng = random.Random(5)
    values = [100.0 + rng.gauss(0, 0.2) for _ in range(700)] + [104.0]
    strict = feed(RcfDetector(), values, step=MINUTE)[-1]
    lenient = feed(RcfDetector(DetectorConfig(ratio_margin=0.1)), values, step=MINUTE)[-1]
    assert strict.anomaly_decision == 1
    assert lenient.anomaly_decision == 0 and lenient.anomaly_score < 70.0


def test_config_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="num_tres"):
        DetectorConfig.from_dict({"num_tres": 10})
    with pytest.raises(ValueError, match="threshold=120"):
        DetectorConfig(threshold=120)
    assert DetectorConfig.from_dict({"threshold": 80}).threshold == 80


def test_no_burst_when_the_daily_reference_switches_on() -> None:
    """A day after start the daily comparison takes over; daily series must not page then.

    (Before the fix every series of the demo paged at that moment.)
    """
    for seed in range(4):
        rng = random.Random(seed)
        values = [
            50.0
            + 20.0 * math.sin(2 * math.pi * i / 1440)
            + 3.0 * math.sin(i / 37.0)
            + rng.gauss(0.0, 2.0)
            for i in range(2 * 1440)
        ]
        results = feed(RcfDetector(DetectorConfig(seed=seed)), values, step=MINUTE)
        # The switch comes 32 points after the first day; nothing starts while it settles, and
        # afterwards no more than the calibrated rate (about one point in 10 ** 2.9).
        started = [first for first, _ in incidents(results) if first >= 1440]
        assert not [first for first in started if first < 1440 + 32 + 50], started
        assert len(started) <= 3, started  # in 1,400 points


def converging_metric(points: int, seed: int) -> list[float]:
    """A training job's gradient norm: decaying towards its final level, 8 % log-normal noise."""
    rng = random.Random(seed)
    return [
        (1.0 + 1.5 * math.exp(-i / 800.0)) * math.exp(rng.gauss(0.0, 0.08)) for i in range(points)
    ]


def test_a_converging_metric_does_not_page() -> None:
    """Its new lows are smaller than its usual step, and a day in, the daily comparison (which
    fits it badly) takes over while the forest's rarity alone cannot report (``settle``)."""
    for seed in range(6):
        results = feed(
            RcfDetector(DetectorConfig(seed=seed)), converging_metric(3000, seed), step=MINUTE
        )
        assert not [i for i, r in enumerate(results) if r.anomaly_decision]


def test_without_settling_the_switch_to_the_daily_comparison_pages() -> None:
    """The reason for ``settle``: the forest's input changes meaning a day (+ 32 points) in."""
    for seed in range(3):
        results = feed(
            RcfDetector(DetectorConfig(seed=seed, settle=0)),
            converging_metric(1600, seed),
            step=MINUTE,
        )
        fired = [i for i, r in enumerate(results) if r.anomaly_decision]
        assert fired and 1440 + 32 <= fired[0] <= 1440 + 32 + 5


def random_walk(points: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    values, level = [], 100.0
    for _ in range(points):
        level += rng.gauss(0.0, 0.3)
        values.append(level)
    return values


def test_expected_value_follows_a_wandering_series_not_yesterday() -> None:
    """A price has no daily cycle: its expected value is its recent level, not yesterday's."""
    for seed in range(3):
        values = random_walk(3 * 1440, seed)
        results = feed(RcfDetector(DetectorConfig(seed=seed)), values, step=MINUTE)
        late = range(2 * 1440, 3 * 1440)
        ours = sum(abs(values[i] - results[i].expected_values[0]) for i in late) / len(late)
        yesterday = sum(abs(values[i] - values[i - 1440]) for i in late) / len(late)
        assert ours < 0.25 * yesterday, (ours, yesterday)


def test_expected_value_of_a_daily_series_keeps_the_daily_shape_through_an_outage() -> None:
    values = daily_series(4, noise=0.5)
    start = 3 * 288 + 60
    for i in range(start, start + 30):  # a sensor stuck at zero for 30 points
        values[i] = 0.0
    results = feed(RcfDetector(), values)
    normal = [100.0 + 40.0 * math.sin(2 * math.pi * (i % 288) / 288) for i in range(len(values))]
    outage = range(start, start + 30)
    assert all(abs(results[i].expected_values[0] - normal[i]) < 5.0 for i in outage)
    assert any(r.anomaly_decision for r in results[start : start + 3])


def test_log_transform_keeps_input_units_and_finds_a_burst() -> None:
    """Volumes: noise proportional to the level. Values, expected values stay in input units."""
    rng = random.Random(4)
    values = [
        50_000.0 * (1.5 + math.cos(2 * math.pi * i / 1440)) * math.exp(rng.gauss(0.0, 0.25))
        for i in range(2000)
    ]
    values[1800] *= 8.0
    detector = RcfDetector(DetectorConfig(transform="log"))
    results = feed(detector, values, step=MINUTE)
    assert results[1800].values == (values[1800],)
    assert 0.5 < results[1799].expected_values[0] / values[1799] < 2.0
    assert results[1800].anomaly_decision == 1
    restored = RcfDetector.from_bytes(detector.to_bytes())
    assert restored.update(2000 * MINUTE, 60_000.0) == detector.update(2000 * MINUTE, 60_000.0)
    with pytest.raises(ValueError, match="transform='sqrt'"):
        DetectorConfig(transform="sqrt")


def test_a_missing_point_is_imputed_from_its_daily_references_even_when_they_are_zero() -> None:
    """A GPU idle every night: the expected value of a missing night-time point is 0."""
    per_day = 288
    values = [0.0 if (i % per_day) < per_day // 2 else 80.0 for i in range(3 * per_day)]
    detector = RcfDetector()
    feed(detector, values)
    # The next point opens the night (its references are all 0) after a day-time 80.
    missing = detector.update(len(values) * 300.0, None)
    assert missing.missing and missing.expected_values == (0.0,)
