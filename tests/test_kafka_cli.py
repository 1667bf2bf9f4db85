"""``anomstream kafka up|status|down`` as a user runs it: separate processes, one data dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.kafka_local import free_port


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # Through app.cli.main as the entry point does (``-m app.cli`` would load cli twice).
        [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())",
         "kafka", *args],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1], check=False,
    )


@pytest.mark.kafka
@pytest.mark.slow
def test_up_status_down_round_trip(tmp_path: Path) -> None:
    port, controller_port = free_port(), free_port()
    where = ["--data-dir", str(tmp_path), "--port", str(port),
             "--controller-port", str(controller_port)]
    try:
        assert _cli("status", *where).returncode == 1

        up = _cli("up", *where)
        assert up.returncode == 0, up.stderr
        assert f"running on 127.0.0.1:{port}" in up.stdout

        status = _cli("status", *where)
        assert status.returncode == 0
        assert f"127.0.0.1:{port}" in status.stdout and "serving" in status.stdout
        # `up` again is harmless: it reports the broker that already runs.
        assert "already running" in _cli("up", *where).stdout
    finally:
        down = _cli("down", "--data-dir", str(tmp_path))
    assert down.returncode == 0 and "stopped" in down.stdout
    assert _cli("status", "--data-dir", str(tmp_path)).returncode == 1
    assert not (tmp_path / "kafka.pid").exists()


def test_a_busy_port_is_a_clear_cli_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _cli("up", "--data-dir", str(tmp_path), "--port", str(port),
                      "--controller-port", str(free_port()))
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert "Traceback" not in result.stderr
