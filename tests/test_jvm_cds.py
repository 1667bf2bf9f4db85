"""Class-data archives: only complete ones are used, and a used one really maps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from app.jvm_cds import ClassDataArchive
from app.kafka_local import STORAGE_TOOL_CLASS, _java, ensure_jars


def _storage_tool(options: list[str], libs: Path) -> subprocess.CompletedProcess[str]:
    """A short real Kafka JVM run (prints a random cluster id)."""
    return subprocess.run(
        [_java(), "-XX:ErrorFile=/dev/null", *options, "-cp", str(libs / "*"),
         STORAGE_TOOL_CLASS, "random-uuid"],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.slow
def test_a_dumped_archive_is_adopted_only_when_complete_and_then_maps(tmp_path: Path) -> None:
    libs = ensure_jars()
    archive = ClassDataArchive(_java(), libs)
    archive.path = tmp_path / "cds" / "classes.jsa"  # keep the shared cache out of this test
    pending = tmp_path / "run.jsa.pending"

    dump = _storage_tool(archive.jvm_options(pending), libs)
    assert dump.returncode == 0, dump.stderr
    assert pending.stat().st_size > 1_000_000

    whole = pending.read_bytes()
    pending.write_bytes(whole[: len(whole) // 2])  # what a kill during the dump leaves
    assert archive.adopt(pending) is False
    assert not archive.path.exists() and not pending.exists()

    pending.write_bytes(whole)
    assert archive.adopt(pending) is True
    assert archive.path.exists() and not pending.exists()
    assert archive.jvm_options(pending) == [f"-XX:SharedArchiveFile={archive.path}"]

    # -Xshare:on fails instead of silently running without the archive.
    run = _storage_tool(["-Xshare:on", *archive.reader_options()], libs)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip()) == 22
