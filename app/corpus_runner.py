"""Run a fresh detector over every file of a corpus, in parallel processes.

One ``RcfDetector`` per file, fed row by row in file order, as a stream would feed it; the result
is one ``anomaly_score`` (0–100) per row, the input of ``detectors.evaluation.nab``. Tuning scripts
call ``run_corpus`` directly.

>>> import numpy as np
>>> from detectors.evaluation.corpus import CorpusFile
>>> values = np.sin(np.arange(300) / 10.0)
>>> values[250] = 40.0
>>> corpus = [CorpusFile("demo", "a.csv", 60.0 * np.arange(300), values, np.zeros((0, 2), int))]
>>> scores = run_corpus(corpus, DetectorConfig(warmup=32), jobs=1)["demo/a.csv"]
>>> len(scores), int(np.argmax(scores))
(300, 250)
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from app.progress import progress_bar
from detectors.baseline import RiverBaseline
from detectors.config import DetectorConfig
from detectors.evaluation.corpus import CorpusFile
from detectors.rcf import RcfDetector


def score_series(config: DetectorConfig, timestamps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``anomaly_score`` of each row from a fresh detector; a NaN value is a missing point."""
    detector = RcfDetector(config)
    scores = np.empty(len(values), dtype=np.float64)
    for row, (timestamp, value) in enumerate(
        zip(timestamps.tolist(), values.tolist(), strict=True)
    ):
        point = None if math.isnan(value) else value
        scores[row] = detector.update(timestamp, point).anomaly_score
    return scores


def score_series_baseline(
    config: DetectorConfig, timestamps: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """The river baseline's 0–100 score of each row (``detectors.baseline.RiverBaseline``)."""
    baseline = RiverBaseline()
    return np.array(
        [baseline.update(None if math.isnan(value) else value) for value in values.tolist()],
        dtype=np.float64,
    )


Scorer = Callable[[DetectorConfig, np.ndarray, np.ndarray], np.ndarray]


def run_corpus(
    corpus: Sequence[CorpusFile],
    config: DetectorConfig | None = None,
    jobs: int | None = None,
    show_progress: bool = False,
    scorer: Scorer = score_series,
) -> dict[str, np.ndarray]:
    """Scores of every file, keyed like the labels (``"<category>/<file>.csv"``).

    ``jobs`` processes (default: one per CPU) share the files, largest first so that the long
    ones do not finish last; ``jobs=1`` runs in this process. ``show_progress`` draws a rich
    progress bar counting rows. Workers are spawned, so a script calling this with ``jobs > 1``
    needs the usual ``if __name__ == "__main__":`` guard. ``scorer`` scores one file (a
    module-level function, so that spawned workers can import it): the RCF detector by default,
    ``score_series_baseline`` for the river baseline.
    """
    config = config or DetectorConfig()
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(corpus) or 1))
    ordered = sorted(corpus, key=lambda corpus_file: corpus_file.rows, reverse=True)
    scores: dict[str, np.ndarray] = {}
    total_rows = sum(f.rows for f in corpus)
    with progress_bar("running detector", total_rows, "rows", show_progress) as advance:
        if jobs == 1:
            for corpus_file in ordered:
                scores[corpus_file.key] = scorer(
                    config, corpus_file.timestamps, corpus_file.values
                )
                advance(corpus_file.rows)
        else:
            # spawn, not fork: the progress bar's refresh thread must not be forked mid-lock.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                futures = {
                    pool.submit(scorer, config, f.timestamps, f.values): f for f in ordered
                }
                for future in as_completed(futures):
                    corpus_file = futures[future]
                    scores[corpus_file.key] = future.result()
                    advance(corpus_file.rows)
    return {corpus_file.key: scores[corpus_file.key] for corpus_file in corpus}
