"""The floor plan of docs/architecture.md, enforced: which of our packages may import which."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "common", "detectors", "stream", "sinks", "dashboard", "app")

# Package -> the packages of ours it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "common": {"contract"},
    "detectors": set(),
    "stream": {"contract", "common", "detectors"},
    "sinks": {"contract", "common"},
    "dashboard": {"contract", "common", "sinks"},
    "app": set(PACKAGES) - {"app"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in the module, including those inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\ndef f():\n    from stream.worker import x\n    import app.cli\n")
    assert imported_packages(module) == {"os", "stream", "app"}


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_packages_below_it(package: str) -> None:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        forbidden = (imported_packages(path) & set(PACKAGES)) - ALLOWED[package] - {package}
        wrong += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(forbidden)]
    assert not wrong, "\n".join(wrong)
