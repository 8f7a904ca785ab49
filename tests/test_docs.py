"""The README and docs/ point only at what exists: their links, and the project files their text
and commands name (a renamed script or recipe fails here, not in a user's first hour)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a path into one of the project's folders, as text or commands name it (placeholders excluded)
PROJECT_PATH = re.compile(
    r"(?<![\w/.-])((?:example_scripts|recipes|convert|bench|tests|docs|trainer|pipeline|modules|comm|data|observability|objectives|run"
    r"|data_parallel)/"
    r"[\w./-]*\w)"
)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_named_project_files_exist(page: Path) -> None:
    text = page.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name} links to {target}: no such heading"
    for named in PROJECT_PATH.findall(text):
        if any(mark in named for mark in ("<", "*", "{")):
            continue
        assert (ROOT / named).exists() or list(ROOT.glob(named + "*")), (
            f"{page.name} names {named}, which does not exist"
        )
