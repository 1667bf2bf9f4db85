"""The Streamlit page run headless by AppTest over a fixture lake: KPIs, filters, links, empty lake.

Expected numbers come from DuckDB reading the Parquet files directly (tests.dashboard_support).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from contract.records import encode
from dashboard import LAKE_ENV, REFRESH_ENV
from dashboard.fixtures import LakeSummary
from sinks.lake_files import publish_sink_file
from sinks.result_table import parse_results
from tests.dashboard_support import direct, direct_one, lake_totals, small_lake
from tests.lake_data import stream_of_results

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
TIMEOUT = 60


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LakeSummary:
    return small_lake(tmp_path_factory.mktemp("lake"))


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], AppTest]:
    def make(lake_dir: Path) -> AppTest:
        monkeypatch.setenv(LAKE_ENV, str(lake_dir))
        monkeypatch.setenv(REFRESH_ENV, "3600")  # no live tick during a test
        return AppTest.from_file(str(APP), default_timeout=TIMEOUT)

    return make


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_kpis_match_a_duckdb_count_of_the_lake(
    lake: LakeSummary, page: Callable[[Path], AppTest]
) -> None:
    at = page(lake.lake_dir).run()
    assert not at.exception
    totals = lake_totals(lake.lake_dir)
    # The default range, the last 24 hours, covers the whole three-hour fixture.
    assert metrics(at) == totals.kpis()
    assert totals.series == 12 and totals.flagged > 0 and totals.silent == 1

    at.selectbox(key="range").set_value("Last hour").run()
    (last_hour,) = direct_one(
        lake.lake_dir,
        "SELECT count(*) FROM files WHERE anomalyDecision = 1 AND detectionPeriodStartTime > ?",
        [lake.last_start - timedelta(hours=1)],
    )
    assert metrics(at)["Flagged intervals"] == f"{last_hour:,}"
    assert 0 < last_hour < totals.flagged


def test_filters_narrow_the_kpis_and_the_anomalies_table(
    lake: LakeSummary, page: Callable[[Path], AppTest]
) -> None:
    at = page(lake.lake_dir).run()
    table = at.dataframe[0].value
    (flagged,) = direct_one(lake.lake_dir, "SELECT sum(anomalyDecision) FROM files")
    assert len(table) == flagged
    assert table["detectionPeriodStartTime"].is_monotonic_decreasing  # newest first

    at.multiselect(key="detector").select("fx-spread").run()
    # Only the dimensions of fx-spread series are offered once the detector is chosen.
    assert [w.key for w in at.multiselect] == ["detector", "dim_pair", "dim_venue"]
    at.multiselect(key="dim_venue").select("EBS").run()
    where = "detectorName = 'fx-spread' AND dim_venue = 'EBS'"
    (series,) = direct_one(
        lake.lake_dir, f"SELECT count(DISTINCT timeseriesId) FROM files WHERE {where}"
    )
    assert metrics(at)["Series in range"] == str(series)
    expected = direct(
        lake.lake_dir,
        f"SELECT timeseriesId FROM files WHERE {where} AND anomalyDecision = 1 "
        "ORDER BY detectionPeriodStartTime DESC, anomalyScore DESC, timeseriesId",
    )
    table = at.dataframe[0].value
    assert table["timeseriesId"].tolist() == [row[0] for row in expected]
    assert set(table["detectorName"]) == {"fx-spread"}

    at.number_input(key="min_score").set_value(90.0).run()
    table = at.dataframe[0].value
    (strong,) = direct_one(
        lake.lake_dir,
        f"SELECT count(*) FROM files WHERE {where} AND anomalyDecision = 1 "
        "AND anomalyScore >= 90",
    )
    assert len(table) == strong < len(expected)
    assert (table["anomalyScore"] >= 90).all()


def test_series_link_opens_the_series_chart(
    lake: LakeSummary, page: Callable[[Path], AppTest]
) -> None:
    (wanted, flagged) = direct_one(
        lake.lake_dir,
        "SELECT timeseriesId, sum(anomalyDecision) FROM files GROUP BY ALL "
        "ORDER BY 2 DESC, 1 LIMIT 1",
    )
    at = page(lake.lake_dir)
    at.query_params["series"] = wanted
    at.run()
    assert not at.exception
    assert at.selectbox(key="series_picker").value == wanted
    specs = [json.loads(chart.proto.spec) for chart in at.get("vega_lite_chart")]
    panels = [spec for spec in specs if "vconcat" in spec]
    assert len(panels) == 1  # the series chart (value panel over score panel), besides the heat map
    assert any(f"180 intervals · {flagged} flagged" in c.value for c in at.caption)
    assert at.query_params["series"] == wanted

    # Picking another series rewrites the link; clearing the picker removes it.
    other = next(o for o in at.selectbox(key="series_picker").options if o != wanted)
    at.selectbox(key="series_picker").set_value(other).run()
    assert at.query_params["series"] != wanted
    at.selectbox(key="series_picker").set_value(None).run()
    assert "series" not in at.query_params


def test_unknown_series_link_says_so(lake: LakeSummary, page: Callable[[Path], AppTest]) -> None:
    at = page(lake.lake_dir)
    at.query_params["series"] = "0" * 64
    at.run()
    assert not at.exception
    assert any("holds no series with id" in w.value for w in at.warning)


def test_series_link_survives_filters_that_exclude_it(
    lake: LakeSummary, page: Callable[[Path], AppTest]
) -> None:
    (wanted,) = direct_one(
        lake.lake_dir, "SELECT min(timeseriesId) FROM files WHERE detectorName = 'api-latency'"
    )
    at = page(lake.lake_dir)
    at.query_params["series"] = wanted
    at.query_params["detector"] = "fx-spread"
    at.run()
    assert not at.exception
    assert at.multiselect(key="detector").value == ["fx-spread"]
    assert at.selectbox(key="series_picker").value == wanted
    assert any("180 intervals" in c.value for c in at.caption)


@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_empty_or_missing_lake_gives_a_helpful_page(
    tmp_path: Path, page: Callable[[Path], AppTest], kind: str
) -> None:
    lake_dir = tmp_path if kind == "empty" else tmp_path / "nowhere"
    at = page(lake_dir).run()
    assert not at.exception
    shown = " ".join(e.value for e in [*at.info, *at.warning, *at.markdown])
    assert str(lake_dir) in shown
    assert ("holds no results yet" if kind == "empty" else "does not exist") in shown
    assert f"anomstream sink parquet --out {lake_dir}" in shown
    assert not at.metric and not at.dataframe


def test_a_file_compacted_away_under_the_page_is_survived(
    tmp_path: Path, page: Callable[[Path], AppTest]
) -> None:
    lake = small_lake(tmp_path / "lake")
    at = page(lake.lake_dir).run()
    assert not at.exception
    # The compactor's grace period is over: a file the page's listing still names is gone.
    gone = sorted(lake.lake_dir.rglob("*.parquet"))[0]
    gone.unlink()
    at.number_input(key="min_score").set_value(50.0).run()  # a new question: no cached answer
    assert not at.exception and not at.error
    (flagged,) = direct_one(
        lake.lake_dir,
        "SELECT count(*) FROM files WHERE anomalyDecision = 1 AND anomalyScore >= 50",
    )
    assert len(at.dataframe[0].value) == flagged
    assert any(f"{flagged} flagged intervals" in c.value for c in at.caption)


def test_page_over_records_as_the_sink_writes_them_with_extra_fields(
    tmp_path: Path, page: Callable[[Path], AppTest]
) -> None:
    """Records parsed by the sink's own parser, with fields the dashboard does not know."""
    rows = list(
        stream_of_results(7, 40, extra={"rawScore": 0.42, "attribution": [0.25, 0.75]})
    )
    batch = parse_results([encode(r) for r in rows], partition=0, offsets=range(len(rows)))
    assert batch.rejected == []
    publish_sink_file(tmp_path, "results", 0, "2026-11-20", batch.table)
    at = page(tmp_path).run()
    assert not at.exception
    flagged = sum(r["anomalyDecision"] for r in rows)
    shown = metrics(at)
    assert (shown["Series in range"], shown["Flagged intervals"]) == ("7", str(flagged))
    # Records without noData (written before it existed) count as reporting.
    assert shown["Silent now"] == "0"
    # Series 0 and 5 carry a third dimension: the filters offer it.
    assert "dim_gpu" in [w.key for w in at.multiselect]
