"""``anomstream produce``: files replayed into the real broker, bad files rejected whole."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from app.cli import main
from app.kafka_local import free_port
from app.producer import ReplayRecord, paced
from common.kafka_io import consume_all

CSV = """timestamp,value,host,extra
2014-04-01 00:00:00,12.3,a,x
2014-04-01T02:05:00+02:00,,b,x

2014-04-01T00:10:00Z,NaN,a,x
2014-04-01T00:15:00.250Z,-4,b,x
"""


def _records(bootstrap: str, topic: str) -> list[tuple[bytes | None, dict]]:
    return [(m.key(), json.loads(m.value() or b"")) for m in consume_all(bootstrap, topic)]


@pytest.mark.kafka
def test_csv_rows_become_json_records_with_utc_times_nulls_dimensions_and_keys(
    kafka_bootstrap: str, topic_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "cpu.csv"
    source.write_text(CSV)
    topic = topic_factory(partitions=2)

    code = main(["produce", str(source), "--topic", topic, "--bootstrap", kafka_bootstrap,
                 "--dimension-column", "host", "--dimension", "dc=eu-1",
                 "--key-field", "host"])

    assert code == 0
    assert "produced 4 record(s)" in capsys.readouterr().out
    records = _records(kafka_bootstrap, topic)
    by_time = sorted(records, key=lambda kv: kv[1]["timestamp"])
    assert [r for _, r in by_time] == [
        {"timestamp": "2014-04-01T00:00:00Z", "value": 12.3, "host": "a", "dc": "eu-1"},
        {"timestamp": "2014-04-01T00:05:00Z", "value": None, "host": "b", "dc": "eu-1"},
        {"timestamp": "2014-04-01T00:10:00Z", "value": None, "host": "a", "dc": "eu-1"},
        {"timestamp": "2014-04-01T00:15:00.250Z", "value": -4.0, "host": "b", "dc": "eu-1"},
    ]
    assert all(key == record["host"].encode() for key, record in records)
    # The key decides the partition: one host's records all share one partition, in file order.
    partitions = {m.partition() for m in consume_all(kafka_bootstrap, topic)
                  if json.loads(m.value() or b"")["host"] == "a"}
    assert len(partitions) == 1


@pytest.mark.kafka
def test_parquet_with_several_measures_renamed_and_epoch_times(
    kafka_bootstrap: str, topic_factory, tmp_path: Path
) -> None:
    source = tmp_path / "gpu.parquet"
    pd.DataFrame({
        "ts": [1396310400, 1396310460],
        "util": [0.5, float("nan")],
        "temp_c": [61.0, 62.5],
    }).to_parquet(source)
    topic = topic_factory()

    code = main(["produce", str(source), "--topic", topic, "--bootstrap", kafka_bootstrap,
                 "--timestamp-column", "ts", "--value-column", "util", "--value-column",
                 "temp_c", "--measure-name", "gpu_util", "--measure-name", "gpu_temp"])

    assert code == 0
    assert [r for _, r in _records(kafka_bootstrap, topic)] == [
        {"timestamp": "2014-04-01T00:00:00Z", "gpu_util": 0.5, "gpu_temp": 61.0},
        {"timestamp": "2014-04-01T00:01:00Z", "gpu_util": None, "gpu_temp": 62.5},
    ]


@pytest.mark.kafka
def test_a_missing_topic_is_created_with_the_asked_partitions(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    from confluent_kafka.admin import AdminClient

    source = tmp_path / "cpu.csv"
    source.write_text(CSV)
    topic = f"produce-creates-{free_port()}-{tmp_path.name}"

    code = main(["produce", str(source), "--topic", topic, "--bootstrap", kafka_bootstrap,
                 "--partitions", "3", "--key-field", "host", "--dimension-column", "host"])

    assert code == 0
    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(topic, timeout=10)
    assert len(metadata.topics[topic].partitions) == 3
    assert len(consume_all(kafka_bootstrap, topic)) == 4


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("content", "options", "expected"),
    [
        (CSV, ["--value-column", "cpu"], "line 1: column(s) ['cpu'] not found"),
        (CSV.replace("2014-04-01T00:10:00Z", "yesterday"), [],
         "line 5, column 'timestamp': cannot parse timestamp 'yesterday'"),
        (CSV.replace("-4", "four"), [], "line 6, column 'value': 'four' is not a number"),
        (CSV.replace("2014-04-01 00:00:00,", ","), [], "line 2, column 'timestamp': empty"),
    ],
    ids=["missing-column", "bad-timestamp", "bad-value", "empty-timestamp"],
)
def test_a_bad_file_is_a_cli_error_naming_file_line_and_column_and_sends_nothing(
    kafka_bootstrap: str, topic_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    content: str, options: list[str], expected: str,
) -> None:
    source = tmp_path / "bad.csv"
    source.write_text(content)
    topic = topic_factory()

    code = main(["produce", str(source), "--topic", topic, "--bootstrap", kafka_bootstrap,
                 *options])

    assert code == 2
    err = capsys.readouterr().err
    assert f"{source}: {expected}" in err
    assert consume_all(kafka_bootstrap, topic) == []


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--key-field", "hostname"], "--key-field 'hostname' is not one of"),
        (["--dimension", "host"], "--dimension 'host': expected NAME=VALUE"),
        (["--dimension-column", "host", "--dimension", "host=x"], "['host'] would be written"),
        (["--measure-name", "a", "--measure-name", "b"], "2 --measure-name for 1 value"),
        (["--speed", "-1"], "--speed must be 0"),
    ],
)
def test_inconsistent_options_are_cli_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], expected: str
) -> None:
    source = tmp_path / "cpu.csv"
    source.write_text(CSV)
    unused_port = free_port()

    code = main(["produce", str(source), "--topic", "t", "--bootstrap",
                 f"127.0.0.1:{unused_port}", *options])

    assert code == 2
    assert expected in capsys.readouterr().err


def test_an_unreachable_broker_is_a_cli_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "cpu.csv"
    source.write_text(CSV)
    address = f"127.0.0.1:{free_port()}"

    assert main(["produce", str(source), "--topic", "t", "--bootstrap", address]) == 2
    assert f"cannot connect to Kafka at {address}" in capsys.readouterr().err


def test_pacing_spreads_event_time_gaps_by_the_speed_factor() -> None:
    now = [100.0]
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    minute = 60_000
    records = [ReplayRecord(t, None, b"") for t in (0, minute, 3 * minute, 2 * minute)]

    sent = list(paced(records, 60.0, clock=lambda: now[0], sleep=sleep))

    assert sent == records
    # 1 min of event time at 60x is 1 s; the late (out-of-order) record does not wait.
    assert naps == pytest.approx([1.0, 2.0])
    assert list(paced(records, 0, clock=lambda: now[0], sleep=sleep)) == records
    assert len(naps) == 2
