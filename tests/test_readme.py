"""The documentation stays true: every row of the bad-input table (``docs/bad-input.md``) names
tests that exist and still contain the text the row quotes; every page, picture and file the
README and the pages link to exists; the README stays a five-minute read."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rows() -> list[tuple[str, list[str], list[str]]]:
    table = (ROOT / "docs" / "bad-input.md").read_text()
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2].startswith("`test_"):
            rows.append((cells[0], re.findall(r'"([^"]+)"', cells[1]), re.findall(r"`(test_\w+)`", cells[2])))
    return rows


def _sources() -> dict[str, str]:
    """Test name -> its source text with its decorators, over every test module."""
    out = {}
    for f in (ROOT / "tests").glob("test_*.py"):
        lines = f.read_text().splitlines(True)
        for node in ast.parse("".join(lines)).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                out[node.name] = "".join(lines[first - 1:node.end_lineno])
    return out


def test_every_bad_input_row_is_backed_by_a_test_that_shows_it():
    rows, sources = _rows(), _sources()
    assert len(rows) >= 10
    for case, quotes, tests in rows:
        assert tests, case
        missing = [t for t in tests if t not in sources]
        assert not missing, f"{case}: no test {missing}"
        body = "".join(sources[t] for t in tests)
        for q in quotes:
            assert q in body, f"{case}: none of {tests} contains {q!r}"


def test_every_link_of_the_readme_and_the_pages_leads_somewhere():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        text = page.read_text()
        targets = re.findall(r"\]\(([^)#\s]+)\)", text) + re.findall(r"<img src=\"([^\"]+)\"", text)
        missing += [f"{page.name}: {t}" for t in targets
                    if not t.startswith("http") and not (page.parent / t).exists()]
    assert not missing, missing
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", (ROOT / "README.md").read_text()))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}, "a page the README does not list"


def test_the_readme_is_a_short_read():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
