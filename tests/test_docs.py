"""Every document the code cites is in the repository, and every section / register item it
cites exists there (a clone has no ../shared/)."""

from __future__ import annotations

import re

from tests.conftest import REPO

DOCS = REPO / "docs" / "methods.md"
CITING = [p for d in ("wsi_lightning", "bench", "experiments") for p in (REPO / d).rglob("*")
          if p.suffix in (".py", ".yaml")] + [REPO / "README.md"]


def _text() -> str:
    return "\n".join(p.read_text() for p in CITING)


def test_cited_documents_exist_in_the_repository():
    text = _text()
    assert not re.search(r"shared/(methods|ENV|STYLE)\.md", text), "cites ../shared/, which a clone lacks"
    for doc in set(re.findall(r"docs/[\w./-]+\.md", text)):
        assert (REPO / doc).is_file(), doc


def test_cited_sections_and_register_items_exist():
    text, docs = _text(), DOCS.read_text()
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)[ .]", docs, re.M))
    items = {int(n) for n in re.findall(r"\*\*Register item (\d+)\*\*", docs)}
    sections = set(re.findall(r"docs/methods\.md[`,]*\s+(?:§|section\s+)?(\d+(?:\.\d+)?)", text))
    assert sections and sections <= headings, sorted(sections - headings)
    cited: set[int] = set()
    for group in re.findall(r"register items? ([\d ,\-–and]+)", text):
        for a, b in re.findall(r"(\d+)(?:\s*[-–]\s*(\d+))?", group):
            cited |= set(range(int(a), int(b or a) + 1))
    assert cited and cited <= items, sorted(cited - items)
