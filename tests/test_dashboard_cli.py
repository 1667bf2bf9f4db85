"""`anomstream dashboard`: arguments and user errors (the served page: test_dashboard_browser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import build_parser, main


def test_binds_to_localhost_by_default() -> None:
    args = build_parser().parse_args(["dashboard"])
    assert (args.host, args.port, args.lake, args.refresh_seconds) == (
        "127.0.0.1", 8501, "lake", 10.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--port", "70000"], "--port 70000: must be between 1 and 65535"),
        (["--refresh-seconds", "0.5"], "--refresh-seconds 0.5: must be at least 1"),
    ],
)
def test_bad_arguments_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["dashboard", "--lake", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_lake_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_dir = tmp_path / "lake.parquet"
    not_a_dir.write_bytes(b"")
    assert main(["dashboard", "--lake", str(not_a_dir)]) == 2
    assert f"--lake {not_a_dir}: not a directory" in capsys.readouterr().err
