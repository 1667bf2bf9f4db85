"""`anomstream backtest`: one output row per input row, clear errors, CSV/Parquet, plots."""

from __future__ import annotations

import csv
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.backtest import parse_timestamp, run_backtest
from app.cli import main

NAB_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nab" / "data"


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def wave(n: int) -> list[float]:
    return [10.0 + 3.0 * math.sin(2 * math.pi * i / 24) for i in range(n)]


def messy_rows() -> list[list[str]]:
    """300 rows with every awkward case: missing values, repeats, a step back, mixed formats."""
    values = wave(300)
    rows = []
    for i, value in enumerate(values):
        stamp = f"2024-01-01 {i // 60 % 24:02d}:{i % 60:02d}:00"
        rows.append([stamp, f"{value:.4f}"])
    rows[10][1] = ""  # empty value
    rows[11][1] = "NaN"
    rows[12][1] = "nan"
    rows[50][0] = rows[49][0]  # repeated timestamp
    rows[80][0] = rows[20][0]  # backward timestamp
    rows[100][0] = "2024-01-01T01:40:00Z"  # ISO-8601 with zone
    rows[101][0] = "2024-01-01T01:41:00"  # ISO-8601, naive
    rows[102][0] = "1704073320"  # epoch seconds
    rows[103][0] = "1704073380000"  # epoch milliseconds
    return rows


def test_timestamp_formats_agree() -> None:
    expected = 1704067200.0  # 2024-01-01 00:00:00 UTC
    for text in (
        "2024-01-01 00:00:00",
        "2024-01-01T00:00:00",
        "2024-01-01T00:00:00Z",
        "2024-01-01T01:00:00+01:00",
        "1704067200",
        "1704067200000",
        "1704067200.0",
    ):
        assert parse_timestamp(text) == expected, text


def test_every_input_row_gives_one_output_row_in_order(tmp_path: Path) -> None:
    rows = messy_rows()
    source = write_csv(tmp_path / "in.csv", ["timestamp", "value"], rows)
    out = tmp_path / "out.csv"
    assert main(["backtest", str(source), "--out", str(out), "--no-progress"]) == 0

    results = read_csv(out)
    assert len(results) == len(rows)
    assert list(results[0]) == [
        "timestamp",
        "value",
        "anomalyScore",
        "anomalyDecision",
        "modelStage",
        "anomalyConfidenceScore",
        "expectedValue",
    ]
    # Timestamps come back exactly as written, so the files line up row by row.
    assert [r["timestamp"] for r in results] == [row[0] for row in rows]
    assert [r["value"] for r in results[10:13]] == ["", "", ""]
    assert results[13]["value"] == rows[13][1]
    assert {r["modelStage"] for r in results} == {"LEARNING", "INFERENCE"}
    assert results[0]["modelStage"] == "LEARNING"
    assert results[-1]["modelStage"] == "INFERENCE"
    assert all(0.0 <= float(r["anomalyScore"]) <= 100.0 for r in results)


def test_a_spike_is_flagged_on_its_own_row(tmp_path: Path) -> None:
    values = wave(400)
    values[350] = 500.0
    rows = [[str(1_700_000_000 + 60 * i), f"{v:.4f}"] for i, v in enumerate(values)]
    source = write_csv(tmp_path / "spike.csv", ["timestamp", "value"], rows)
    out = tmp_path / "spike_out.csv"
    assert main(["backtest", str(source), "--out", str(out), "--no-progress"]) == 0
    results = read_csv(out)
    assert results[350]["timestamp"] == rows[350][0]
    assert results[350]["anomalyDecision"] == "1"
    assert float(results[350]["anomalyScore"]) >= 70.0
    # The steady wave before the spike, once learnt, is not flagged.
    assert all(r["anomalyDecision"] == "0" for r in results[200:350])


