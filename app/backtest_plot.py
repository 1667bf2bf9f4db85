"""The backtest figure: the series with its expected value and anomalies, above the score."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path


def learning_spans(learning: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open index ranges ``[start, stop)`` of consecutive LEARNING rows.

    >>> learning_spans([1, 1, 0, 0, 1, 0])
    [(0, 2), (4, 5)]
    """
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for index, flag in enumerate(learning):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            spans.append((start, index))
            start = None
    if start is not None:
        spans.append((start, len(learning)))
    return spans


def plot_backtest(
    path: Path,
    *,
    title: str,
    timestamps: Sequence[float],
    value_columns: Sequence[str],
    values: Sequence[Sequence[float]],
    expected: Sequence[Sequence[float]],
    scores: Sequence[float],
    decisions: Sequence[int],
    learning: Sequence[int],
    threshold: float,
) -> None:
    """Save a PNG with two stacked panels sharing the x axis.

    Top: each series and its expected value, anomalies (decision = 1) as red points. Bottom: the
    anomaly score and the decision threshold. LEARNING periods are shaded on both panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    count = len(scores)
    # Time on the x axis only when it runs forward; with repeated-backward stamps a time axis
    # would fold the series onto itself, so the row number is the honest axis then.
    forward = all(b >= a for a, b in pairwise(timestamps))
    x: list[datetime] | list[int]
    if forward and count:
        x = [datetime.fromtimestamp(t, tz=UTC) for t in timestamps]
    else:
        x = list(range(1, count + 1))

    figure, (series_ax, score_ax) = plt.subplots(
        2, 1, sharex=True, figsize=(13, 6.5), gridspec_kw={"height_ratios": [2, 1]}
    )
    thin = 0.7 if count > 2000 else 1.0
    anomalies = [i for i, d in enumerate(decisions) if d]
    # Red is kept for anomalies, so the series take the blues, greens and browns of tab10.
    palette = ["tab:blue", "tab:green", "tab:brown", "tab:cyan", "tab:olive", "tab:gray"]
    for number, (column, series, expect) in enumerate(
        zip(value_columns, values, expected, strict=True)
    ):
        label = "value" if len(value_columns) == 1 else column
        color = palette[number % len(palette)]
        # The expected value goes under the series, same colour, so each pair reads as one.
        series_ax.plot(
            x,
            expect,
            linewidth=thin,
            linestyle="--",
            color="tab:orange" if len(value_columns) == 1 else color,
            alpha=0.7,
            label=f"expected {label}",
        )
        series_ax.plot(x, series, linewidth=thin, color=color, label=label)
        series_ax.scatter(
            [x[i] for i in anomalies],
            [series[i] for i in anomalies],
            s=22,
            color="red",
            zorder=3,
            label="anomaly" if column == value_columns[0] else None,
        )
    score_ax.plot(x, scores, linewidth=thin, color="tab:purple", label="anomaly score")
    score_ax.axhline(
        threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}"
    )
    score_ax.set_ylim(-2, 102)

    for number, (start, stop) in enumerate(learning_spans(learning)):
        right = x[stop] if stop < count else x[-1]
        for ax in (series_ax, score_ax):
            ax.axvspan(
                x[start],
                right,
                color="0.85",
                zorder=0,
                label="LEARNING" if number == 0 and ax is score_ax else None,
            )

    series_ax.set_title(title)
    series_ax.set_ylabel("value")
    score_ax.set_ylabel("anomaly score (0-100)")
    if isinstance(x[0] if count else 0, datetime):
        score_ax.set_xlabel("time (UTC)")
        locator = mdates.AutoDateLocator()
        score_ax.xaxis.set_major_locator(locator)
        score_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    else:
        score_ax.set_xlabel("row")
    series_ax.legend(loc="upper left", fontsize="small", ncols=3)
    score_ax.legend(loc="upper left", fontsize="small", ncols=3)
    for ax in (series_ax, score_ax):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
