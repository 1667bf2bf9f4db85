"""`anomstream generate`: deterministic feeds whose labels sit on the injected anomalies."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.cli import main
from app.generators import DEFAULT_INTERVALS, FEEDS, Feed, FeedSpec, generate_feed
from app.generators.common import Label, Series
from app.generators.evaluate import FeedEvaluation, SeriesRun, _score_run, alert_events
from contract.records import parse_time

FeedName = str


def feed_of(name: FeedName, points: int = 1500, seed: int = 7, **kwargs: Any) -> Feed:
    return generate_feed(
        name, FeedSpec(seed=seed, interval=DEFAULT_INTERVALS[name], points=points, **kwargs)
    )


def series_of(feed: Feed, label: Label) -> Series:
    key = (tuple(sorted(label.dimensions.items())), label.measure)
    return next(series for series in feed.series if series.key == key)


def labels_of(feed: Feed, kind: str) -> list[Label]:
    labels = [label for label in feed.labels if label.kind == kind]
    assert labels, f"the {feed.name} feed has no {kind} label"
    return labels


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", list(FEEDS))
def test_same_seed_same_feed_other_seed_other_feed(name: FeedName) -> None:
    first, again, other = feed_of(name, 600), feed_of(name, 600), feed_of(name, 600, seed=8)
    assert list(first.records()) == list(again.records())
    assert first.labels_document() == again.labels_document()
    assert list(first.records()) != list(other.records())


def test_cli_output_is_identical_for_a_seed(tmp_path: Path) -> None:
    for run in ("a", "b"):
        assert main(["generate", "ops", "--out", str(tmp_path / run / "ops.jsonl"),
                     "--points", "500", "--seed", "3", "--no-progress"]) == 0  # fmt: skip
    for name in ("ops.jsonl", "ops.labels.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("name", list(FEEDS))
def test_every_feed_has_labels_and_anomaly_free_series(name: FeedName) -> None:
    feed = feed_of(name)
    document = feed.labels_document()
    clean = [s for s in document["series"] if not s["anomalous"]]
    anomalous = [s for s in document["series"] if s["anomalous"]]
    assert clean and anomalous
    labelled = {(json.dumps(lb["dimensions"], sort_keys=True), lb["measure"]) for lb in
                document["labels"]}  # fmt: skip
    for series in clean:
        assert (json.dumps(series["dimensions"], sort_keys=True), series["measure"]) not in labelled
    # No anomaly while the detector is still learning the series.
    assert min(label.first for label in feed.labels) >= 100


def test_label_times_are_the_record_times_of_the_anomaly(tmp_path: Path) -> None:
    """Read back from the file: the records inside a stale_price label hold one flat price."""
    out = tmp_path / "market.jsonl"
    assert main(["generate", "market", "--out", str(out), "--points", "1500", "--seed", "5",
                 "--no-progress"]) == 0  # fmt: skip
    records = read_jsonl(out)
    document = json.loads((tmp_path / "market.labels.json").read_text())
    prices: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for record in records:
        prices[record["instrument"]].append((record["timestamp"], record["price"]))
    stale = [label for label in document["labels"] if label["kind"] == "stale_price"]
    assert stale
    for label in stale:
        start, end = parse_time(label["start"]), parse_time(label["end"])
        series = prices[label["dimensions"]["instrument"]]
        inside = [p for t, p in series if start <= parse_time(t) <= end]
        assert len(inside) >= 20 and len(set(inside)) == 1
        after = [p for t, p in series if parse_time(t) > end][:5]
        assert len(set(after)) > 1, "the market moves again after the stale window"
    # Outside the stale windows the price is never flat for 10 points in a row.
    for instrument, series in prices.items():
        windows = [(parse_time(lb["start"]), parse_time(lb["end"])) for lb in stale
                   if lb["dimensions"]["instrument"] == instrument]  # fmt: skip
        free = [p for t, p in series if not any(a <= parse_time(t) <= b for a, b in windows)]
        runs = [len(set(free[i : i + 10])) for i in range(len(free) - 10)]
        assert min(runs) > 1


def test_market_labels_sit_on_their_anomalies() -> None:
    feed = feed_of("market", 3000)
    for label in labels_of(feed, "price_jump"):
        price = series_of(feed, label).values
        jump = abs(math.log(price[label.first] / price[label.first - 1]))
        ordinary = np.abs(np.diff(np.log(price[: label.first - 1])))
        assert jump > 0.025 and jump > 20 * np.median(ordinary)
    for kind, factor in (("volume_burst", 3.0), ("spread_blowout", 3.0)):
        for label in labels_of(feed, kind):
            values = series_of(feed, label).values
            window = values[label.first : label.last + 1]
            before = values[label.first - 30 : label.first]
            assert window.min() > factor * np.median(before)
    for label in labels_of(feed, "stale_price"):
        window = series_of(feed, label).values[label.first : label.last + 1]
        assert np.all(window == window[0])


def test_ops_labels_sit_on_their_anomalies() -> None:
    feed = feed_of("ops", 3000)
    for label in labels_of(feed, "stuck_at_zero"):
        assert label.measure == "gpu_util"
        assert np.all(series_of(feed, label).values[label.first : label.last + 1] == 0.0)
    for label in labels_of(feed, "under_utilisation"):
        values = series_of(feed, label).values
        around = np.concatenate([values[label.first - 20 : label.first],
                                 values[label.last + 1 : label.last + 21]])  # fmt: skip
        assert values[label.first : label.last + 1].mean() < 0.6 * around.mean()
    for label in labels_of(feed, "latency_spike"):
        values = series_of(feed, label).values
        assert (
            values[label.first : label.last + 1].min()
            > 2.5 * values[label.first - 20 : label.first].max()
        )
    for label in labels_of(feed, "slow_drift"):
        values = series_of(feed, label).values
        # Compared with the same time of the previous day, the end of the drift runs hot.
        day = int(86400 / feed.spec.interval)
        if label.last - day >= 0:
            assert values[label.last - 10 : label.last + 1].mean() > (
                values[label.last - day - 10 : label.last - day + 1].mean() + 12.0
            )
        assert label.last - label.first + 1 >= 100
    explosions = labels_of(feed, "gradient_explosion")
    assert len({label.dimensions["layer"] for label in explosions}) == 1, "one layer blows up"
    for label in explosions:
        values = series_of(feed, label).values
        assert values[label.last] > 10 * values[label.first - 1]


def test_ops_records_name_their_entity() -> None:
    feed = feed_of("ops", 5)
    entities = {(record["entity"], tuple(sorted(k for k in record if k in
                 ("host", "gpu", "job", "layer")))) for record in feed.records()}  # fmt: skip
    assert entities == {
        ("host", ("host",)),
        ("gpu", ("gpu", "host")),
        ("job", ("job",)),
        ("layer", ("job", "layer")),
    }


def test_bookstore_even_and_odd_hours() -> None:
    feed = feed_of("bookstore", 24 * 60)
    spikes = {(label.dimensions["item"], label.first) for label in feed.labels}
    hours = (feed.spec.timestamps() // 3600 % 24).astype(int)
    expected = {"item-A": (20, 10), "item-B": (30, 15)}
    for series in feed.series:
        item = series.dimensions["item"]
        normal = np.array([i for i in range(len(hours)) if (item, i) not in spikes])
        even = series.values[normal[hours[normal] % 2 == 0]].mean()
        odd = series.values[normal[hours[normal] % 2 == 1]].mean()
        assert 1.8 < even / odd < 2.2
        if item in expected:
            assert even == pytest.approx(expected[item][0], rel=0.08)
            assert odd == pytest.approx(expected[item][1], rel=0.08)
    for item, index in spikes:
        series = next(s for s in feed.series if s.dimensions["item"] == item)
        rate = expected[item][hours[index] % 2]
        assert series.values[index] >= 3 * rate


def test_market_volume_is_u_shaped_over_the_day_and_ops_follows_the_day() -> None:
    market = feed_of("market", 4 * 1440)
    hours = (market.spec.timestamps() // 3600 % 24).astype(int)
    edges, midday = np.isin(hours, [0, 1, 22, 23]), np.isin(hours, [10, 11, 12, 13])
    for series in market.series:
        if series.measure == "volume":
            assert series.values[edges].mean() > 1.6 * series.values[midday].mean()
    ops = feed_of("ops", 4 * 1440)
    afternoon, night = np.isin(hours, [13, 14, 15]), np.isin(hours, [1, 2, 3])
    for series in ops.series:
        if series.measure in ("cpu_util", "gpu_util"):
            assert series.values[afternoon].mean() > series.values[night].mean() + 20.0


@pytest.mark.parametrize("name", list(FEEDS))
def test_record_format(name: FeedName) -> None:
    feed = feed_of(name, 50)
    measures = {series.measure for series in feed.series}
    records = list(feed.records())
    assert len(records) == 50 * len(feed.entities())
    for record in records:
        assert parse_time(record["timestamp"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert record["timestamp"].endswith("Z")
        for key, value in record.items():
            if key in measures:
                assert isinstance(value, int | float) and math.isfinite(value)
            else:
                assert isinstance(value, str)
    stamps = [record["timestamp"] for record in records]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 50


def test_out_formats_hold_the_same_records(tmp_path: Path) -> None:
    common = ["--points", "120", "--seed", "2", "--instruments", "3", "--no-progress"]
    for suffix in ("csv", "parquet", "jsonl"):
        assert main(["generate", "market", "--out", str(tmp_path / f"m.{suffix}"), *common]) == 0
        assert (tmp_path / "m.labels.json").exists()
    from_jsonl = read_jsonl(tmp_path / "m.jsonl")
    from_parquet = pq.read_table(tmp_path / "m.parquet").to_pylist()
    with open(tmp_path / "m.csv", newline="") as handle:
        from_csv = [
            {"timestamp": row["timestamp"], "instrument": row["instrument"],
             "price": float(row["price"]), "volume": int(row["volume"]),
             "spread_bps": float(row["spread_bps"])}
            for row in csv.DictReader(handle)
        ]  # fmt: skip
    assert len(from_jsonl) == 360
    assert from_jsonl == from_parquet == from_csv
    assert json.loads((tmp_path / "m.labels.json").read_text())["feed"] == "market"


def test_custom_start_interval_and_entities(tmp_path: Path) -> None:
    out = tmp_path / "ops.jsonl"
    assert main(["generate", "ops", "--out", str(out), "--points", "10", "--hosts", "2",
                 "--start", "2026-03-01T12:00:00+01:00", "--interval", "5m",
                 "--no-progress"]) == 0  # fmt: skip
    records = read_jsonl(out)
    assert records[0]["timestamp"] == "2026-03-01T11:00:00.000Z"
    assert records[-1]["timestamp"] == "2026-03-01T11:45:00.000Z"
    assert {r["host"] for r in records if r["entity"] == "host"} == {"gpu-node-01", "gpu-node-02"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bookstore"], "--topic TOPIC or --out FILE"),
        (["bookstore", "--out", "x.txt"], ".csv, .parquet, .jsonl"),
        (["ops", "--instruments", "3", "--out", "x.csv"], "--instruments is for the market"),
        (["market", "--interval", "soon", "--out", "x.csv"], "not a duration"),
        (["market", "--start", "yesterday", "--out", "x.csv"], "not an ISO-8601 time"),
        (["market", "--points", "0", "--out", "x.csv"], "points must be at least 1"),
        (["all", "--out", "x.csv"], "'all' only evaluates"),
    ],
)
def test_bad_arguments_are_clear_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [str(tmp_path / a) if a.startswith("x.") else a for a in argv]
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_alert_events_and_scoring_follow_the_documented_rules() -> None:
    assert alert_events([5, 6, 9, 13, 40], tolerance=3) == [[5, 6, 9], [13], [40]]
    dims = {"instrument": "X"}
    labels = [
        Label(dims, "price", 100, 104, "stale_price"),
        Label(dims, "price", 200, 200, "price_jump"),
    ]
    decisions = np.zeros(300, dtype=np.int8)
    # Fires just after the stale window (end + 2 <= end + tolerance), 5 points after the jump
    # (missed: beyond the tolerance), and once far from any label (a false event).
    decisions[[106, 205, 250]] = 1
    series = Series(dims, "price", np.ones(300))
    clean = Series({"instrument": "Y"}, "price", np.ones(300))
    clean_decisions = np.zeros(300, dtype=np.int8)
    clean_decisions[[50, 51]] = 1
    evaluation = FeedEvaluation("market", 300, 60.0, 3, {}, [])
    _score_run(evaluation, SeriesRun(series, labels, np.zeros(300), decisions), tolerance=3)
    _score_run(evaluation, SeriesRun(clean, [], np.zeros(300), clean_decisions), tolerance=3)
    assert (evaluation.labels, evaluation.found, evaluation.recall) == (2, 1, 0.5)
    assert (evaluation.events, evaluation.true_events) == (4, 1)
    assert evaluation.precision == 0.25
    assert (evaluation.clean_series, evaluation.clean_series_alerting, evaluation.clean_events) == (
        1,
        1,
        1,
    )
    stale, jump = evaluation.kinds["stale_price"], evaluation.kinds["price_jump"]
    assert (stale.found, stale.events, stale.false_events, stale.precision) == (1, 1, 2, 1 / 3)
    assert (jump.found, jump.events, jump.false_events, jump.precision) == (0, 0, 2, 0.0)


def test_evaluate_prints_a_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "bookstore", "--points", "400", "--evaluate", "--no-progress"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (feed,) = report["feeds"]
    assert feed["feed"] == "bookstore" and feed["series"] == 3
    assert feed["labels"] == feed["kinds"]["unexplained_spike"]["labels"] > 0
    assert 0 <= feed["found"] <= feed["labels"]
    assert feed["recall"] == feed["found"] / feed["labels"]
    assert feed["true_events"] <= feed["alert_events"]
    assert feed["anomaly_free"]["series"] == 1
    assert feed["detector"]["threshold"] == 70.0
    assert main([*argv, "--plot", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for heading in ("Feed", "Anomaly kind", "Labels", "Found", "Recall", "Precision"):
        assert heading in table
    assert "unexplained_spike" in table and "(anomaly-free series)" in table
    assert (tmp_path / "evaluation-bookstore.png").stat().st_size > 10_000
    report = tmp_path / "report.md"
    report.write_text(
        "# Prose\n<!-- evaluation:begin -->\nSTALE-TABLE\n<!-- evaluation:end -->\nMore.\n"
    )
    assert main([*argv, "--markdown", str(report)]) == 0
    text = report.read_text()
    assert text.startswith("# Prose\n<!-- evaluation:begin -->\nRun ") and text.endswith("More.\n")
    assert "STALE-TABLE" not in text and "| bookstore | unexplained_spike | 2 |" in text


def test_the_demo_detectors_page_on_anomalies_and_never_on_anomaly_free_series(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The demo's own feeds and detector parameters (examples/docker/detect.yaml = app/demo.py),
    over about as many points as the demo test replays."""
    config = Path(__file__).resolve().parents[1] / "examples" / "docker" / "detect.yaml"
    for feed, entities in (("market", ["--instruments", "4"]), ("ops", ["--hosts", "2"])):
        argv = ["generate", feed, *entities, "--points", "2200", "--evaluate", "--no-progress"]
        assert main([*argv, "--detect-config", str(config), "--json"]) == 0
        (report,) = json.loads(capsys.readouterr().out)["feeds"]
        assert report["anomaly_free"]["series_with_alerts"] == 0, report["anomaly_free"]
        # Every injected anomaly is found (docs/demo.md: why a live run can still leave one
        # unpaged, and the summary line names those cases).
        assert report["found"] == report["labels"] > 0, report
        volume_or_latency = report["measure_params"].get("volume") or report["measure_params"].get(
            "latency_ms"
        )
        assert volume_or_latency["transform"] == "log"


