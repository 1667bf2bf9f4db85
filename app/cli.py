"""The ``anomstream`` command line: a thin dispatcher over ``app.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from app.errors import CliError

__all__ = ["COMMANDS", "CliError", "build_parser", "main"]

# Sub-command name -> module implementing it (see app/commands/__init__.py for the protocol).
COMMANDS: dict[str, str] = {
    "detect": "app.commands.detect",
    "alert": "app.commands.alert",
    "backtest": "app.commands.backtest",
    "generate": "app.commands.generate",
    "demo": "app.commands.demo",
    "evaluate": "app.commands.evaluate",
    "sink": "app.commands.sink",
    "query": "app.commands.query",
    "kafka": "app.commands.kafka",
    "produce": "app.commands.produce",
    "dashboard": "app.commands.dashboard",
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomstream",
        description="Streaming anomaly detection on Random Cut Forests.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except CliError as error:
        print(f"anomstream {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
