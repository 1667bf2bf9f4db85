"""dashboard.queries against independent DuckDB answers over the same fixture lake."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from contract.records import dimension_list, encode, format_time, timeseries_id
from dashboard import charts, queries
from dashboard.app import LakeReader
from dashboard.fixtures import LakeSummary, build_lake, series_specs
from dashboard.queries import Filters
from sinks.lake import connect
from sinks.lake_files import publish_sink_file
from sinks.result_table import parse_results
from tests.dashboard_support import direct, direct_one, lake_totals, small_lake

START_NEXT_DAY = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LakeSummary:
    return small_lake(tmp_path_factory.mktemp("lake"))


def test_fixture_lake_is_deterministic_and_in_the_lake_layout(tmp_path: Path) -> None:
    first = build_lake(tmp_path / "a", series=6, intervals=50, seed=4, anomaly_rate=0.05)
    second = build_lake(tmp_path / "b", series=6, intervals=50, seed=4, anomaly_rate=0.05)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert names == sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.parquet")
    )
    assert all(str(n).startswith("dt=2026-11-20/anomstream.results+") for n in names)
    sql = "SELECT * EXCLUDE (dimensionList) FROM files ORDER BY kafkaPartition, kafkaOffset"
    assert direct(tmp_path / "a", sql) == direct(tmp_path / "b", sql)
    (flagged,) = direct_one(tmp_path / "a", "SELECT sum(anomalyDecision) FROM files")
    assert first.anomalies == flagged > 0
    assert replace(first, lake_dir=second.lake_dir) == second


def test_series_are_distinct_and_named_by_their_dimensions() -> None:
    specs = series_specs(1000)
    assert len({s.timeseries_id for s in specs}) == 1000
    assert {s.detector.name for s in specs} == {
        "fx-spread", "equity-price", "cpu-utilisation", "api-latency",
    }  # fmt: skip


def test_kpis_match_an_independent_count(lake: LakeSummary) -> None:
    con = connect(lake.lake_dir)
    kpis = queries.kpis(con, Filters())
    totals = lake_totals(lake.lake_dir)
    assert (kpis.series, kpis.alerting, kpis.silent, kpis.incidents, kpis.anomalies) == (
        totals.series, totals.alerting, totals.silent, totals.incidents, totals.flagged
    )
    assert kpis.anomalies == lake.anomalies > 0
    assert kpis.silent == 1  # the fixture's silent series


def test_kpis_move_with_the_time_range(lake: LakeSummary) -> None:
    """"Now" is the end of the range: a range ending just after a flagged interval has that
    series alerting; one ending before the silence began has nobody silent."""
    con = connect(lake.lake_dir)
    (flagged_at,) = direct_one(
        lake.lake_dir,
        "SELECT max(detectionPeriodStartTime) FROM files WHERE anomalyDecision = 1",
    )
    (silent_from,) = direct_one(
        lake.lake_dir, "SELECT min(detectionPeriodStartTime) FROM files WHERE noData = 1"
    )
    window = Filters(start=lake.first_start, end=flagged_at + timedelta(seconds=1))
    before = queries.kpis(con, window)
    assert before.alerting >= 1
    assert before.silent == (1 if flagged_at >= silent_from else 0)
    early = queries.kpis(con, Filters(end=silent_from))
    assert early.silent == 0
    (flagged_before,) = direct_one(
        lake.lake_dir,
        "SELECT sum(anomalyDecision) FROM files WHERE detectionPeriodStartTime < ?",
        [silent_from],
    )
    assert early.anomalies == flagged_before


def test_time_range_and_series_filters_narrow_every_panel(lake: LakeSummary) -> None:
    con = connect(lake.lake_dir)
    start = lake.last_start - timedelta(minutes=59)
    end = lake.last_start + timedelta(minutes=1)
    filters = Filters(
        detectors=("fx-spread", "cpu-utilisation"),
        dimensions=(("dim_venue", ("EBS",)),),
        start=start,
        end=end,
        min_score=80.0,
    )
    where = (
        "detectorName IN ('fx-spread', 'cpu-utilisation') AND dim_venue = 'EBS' "
        "AND detectionPeriodStartTime >= ? AND detectionPeriodStartTime < ?"
    )
    expected = direct(
        lake.lake_dir,
        f"SELECT detectionPeriodStartTime, timeseriesId, anomalyScore FROM files WHERE {where} "
        "AND anomalyDecision = 1 AND anomalyScore >= 80 "
        "ORDER BY detectionPeriodStartTime DESC, anomalyScore DESC, timeseriesId",
        [start, end],
    )
    page = queries.anomalies(con, filters, limit=1000)
    table = page.rows
    assert list(table.columns) == list(queries.ANOMALY_COLUMNS)
    assert list(zip(table["timeseriesId"], table["anomalyScore"], strict=True)) == [
        (row[1], row[2]) for row in expected
    ]
    assert page.total == len(expected) > 0
    assert set(table["detectorName"]) == {"fx-spread"}
    assert all(label.startswith("fx-spread · spread_bps · ") for label in table["label"])

    (series_count,) = direct_one(
        lake.lake_dir, f"SELECT count(DISTINCT timeseriesId) FROM files WHERE {where}", [start, end]
    )
    assert queries.kpis(con, filters).series == series_count
    catalog = queries.series_catalog(con, filters)
    assert len(catalog) == series_count
    narrowed = queries.matching(queries.series_catalog(con, Filters()), filters)
    assert narrowed.reset_index(drop=True).equals(catalog)
    limited = queries.anomalies(con, filters, limit=2)
    assert limited.rows["timeseriesId"].tolist() == [row[1] for row in expected[:2]]
    assert limited.total == len(expected)


def test_unknown_dimension_column_is_refused(lake: LakeSummary) -> None:
    con = connect(lake.lake_dir)
    with pytest.raises(ValueError, match="unknown dimension column"):
        queries.kpis(con, Filters(dimensions=(('dim_x" OR true --', ("a",)),)))


def test_heatmap_is_the_hourly_maximum_of_the_hottest_series(lake: LakeSummary) -> None:
    con = connect(lake.lake_dir)
    cells = queries.heatmap(con, Filters(), top=3)
    hourly = pd.DataFrame(
        direct(
            lake.lake_dir,
            "SELECT timeseriesId, date_trunc('hour', detectionPeriodStartTime) AS hour,"
            " max(anomalyScore) AS m FROM files GROUP BY ALL",
        ),
        columns=["timeseriesId", "hour", "m"],
    )
    hottest = (
        hourly.groupby("timeseriesId")["m"].max().sort_values(ascending=False).index[:3].tolist()
    )
    assert cells.drop_duplicates("timeseriesId")["timeseriesId"].tolist()[:1] == hottest[:1]
    assert set(cells["timeseriesId"]) <= set(hourly["timeseriesId"])
    assert cells["rank"].max() == 3 and cells["timeseriesId"].nunique() == 3
    merged = cells.merge(hourly, on=["timeseriesId", "hour"])
    assert len(merged) == len(cells)
    assert (merged["maxScore"] == merged["m"]).all()
    # 180 minutes from 22:30 touch four UTC hours: 22, 23, 00, 01.
    assert cells.groupby("timeseriesId")["hour"].count().tolist() == [4, 4, 4]
    assert charts.heatmap_chart(cells).to_dict()["mark"]["type"] == "rect"


def test_series_points_and_chart(lake: LakeSummary) -> None:
    con = connect(lake.lake_dir)
    catalog = queries.series_catalog(con, Filters())
    chosen = catalog["timeseriesId"].iloc[0]
    points = queries.series_points(con, chosen, Filters())
    assert len(points) == 180
    assert points["time"].is_monotonic_increasing
    assert str(points["time"].dt.tz) in {"UTC", "Etc/UTC"}
    flagged = direct_one(
        lake.lake_dir, "SELECT sum(anomalyDecision) FROM files WHERE timeseriesId = ?", [chosen]
    )[0]
    assert points["anomaly"].sum() == flagged
    assert queries.series_label(con, chosen) == catalog["label"].iloc[0]
    assert queries.series_label(con, "no-such-series") is None
    spec = charts.series_chart(points, "spread_bps").to_dict()
    upper, lower = spec["vconcat"]
    assert any(p.get("bind") == "scales" for p in _params(spec))
    # The score has its own panel and axis, 0-100, with the threshold on it.
    score_axes = [layer["encoding"]["y"] for layer in lower["layer"][1:]]
    assert score_axes[0]["title"] == "anomaly score"
    assert score_axes[0]["scale"]["domain"] == [0, 100]
    assert all(layer["encoding"].get("y", {}).get("title") != "anomaly score"
               for layer in upper["layer"])
    # The incidents are shaded: one rect per run of flagged intervals, here single spikes.
    incidents = next(layer for layer in upper["layer"]
                     if layer["mark"].get("color") == charts.ANOMALY_COLOUR)
    assert incidents["mark"]["type"] == "rect"
    assert len(spec["datasets"][incidents["data"]["name"]]) == len(charts.spans(points, "anomaly"))


def test_spans_of_incidents_and_silence(lake: LakeSummary) -> None:
    con = connect(lake.lake_dir)
    (silent_id,) = direct_one(lake.lake_dir, "SELECT any_value(timeseriesId) FROM files"
                              " WHERE noData = 1")
    points = queries.series_points(con, silent_id, Filters())
    silence = charts.spans(points, "no_data")
    (first, last, count) = direct_one(
        lake.lake_dir,
        "SELECT min(detectionPeriodStartTime), max(detectionPeriodEndTime), count(*) FROM files"
        " WHERE timeseriesId = ? AND noData = 1",
        [silent_id],
    )
    assert silence[["start", "end", "intervals"]].values.tolist() == [[first, last, count]]
    assert points.loc[points["no_data"] == 1, "value"].isna().all()
    frame = pd.DataFrame({
        "time": range(8), "end": range(1, 9), "anomaly": [0, 1, 1, 1, 0, 0, 1, 0],
        "score": [5, 71, 95, 80, 40, 3, 77, 2],
    })
    assert charts.spans(frame, "anomaly").values.tolist() == [[1, 4, 95, 3], [6, 7, 77, 1]]


def _params(spec: dict) -> list[dict]:
    found = list(spec.get("params", []))
    for layer in spec.get("layer", []):
        found += _params(layer)
    return found


def test_empty_and_missing_lakes_give_empty_answers(tmp_path: Path) -> None:
    for lake_dir in (tmp_path, tmp_path / "missing"):
        con = connect(lake_dir)
        extent = queries.extent(con)
        assert (extent.rows, extent.first, extent.last) == (0, None, None)
        assert queries.kpis(con, Filters()) == queries.Kpis(0, 0, 0, 0, 0)
        empty = queries.anomalies(con, Filters(), 10)
        assert empty.rows.empty and empty.total == 0
        assert queries.heatmap(con, Filters(), 5).empty
        assert queries.series_catalog(con, Filters()).empty


def test_lake_reader_moves_to_a_new_version_only_when_files_change(tmp_path: Path) -> None:
    build_lake(tmp_path, series=4, intervals=20, seed=2)
    reader = LakeReader(tmp_path, relist_seconds=0)
    first = reader.snapshot()
    assert reader.snapshot().key == first.key  # listed again, nothing new: cached answers stand
    assert queries.extent(first.con).rows == 80
    later = build_lake(tmp_path, series=4, intervals=20, seed=2, start=START_NEXT_DAY)
    second = reader.snapshot()
    assert second.key != first.key
    assert queries.extent(second.con).last == later.last_start


def test_dimension_names_from_the_records_are_quoted_not_trusted(tmp_path: Path) -> None:
    """Dimension names are data: quotes and spaces in them must neither break nor bend SQL.

    (A double quote in a name is quoted here too, see ``quote_name``, but ``sinks.lake``'s own
    ``series`` view cannot be created over such a lake yet.)
    """
    odd = {"data centre": "eu'1", "it's": "x y"}
    records = [
        {
            "detectorName": "cpu", "measure": "util",
            "timeseriesId": timeseries_id("cpu", "util", odd),
            "dimensionList": dimension_list(odd), "aggregatedMeasureValue": 1.0 + i,
            "anomalyScore": 80.0 + i, "anomalyDecisionThreshold": 70.0, "anomalyDecision": 1,
            "anomalyConfidenceScore": 90.0, "modelStage": "INFERENCE", "expectedValue": 1.0,
            "processedDataPoints": i + 1,
            "detectionPeriodStartTime": format_time(1_763_600_000 + 60 * i),
            "detectionPeriodEndTime": format_time(1_763_600_060 + 60 * i),
        }
        for i in range(3)
    ]
    plain = {**records[0], "timeseriesId": timeseries_id("cpu", "util", {}), "dimensionList": []}
    records.append(plain)
    batch = parse_results([encode(r) for r in records], partition=0, offsets=[0, 1, 2, 3])
    assert batch.rejected == []
    publish_sink_file(tmp_path, "results", 0, "2025-11-20", batch.table)
    con = connect(tmp_path)
    columns = queries.dimension_columns(con)
    assert columns == ["dim_data centre", "dim_it's"]
    catalog = queries.series_catalog(con, Filters())
    assert catalog["label"].tolist() == ["cpu · util", "cpu · util · data centre=eu'1, it's=x y"]
    chosen = Filters(dimensions=(("dim_data centre", ("eu'1",)), ("dim_it's", ("x y",))))
    assert queries.anomalies(con, chosen, 10).total == 3
    assert queries.kpis(con, chosen).series == 1
    assert queries.heatmap(con, chosen, 5)["maxScore"].max() == 82.0
