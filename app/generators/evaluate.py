"""Score the default detector against a generated feed's labels: precision and recall.

Every series of the feed runs through its own ``RcfDetector`` (default configuration, so the
default decision threshold) in time order. Then, per series:

- A label's **credited span** runs from its first point to ``tolerance`` intervals after its
  last point: a detector may need a point or two to react, and the end of an anomaly (a price
  that stops being stale, a GPU that recovers) is itself a change worth flagging.
- **Alert events**: fired decisions (``anomalyDecision == 1``) grouped so that fires at most
  ``tolerance`` intervals apart form one event. An on-call person sees an event, not each
  row, so precision counts events.
- A label is **found** when at least one decision fires inside its credited span.
- An event is **true** when at least one of its fires lies in a credited span of a label of the
  same series, **false** otherwise (every event on an anomaly-free series is false).

Per feed: recall = found labels / labels; precision = true events / all events (anomaly-free
series included). Per kind *k*: recall = found *k* labels / *k* labels; precision = events
touching a *k* span / (those + false events on series that carry a *k* label). Labels are
only injected after the detector's warm-up, so none falls in its LEARNING stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.generators.common import Feed, Label, Series

DEFAULT_TOLERANCE = 3


@dataclass(slots=True)
class SeriesRun:
    """One series with its labels and the detector's scores and decisions on it."""

    series: Series
    labels: list[Label]
    scores: np.ndarray
    decisions: np.ndarray

    def fired(self) -> np.ndarray:
        return np.flatnonzero(self.decisions)


@dataclass(slots=True)
class KindScore:
    labels: int = 0
    found: int = 0
    events: int = 0
    false_events: int = 0

    @property
    def recall(self) -> float | None:
        return self.found / self.labels if self.labels else None

    @property
    def precision(self) -> float | None:
        total = self.events + self.false_events
        return self.events / total if total else None


@dataclass(slots=True)
class FeedEvaluation:
    feed: str
    points: int
    interval: float
    tolerance: int
    detector: dict[str, Any]
    runs: list[SeriesRun]
    measure_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    kinds: dict[str, KindScore] = field(default_factory=dict)
    labels: int = 0
    found: int = 0
    events: int = 0
    true_events: int = 0
    clean_series: int = 0
    clean_series_alerting: int = 0
    clean_events: int = 0

    @property
    def recall(self) -> float | None:
        return self.found / self.labels if self.labels else None

    @property
    def precision(self) -> float | None:
        return self.true_events / self.events if self.events else None

    def to_json(self) -> dict[str, Any]:
        return {
            "feed": self.feed,
            "points": self.points,
            "interval_seconds": self.interval,
            "series": len(self.runs),
            "tolerance_intervals": self.tolerance,
            "detector": self.detector,
            "measure_params": self.measure_params,
            "labels": self.labels,
            "found": self.found,
            "recall": self.recall,
            "alert_events": self.events,
            "true_events": self.true_events,
            "precision": self.precision,
            "anomaly_free": {
                "series": self.clean_series,
                "series_with_alerts": self.clean_series_alerting,
                "alert_events": self.clean_events,
            },
            "kinds": {
                kind: {
                    "labels": score.labels,
                    "found": score.found,
                    "recall": score.recall,
                    "events": score.events,
                    "false_events_on_its_series": score.false_events,
                    "precision": score.precision,
                }
                for kind, score in sorted(self.kinds.items())
            },
        }


def alert_events(fired: Sequence[int] | np.ndarray, tolerance: int) -> list[list[int]]:
    """Group fired point indices: fires at most ``tolerance`` apart are one event.

    >>> alert_events([3, 4, 6, 20, 30, 31], tolerance=3)
    [[3, 4, 6], [20], [30, 31]]
    """
    events: list[list[int]] = []
    for index in (int(i) for i in fired):
        if events and index - events[-1][-1] <= tolerance:
            events[-1].append(index)
        else:
            events.append([index])
    return events


