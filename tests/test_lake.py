"""The lake without Kafka: record parsing, rotation, file naming, views, schema evolution,
compaction and the query command."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app import cli
from contract import records
from sinks import lake
from sinks.compact import compact
from sinks.lake_files import (
    compacted_file_name,
    lake_end,
    list_files,
    publish_sink_file,
    sink_file_name,
    visible_files,
)
from sinks.parquet import PartitionBuffer, RotationPolicy, cut_points
from sinks.result_table import MS_PER_DAY, day_name, parse_results
from tests.lake_data import DAY0, result_record, stream_of_results


def write_stream(
    lake_dir: Path,
    recs: list[dict],
    *,
    topic: str = "results",
    partitions: int = 2,
    policy: RotationPolicy | None = None,
) -> dict[int, list[int]]:
    """Write records as the sink would (round-robin partitions), return offsets per partition."""
    policy = policy or RotationPolicy(max_records=50, max_span_ms=3_600_000)
    per_partition: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    for i, rec in enumerate(recs):
        per_partition[i % partitions].append(records.encode(rec))
    offsets: dict[int, list[int]] = {}
    for partition, payloads in per_partition.items():
        offs = list(range(len(payloads)))
        offsets[partition] = offs
        buffer = PartitionBuffer(partition, policy)
        parsed = parse_results(payloads, partition, offs)
        closed = buffer.add(parsed.table, len(payloads))
        last = buffer.take_all()
        for table in [*closed, *([last] if last is not None else [])]:
            day = day_name(
                int(table.column("detectionPeriodStartTime").cast(pa.int64())[0].as_py())
                // MS_PER_DAY
            )
            publish_sink_file(lake_dir, topic, partition, day, table)
    return offsets


def test_parse_results_types_dimensions_extras_and_rejects() -> None:
    good = result_record(5, 3, extra={"rawScore": 1.25, "attribution": {"value": 0.7}})
    payloads = [records.encode(good), b"{not json", None, records.encode({"measure": "x"})]
    batch = parse_results(payloads, partition=4, offsets=[10, 11, 12, 13])
    assert [index for index, _ in batch.rejected] == [1, 2, 3]
    assert "detectionPeriodStartTime" in batch.rejected[2][1]
    table = batch.table
    assert table.num_rows == 1
    schema = table.schema
    assert schema.field("anomalyDecision").type == pa.int8()
    assert schema.field("modelStage").type == pa.dictionary(pa.int8(), pa.string())
    assert schema.field("detectionPeriodStartTime").type == pa.timestamp("ms", tz="UTC")
    assert schema.field("kafkaPartition").type == pa.int32()
    row = table.to_pylist()[0]
    assert row["dim_host"] == "host-0005" and row["dim_gpu"] == "5" and row["dim_region"] == "ap"
    assert row["rawScore"] == 1.25
    assert json.loads(row["attribution"]) == {"value": 0.7}
    assert (row["kafkaPartition"], row["kafkaOffset"]) == (4, 10)
    assert row["detectionPeriodStartTime"].timestamp() == DAY0 + 180
    assert row["dimensionList"] == good["dimensionList"]


def test_rotation_is_a_function_of_the_records_only() -> None:
    policy = RotationPolicy(max_records=4, max_span_ms=10 * 60_000)
    millis = np.array([0, 60_000, 120_000, 180_000, 240_000, 900_000, 960_000], dtype=np.int64)
    whole, _ = cut_points(policy, millis, state=None)
    assert whole == [4, 5]  # count reached, then a span over 10 minutes
    # Fed in arbitrary pieces, the cuts fall at the same offsets.
    pieces = [millis[:1], millis[1:5], millis[5:]]
    state = None
    cuts: list[int] = []
    base = 0
    for piece in pieces:
        found, state = cut_points(policy, piece, state=state)
        cuts += [base + c for c in found]
        base += len(piece)
    assert cuts == whole
    midnight = np.array([MS_PER_DAY - 1, MS_PER_DAY], dtype=np.int64)
    assert cut_points(policy, midnight, state=None)[0] == [1]


def test_files_never_span_two_days_and_names_carry_first_offsets(tmp_path: Path) -> None:
    recs = list(stream_of_results(3, 30, start=DAY0 + 86_400 - 15 * 60))
    write_stream(tmp_path, recs, partitions=1, policy=RotationPolicy(1000, 86_400_000))
    files = list_files(tmp_path)
    assert [(f.day, f.path.name) for f in files] == [
        ("2026-11-20", sink_file_name("results", 0, 0)),
        ("2026-11-21", sink_file_name("results", 0, 45)),
    ]
    assert lake_end(tmp_path, "results", 0) == 89
    assert not list(tmp_path.rglob("*.tmp"))


def test_views_count_rows_anomalies_and_series(tmp_path: Path) -> None:
    recs = list(stream_of_results(7, 40))
    write_stream(tmp_path, recs)
    con = lake.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM scores").fetchone() == (280,)
    expected_anomalies = sum(r["anomalyDecision"] for r in recs)
    assert con.execute("SELECT count(*) FROM anomalies").fetchone() == (expected_anomalies,)
    series = con.execute(
        "SELECT timeseriesId, points, anomalies, modelStage, anomalyConfidenceScore, dim_host "
        "FROM series ORDER BY dim_host"
    ).fetchall()
    assert len(series) == 7
    first = [r for r in recs if r["dimensionList"][1]["value"] == "host-0000"]
    assert series[0] == (
        first[0]["timeseriesId"],
        40,
        sum(r["anomalyDecision"] for r in first),
        "INFERENCE",
        78.0,
        "host-0000",
    )
    dupes = con.execute(
        "SELECT count(*) - count(DISTINCT (kafkaPartition, kafkaOffset)) FROM scores"
    ).fetchone()
    assert dupes == (0,)
    assert con.execute("SELECT DISTINCT dt::VARCHAR FROM scores").fetchall() == [("2026-11-20",)]


def test_empty_lake_has_typed_empty_views(tmp_path: Path) -> None:
    data = tmp_path / "full"
    write_stream(data, list(stream_of_results(2, 3)))
    full = {row[0]: row[1] for row in lake.connect(data).execute("DESCRIBE scores").fetchall()}
    for missing in (tmp_path / "nothing", tmp_path):
        con = lake.connect(missing)
        for view in ("scores", "anomalies", "series"):
            assert con.execute(f"SELECT count(*) FROM {view}").fetchone() == (0,)
        empty = {row[0]: row[1] for row in con.execute("DESCRIBE scores").fetchall()}
        assert empty == {k: v for k, v in full.items() if not k.startswith("dim_")}


def test_schema_evolution_new_field_is_a_new_column_old_files_read_null(tmp_path: Path) -> None:
    old = [result_record(i, 0) for i in range(4)]
    new = [
        result_record(i, 1, extra={"rawScore": 0.5 + i, "attribution": [0.1, 0.9]})
        for i in range(4)
    ]
    publish_sink_file(
        tmp_path,
        "results",
        0,
        "2026-11-20",
        parse_results([records.encode(r) for r in old], 0, range(4)).table,
    )
    publish_sink_file(
        tmp_path,
        "results",
        0,
        "2026-11-20",
        parse_results([records.encode(r) for r in new], 0, range(4, 8)).table,
    )
    assert "rawScore" not in pq.read_schema(list_files(tmp_path)[0].path).names
    rows = lake.query(
        tmp_path, "SELECT kafkaOffset, rawScore, attribution FROM scores ORDER BY kafkaOffset"
    ).to_pylist()
    assert [r["rawScore"] for r in rows] == [None] * 4 + [0.5, 1.5, 2.5, 3.5]
    assert [r["attribution"] for r in rows][3:5] == [None, "[0.1, 0.9]"]


def test_visible_files_hide_inputs_covered_by_a_compacted_file(tmp_path: Path) -> None:
    day = tmp_path / "dt=2026-11-20"
    day.mkdir()
    names = [
        sink_file_name("r", 0, 0),
        sink_file_name("r", 0, 10),
        sink_file_name("r", 0, 30),
        sink_file_name("r", 1, 5),
        compacted_file_name("r", 0, 0, 29),
    ]
    for name in names:
        (day / name).touch()
    (day / ".r+0+00000000000000000040.parquet.tmp").touch()
    shown = sorted(f.path.name for f in visible_files(list_files(tmp_path)))
    assert shown == sorted([names[2], names[3], names[4]])


def test_compaction_merges_closed_days_keeps_rows_and_is_idempotent(tmp_path: Path) -> None:
    recs = list(stream_of_results(5, 600))  # 10 hours of 2026-11-20
    recs += list(stream_of_results(5, 10, start=DAY0 + 86_400))
    write_stream(tmp_path, recs, partitions=2, policy=RotationPolicy(100, 3_600_000))
    before = lake.query(tmp_path, "SELECT * FROM scores ORDER BY kafkaPartition, kafkaOffset")
    small = len(list_files(tmp_path))
    report = compact(tmp_path, grace_s=0)
    assert report.merged_days == ["2026-11-20"] and report.files_out == 2
    assert report.rows == 3000
    files = list_files(tmp_path)
    assert len(files) < small
    assert [f.path.name for f in files if f.day == "2026-11-20"] == [
        compacted_file_name("results", 0, 0, 1499),
        compacted_file_name("results", 1, 0, 1499),
    ]
    after = lake.query(tmp_path, "SELECT * FROM scores ORDER BY kafkaPartition, kafkaOffset")
    assert after.to_pylist() == before.to_pylist()
    assert compact(tmp_path, grace_s=0).files_out == 0
    assert lake_end(tmp_path, "results", 0) == 1524


def test_readers_never_see_duplicates_or_gaps_while_compacting(tmp_path: Path) -> None:
    recs = list(stream_of_results(4, 400)) + list(stream_of_results(4, 5, start=DAY0 + 86_400))
    write_stream(tmp_path, recs, partitions=2, policy=RotationPolicy(40, 3_600_000))
    expected = len(recs)
    counts: list[tuple[int, int]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            row = lake.query(
                tmp_path,
                "SELECT count(*) AS n, count(DISTINCT (kafkaPartition, kafkaOffset)) AS d "
                "FROM scores",
            ).to_pylist()[0]
            counts.append((row["n"], row["d"]))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        compact(tmp_path, grace_s=1.5)  # readers must query while inputs and merge coexist
    finally:
        stop.set()
        reader.join(30)
    assert len(counts) >= 3 and all(c == (expected, expected) for c in counts)


def test_query_command_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_stream(tmp_path, list(stream_of_results(3, 4)))
    sql = "SELECT dim_host, points, lastDetectionPeriodStartTime FROM series ORDER BY dim_host"
    assert cli.main(["query", sql, "--lake", str(tmp_path), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {
        "dim_host": "host-0000",
        "points": 4,
        "lastDetectionPeriodStartTime": "2026-11-20T00:03:00.000Z",
    }
    assert cli.main(["query", sql, "--lake", str(tmp_path), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "dim_host,points,lastDetectionPeriodStartTime" and len(lines) == 4
    assert cli.main(["query", sql, "--lake", str(tmp_path)]) == 0
    assert "host-0002" in capsys.readouterr().out
    assert cli.main(["query", "SELECT nope FROM scores", "--lake", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_sink_commands_check_their_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["sink", "parquet", "--out", str(tmp_path), "--max-span", "soon"]) == 2
    assert "--max-span" in capsys.readouterr().err
    assert cli.main(["sink", "parquet", "--out", str(tmp_path), "--max-records", "0"]) == 2
    assert "max_records" in capsys.readouterr().err
    assert cli.main(["sink", "compact", str(tmp_path / "missing")]) == 2
    assert "no such lake" in capsys.readouterr().err


def test_compact_command_merges_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recs = list(stream_of_results(3, 100)) + list(stream_of_results(3, 2, start=DAY0 + 86_400))
    write_stream(tmp_path, recs, partitions=1, policy=RotationPolicy(60, 3_600_000))
    assert cli.main(["sink", "compact", str(tmp_path), "--grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "days=2026-11-20" in out and "files_in=5 files_out=1 rows=300" in out
    assert lake.query(tmp_path, "SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 306}]


def test_pretty_printed_records_parse_like_compact_ones() -> None:
    record = result_record(1, 1, extra={"note": "two\nlines"})
    pretty = json.dumps(record, indent=2).encode()
    batch = parse_results([pretty, records.encode(record)], partition=0, offsets=[0, 1])
    assert batch.rejected == []
    first, second = batch.table.drop_columns(["kafkaOffset"]).to_pylist()
    assert first == second and first["note"] == "two\nlines"


def _reference_cuts(policy: RotationPolicy, millis: np.ndarray) -> list[int]:
    """The rotation rule written row by row, as the decision record states it."""
    cuts: list[int] = []
    rows = day = low = high = 0
    for index, value in enumerate(millis.tolist()):
        if rows and (
            rows >= policy.max_records
            or value // MS_PER_DAY != day
            or max(high, value) - min(low, value) > policy.max_span_ms
        ):
            cuts.append(index)
            rows = 0
        if rows == 0:
            rows, day, low, high = 1, value // MS_PER_DAY, value, value
        else:
            rows, low, high = rows + 1, min(low, value), max(high, value)
    return cuts


def test_vectorised_rotation_matches_the_row_by_row_rule_in_any_batching() -> None:
    rng = np.random.default_rng(3)
    for trial in range(200):
        policy = RotationPolicy(int(rng.integers(1, 30)), int(rng.integers(0, 5 * 60_000)))
        n = int(rng.integers(0, 300))
        millis = 3 * MS_PER_DAY - 100 * 60_000 + rng.integers(0, 400 * 60_000, n)
        if trial % 2:
            millis.sort()
        cuts: list[int] = []
        state = None
        position = 0
        while position < n:
            piece = millis[position : position + int(rng.integers(1, 50))]
            found, state = cut_points(policy, piece, state=state)
            cuts += [position + c for c in found]
            position += len(piece)
        assert cuts == _reference_cuts(policy, millis), trial