def test_detect_config_with_two_settings_for_one_measure_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "detect.yaml"
    spec = "{name: %s, input: m, measure: price, interval: 60s, params: {ratio_margin: %s}}"
    config.write_text(
        "kafka: {bootstrap: 127.0.0.1:9092, group_id: g}\n"
        "topics: {output: o, dead_letter: d, repartition: r, state: s}\n"
        f"detectors: [{spec % ('a', 0.1)}, {spec % ('b', 0.2)}]\n"
    )
    argv = ["generate", "market", "--points", "50", "--evaluate", "--detect-config", str(config)]
    assert main(argv) == 2
    assert "detectors 'a' and 'b' both read 'price' with different parameters" in (
        capsys.readouterr().err
    )


@pytest.mark.kafka
def test_topic_output_produces_every_record_keyed_by_entity(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    from common.kafka_io import consume_all

    topic = f"generate-bookstore-{tmp_path.name}"
    labels = tmp_path / "bookstore.labels.json"
    argv = ["generate", "bookstore", "--topic", topic, "--bootstrap", kafka_bootstrap,
            "--labels", str(labels), "--points", "40", "--seed", "4", "--partitions", "2",
            "--speed", "72000", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    expected = list(feed_of("bookstore", 40, seed=4).records())
    messages = consume_all(kafka_bootstrap, topic)
    assert len(messages) == len(expected) == 120
    by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for message in messages:
        payload = message.value()
        assert payload is not None
        record = json.loads(payload)
        assert message.key() == f"item={record['item']}".encode()
        by_item[record["item"]].append(record)
    for item, records in by_item.items():
        # One entity lives on one partition, so its records arrive in time order.
        assert records == [r for r in expected if r["item"] == item]
    assert json.loads(labels.read_text())["feed"] == "bookstore"
