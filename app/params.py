"""The one ``--param key=value`` parser: detector overrides for ``backtest`` and ``evaluate``.

Each value is converted to the type of its ``DetectorConfig`` field; fractions let decay rates be
written as they are thought of (``time_decay=1/2560``); an optional field takes ``none``.

>>> parse_params(["num_trees=50", "time_decay=1/1000"]).time_decay
0.001
>>> parse_params(["num_tres=3"])
Traceback (most recent call last):
...
app.errors.CliError: --param num_tres: unknown detector parameter; known: ...
>>> parse_params(["num_trees=many"])
Traceback (most recent call last):
...
app.errors.CliError: --param num_trees: 'many' is not a valid int
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from app.errors import CliError
from detectors.config import DetectorConfig

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def parse_params(pairs: Sequence[str]) -> DetectorConfig:
    """A ``DetectorConfig`` from ``key=value`` texts; ``CliError`` names the bad one."""
    hints = typing.get_type_hints(DetectorConfig)
    values: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        key = key.strip()
        if not equals or not key:
            raise CliError(f"--param {pair!r}: expected KEY=VALUE")
        if key not in hints:
            raise CliError(
                f"--param {key}: unknown detector parameter; known: {', '.join(sorted(hints))}"
            )
        values[key] = _convert(key, text.strip(), hints[key])
    try:
        return DetectorConfig(**values)
    except (TypeError, ValueError) as error:
        raise CliError(f"--param: {error}") from None


def _convert(key: str, text: str, hint: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and text.lower() in {"none", "null"}:
        return None
    target = next(option for option in options if option is not type(None))
    try:
        if target is bool:
            lowered = text.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError(text)
            return lowered in _TRUE
        if target is int:
            return int(text)
        if target is float:
            return float(Fraction(text)) if "/" in text else float(text)
        if target is str:
            return text
        import yaml

        return yaml.safe_load(text)
    except (ValueError, ZeroDivisionError):
        name = getattr(target, "__name__", str(target))
        raise CliError(f"--param {key}: {text!r} is not a valid {name}") from None
