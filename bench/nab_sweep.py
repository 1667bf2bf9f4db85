"""Benchmark: the NAB threshold sweep (three profiles) on a real corpus, against a fixed threshold.

Tuning calls the sweep once per candidate configuration, so it has to stay cheap. Scores are
random here (the detector's speed is not what is measured); ties are kept realistic by rounding.

    .venv/bin/python bench/nab_sweep.py --data /work/shared/data/nab/data \\
        --labels /work/shared/data/nab/labels/combined_windows.json --json /tmp/nab_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from app.corpus import load_corpus
from detectors.evaluation import PROFILES, ThresholdSweep, score_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="save the measurements here")
    args = parser.parse_args()

    started = time.perf_counter()
    corpus = load_corpus(args.data, args.labels)
    load_seconds = time.perf_counter() - started
    rng = np.random.default_rng(0)
    scores = {f.key: np.round(100 * rng.random(f.rows) ** 8, 3) for f in corpus}

    def sweep_all_profiles() -> None:
        sweep = ThresholdSweep(scores, corpus)
        for profile in PROFILES:
            score_corpus(scores, corpus, profile, sweep=sweep)

    def fixed_threshold_all_profiles() -> None:
        for profile in PROFILES:
            score_corpus(scores, corpus, profile, threshold=70.0)

    sweep_all_profiles()  # the first call also builds the per-file layouts; not measured
    timings = {}
    for name, work in (
        ("sweep_3_profiles", sweep_all_profiles),
        ("fixed_threshold_3_profiles", fixed_threshold_all_profiles),
    ):
        runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            work()
            runs.append(time.perf_counter() - started)
        timings[name] = min(runs)
    result = {
        "files": len(corpus),
        "rows": sum(f.rows for f in corpus),
        "candidate_thresholds": len(ThresholdSweep(scores, corpus).thresholds),
        "load_corpus_seconds": load_seconds,
        **{f"{name}_seconds": seconds for name, seconds in timings.items()},
        "sweep_over_fixed_ratio": timings["sweep_3_profiles"]
        / timings["fixed_threshold_3_profiles"],
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
