"""The README's bad-input table stays true: every row names tests that exist and still contain
the text the row quotes."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rows() -> list[tuple[str, list[str], list[str]]]:
    text = (ROOT / "README.md").read_text()
    table = text.split("## Paths, exit statuses and bad input", 1)[1].split("\n## ", 1)[0]
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
