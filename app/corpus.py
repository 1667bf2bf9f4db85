"""Reading a labelled corpus in the NAB layout: ``DIR/<category>/<file>.csv`` and a windows file.

Each data file is ``timestamp,value``; the labels file maps ``"<category>/<file>.csv"`` to a list
of ``[start, end]`` timestamps. Windows are turned into row positions here, once, because the
scorer aligns by row: some files repeat a timestamp (daylight saving) or step backwards.

>>> import json, pathlib, tempfile
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / "demo").mkdir()
>>> rows = [f"2024-01-01 00:{m:02d}:00,{m}" for m in range(10)]
>>> _ = (root / "demo" / "a.csv").write_text("timestamp,value\\n" + "\\n".join(rows) + "\\n")
>>> labels = {"demo/a.csv": [["2024-01-01 00:04:00.000000", "2024-01-01 00:06:00.000000"]]}
>>> _ = (root / "windows.json").write_text(json.dumps(labels))
>>> [corpus_file] = load_corpus(root, root / "windows.json")
>>> corpus_file.key, corpus_file.rows, corpus_file.windows.tolist()
('demo/a.csv', 10, [[4, 6]])
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import numpy as np

from contract.records import parse_timestamp
from detectors.evaluation.corpus import CorpusFile, window_rows


def read_series(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps (epoch seconds) and values of a ``timestamp,value`` CSV.

    An empty or ``nan`` value is kept as NaN (a missing point); anything unparseable raises
    ``ValueError`` naming the file, line and field.
    """
    timestamps: list[float] = []
    values: list[float] = []
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        for field in ("timestamp", "value"):
            if field not in header:
                raise ValueError(f"{path}:1: missing column {field!r} (header: {header})")
        ts_col, value_col = header.index("timestamp"), header.index("value")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(ts_col, value_col):
                raise ValueError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
            try:
                timestamps.append(parse_timestamp(row[ts_col]))
            except ValueError:
                raise ValueError(
                    f"{path}:{line}: field 'timestamp': not a timestamp: {row[ts_col]!r}"
                ) from None
            text = row[value_col].strip()
            try:
                values.append(float(text) if text else math.nan)
            except ValueError:
                raise ValueError(
                    f"{path}:{line}: field 'value': not a number: {row[value_col]!r}"
                ) from None
    return np.asarray(timestamps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def load_corpus(data_dir: str | Path, labels_path: str | Path) -> list[CorpusFile]:
    """Every ``<category>/<file>.csv`` under ``data_dir`` with its windows, sorted by key.

    A data file without an entry in the labels file is an error (it cannot be scored); label
    entries without a data file are skipped, so a subset of a corpus can share its labels.
    """
    data_dir, labels_path = Path(data_dir), Path(labels_path)
    try:
        labels = json.loads(labels_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{labels_path}: cannot read labels: {error}") from None
    if not isinstance(labels, dict):
        raise ValueError(f"{labels_path}: expected an object mapping file keys to windows")
    paths = sorted(data_dir.glob("*/*.csv"))
    if not paths:
        raise ValueError(f"{data_dir}: no <category>/<file>.csv files")
    corpus = []
    for path in paths:
        key = f"{path.parent.name}/{path.name}"
        if key not in labels:
            raise ValueError(f"{labels_path}: no windows for {key!r} (use [] for none)")
        timestamps, values = read_series(path)
        windows = _window_array(timestamps, labels[key], f"{labels_path}: {key}")
        corpus.append(CorpusFile(path.parent.name, path.name, timestamps, values, windows))
    return corpus


def _window_array(timestamps: np.ndarray, spans: Iterable[object], where: str) -> np.ndarray:
    pairs: list[tuple[int, int]] = []
    for number, span in enumerate(spans):
        if not (isinstance(span, list | tuple) and len(span) == 2):
            raise ValueError(f"{where}: window {number}: expected [start, end], got {span!r}")
        try:
            start, end = parse_timestamp(span[0]), parse_timestamp(span[1])
            pairs.append(window_rows(timestamps, start, end))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: window {number} {span!r}: {error}") from None
    for number, (previous, current) in enumerate(pairwise(pairs), start=1):
        if current[0] <= previous[1]:
            raise ValueError(f"{where}: window {number} overlaps or precedes the one before")
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
