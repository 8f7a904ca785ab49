"""The floors of the code (docs/design.md): imports go down the list only, and comm/ and modules/
know nothing of each other. A module-level or function-level import both count."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

# top to bottom; a package may import those after it
FLOORS = ["trainer", "data_parallel", "pipeline", "convert", "modules", "comm"]
STRANGERS = {("comm", "modules"), ("modules", "comm")}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Each of our packages that a file of ``package`` imports -> the files importing it."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in FLOORS and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", FLOORS)
def test_imports_go_down_the_floors_only(package: str) -> None:
    below = FLOORS[FLOORS.index(package) + 1 :]
    wrong = {
        other: files
        for other, files in imported_packages(package).items()
        if other not in below or (package, other) in STRANGERS
    }
    assert not wrong, f"{package}/ imports what it must not: {wrong}"
