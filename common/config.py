"""Reading YAML configuration files: the one loader and the one ``ConfigError``.

``read_yaml`` reads and parses a file into a mapping and ``yaml_lines`` maps each key path to
its line, so that a validation error can point at the line to edit. The typed models
(``stream.config.DetectConfig``, ``sinks.alerting.config.AlertConfig``) validate the mapping.

>>> import pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
>>> _ = path.write_text("kafka:\\n  bootstrap: x\\ndetectors:\\n  - name: cpu\\n")
>>> data, text = read_yaml(path)
>>> data["detectors"][0]["name"], yaml_lines(text)[("detectors", 0, "name")]
('cpu', 4)
>>> _ = path.write_text("a: [unclosed\\n")
>>> read_yaml(path)
Traceback (most recent call last):
...
common.config.ConfigError: ...c.yaml:2: not valid YAML (line 2, column 1): ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file, the line and the field."""


def read_yaml(path: str | Path, *, what: str = "a mapping", empty_ok: bool = False
              ) -> tuple[dict[str, Any], str]:
    """The mapping in ``path`` and the file's text; ``ConfigError`` for anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}: " if mark else f"{path}: "
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or error
        raise ConfigError(f"{where}not valid YAML{at}: {problem}") from None
    if data is None and empty_ok:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {what}")
    return data, text


def yaml_lines(text: str) -> dict[tuple[Any, ...], int]:
    """Key path (mapping keys and sequence indexes) -> 1-based line of that key or item."""
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, here: tuple[Any, ...]) -> None:
        lines.setdefault(here, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*here, key.value)] = key.start_mark.line + 1
                walk(value, (*here, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*here, index))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def line_of(lines: dict[tuple[Any, ...], int], location: tuple[Any, ...]) -> int | None:
    """The line of the deepest key on ``location`` that the file has (the field or its parent).

    >>> line_of({("a",): 1, ("a", "b"): 2}, ("a", "b", "c")), line_of({}, ("x",))
    (2, None)
    """
    for n in range(len(location), 0, -1):
        if location[:n] in lines:
            return lines[location[:n]]
    return None
