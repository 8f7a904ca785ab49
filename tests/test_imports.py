"""The floors of the code (docs/design.md): imports go down the list only, and comm/ and modules/
know nothing of each other. A module-level or function-level import both count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

# top to bottom; a package may import those after it
FLOORS = [
    "run",
    "trainer",
    "objectives",
    "generation",
    "observability",
    "data",
    "data_parallel",
    "pipeline",
    "convert",
    "modules",
    "comm",
]
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


def imported_modules(args: list[str]) -> set[str]:
    """The modules ``python dist_clm_train.py <args>`` imports (python -X importtime)."""
    import subprocess
    import sys

    from tests.helpers import OFFLINE_ENV

    env = {"PATH": "", **OFFLINE_ENV}
    done = subprocess.run([sys.executable, "-X", "importtime", "dist_clm_train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


def test_help_and_previews_import_no_modeling_code(tiny_hf: Path, tmp_path: Path) -> None:
    """Families import HF's modeling modules (and its mask builders) when a model is built, so
    --help and --preview-data start in the time torch and the tokenizer take."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    preview = ["--preview-data", "1", "--task-name", str(data), "--model-name", str(tiny_hf), "--seq-length", "8"]
    for args in (["--help"], preview):
        modules = imported_modules(args)
        assert "trainer.config" in modules  # the measurement saw our imports
        # (transformers.modeling_rope_utils is its config classes' own: the tokenizer loads it)
        models = [m for m in modules if m.startswith("transformers.models.") and ".modeling_" in m]
        modeling = sorted([*models, *(m for m in modules if m.endswith(("masking_utils", ".modeling_utils")))])
        assert not modeling, (args[0], modeling)
    assert "transformers" not in imported_modules(["--help"])
