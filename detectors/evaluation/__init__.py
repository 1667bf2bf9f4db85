"""Scoring detectors against labelled corpora (NAB rules); ``app.corpus_runner`` runs them."""

from detectors.evaluation.corpus import CorpusFile
from detectors.evaluation.nab import (
    PROFILES,
    CorpusScore,
    Profile,
    Tally,
    ThresholdSweep,
    optimize_threshold,
    score_corpus,
)

__all__ = [
    "PROFILES",
    "CorpusFile",
    "CorpusScore",
    "Profile",
    "Tally",
    "ThresholdSweep",
    "optimize_threshold",
    "score_corpus",
]
