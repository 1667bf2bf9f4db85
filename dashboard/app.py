"""The risk-desk page: ``anomstream dashboard --lake DIR`` serves it with ``streamlit run``.

Read-only over the lake through one cached DuckDB connection per lake (``sinks.lake.connect``).
The sidebar holds the filters (bound to the URL, so a view can be shared); the panels live in a
fragment that re-runs on its own every few seconds (unless paused) and re-lists the lake, so new
results appear without a full rerun. ``?series=<timeseriesId>`` opens that series directly: that
is the link alert messages carry.

Configuration comes from the environment (``streamlit run`` passes no arguments of its own):
``ANOMSTREAM_LAKE`` (default ``lake``) and ``ANOMSTREAM_REFRESH_SECONDS`` (default 10).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import streamlit as st

from contract import records as r
from dashboard import LAKE_ENV, REFRESH_ENV, charts, queries
from dashboard.queries import Filters, LakeExtent
from sinks.lake import DEFAULT_LAKE, connect, refresh, visible_paths

DEFAULT_REFRESH_SECONDS = 10.0

RANGES: dict[str, timedelta | None] = {
    "Last hour": timedelta(hours=1),
    "Last 6 hours": timedelta(hours=6),
    "Last 24 hours": timedelta(hours=24),
    "Last 7 days": timedelta(days=7),
    "All": None,
}
CUSTOM_RANGE = "Custom"
DEFAULT_RANGE = "Last 24 hours"
TABLE_ROWS = 500
CACHE_ENTRIES = 256
EXPORT_ROWS = 100_000
DEFAULT_TOP = 20

# Session-state keys; those bound to the URL double as query parameter names.
SERIES_KEY = "series"  # the URL's ?series=; read once per session, then kept in sync by hand
PICKER_KEY = "series_picker"
TABLE_KEY = "anomaly_table"
TABLE_IDS_KEY = "anomaly_table_ids"
HEATMAP_KEY = "heatmap"
URL_READ_KEY = "url_read"
RETRIED_KEY = "retried_after_lake_change"


class LakeReader:
    """The one DuckDB connection over a lake, shared by every session of the server.

    At most every ``relist_seconds`` a page run lists the lake again; when the list of files
    changed (the sink published, the compactor merged), the views are re-created over it and
    the lake's version moves on. Query results are cached per version, so live ticks and other
    desks' sessions cost nothing until new results land.
    """

    def __init__(self, lake_dir: Path, relist_seconds: float) -> None:
        self.lake_dir = lake_dir
        self.relist_seconds = relist_seconds
        self._lock = threading.Lock()
        self._paths = visible_paths(lake_dir)
        self._connection = connect(lake_dir)
        self._version = 0
        self._listed_at = time.monotonic()

    def relist_now(self) -> None:
        """Make the next snapshot list the lake again, however recent the last listing."""
        with self._lock:
            self._listed_at = -math.inf

    def snapshot(self) -> Snapshot:
        with self._lock:
            if time.monotonic() - self._listed_at >= self.relist_seconds:
                paths = visible_paths(self.lake_dir)
                if paths != self._paths:
                    refresh(self._connection, self.lake_dir)
                    self._paths = paths
                    self._version += 1
                self._listed_at = time.monotonic()
            # DuckDB connections are not for sharing across threads; cursors are.
            cursor = self._connection.cursor()
            key = f"{self.lake_dir}@{self._version}"
        cursor.execute("SET TimeZone = 'UTC'")
        # Lake files are immutable once published: their footers need reading once, not per
        # query (halves the time of the short queries over a day's ~100 files).
        cursor.execute("SET parquet_metadata_cache = true")
        return Snapshot(cursor, key)


@dataclass(frozen=True)
class Snapshot:
    """One page run's handle on the lake: a cursor, and the key of the lake's current file
    list, under which every query result is cached."""

    con: duckdb.DuckDBPyConnection
    key: str

    def extent(self) -> LakeExtent:
        return _extent(self.key, self.con)

    def catalog(self) -> pd.DataFrame:
        return _catalog(self.key, self.con)

    def kpis(self, filters: Filters) -> queries.Kpis:
        return _kpis(self.key, filters, self.con)

    def anomalies(self, filters: Filters) -> queries.AnomalyPage:
        return _anomalies(self.key, filters, self.con)

    def heatmap(self, filters: Filters, top: int) -> pd.DataFrame:
        return _heatmap(self.key, filters, top, self.con)

    def points(self, timeseries_id: str, filters: Filters) -> pd.DataFrame:
        return _points(self.key, timeseries_id, filters, self.con)

    def label(self, timeseries_id: str) -> str | None:
        return _label(self.key, timeseries_id, self.con)


# Streamlit skips arguments named with a leading underscore when it hashes the cache key.
@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _extent(key: str, _con: duckdb.DuckDBPyConnection) -> LakeExtent:
    return queries.extent(_con)


@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _catalog(key: str, _con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    return queries.series_catalog(_con, Filters())


@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _kpis(key: str, filters: Filters, _con: duckdb.DuckDBPyConnection) -> queries.Kpis:
    return queries.kpis(_con, filters)


@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _anomalies(
    key: str, filters: Filters, _con: duckdb.DuckDBPyConnection
) -> queries.AnomalyPage:
    return queries.anomalies(_con, filters, TABLE_ROWS)


@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _heatmap(
    key: str, filters: Filters, top: int, _con: duckdb.DuckDBPyConnection
) -> pd.DataFrame:
    return queries.heatmap(_con, filters, top)


@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _points(
    key: str, timeseries_id: str, filters: Filters, _con: duckdb.DuckDBPyConnection
) -> pd.DataFrame:
    return queries.series_points(_con, timeseries_id, filters)


@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _label(key: str, timeseries_id: str, _con: duckdb.DuckDBPyConnection) -> str | None:
    return queries.series_label(_con, timeseries_id)


@st.cache_resource(show_spinner=False)
def lake_reader(lake_dir: str, relist_seconds: float) -> LakeReader:
    return LakeReader(Path(lake_dir), relist_seconds)


def settings() -> tuple[Path, float]:
    lake = Path(os.environ.get(LAKE_ENV) or DEFAULT_LAKE).expanduser().absolute()
    raw = os.environ.get(REFRESH_ENV) or str(DEFAULT_REFRESH_SECONDS)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = DEFAULT_REFRESH_SECONDS
    return lake, max(seconds, 1.0)


def main() -> None:
    st.set_page_config(page_title="anomstream · risk desk", page_icon="📈", layout="wide")
    lake_dir, refresh_seconds = settings()
    reader = lake_reader(str(lake_dir), refresh_seconds)
    with lake_changes(reader):
        page(reader, lake_dir, refresh_seconds)


@contextmanager
def lake_changes(reader: LakeReader) -> Iterator[None]:
    """Survive a file vanishing under a query: list the lake again and run once more.

    The compactor deletes the small files it merged once its grace period is over; a page
    whose listing is older than that reads a file that is gone. A second failure in a row is
    not that, and is shown as it is.
    """
    try:
        yield
        st.session_state.pop(RETRIED_KEY, None)
    except duckdb.IOException as error:
        reader.relist_now()
        if st.session_state.pop(RETRIED_KEY, False):
            st.error(f"Cannot read the lake at `{reader.lake_dir}`: {error}")
            return
        st.session_state[RETRIED_KEY] = True
        st.rerun()  # the whole page: a fragment-scoped rerun is refused on full runs


def page(reader: LakeReader, lake_dir: Path, refresh_seconds: float) -> None:
    lake = reader.snapshot().extent()
    if lake.rows == 0:
        empty_lake_page(reader, refresh_seconds)
        return
    remember_url_series()
    filters, live, catalog = sidebar(reader.snapshot(), lake_dir, lake, refresh_seconds)
    st.title("Anomaly desk")
    run_every = refresh_seconds if live else None
    st.fragment(run_every=run_every)(panels)(reader, filters, catalog)


def empty_lake_page(reader: LakeReader, refresh_seconds: float) -> None:
    st.title("Anomaly desk")
    if not reader.lake_dir.is_dir():
        st.warning(f"There is no lake at `{reader.lake_dir}` yet: the directory does not exist.")
    else:
        st.info(f"The lake at `{reader.lake_dir}` holds no results yet.")
    st.markdown(
        "Results appear here once the Parquet sink has written its first file:\n\n"
        "1. run the detectors and the sink, e.g. "
        f"`anomstream sink parquet --out {reader.lake_dir}`;\n"
        "2. or point the dashboard at another lake: `anomstream dashboard --lake DIR`.\n\n"
        f"This page checks the lake again every {refresh_seconds:g} s."
    )

    @st.fragment(run_every=refresh_seconds)
    def wait_for_results() -> None:
        if reader.snapshot().extent().rows > 0:
            st.rerun()

    wait_for_results()


def remember_url_series() -> None:
    """On a session's first run, open the series named by ``?series=`` (an alert's link)."""
    if URL_READ_KEY in st.session_state:
        return
    st.session_state[URL_READ_KEY] = True
    wanted = st.query_params.get(SERIES_KEY)
    if wanted:
        st.session_state[PICKER_KEY] = wanted
    if "from" in st.query_params or "to" in st.query_params:
        st.session_state["range"] = CUSTOM_RANGE


def sidebar(
    lake_now: Snapshot, lake_dir: Path, lake: LakeExtent, refresh_seconds: float
) -> tuple[Filters, bool, pd.DataFrame]:
    bar = st.sidebar
    bar.header("anomstream")
    bar.caption(f"Lake `{lake_dir}`")
    live = bar.toggle(
        f"Live (refresh every {refresh_seconds:g} s)",
        value=True,
        key="live",
        help="Pause to freeze the panels while you look at something.",
    )
    choice = bar.selectbox(
        "Time range", [*RANGES, CUSTOM_RANGE], index=list(RANGES).index(DEFAULT_RANGE),
        key="range", bind="query-params",
        help="Relative to the newest result in the lake.",
    )
    start = end = None
    if choice == CUSTOM_RANGE:
        assert lake.first is not None and lake.last is not None
        start = bar.datetime_input(
            "From (UTC)", value=_naive(lake.last - timedelta(hours=24)),
            key="from", bind="query-params",
        )
        end = bar.datetime_input(
            "To (UTC)", value=_naive(lake.last + timedelta(minutes=1)),
            key="to", bind="query-params",
        )
    bar.subheader("Series filters")
    everything = lake_now.catalog()
    detectors = bar.multiselect(
        "Detector", sorted(everything[r.DETECTOR_NAME].unique()),
        key="detector", bind="query-params", placeholder="All detectors",
    )
    narrowed = everything[everything[r.DETECTOR_NAME].isin(detectors)] if detectors else everything
    dimensions: list[tuple[str, tuple[str, ...]]] = []
    for column in lake.dimension_columns:
        values = sorted(narrowed[column].dropna().unique())
        if not values:
            continue
        chosen = bar.multiselect(
            column.removeprefix(queries.DIMENSION_PREFIX), values,
            key=column, bind="query-params", placeholder="All",
        )
        if chosen:
            dimensions.append((column, tuple(chosen)))
    filters = Filters(
        detectors=tuple(detectors),
        dimensions=tuple(dimensions),
        start=_aware(start),
        end=_aware(end),
    )
    catalog = queries.matching(everything, filters)
    bar.caption(f"{len(catalog):,} of {len(everything):,} series match.")
    return filters, live, catalog


def panels(reader: LakeReader, filters: Filters, catalog: pd.DataFrame) -> None:
    """Everything below the title: re-run alone on each live tick and on its own widgets."""
    with lake_changes(reader):
        draw_panels(reader, filters, catalog)


def draw_panels(reader: LakeReader, filters: Filters, catalog: pd.DataFrame) -> None:
    lake_now = reader.snapshot()
    lake = lake_now.extent()
    if filters.start is None and filters.end is None:
        filters = relative_range(filters, lake, st.session_state.get("range", DEFAULT_RANGE))
    kpi_row(lake_now, filters, lake)
    series_panel(lake_now, filters, catalog)
    anomalies_panel(reader, lake_now, filters)
    heatmap_panel(lake_now, filters)


def relative_range(filters: Filters, lake: LakeExtent, choice: str) -> Filters:
    span = RANGES.get(choice)
    if span is None or lake.last is None:
        return filters
    # Periods are labelled by their start: include the newest one whole.
    end = lake.last + timedelta(microseconds=1)
    return Filters(filters.detectors, filters.dimensions, end - span, end, filters.min_score)


def kpi_row(lake_now: Snapshot, filters: Filters, lake: LakeExtent) -> None:
    kpis = lake_now.kpis(filters)
    newest = lake.last.strftime("%Y-%m-%d %H:%M UTC") if lake.last else "–"
    st.caption(f"Newest result {newest} · range {describe_range(filters)}")
    columns = st.columns(5)
    columns[0].metric(
        "Series in range", f"{kpis.series:,}", border=True,
        help="Series matching the filters with results in the time range.",
    )
    columns[1].metric(
        "Alerting now", f"{kpis.alerting:,}", border=True,
        help="Series in an open incident: their latest interval in the range is flagged.",
    )
    columns[2].metric(
        "Silent now", f"{kpis.silent:,}", border=True,
        help="Series that stopped reporting: their latest interval in the range has no data "
        "for longer than their detector's no_data_after.",
    )
    columns[3].metric(
        "Incidents in range", f"{kpis.incidents:,}", border=True,
        help="Runs of consecutive flagged intervals (each starts where the score crosses the "
        "threshold upward) within the time range.",
    )
    columns[4].metric(
        "Flagged intervals", f"{kpis.anomalies:,}", border=True,
        help="Intervals at or above their detector's threshold within the time range.",
    )


def series_panel(
    lake_now: Snapshot, filters: Filters, catalog: pd.DataFrame
) -> None:
    st.subheader("Series")
    labels = dict(zip(catalog[r.TIMESERIES_ID], catalog["label"], strict=True))
    current = st.session_state.get(PICKER_KEY)
    if current and current not in labels:
        # Opened from a link or the table while the filters exclude it: still show it.
        labels[current] = lake_now.label(current) or f"unknown series {current}"
    chosen = st.selectbox(
        "Series", list(labels), index=None, key=PICKER_KEY,
        format_func=lambda timeseries_id: labels.get(timeseries_id, timeseries_id),
        placeholder="Type to search by detector, measure or dimension value…",
        label_visibility="collapsed",
    )
    sync_url_series(chosen)
    if chosen is None:
        st.caption("Pick a series above, click an anomaly in the table or a cell of the heat map.")
        return
    points = lake_now.points(chosen, filters)
    if points.empty:
        if labels[chosen].startswith("unknown series"):
            st.warning(f"The lake holds no series with id `{chosen}`.")
        else:
            st.info("This series has no results in the selected time range.")
        return
    measure = catalog.loc[catalog[r.TIMESERIES_ID] == chosen, r.MEASURE]
    title = measure.iloc[0] if len(measure) else "value"
    st.altair_chart(charts.series_chart(points, title), width="stretch", key="series_chart")
    last = points.iloc[-1]
    flagged = int(points["anomaly"].sum())
    incidents = len(charts.spans(points, "anomaly"))
    st.caption(
        f"{len(points):,} intervals · {flagged:,} flagged in {incidents:,} incidents (shaded red;"
        f" grey: no data) · latest score {last['score']:.1f} · stage {last['stage']} · "
        f"confidence {last['confidence']:.0f} · link: `?{SERIES_KEY}={chosen}`"
    )


def sync_url_series(chosen: str | None) -> None:
    """Keep ``?series=`` equal to the open series, so the address bar is always shareable."""
    if chosen is None:
        if SERIES_KEY in st.query_params:
            del st.query_params[SERIES_KEY]
    elif st.query_params.get(SERIES_KEY) != chosen:
        st.query_params[SERIES_KEY] = chosen


def anomalies_panel(
    reader: LakeReader, lake_now: Snapshot, filters: Filters
) -> None:
    st.subheader("Anomalies")
    left, right = st.columns([1, 3], vertical_alignment="bottom")
    min_score = left.number_input(
        "Minimum score", min_value=0.0, max_value=100.0, value=0.0, step=5.0,
        key="min_score", bind="query-params",
    )
    filters = Filters(
        filters.detectors, filters.dimensions, filters.start, filters.end, float(min_score)
    )
    page = lake_now.anomalies(filters)
    table, total = page.rows, page.total
    shown = f"newest {len(table):,} of {total:,}" if total > len(table) else f"{total:,}"
    right.caption(f"{shown} flagged intervals, newest first · click a row to open its series")
    if table.empty:
        st.info("No anomalies match these filters.")
        return
    st.session_state[TABLE_IDS_KEY] = table[r.TIMESERIES_ID].tolist()
    st.dataframe(
        table,
        key=TABLE_KEY,
        on_select=open_selected_anomaly,
        selection_mode="single-row",
        hide_index=True,
        height=320,
        column_order=[
            r.DETECTION_PERIOD_START_TIME, "label", r.ANOMALY_SCORE, r.AGGREGATED_MEASURE_VALUE,
            r.EXPECTED_VALUE, r.ANOMALY_CONFIDENCE_SCORE,
        ],
        column_config={
            r.DETECTION_PERIOD_START_TIME: st.column_config.DatetimeColumn(
                "Period start (UTC)", format="YYYY-MM-DD HH:mm", timezone="UTC"
            ),
            "label": st.column_config.TextColumn("Series", width="large"),
            r.ANOMALY_SCORE: st.column_config.ProgressColumn(
                "Score", min_value=0, max_value=100, format="%.1f"
            ),
            r.AGGREGATED_MEASURE_VALUE: st.column_config.NumberColumn("Value", format="%.4g"),
            r.EXPECTED_VALUE: st.column_config.NumberColumn("Expected", format="%.4g"),
            r.ANOMALY_CONFIDENCE_SCORE: st.column_config.NumberColumn("Confidence", format="%.0f"),
        },
    )

    def export() -> str:
        page = queries.anomalies(reader.snapshot().con, filters, EXPORT_ROWS)
        return page.rows.to_csv(index=False)

    st.download_button(
        "Export CSV", data=export, file_name="anomalies.csv", mime="text/csv",
        icon=":material/download:", on_click="ignore",
        help=f"Every anomaly matching the filters (up to {EXPORT_ROWS:,} rows).",
    )


def open_selected_anomaly() -> None:
    rows = st.session_state[TABLE_KEY].selection.rows
    ids = st.session_state.get(TABLE_IDS_KEY, [])
    if rows and rows[0] < len(ids):
        st.session_state[PICKER_KEY] = ids[rows[0]]


def heatmap_panel(lake_now: Snapshot, filters: Filters) -> None:
    st.subheader("Where to look")
    top = st.number_input(
        "Top series by maximum score", min_value=5, max_value=200, value=DEFAULT_TOP, step=5,
        key="top",
    )
    cells = lake_now.heatmap(filters, int(top))
    if cells.empty:
        st.info("No results in the selected time range.")
        return
    st.altair_chart(
        charts.heatmap_chart(cells), width="stretch", key=HEATMAP_KEY,
        on_select=open_picked_cell, selection_mode=charts.PICK_PARAM,
    )


def open_picked_cell() -> None:
    picked = st.session_state[HEATMAP_KEY].selection.get(charts.PICK_PARAM) or []
    if picked and picked[0].get(r.TIMESERIES_ID):
        st.session_state[PICKER_KEY] = picked[0][r.TIMESERIES_ID]


def describe_range(filters: Filters) -> str:
    if filters.start is None and filters.end is None:
        return "all time"
    start = filters.start.strftime("%Y-%m-%d %H:%M") if filters.start else "…"
    end = filters.end.strftime("%Y-%m-%d %H:%M") if filters.end else "…"
    return f"{start} → {end} UTC"


def _naive(moment: datetime) -> datetime:
    """Streamlit's datetime inputs are naive: give them UTC wall time."""
    return moment.replace(tzinfo=None)


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.replace(tzinfo=UTC)


if __name__ == "__main__":
    main()
