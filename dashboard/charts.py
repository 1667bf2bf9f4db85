"""Altair specs for the dashboard: pure functions from query frames to charts.

Times are aware UTC timestamps and every time scale is a UTC scale, so a desk in New York and
one in Singapore read the same hours as the lake and the alert messages.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from contract import records as r

SCORE_DOMAIN = (0, 100)
# Legend entries of the series chart and their colours: the measured value is the ink, the
# expectation is quiet; in the score panel the score is warm and its threshold dashed.
SERIES_LEGEND = ("value", "expected", "anomaly score", "threshold")
SERIES_COLOURS = ("#1f4e79", "#8c8c8c", "#e8710a", "#c0392b")
ANOMALY_COLOUR = "#c0392b"
SILENT_COLOUR = "#7f8c8d"
HEAT_STOPS = (0, 50, 70, 85, 100)
HEAT_COLOURS = ("#f4f6f8", "#fde9c8", "#fdae61", "#e34a33", "#8b0000")
ZOOM_PARAM = "zoom"
PICK_PARAM = "pick"


def spans(points: pd.DataFrame, flag: str) -> pd.DataFrame:
    """Runs of consecutive intervals where ``flag`` is 1: ``start``, ``end`` (of the run's last
    interval), ``peak`` (highest score) and ``intervals``. With ``flag="anomaly"`` these are the
    incidents: each starts at the upward crossing of the threshold.

    >>> frame = pd.DataFrame({"time": [0, 1, 2, 3, 4], "end": [1, 2, 3, 4, 5],
    ...                       "anomaly": [1, 1, 0, 1, 0], "score": [80, 90, 5, 75, 3]})
    >>> spans(frame, "anomaly").values.tolist()
    [[0, 2, 90, 2], [3, 4, 75, 1]]
    """
    on = points[flag].fillna(0).astype(int) == 1
    run = (on != on.shift(fill_value=False)).cumsum()[on]
    grouped = points[on].groupby(run)
    return pd.DataFrame(
        {
            "start": grouped["time"].min(),
            "end": grouped["end"].max(),
            "peak": grouped["score"].max(),
            "intervals": grouped["time"].count(),
        }
    ).reset_index(drop=True)


def series_chart(points: pd.DataFrame, measure: str, *, height: int = 360) -> alt.VConcatChart:
    """Two panels on one time axis: the value and its expected value, incidents shaded red and
    intervals without data shaded grey, flagged intervals as red points; below, the anomaly
    score on its own 0-100 axis with the threshold. Drag or scroll the upper panel to zoom.

    ``points`` has the columns of ``queries.series_points``.
    """
    colour = alt.Color(
        "line:N",
        title=None,
        scale=alt.Scale(domain=list(SERIES_LEGEND), range=list(SERIES_COLOURS)),
        legend=alt.Legend(orient="top", symbolOpacity=1),
    )
    zoom = alt.selection_interval(name=ZOOM_PARAM, bind="scales", encodings=["x"])

    def time_x(field: str, below: bool) -> alt.X:
        return alt.X(f"{field}:T", title="UTC" if below else None, scale=alt.Scale(type="utc"),
                     axis=alt.Axis(format="%d %b %H:%M"))

    x, x_below = time_x("time", below=False), time_x("time", below=True)
    tooltip = [
        alt.Tooltip("utcyearmonthdatehoursminutes(time):T", title="period start (UTC)"),
        alt.Tooltip("value:Q", format=",.4~f"),
        alt.Tooltip("expected:Q", format=",.4~f"),
        alt.Tooltip("score:Q", format=".1f"),
        alt.Tooltip("confidence:Q", format=".0f"),
        alt.Tooltip("stage:N"),
    ]
    incidents = spans(points, "anomaly")
    silent = spans(points, "no_data")

    def shade(frame: pd.DataFrame, fill: str, below: bool) -> alt.Chart:
        return (
            alt.Chart(frame)
            .mark_rect(color=fill, opacity=0.16)
            .encode(
                x=time_x("start", below),
                x2=alt.X2("end:T"),
                tooltip=[
                    alt.Tooltip("utcyearmonthdatehoursminutes(start):T", title="from (UTC)"),
                    alt.Tooltip("utcyearmonthdatehoursminutes(end):T", title="to (UTC)"),
                    alt.Tooltip("intervals:Q"),
                    alt.Tooltip("peak:Q", title="peak score", format=".1f"),
                ],
            )
        )

    base = alt.Chart(points)
    measured = (
        base.transform_fold(["value", "expected"], as_=["line", "level"])
        .mark_line(strokeWidth=1.6)
        .encode(
            x=x,
            y=alt.Y("level:Q", title=measure, scale=alt.Scale(zero=False)),
            color=colour,
            strokeDash=alt.StrokeDash(
                "line:N",
                scale=alt.Scale(domain=list(SERIES_LEGEND), range=[[1, 0], [4, 3], [1, 0], [6, 4]]),
                legend=None,
            ),
        )
    )
    flagged = (
        base.transform_filter(alt.datum.anomaly == 1)
        .mark_point(filled=True, size=70, color=ANOMALY_COLOUR, opacity=0.9)
        .encode(x=x, y=alt.Y("value:Q"), tooltip=tooltip)
    )
    upper = alt.layer(
        shade(incidents, ANOMALY_COLOUR, below=False),
        shade(silent, SILENT_COLOUR, below=False),
        measured,
        flagged,
    ).add_params(zoom).properties(height=height)
    score_axis = alt.Y(
        "score:Q", title="anomaly score", scale=alt.Scale(domain=list(SCORE_DOMAIN))
    )
    score = (
        base.transform_calculate(line="'anomaly score'")
        .mark_area(opacity=0.35, line={"strokeWidth": 0.8}, clip=True)
        .encode(x=x_below, y=score_axis, color=colour, tooltip=tooltip)
    )
    threshold = (
        base.transform_calculate(line="'threshold'")
        .mark_line(strokeWidth=1.2, strokeDash=[6, 4], clip=True)
        .encode(x=x_below, y=alt.Y("threshold:Q"), color=colour)
    )
    lower = alt.layer(
        shade(incidents, ANOMALY_COLOUR, below=True), score, threshold
    ).properties(height=max(100, height // 3))
    # One time scale for both panels: zooming the upper one zooms the score panel with it.
    return alt.vconcat(upper, lower, spacing=6).resolve_scale(x="shared", color="shared")


def heatmap_chart(cells: pd.DataFrame, *, row_height: int = 20) -> alt.Chart:
    """Maximum score per series (rows, hottest first) per UTC hour (columns); click a cell to
    open its series. ``cells`` has the columns of ``queries.heatmap``."""
    order = cells.drop_duplicates(r.TIMESERIES_ID).sort_values("rank")["label"].tolist()
    pick = alt.selection_point(name=PICK_PARAM, fields=[r.TIMESERIES_ID], on="click")
    return (
        alt.Chart(cells)
        .mark_rect(stroke="white", strokeWidth=0.5)
        .encode(
            x=alt.X(
                "utcyearmonthdatehours(hour):O",
                title="hour (UTC)",
                axis=alt.Axis(format="%b %d %H:00", labelAngle=-60, labelOverlap=True),
            ),
            y=alt.Y("label:N", title=None, sort=order, axis=alt.Axis(labelLimit=360)),
            color=alt.Color(
                "maxScore:Q",
                title="max score",
                # Pale below the usual threshold, hot above it: the eye goes where the alerts are.
                scale=alt.Scale(domain=list(HEAT_STOPS), range=list(HEAT_COLOURS), clamp=True),
            ),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.55)),
            tooltip=[
                alt.Tooltip("label:N", title="series"),
                alt.Tooltip("utcyearmonthdatehours(hour):T", title="hour (UTC)"),
                alt.Tooltip("maxScore:Q", title="max score", format=".1f"),
                alt.Tooltip("anomalies:Q", title="anomalies"),
            ],
        )
        .add_params(pick)
        .properties(height=alt.Step(row_height))
    )
