"""Altair specs for the dashboard: pure functions from query frames to charts.

Times are aware UTC timestamps and every time scale is a UTC scale, so a desk in New York and
one in Singapore read the same hours as the lake and the alert messages.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

SCORE_DOMAIN = (0, 100)
# Legend entries of the series chart and their colours: the measured value is the ink, the
# expectation is quiet, the score and its threshold are warm and dashed respectively.
SERIES_LEGEND = ("value", "expected", "anomaly score", "threshold")
SERIES_COLOURS = ("#1f4e79", "#8c8c8c", "#e8710a", "#c0392b")
ANOMALY_COLOUR = "#c0392b"
HEAT_STOPS = (0, 50, 70, 85, 100)
HEAT_COLOURS = ("#f4f6f8", "#fde9c8", "#fdae61", "#e34a33", "#8b0000")
ZOOM_PARAM = "zoom"
PICK_PARAM = "pick"


def series_chart(points: pd.DataFrame, measure: str, *, height: int = 360) -> alt.LayerChart:
    """Value and expected value on the left axis, anomaly score and threshold on the right
    axis, flagged intervals as red points on the value line; drag or scroll to zoom in time.

    ``points`` has the columns of ``queries.series_points``.
    """
    colour = alt.Color(
        "line:N",
        title=None,
        scale=alt.Scale(domain=list(SERIES_LEGEND), range=list(SERIES_COLOURS)),
        legend=alt.Legend(orient="top", symbolOpacity=1),
    )
    x = alt.X(
        "time:T", title="UTC", scale=alt.Scale(type="utc"), axis=alt.Axis(format="%d %b %H:%M")
    )
    tooltip = [
        alt.Tooltip("utcyearmonthdatehoursminutes(time):T", title="period start (UTC)"),
        alt.Tooltip("value:Q", format=",.4~f"),
        alt.Tooltip("expected:Q", format=",.4~f"),
        alt.Tooltip("score:Q", format=".1f"),
        alt.Tooltip("confidence:Q", format=".0f"),
        alt.Tooltip("stage:N"),
    ]
    base = alt.Chart(points)
    zoom = alt.selection_interval(name=ZOOM_PARAM, bind="scales", encodings=["x"])
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
        .add_params(zoom)
    )
    flagged = (
        base.transform_filter(alt.datum.anomaly == 1)
        .mark_point(filled=True, size=70, color=ANOMALY_COLOUR, opacity=0.9)
        .encode(x=x, y=alt.Y("value:Q"), tooltip=tooltip)
    )
    score_axis = alt.Y(
        "score:Q",
        title="anomaly score",
        scale=alt.Scale(domain=list(SCORE_DOMAIN)),
        axis=alt.Axis(orient="right"),
    )
    # A faint area: the score is noisy by nature, and must not hide the value line.
    score = (
        base.transform_calculate(line="'anomaly score'")
        .mark_area(opacity=0.28, line={"strokeWidth": 0.6, "opacity": 0.6})
        .encode(x=x, y=score_axis, color=colour, tooltip=tooltip)
    )
    threshold = (
        base.transform_calculate(line="'threshold'")
        .mark_line(strokeWidth=1.2, strokeDash=[6, 4])
        .encode(x=x, y=alt.Y("threshold:Q"), color=colour)
    )
    return (
        alt.layer(alt.layer(measured, flagged), alt.layer(score, threshold))
        .resolve_scale(y="independent")
        .properties(height=height)
    )


def heatmap_chart(cells: pd.DataFrame, *, row_height: int = 20) -> alt.Chart:
    """Maximum score per series (rows, hottest first) per UTC hour (columns); click a cell to
    open its series. ``cells`` has the columns of ``queries.heatmap``."""
    order = cells.drop_duplicates("timeseriesId").sort_values("rank")["label"].tolist()
    pick = alt.selection_point(name=PICK_PARAM, fields=["timeseriesId"], on="click")
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
