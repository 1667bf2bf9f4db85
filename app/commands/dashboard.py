"""``anomstream dashboard --lake DIR``: the risk-desk Streamlit app over the Parquet lake."""

from __future__ import annotations

import argparse
import os
import sys

from app.cli import CliError

HELP = "Serve the risk-desk dashboard (Streamlit over the Parquet lake, read-only)."

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lake", default="lake", metavar="DIR", help="lake directory (default: lake)"
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default: {DEFAULT_HOST}; 0.0.0.0 exposes it to the network)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--refresh-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="live refresh period of the panels (default: 10)",
    )


def run(args: argparse.Namespace) -> int:
    from importlib.util import find_spec
    from pathlib import Path

    from dashboard import LAKE_ENV, REFRESH_ENV

    lake = Path(args.lake).expanduser().absolute()
    if lake.exists() and not lake.is_dir():
        raise CliError(f"--lake {args.lake}: not a directory")
    if not 0 < args.port < 65536:
        raise CliError(f"--port {args.port}: must be between 1 and 65535")
    if args.refresh_seconds < 1:
        raise CliError(f"--refresh-seconds {args.refresh_seconds:g}: must be at least 1")
    if not lake.is_dir():
        print(
            f"anomstream dashboard: note: {lake} does not exist yet; the page says so until "
            "the sink writes its first file",
            file=sys.stderr,
        )
    env = dict(os.environ)
    env[LAKE_ENV] = str(lake)
    env[REFRESH_ENV] = str(args.refresh_seconds)
    app = find_spec("dashboard.app")
    assert app is not None and app.origin is not None
    command = [
        sys.executable, "-m", "streamlit", "run", app.origin,
        "--server.address", args.host,
        "--server.port", str(args.port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "minimal",
        "--theme.base", "light",
    ]  # fmt: skip
    print(f"anomstream dashboard: http://{args.host}:{args.port}/ over {lake}", file=sys.stderr)
    sys.stderr.flush()
    # Become Streamlit (no child left behind when a supervisor or a test stops this process).
    os.execve(sys.executable, command, env)
