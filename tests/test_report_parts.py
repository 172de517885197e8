"""The report's section on places: every run's accuracy under its own split beside near and far."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import pandas as pd

from citylib.run import report_parts
from citylib.stages import places


class _Cells(HTMLParser):
    """The text of a table's header and body cells, row by row."""

    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _frame(table: str) -> pd.DataFrame:
    cells = _Cells()
    cells.feed(table)
    return pd.DataFrame(cells.rows[1:], columns=cells.rows[0])


def _run(root, name, split_by, rows):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": {"data": {"split_by": split_by}}}))
    pd.DataFrame(rows, columns=places.NEAR_COLUMNS).to_csv(d / "places_near.csv", index=False)
    return d


def test_places_section_shows_each_runs_accuracy_under_its_split_near_and_far(tmp_path):
    nan = float("nan")
    leaky = _run(tmp_path, "simple_seed0", "group",
                 [["<b>ville", 50.0, 10, 0.7, 0.5, 0.9, 4, 1.0, 1.0, 1.0, 6, 0.5, 0.25, 0.75]])
    blocked = _run(tmp_path, "simple_block", "block",
                   [["<b>ville", 50.0, 8, 0.625, 0.375, 0.875, 0, nan, nan, nan, 8, 0.625, 0.375, 0.875]])
    bare = tmp_path / "no_places"
    bare.mkdir()
    assert report_parts.places_section([bare]) == []
    text, table = report_parts.places_section([leaky, bare, blocked])
    assert "50 m" in text
    body = _frame(table)
    assert body["run"].tolist() == ["simple_seed0", "simple_block"]
    assert body["split by"].tolist() == ["group", "block"]
    assert body["test images"].tolist() == ["10", "8"]
    assert body["accuracy [95%]"].tolist() == ["0.700 [0.500, 0.900]", "0.625 [0.375, 0.875]"]
    assert body["near: accuracy [95%]"].tolist() == ["1.000 [1.000, 1.000]", "—"]
    assert body["far: images"].tolist() == ["6", "8"]
    assert body["far: accuracy [95%]"].tolist() == ["0.500 [0.250, 0.750]", "0.625 [0.375, 0.875]"]
    assert body["city"].tolist() == ["<b>ville"] * 2
    assert "<b>ville" not in table and "&lt;b&gt;ville" in table      # a city's name is escaped


def test_an_older_places_result_without_the_runs_own_accuracy_shows_a_dash(tmp_path):
    old = _run(tmp_path, "simple_seed0", "group",
               [["oslo", 50.0, 10, 0.7, 0.5, 0.9, 4, 1.0, 1.0, 1.0, 6, 0.5, 0.25, 0.75]])
    near = pd.read_csv(old / "places_near.csv").drop(columns=["n_all", "accuracy_all", "all_low", "all_high"])
    near.to_csv(old / "places_near.csv", index=False)
    body = _frame(report_parts.places_section([old])[1])
    assert body["accuracy [95%]"].tolist() == ["—"] and body["test images"].tolist() == ["—"]
    assert body["far: accuracy [95%]"].tolist() == ["0.500 [0.250, 0.750]"]