def run_series(
    series: Series, labels: list[Label], detector_params: dict[str, Any], timestamps: np.ndarray
) -> SeriesRun:
    """Feed ``series`` (points at ``timestamps``, epoch seconds) to a fresh detector."""
    from detectors import DetectorConfig, RcfDetector

    detector = RcfDetector(DetectorConfig(**detector_params))
    scores = np.zeros(len(series.values))
    decisions = np.zeros(len(series.values), dtype=np.int8)
    for index, (moment, value) in enumerate(zip(timestamps, series.values, strict=True)):
        # Real times: a detector may use them (the time of day of a daily-seasonal series).
        result = detector.update(float(moment), float(value))
        scores[index] = result.anomaly_score
        decisions[index] = result.anomaly_decision
    return SeriesRun(series, labels, scores, decisions)


def evaluate_feed(
    feed: Feed,
    detector_params: dict[str, Any] | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
    advance: Callable[[], None] | None = None,
    measure_params: dict[str, dict[str, Any]] | None = None,
) -> FeedEvaluation:
    """Run every series of ``feed`` through a detector and score it against the labels.

    ``measure_params`` overrides ``detector_params`` for the series of a measure (the
    per-detector ``params`` of a detect configuration). ``advance`` is called once per series
    (a progress bar's step).
    """
    from detectors import DetectorConfig

    params = dict(detector_params or {})
    labels_of: dict[Any, list[Label]] = {}
    for label in feed.labels:
        labels_of.setdefault((tuple(sorted(label.dimensions.items())), label.measure), []).append(
            label
        )
    overrides = measure_params or {}
    runs: list[SeriesRun] = []
    timestamps = feed.spec.timestamps()
    for series in feed.series:
        own = {**params, **overrides.get(series.measure, {})}
        runs.append(run_series(series, labels_of.get(series.key, []), own, timestamps))
        if advance is not None:
            advance()
    evaluation = FeedEvaluation(
        feed=feed.name,
        points=feed.spec.points,
        interval=feed.spec.interval,
        tolerance=tolerance,
        detector=DetectorConfig(**params).to_dict(),
        runs=runs,
        measure_params={
            measure: overrides[measure]
            for measure in sorted(overrides.keys() & {series.measure for series in feed.series})
        },
    )
    for run in runs:
        _score_run(evaluation, run, tolerance)
    return evaluation


def _score_run(evaluation: FeedEvaluation, run: SeriesRun, tolerance: int) -> None:
    fired = run.fired()
    spans = [(label, label.first, label.last + tolerance) for label in run.labels]
    events = alert_events(fired, tolerance)
    evaluation.events += len(events)
    if not run.labels:
        evaluation.clean_series += 1
        evaluation.clean_series_alerting += int(bool(events))
        evaluation.clean_events += len(events)
    for label, first, last in spans:
        score = evaluation.kinds.setdefault(label.kind, KindScore())
        score.labels += 1
        evaluation.labels += 1
        if np.any((fired >= first) & (fired <= last)):
            score.found += 1
            evaluation.found += 1
    series_kinds = {label.kind for label in run.labels}
    for event in events:
        touched = {
            label.kind for label, first, last in spans if any(first <= i <= last for i in event)
        }
        if touched:
            evaluation.true_events += 1
            for kind in touched:
                evaluation.kinds[kind].events += 1
        else:
            for kind in series_kinds:
                evaluation.kinds[kind].false_events += 1


