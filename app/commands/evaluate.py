"""``anomstream evaluate``: score the detector on a labelled corpus with the NAB rules.

Either runs a fresh detector over every ``DIR/<category>/<file>.csv`` (one per file, in parallel
processes) or reads precomputed per-file outputs with an ``anomalyScore`` column (the output of
``anomstream backtest``), then reports, for each NAB profile, the score at the corpus-wide
optimal threshold and at the deployed threshold, overall and per category.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli import CliError
from contract.records import ANOMALY_SCORE

if TYPE_CHECKING:
    import numpy as np

    from detectors.evaluation import CorpusFile, CorpusScore, ThresholdSweep

HELP = "Score the detector on a labelled corpus (NAB rules, three profiles)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, metavar="DIR", help="corpus: DIR/<category>/*.csv"
    )
    parser.add_argument(
        "--labels",
        required=True,
        type=Path,
        metavar="WINDOWS.json",
        help='windows file: {"<category>/<file>.csv": [[start, end], ...]}',
    )
    parser.add_argument(
        "--results",
        type=Path,
        metavar="DIR",
        help="read scores from DIR/<category>/<file>.csv (anomalyScore column) instead of "
        "running the detector",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="score with the river baseline (an exponentially weighted z-score, "
        "detectors/baseline.py) instead of the RCF detector, to compare the reports",
    )
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="also write the report")
    parser.add_argument(
        "--plot", type=Path, metavar="OUT.png", help="plot score against threshold per profile"
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="detector parameter override (repeatable), e.g. --param num_trees=50; "
        "threshold also sets the deployed threshold",
    )
    parser.add_argument(
        "--jobs", type=int, metavar="N", help="parallel processes (default: one per CPU)"
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from app.corpus import load_corpus
    from app.corpus_runner import run_corpus, score_series_baseline
    from app.params import parse_params
    from detectors.evaluation import PROFILES, ThresholdSweep, score_corpus

    config = parse_params(args.param)
    if args.jobs is not None and args.jobs < 1:
        raise CliError(f"--jobs must be at least 1, got {args.jobs}")
    try:
        corpus = load_corpus(args.data, args.labels)
    except (OSError, ValueError) as error:
        raise CliError(str(error)) from None
    # Wide enough for the table when the output is a file or a pipe (80 columns would fold it).
    console = Console() if sys.stdout.isatty() else Console(width=140)
    if args.results is not None and args.baseline:
        raise CliError("--results and --baseline exclude each other")
    if args.results is not None:
        scores = read_results(args.results, corpus)
        source = f"scores from {args.results}"
    elif args.baseline:
        scores = run_corpus(corpus, config, jobs=args.jobs, show_progress=True,
                            scorer=score_series_baseline)
        source = "scores from the river baseline (EW z-score) per file"
    else:
        scores = run_corpus(corpus, config, jobs=args.jobs, show_progress=True)
        source = "scores from a fresh RcfDetector per file"
    sweep = ThresholdSweep(scores, corpus)
    report: dict[str, Any] = {
        "data": str(args.data),
        "labels": str(args.labels),
        "results": None if args.results is None else str(args.results),
        "detector_config": None if args.results is not None or args.baseline
        else config.to_dict(),
        "baseline": "river EWMean/EWVar z-score" if args.baseline else None,
        "corpus": {
            "files": len(corpus),
            "rows": sum(f.rows for f in corpus),
            "windows": sweep.windows,
        },
        "deployed_threshold": config.threshold,
        "profiles": {},
    }
    console.print(
        f"{len(corpus)} files, {report['corpus']['rows']:,} rows, {sweep.windows} windows; {source}"
    )
    # Each category on its own: the threshold that suits it best says whether one threshold
    # means the same everywhere.
    category_sweeps = {
        category: (files, ThresholdSweep(scores, files))
        for category in sorted({f.category for f in corpus})
        for files in [[f for f in corpus if f.category == category]]
    }
    report["categories"] = {}
    for name, profile in PROFILES.items():
        optimized = score_corpus(scores, corpus, profile, sweep=sweep)
        deployed = score_corpus(scores, corpus, profile, threshold=config.threshold)
        own = {
            category: score_corpus(scores, files, profile, sweep=category_sweep)
            for category, (files, category_sweep) in category_sweeps.items()
        }
        console.print(_table(name, optimized, deployed, own))
        for category, result in own.items():
            report["categories"].setdefault(category, {})[name] = {
                "threshold": result.threshold if math.isfinite(result.threshold) else None,
                "score": result.score,
            }
        report["profiles"][name] = {
            "weights": {
                "tp": profile.tp_weight,
                "fn": profile.fn_weight,
                "fp": profile.fp_weight,
            },
            "optimized": optimized.as_dict(),
            "deployed": deployed.as_dict(),
        }
    if args.json is not None:
        _write(args.json, json.dumps(report, indent=2) + "\n")
        console.print(f"report written to {args.json}")
    if args.plot is not None:
        _plot(args.plot, sweep, config.threshold, report, category_sweeps)
        console.print(f"plot written to {args.plot}")
    return 0


def read_results(results_dir: Path, corpus: list[CorpusFile]) -> dict[str, np.ndarray]:
    """The ``anomalyScore`` column of ``results_dir/<category>/<file>.csv`` for each file."""
    import numpy as np

    scores: dict[str, np.ndarray] = {}
    for corpus_file in corpus:
        path = results_dir / corpus_file.category / corpus_file.name
        try:
            handle = path.open(newline="")
        except OSError as error:
            raise CliError(f"{path}: cannot read results: {error.strerror}") from None
        with handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            if ANOMALY_SCORE not in header:
                raise CliError(f"{path}:1: no {ANOMALY_SCORE!r} column (header: {header})")
            column = header.index(ANOMALY_SCORE)
            values: list[float] = []
            for line, row in enumerate(reader, start=2):
                try:
                    value = float(row[column])
                except (IndexError, ValueError):
                    shown = row[column] if column < len(row) else ""
                    raise CliError(
                        f"{path}:{line}: field {ANOMALY_SCORE!r}: not a number: {shown!r}"
                    ) from None
                if math.isinf(value):
                    raise CliError(f"{path}:{line}: field {ANOMALY_SCORE!r}: {value} is not finite")
                values.append(value)
        if len(values) != corpus_file.rows:
            raise CliError(
                f"{path}: {len(values)} result rows, but the data file has {corpus_file.rows} "
                "(one result per input row is needed to line them up)"
            )
        scores[corpus_file.key] = np.asarray(values, dtype=np.float64)
    return scores


def _table(
    name: str, optimized: CorpusScore, deployed: CorpusScore, own: dict[str, CorpusScore]
) -> Any:
    from rich import box
    from rich.table import Table

    p = optimized.profile
    table = Table(
        title=f"{name} (tp {p.tp_weight:g}, fn {p.fn_weight:g}, fp {p.fp_weight:g}): "
        f"optimal threshold {optimized.threshold:.2f}, deployed {deployed.threshold:g}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("category")
    table.add_column("windows", justify="right")
    table.add_column("optimal", justify="right")
    table.add_column("tp/fp/fn", justify="right")
    table.add_column("deployed", justify="right")
    table.add_column("tp/fp/fn", justify="right")
    table.add_column("false/1k", justify="right")
    table.add_column("own best (at)", justify="right")
    lines: list[tuple[str, str | None]] = [
        (category, category) for category in optimized.categories
    ]
    for label, category in [*lines, ("corpus", None)]:
        windows = (optimized.categories[category] if category else optimized.total).windows
        cells = [label, str(windows)]
        for result in (optimized, deployed):
            tally = result.categories[category] if category else result.total
            score = result.category_score(category) if category else result.score
            cells += ["—" if score is None else f"{score:.1f}", f"{tally.tp}/{tally.fp}/{tally.fn}"]
        tally = deployed.categories[category] if category else deployed.total
        cells.append(f"{tally.false_per_1000:.2f}")
        best = own[category] if category else optimized
        cells.append("—" if best.score is None else f"{best.score:.1f} ({best.threshold:.1f})")
        table.add_row(*cells, style="bold" if category is None else None)
    return table


def _plot(
    path: Path,
    sweep: ThresholdSweep,
    deployed: float,
    report: dict[str, Any],
    category_sweeps: dict[str, tuple[list[CorpusFile], ThresholdSweep]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from detectors.evaluation import PROFILES

    figure, (by_profile, by_category) = plt.subplots(1, 2, figsize=(14, 4.8))
    curves = [
        (by_profile, name, profile, sweep, report["profiles"][name]["optimized"])
        for name, profile in PROFILES.items()
    ]
    standard = PROFILES["standard"]
    curves += [
        (
            by_category,
            category,
            standard,
            category_sweep,
            report["categories"][category]["standard"],
        )
        for category, (_, category_sweep) in category_sweeps.items()
        if category_sweep.windows
    ]
    for axes, label, profile, curve_sweep, best in curves:
        windows = max(curve_sweep.windows, 1)
        raw = curve_sweep.raw(profile)
        null, perfect = -profile.fn_weight * windows, profile.tp_weight * windows
        axes.step(
            curve_sweep.thresholds,
            100.0 * (raw - null) / (perfect - null),
            where="post",
            label=f"{label}: best {best['score'] or 0:.1f} at {best['threshold'] or 0:.1f}",
        )
    for axes, title in (
        (by_profile, "the corpus, by NAB profile"),
        (by_category, "each category on its own (standard profile)"),
    ):
        axes.axvline(deployed, color="grey", linestyle="--", label=f"deployed {deployed:g}")
        axes.set_xlim(0, 100)
        # Low thresholds fire everywhere and score in the thousands below zero; the useful
        # range is the one around and above the null detector.
        axes.set_ylim(-100, 105)
        axes.set_xlabel("threshold (anomalyScore)")
        axes.set_ylabel("NAB score")
        axes.set_title(title)
        axes.legend(fontsize="small")
    figure.suptitle(f"NAB score by threshold: {report['data']}")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as error:
        raise CliError(f"{path}: cannot write plot: {error.strerror}") from None
    finally:
        plt.close(figure)


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        raise CliError(f"{path}: cannot write: {error.strerror}") from None
