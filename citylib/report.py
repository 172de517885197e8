"""The report: every executed notebook as HTML, and one index page for the whole job.

Reads the executed notebooks under ``outputs/`` (``data/``, ``runs/<run>/``,
``comparison/``) and ``outputs/runs/summary.csv``; writes ``outputs/report/*.html`` and
``outputs/report/index.html``. Figures are embedded, so the pages read without Jupyter.
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from citylib import artifacts, paths


def run(outputs: str | Path | None = None) -> Path:
    """Render the report; return the path of ``index.html``."""
    from nbconvert import HTMLExporter

    out = paths.outputs(outputs)
    report = out / "report"
    exporter = HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True)
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for title, folder in _sources(out):
        links = []
        for nb in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
            rel = nb.relative_to(out)
            name = "__".join(rel.with_suffix(".html").parts)
            body, _ = exporter.from_filename(str(nb))
            with artifacts.atomic_path(report / name) as tmp:
                tmp.write_text(body)
            links.append((nb.stem, name))
        if links:
            sections.append((title, links))
    index = report / "index.html"
    with artifacts.atomic_path(index) as tmp:
        tmp.write_text(_index_html(out, sections))
    return index


def _sources(out: Path):
    yield "Data", out / "data"
    for run_dir in sorted((out / "runs").glob("*/")):
        yield f"Run {run_dir.name}", run_dir
    yield "Comparison", out / "comparison"


def _index_html(out: Path, sections) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>citylib report</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}</style>",
             "</head><body><h1>citylib report</h1>"]
    summary = out / "runs" / "summary.csv"
    if summary.exists():
        frame = pd.read_csv(summary)
        parts.append("<h2>Runs</h2>" + frame.to_html(index=False, float_format=lambda x: f"{x:.4f}", na_rep="—"))
    for title, links in sections:
        items = "".join(f"<li><a href='{html.escape(href)}'>{html.escape(label)}</a></li>" for label, href in links)
        parts.append(f"<h2>{html.escape(title)}</h2><ul>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
