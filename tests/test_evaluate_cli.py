"""``anomstream evaluate`` on a tiny hand-made corpus."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.corpus import load_corpus
from detectors.evaluation import PROFILES, score_corpus

START = datetime(2024, 5, 1, tzinfo=UTC)


def stamp(row: int) -> str:
    return (START + timedelta(minutes=5 * row)).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture
def corpus_dir(tmp_path: Path) -> tuple[Path, Path]:
    """Two series with one anomaly window each: a spike, and a level shift."""
    data = tmp_path / "data"
    (data / "ops").mkdir(parents=True)
    (data / "market").mkdir()
    spike = [10 + math.sin(i / 6) for i in range(300)]
    spike[200] = 40.0
    shift = [5 + 0.5 * math.cos(i / 4) + (8 if i >= 300 else 0) for i in range(400)]
    shift_rows = [f"{stamp(i)},{v:.4f}" for i, v in enumerate(shift)]
    shift_rows[50] = f"{stamp(50)},"  # a missing value
    (data / "ops" / "spike.csv").write_text(
        "timestamp,value\n" + "".join(f"{stamp(i)},{v:.4f}\n" for i, v in enumerate(spike))
    )
    (data / "market" / "shift.csv").write_text("timestamp,value\n" + "\n".join(shift_rows) + "\n")
    labels = {
        "ops/spike.csv": [[stamp(190) + ".000000", stamp(220) + ".000000"]],
        "market/shift.csv": [[stamp(290) + ".000000", stamp(330) + ".000000"]],
        "elsewhere/not_here.csv": [],  # labels for files outside the subset are fine
    }
    labels_path = tmp_path / "windows.json"
    labels_path.write_text(json.dumps(labels))
    return data, labels_path


def write_results(directory: Path, scores: dict[str, np.ndarray]) -> None:
    """Per-file outputs in the layout and columns of ``anomstream backtest``."""
    for key, values in scores.items():
        path = directory / key
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["timestamp,value,anomalyScore,anomalyDecision"]
        lines += [f"{stamp(i)},0,{float(s)!r},{int(s >= 70)}" for i, s in enumerate(values)]
        path.write_text("\n".join(lines) + "\n")


def test_runs_the_detector_and_writes_the_report(corpus_dir, tmp_path, capsys):
    data, labels = corpus_dir
    out = tmp_path / "report.json"
    argv = ["evaluate", "--data", str(data), "--labels", str(labels), "--json", str(out)]
    assert main([*argv, "--jobs", "2", "--param", "num_trees=20", "--param", "warmup=32"]) == 0
    report = json.loads(out.read_text())
    assert report["corpus"] == {"files": 2, "rows": 700, "windows": 2}
    assert report["detector_config"]["num_trees"] == 20
    assert report["deployed_threshold"] == 70.0
    assert set(report["profiles"]) == set(PROFILES)
    for name, entry in report["profiles"].items():
        assert entry["weights"]["fp"] == PROFILES[name].fp_weight
        optimized, deployed = entry["optimized"], entry["deployed"]
        assert deployed["threshold"] == 70.0
        assert optimized["score"] >= deployed["score"] - 1e-9
        assert set(optimized["categories"]) == {"ops", "market"}
        assert set(optimized["files"]) == {"ops/spike.csv", "market/shift.csv"}
        assert optimized["tp"] + optimized["fn"] == 2
        assert optimized["raw_perfect"] == 2 * PROFILES[name].tp_weight
    # The spike is obvious: the detector's best threshold catches it.
    assert report["profiles"]["standard"]["optimized"]["files"]["ops/spike.csv"]["tp"] == 1
    printed = capsys.readouterr().out
    assert "reward_low_FN_rate" in printed and "corpus" in printed


def test_results_directory_is_scored_as_given(corpus_dir, tmp_path):
    data, labels = corpus_dir
    corpus = load_corpus(data, labels)
    rng = np.random.default_rng(3)
    scores = {f.key: np.round(100 * rng.random(f.rows) ** 4, 2) for f in corpus}
    scores["ops/spike.csv"][195] = 99.5
    results = tmp_path / "results"
    write_results(results, scores)
    out = tmp_path / "report.json"
    argv = ["evaluate", "--data", str(data), "--labels", str(labels), "--results", str(results)]
    assert main([*argv, "--json", str(out), "--param", "threshold=60"]) == 0
    report = json.loads(out.read_text())
    assert report["results"] == str(results) and report["detector_config"] is None
    for name in PROFILES:
        optimized = score_corpus(scores, corpus, name)
        deployed = score_corpus(scores, corpus, name, threshold=60.0)
        entry = report["profiles"][name]
        assert entry["optimized"]["threshold"] == optimized.threshold
        assert entry["optimized"]["score"] == pytest.approx(optimized.score)
        assert entry["deployed"]["threshold"] == 60.0
        assert entry["deployed"]["score"] == pytest.approx(deployed.score)
        assert entry["deployed"]["fp"] == deployed.fp
        spike = entry["deployed"]["files"]["ops/spike.csv"]
        assert spike["raw"] == pytest.approx(deployed.files["ops/spike.csv"].raw)

    # A perfect set of results scores 100 under every profile.
    perfect = {f.key: np.zeros(f.rows) for f in corpus}
    for f in corpus:
        perfect[f.key][f.windows[:, 0]] = 100.0
    write_results(results, perfect)
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for entry in report["profiles"].values():
        assert entry["optimized"]["score"] == pytest.approx(100.0)
        assert entry["deployed"]["score"] == pytest.approx(100.0)


def test_user_errors_are_reported_without_a_traceback(corpus_dir, tmp_path, capsys):
    data, labels = corpus_dir
    argv = ["evaluate", "--data", str(data), "--labels", str(labels)]
    assert main([*argv, "--param", "num_tress=3"]) == 2
    assert "unknown detector parameter" in capsys.readouterr().err
    assert main([*argv, "--param", "num_trees=many"]) == 2
    assert "'many' is not a valid int" in capsys.readouterr().err
    results = tmp_path / "short"
    corpus = load_corpus(data, labels)
    write_results(results, {f.key: np.zeros(f.rows - 1) for f in corpus})
    assert main([*argv, "--results", str(results)]) == 2
    assert "result rows, but the data file has" in capsys.readouterr().err


SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def measure(corpus: str, tmp_path: Path) -> dict:
    root = SHARED_DATA / corpus
    if not (root / "data").is_dir():
        pytest.skip(f"corpus not found at {root.resolve()} (shared/ beside the repo)")
    report = tmp_path / f"{corpus}.json"
    labels = root / "labels" / "combined_windows.json"
    argv = ["evaluate", "--data", str(root / "data"), "--labels", str(labels)]
    assert main([*argv, "--json", str(report)]) == 0
    return json.loads(report.read_text())["profiles"]


@pytest.mark.slow
def test_the_default_detector_keeps_its_nab_figures(tmp_path: Path) -> None:
    """The figures of docs/detector.md, re-measured on every run where the corpus is."""
    profiles = measure("nab", tmp_path)
    optimized = {name: profiles[name]["optimized"]["score"] for name in PROFILES}
    assert optimized["standard"] >= 65.5, optimized
    assert optimized["reward_low_FP_rate"] >= 54.5, optimized
    assert optimized["reward_low_FN_rate"] >= 73.5, optimized
    assert profiles["standard"]["deployed"]["score"] >= 62.5, profiles["standard"]["deployed"]


@pytest.mark.slow
def test_the_default_detector_keeps_its_kpi_ops_figures(tmp_path: Path) -> None:
    profiles = measure("kpi-ops", tmp_path)
    standard = profiles["standard"]
    assert standard["optimized"]["score"] >= 75.0, standard["optimized"]
    assert 65.0 <= standard["optimized"]["threshold"] <= 80.0, standard["optimized"]
    assert standard["deployed"]["score"] >= 73.5, standard["deployed"]


def test_baseline_scores_the_corpus_with_the_river_baseline(corpus_dir, tmp_path, capsys):
    data, labels = corpus_dir
    out = tmp_path / "baseline.json"
    argv = ["evaluate", "--data", str(data), "--labels", str(labels)]
    assert main([*argv, "--baseline", "--jobs", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["baseline"] and report["detector_config"] is None
    assert report["corpus"] == {"files": 2, "rows": 700, "windows": 2}
    assert set(report["profiles"]) == set(PROFILES)
    # Its scores are the baseline's own, scored by the same NAB rules as the detector's.
    from app.corpus_runner import score_series_baseline
    from detectors.config import DetectorConfig

    corpus = load_corpus(data, labels)
    scores = {f.key: score_series_baseline(DetectorConfig(), f.timestamps, f.values)
              for f in corpus}
    expected = score_corpus(scores, corpus, "standard")
    assert report["profiles"]["standard"]["optimized"]["score"] == pytest.approx(expected.score)
    # A 30-sigma spike is beyond any threshold's doubt, for a z-score too.
    assert report["profiles"]["standard"]["optimized"]["files"]["ops/spike.csv"]["tp"] == 1
    assert "river baseline" in capsys.readouterr().out
    assert main([*argv, "--baseline", "--results", str(tmp_path)]) == 2
    assert "exclude each other" in capsys.readouterr().err