def render_table(evaluations: Iterable[FeedEvaluation]) -> Any:
    """A rich table: per feed, one row per anomaly kind, the feed's total and its clean series."""
    from rich.table import Table

    table = Table(title="Detector vs. injected anomalies (default threshold)")
    for name, justify in (
        ("Feed", "left"),
        ("Anomaly kind", "left"),
        ("Series", "right"),
        ("Labels", "right"),
        ("Found", "right"),
        ("Recall", "right"),
        ("Alert events", "right"),
        ("True events", "right"),
        ("Precision", "right"),
    ):
        # Cells never wrap: a reader greps the printed table for a kind.
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for evaluation in evaluations:
        for kind, score in sorted(evaluation.kinds.items()):
            table.add_row(
                evaluation.feed,
                kind,
                str(sum(any(label.kind == kind for label in r.labels) for r in evaluation.runs)),
                str(score.labels),
                str(score.found),
                _percent(score.recall),
                str(score.events + score.false_events),
                str(score.events),
                _percent(score.precision),
            )
        table.add_row(
            evaluation.feed,
            "(anomaly-free series)",
            f"{evaluation.clean_series} ({evaluation.clean_series_alerting} alerting)",
            "0",
            "-",
            "-",
            str(evaluation.clean_events),
            "0",
            "-",
        )
        table.add_row(
            f"[bold]{evaluation.feed}[/bold]",
            "[bold]all[/bold]",
            str(len(evaluation.runs)),
            str(evaluation.labels),
            str(evaluation.found),
            f"[bold]{_percent(evaluation.recall)}[/bold]",
            str(evaluation.events),
            str(evaluation.true_events),
            f"[bold]{_percent(evaluation.precision)}[/bold]",
            end_section=True,
        )
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def plot_evaluation(evaluation: FeedEvaluation, path: Path) -> None:
    """One panel per anomaly kind (its first labelled series) plus one anomaly-free series:
    values, labelled windows shaded, fired decisions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen: list[tuple[str, SeriesRun]] = []
    for kind in sorted(evaluation.kinds):
        run = next(r for r in evaluation.runs if any(label.kind == kind for label in r.labels))
        chosen.append((kind, run))
    clean = next((r for r in evaluation.runs if not r.labels), None)
    if clean is not None:
        chosen.append(("anomaly-free", clean))
    figure, axes = plt.subplots(len(chosen), 1, figsize=(11, 2.3 * len(chosen)), squeeze=False)
    for axis, (title, run) in zip(axes[:, 0], chosen, strict=True):
        x = np.arange(len(run.series.values))
        axis.plot(x, run.series.values, linewidth=0.7, color="#1f77b4")
        half_width = max(0.5, len(x) / 600.0)  # a one-point window stays visible
        for label in run.labels:
            colour = "#ff7f0e" if label.kind == title else "#999999"
            axis.axvspan(
                label.first - half_width, label.last + half_width, color=colour, alpha=0.35, lw=0
            )
        fired = run.fired()
        axis.scatter(fired, run.series.values[fired], s=10, color="#d62728", zorder=3)
        dims = ", ".join(f"{k}={v}" for k, v in run.series.dimensions.items())
        axis.set_title(f"{evaluation.feed} · {title} · {run.series.measure} ({dims})", fontsize=9)
        axis.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel(
        f"interval ({evaluation.interval:g} s); orange: this kind's labelled windows, grey: other "
        "kinds' windows; red dots: the detector's decisions",
        fontsize=8,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def markdown_table(evaluations: Iterable[FeedEvaluation]) -> str:
    """The rich table's rows as a Markdown table."""
    lines = [
        "| Feed | Anomaly kind | Series | Labels | Found | Recall | Alert events | True events "
        "| Precision |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for evaluation in evaluations:
        for kind, score in sorted(evaluation.kinds.items()):
            carriers = sum(any(label.kind == kind for label in r.labels) for r in evaluation.runs)
            lines.append(
                f"| {evaluation.feed} | {kind} | {carriers} | {score.labels} | {score.found} "
                f"| {_percent(score.recall)} | {score.events + score.false_events} "
                f"| {score.events} | {_percent(score.precision)} |"
            )
        lines.append(
            f"| {evaluation.feed} | (anomaly-free series) | {evaluation.clean_series} "
            f"({evaluation.clean_series_alerting} alerting) | 0 | - | - "
            f"| {evaluation.clean_events} | 0 | - |"
        )
        lines.append(
            f"| **{evaluation.feed}** | **all** | {len(evaluation.runs)} | {evaluation.labels} "
            f"| {evaluation.found} | **{_percent(evaluation.recall)}** | {evaluation.events} "
            f"| {evaluation.true_events} | **{_percent(evaluation.precision)}** |"
        )
    return "\n".join(lines) + "\n"


BEGIN_MARKER = "<!-- evaluation:begin -->"
END_MARKER = "<!-- evaluation:end -->"


def write_markdown(path: Path, evaluations: Sequence[FeedEvaluation], provenance: str) -> None:
    """Put the results table (with ``provenance``: command, detector version) into ``path``.

    When ``path`` already holds the markers, only the text between them is replaced, so the
    prose of a report survives a re-run; otherwise the file is just the block.
    """
    block = f"{BEGIN_MARKER}\n{provenance.strip()}\n\n{markdown_table(evaluations)}{END_MARKER}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN_MARKER in text and END_MARKER in text:
        head, rest = text.split(BEGIN_MARKER, 1)
        tail = rest.split(END_MARKER, 1)[1]
        text = f"{head}{block}{tail}"
    else:
        text = block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
