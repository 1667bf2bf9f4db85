"""The dashboard in a real browser: `anomstream dashboard` as a subprocess, headless Chromium.

Loads the page over a fixture lake on 127.0.0.1, checks the KPIs against DuckDB, sees the chart
and the table, changes a filter and sees the table change, exports CSV, opens a series by
clicking a table row, a heat-map cell and through its ``?series=`` link, watches the live refresh
pick up a newly published day, and saves screenshots (under the test's tmp dir and
``out/screenshots/``).
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from dashboard.charts import ANOMALY_COLOUR, SILENT_COLOUR
from dashboard.fixtures import LakeSummary, build_lake
from tests.dashboard_support import (
    ANOMALY_RATE,
    SEED,
    SERIES,
    direct,
    direct_one,
    lake_totals,
    runs,
    small_lake,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "out" / "screenshots"
WAIT = 60  # seconds: the bound of every wait; a 2-core CI box under load is slow, not broken

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LakeSummary:
    return small_lake(tmp_path_factory.mktemp("lake"))


@pytest.fixture(scope="module")
def server(lake: LakeSummary, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``anomstream dashboard`` on a free port of 127.0.0.1, live refresh every 2 s."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "dashboard.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "app.cli", "dashboard", "--lake", str(lake.lake_dir),
                "--port", str(port), "--refresh-seconds", "2",
            ],
            stdout=output, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                        if reply.read() == b"ok":
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dashboard did not come up:\n{log.read_text()}")
                time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def browser(downloads: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--window-size=1500,2400", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    def guarded(d: WebDriver) -> Any:
        try:
            return condition(d)
        except StaleElementReferenceException:  # Streamlit re-rendered under us: look again
            return False

    return WebDriverWait(driver, WAIT, poll_frequency=0.25).until(guarded, f"waiting for {what}")


def settled(driver: WebDriver) -> bool:
    """No script run in flight and no element greyed out as stale."""
    running = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
    stale = driver.find_elements(By.CSS_SELECTOR, '[data-stale="true"]')
    return not running and not stale


def metrics(driver: WebDriver) -> dict[str, str]:
    found = {}
    for metric in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]'):
        label = metric.find_element(By.CSS_SELECTOR, '[data-testid="stMetricLabel"]').text
        found[label.strip()] = metric.find_element(
            By.CSS_SELECTOR, '[data-testid="stMetricValue"]'
        ).text.strip()
    return found


def table_cells(driver: WebDriver) -> list[str]:
    """The text of the anomalies table's rendered cells (Glide's accessibility table)."""
    grid = driver.find_element(By.CSS_SELECTOR, '[data-testid="stDataFrame"]')
    return [c.get_attribute("textContent") or "" for c in grid.find_elements(By.CSS_SELECTOR, "td")]


def caption_with(driver: WebDriver, fragment: str) -> str | None:
    for caption in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stCaptionContainer"]'):
        if fragment in caption.text:
            return str(caption.text)
    return None


def toggle_live(driver: WebDriver) -> None:
    driver.find_element(By.CSS_SELECTOR, '[data-testid="stCheckbox"] label').click()


def screenshot(driver: WebDriver, path: Path) -> None:
    driver.save_screenshot(str(path))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)


def test_risk_desk_in_chromium(
    server: str, lake: LakeSummary, browser: WebDriver, downloads: Path, tmp_path: Path
) -> None:
    browser.get(server + "/")
    wait_for(browser, lambda d: len(metrics(d)) == 5 and table_cells(d), "KPIs and table")
    # Pause the live refresh so that nothing re-renders while the test reads the page.
    toggle_live(browser)
    wait_for(browser, settled, "the page to settle")

    totals = lake_totals(lake.lake_dir)
    assert metrics(browser) == totals.kpis()
    assert caption_with(browser, f"{totals.flagged} flagged intervals, newest first")
    newest = direct(
        lake.lake_dir,
        "SELECT timeseriesId, anomalyScore FROM files WHERE anomalyDecision = 1 "
        "ORDER BY detectionPeriodStartTime DESC, anomalyScore DESC, timeseriesId LIMIT 1",
    )[0]
    assert f"{newest[1]:g}" in table_cells(browser)[:6]
    # The heat map is drawn by vega-embed.
    assert browser.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"] svg, '
                                 '[data-testid="stVegaLiteChart"] canvas')

    # A filter: a minimum score just above the newest anomaly's drops it from the table.
    minimum = int(newest[1]) + 1
    (strong,) = direct_one(
        lake.lake_dir,
        "SELECT count(*) FROM files WHERE anomalyDecision = 1 AND anomalyScore >= ?",
        [minimum],
    )
    assert 0 < strong < totals.flagged
    before = table_cells(browser)
    field = browser.find_element(By.CSS_SELECTOR, 'input[aria-label="Minimum score"]')
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(minimum), Keys.ENTER)

    def filtered(d: WebDriver) -> bool:
        # The grid's cells repaint a moment after the caption: wait for both.
        cells = table_cells(d)
        scores = [float(cell) for cell in cells[2::6] if cell]
        return bool(
            caption_with(d, f"{strong} flagged intervals")
            and settled(d)
            and cells[:6] != before[:6]
            and scores
            and min(scores) >= minimum
        )

    wait_for(browser, filtered, f"the table to show only scores >= {minimum}")
    assert f"min_score={minimum}" in browser.current_url

    # Export CSV: every matching anomaly, not only the rows on screen.
    browser.find_element(By.CSS_SELECTOR, '[data-testid="stDownloadButton"] button').click()
    exported = downloads / "anomalies.csv"
    wait_for(browser, lambda d: exported.exists(), "the CSV download")
    with exported.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == strong
    assert min(float(row["anomalyScore"]) for row in rows) >= minimum

    # Clicking the first row's selection box opens that anomaly's series in the chart.
    (first_id,) = direct_one(
        lake.lake_dir,
        "SELECT timeseriesId FROM files WHERE anomalyDecision = 1 AND anomalyScore >= ? "
        "ORDER BY detectionPeriodStartTime DESC, anomalyScore DESC, timeseriesId LIMIT 1",
        [minimum],
    )
    click_first_row(browser)
    wait_for(
        browser,
        lambda d: f"series={first_id}" in d.current_url and series_chart(d) is not None,
        "the series chart of the clicked row",
    )
    wait_for(browser, settled, "the page to settle")
    screenshot(browser, tmp_path / "dashboard-row-opened.png")

    # Clicking a heat-map cell of the hottest series opens that series.
    (hottest,) = direct_one(
        lake.lake_dir,
        "SELECT timeseriesId FROM files GROUP BY timeseriesId "
        "ORDER BY max(anomalyScore) DESC, sum(anomalyDecision) DESC, timeseriesId LIMIT 1",
    )
    heat = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]')[-1]
    first_cell = heat.find_elements(By.CSS_SELECTOR, "g.mark-rect path")[0]  # rank 1 comes first
    ActionChains(browser).move_to_element(first_cell).click().perform()
    wait_for(browser, lambda d: f"series={hottest}" in d.current_url, "the heat map's series")

    # A link as alert messages carry it opens the series directly, in a fresh session.
    (linked, linked_flags, detector, dimensions) = direct_one(
        lake.lake_dir,
        "SELECT timeseriesId, sum(anomalyDecision), any_value(detectorName),"
        " any_value(dimensionList) FROM files GROUP BY timeseriesId ORDER BY 2 DESC, 1 LIMIT 1",
    )
    browser.get(f"{server}/?series={linked}")
    wait_for(browser, lambda d: caption_with(d, "180 intervals"), "the linked series")
    toggle_live(browser)
    wait_for(browser, settled, "the page to settle")
    assert caption_with(browser, f"180 intervals · {linked_flags} flagged")
    chart = series_chart(browser)
    assert chart is not None and chart.size["height"] > 200
    # Its incidents are shaded spans, one per run of flagged intervals, across the value panel
    # and the score panel; the score has a panel and an axis of its own, under the value's.
    incidents = runs(lake.lake_dir, "anomalyDecision", linked)
    assert incidents > 1
    assert len(shaded(chart, ANOMALY_COLOUR)) == 2 * incidents
    titles = axis_titles(chart)
    assert titles[0] != "anomaly score" and titles[-1] == "anomaly score", titles
    picker = browser.find_element(By.CSS_SELECTOR, 'input[aria-label="Series"]')
    shown = picker.get_attribute("value") or ""
    assert shown.startswith(detector)
    assert all(f"{d['name']}={d['value']}" in shown for d in dimensions)
    screenshot(browser, tmp_path / "dashboard.png")
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000

    # A series that stopped reporting: its silence is a grey span, and it counts as silent now.
    (silent_id,) = direct_one(lake.lake_dir, "SELECT any_value(timeseriesId) FROM files"
                              " WHERE noData = 1")
    browser.get(f"{server}/?series={silent_id}")
    wait_for(browser, lambda d: caption_with(d, "180 intervals") and len(metrics(d)) == 5,
             "the silent series")
    toggle_live(browser)
    wait_for(browser, settled, "the page to settle")
    assert metrics(browser)["Silent now"] == "1"
    silent_chart = series_chart(browser)
    assert silent_chart is not None
    assert len(shaded(silent_chart, SILENT_COLOUR)) == runs(lake.lake_dir, "noData", silent_id)

    # Live again: a newly published day shows up by itself, without reloading the page.
    toggle_live(browser)
    later = lake.first_start + timedelta(days=2)  # its own dt= directory: no file names shared
    build_lake(
        lake.lake_dir, series=SERIES, intervals=30, start=later, seed=SEED + 1,
        anomaly_rate=ANOMALY_RATE,
    )  # fmt: skip
    published = (later + timedelta(minutes=29)).strftime("%Y-%m-%d %H:%M")
    wait_for(browser, lambda d: caption_with(d, f"Newest result {published}"), "the live refresh")


def shaded(chart: WebElement, colour: str) -> list[WebElement]:
    """The shaded spans of one colour that Vega drew (as SVG paths) in ``chart``."""
    return [
        path for path in chart.find_elements(By.CSS_SELECTOR, "g.mark-rect path")
        if (path.get_attribute("fill") or "").lower() == colour
    ]


def axis_titles(chart: WebElement) -> list[str]:
    """The chart's axis titles, top to bottom."""
    titles = chart.find_elements(By.CSS_SELECTOR, "g.role-axis-title text")
    ordered = sorted(titles, key=lambda text: (text.location["y"], text.location["x"]))
    return [text.text for text in ordered if text.text != "UTC"]


def series_chart(driver: WebDriver) -> WebElement | None:
    """The series chart: the vega chart placed right under the series picker."""
    charts = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]')
    return charts[0] if len(charts) == 2 else None


def click_first_row(driver: WebDriver) -> None:
    canvas = driver.find_element(By.CSS_SELECTOR, '[data-testid="data-grid-canvas"]')
    header = 36  # px: Glide's header row, then rows of 35 px
    width, height = canvas.size["width"], canvas.size["height"]
    ActionChains(driver).move_to_element_with_offset(
        canvas, -width // 2 + 18, -height // 2 + header + 17
    ).click().perform()