def run_cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["backtest", *args, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_missing_column_names_it_and_the_columns_present(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_csv(tmp_path / "in.csv", ["timestamp", "price"], [["2024-01-01", "1"]])
    out = tmp_path / "out.csv"
    err = run_cli_error([str(source), "--out", str(out)], capsys)
    assert "in.csv" in err
    assert "'value'" in err
    assert "'timestamp', 'price'" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("line", "column", "bad", "what"),
    [
        (4, "timestamp", "2024-13-45 99:00:00", "timestamp"),
        (7, "timestamp", "yesterday", "timestamp"),
        (5, "value", "12,5", "not a number"),
        (6, "value", "abc", "not a number"),
    ],
)
def test_unparsable_cell_names_file_line_column_and_text(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    line: int,
    column: str,
    bad: str,
    what: str,
) -> None:
    rows = [[f"2024-01-01 00:{i:02d}:00", "1.5"] for i in range(10)]
    rows[line - 2][0 if column == "timestamp" else 1] = bad  # line 1 is the header
    source = write_csv(tmp_path / "bad.csv", ["timestamp", "value"], rows)
    out = tmp_path / "out.csv"
    err = run_cli_error([str(source), "--out", str(out)], capsys)
    assert f"bad.csv, line {line}, column '{column}'" in err
    assert repr(bad) in err
    assert what in err
    # No half-written output is left behind.
    assert list(tmp_path.iterdir()) == [source]


def test_short_row_names_the_missing_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "short.csv"
    source.write_text("timestamp,value\n2024-01-01 00:00:00,1\n2024-01-01 00:01:00\n")
    err = run_cli_error([str(source), "--out", str(tmp_path / "o.csv")], capsys)
    assert "short.csv, line 3, column 'value'" in err


def test_params_are_typed_and_unknown_keys_list_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_csv(tmp_path / "in.csv", ["timestamp", "value"], messy_rows()[:100])
    out = tmp_path / "out.csv"
    err = run_cli_error([str(source), "--out", str(out), "--param", "num_tres=10"], capsys)
    assert "num_tres" in err and "num_trees" in err and "sample_size" in err
    err = run_cli_error([str(source), "--out", str(out), "--param", "num_trees=many"], capsys)
    assert "num_trees" in err and "'many'" in err
    err = run_cli_error([str(source), "--out", str(out), "--param", "num_trees=0"], capsys)
    assert "num_trees" in err

    # A valid override takes effect: a 20-point warm-up leaves LEARNING earlier than 90.
    args = ["--out", str(out), "--no-progress", "--param", "warmup=20", "--param", "threshold=90"]
    assert main(["backtest", str(source), *args]) == 0
    learning = sum(r["modelStage"] == "LEARNING" for r in read_csv(out))
    assert 20 <= learning < 40


def test_parquet_in_and_out(tmp_path: Path) -> None:
    n = 200
    stamps = [1_700_000_000_000_000 + 60_000_000 * i for i in range(n)]
    stamps[120] = stamps[100]  # backward
    values: list[float | None] = list(wave(n))
    values[30] = None
    values[31] = math.nan
    table = pa.table(
        {
            "ts": pa.array(stamps, type=pa.timestamp("us")),
            "load": pa.array(values, type=pa.float64()),
        }
    )
    source = tmp_path / "in.parquet"
    pq.write_table(table, source)
    out = tmp_path / "out.parquet"
    args = ["--timestamp-column", "ts", "--value-column", "load", "--no-progress"]
    assert main(["backtest", str(source), "--out", str(out), *args]) == 0

    result = pq.read_table(out)
    assert result.num_rows == n
    assert result.column_names[:2] == ["timestamp", "value"]
    # The timestamp column keeps its Parquet type and its values, in input order.
    assert result.column("timestamp").type == pa.timestamp("us")
    assert result.column("timestamp").to_pylist() == table.column("ts").to_pylist()
    assert result.column("value").null_count == 2
    assert set(result.column("modelStage").to_pylist()) == {"LEARNING", "INFERENCE"}

    # Parquet in, CSV out works too.
    csv_out = tmp_path / "out.csv"
    assert main(["backtest", str(source), "--out", str(csv_out), *args]) == 0
    assert len(read_csv(csv_out)) == n


def test_parquet_bad_text_timestamp_names_row_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = pa.table({"timestamp": ["2024-01-01 00:00:00", "soon"], "value": [1.0, 2.0]})
    source = tmp_path / "bad.parquet"
    pq.write_table(table, source)
    err = run_cli_error([str(source), "--out", str(tmp_path / "o.parquet")], capsys)
    assert "bad.parquet, row 2, column 'timestamp'" in err and "'soon'" in err


def test_multivariate_columns(tmp_path: Path) -> None:
    n = 300
    a, b = wave(n), [5.0 + 0.5 * v for v in wave(n)]
    rows = [
        [f"2024-01-01T{i // 60 % 24:02d}:{i % 60:02d}:00", f"{a[i]:.3f}", f"{b[i]:.3f}"]
        for i in range(n)
    ]
    rows[40][2] = ""  # one variable missing: the row stays, its other value too
    rows[260][1] = "90"  # jump in one variable
    source = write_csv(tmp_path / "multi.csv", ["timestamp", "cpu", "mem"], rows)
    out = tmp_path / "multi_out.csv"
    args = ["--value-column", "cpu", "--value-column", "mem", "--no-progress"]
    assert main(["backtest", str(source), "--out", str(out), *args]) == 0

    results = read_csv(out)
    assert len(results) == n
    assert list(results[0]) == [
        "timestamp",
        "value_cpu",
        "value_mem",
        "anomalyScore",
        "anomalyDecision",
        "modelStage",
        "anomalyConfidenceScore",
        "expectedValue_cpu",
        "expectedValue_mem",
        "attribution_cpu",
        "attribution_mem",
    ]
    assert results[40]["value_mem"] == "" and results[40]["value_cpu"] == rows[40][1]
    assert results[260]["value_cpu"] == "90.0"


def test_plot_is_a_png(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    source = write_csv(tmp_path / "in.csv", ["timestamp", "value"], messy_rows())
    plot = tmp_path / "plots" / "backtest.png"
    summary = run_backtest(source, tmp_path / "out.csv", plot_path=plot, progress=True)
    assert summary.rows == 300 and summary.missing == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = mpimg.imread(plot).shape
    assert width > height > 300


def backtest_one(path: str, out_dir: str) -> tuple[str, list[str], list[str]]:
    """Backtest one corpus file; return its input and output timestamp columns."""
    source = Path(path)
    out = Path(out_dir) / f"{source.parent.name}__{source.stem}.csv"
    run_backtest(source, out, progress=False)
    with open(source, newline="") as handle:
        given = [row[0] for row in list(csv.reader(handle))[1:] if row]
    with open(out, newline="") as handle:
        produced = [row[0] for row in list(csv.reader(handle))[1:]]
    return source.name, given, produced


@pytest.mark.slow
def test_whole_nab_corpus_one_output_row_per_input_row(tmp_path: Path) -> None:
    if not NAB_DATA.is_dir():
        pytest.skip(f"NAB corpus not found at {NAB_DATA.resolve()} (shared/ beside the repo)")
    files = sorted(str(p) for p in NAB_DATA.rglob("*.csv"))
    assert files, f"no CSV files under {NAB_DATA}"
    # Largest first so the two workers finish together.
    files.sort(key=lambda p: Path(p).stat().st_size, reverse=True)
    with ProcessPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(backtest_one, files, [str(tmp_path)] * len(files)))
    assert len(outcomes) == len(files)
    for name, given, produced in outcomes:
        assert len(produced) == len(given), name
        assert produced == given, name
