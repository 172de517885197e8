"""The report: every executed notebook as HTML, and one index page for the whole job.

Reads the executed notebooks under ``outputs/`` (``data/``, ``runs/<run>/``,
``comparison/``) and ``outputs/runs/summary.csv``; writes ``outputs/report/*.html`` and
``outputs/report/index.html``. Figures are embedded, so the pages read without Jupyter.
"""
from __future__ import annotations

import html
import urllib.parse
from pathlib import Path

import pandas as pd

from citylib.core import artifacts, paths
from citylib.run import table
from citylib.run.current import Current, current
from citylib.run.report_parts import figures_html as _figures, places_section, removal_section, table_html as _table
from citylib.stages import ar_tables, causal, methods


def run(outputs: str | Path | None = None) -> Path:
    """Render the report; return the path of ``index.html``."""
    from nbconvert import HTMLExporter

    out = paths.outputs(outputs)
    report = out / "report"
    exporter = HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True)
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    now = current(out)
    for title, folder in _sources(out, now):
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
        tmp.write_text(_index_html(out, sections, now))
    return index


def _sources(out: Path, now: Current):
    """(title, folder) of the executed notebooks to show: the data's, the current runs', and the
    comparison's when it was made of them."""
    yield "Data", out / "data"
    for run_dir in now.runs:
        yield f"Run {run_dir.name}", run_dir
    if now.comparison:
        yield "Comparison", out / "comparison"


STYLE = ("body{font-family:sans-serif;max-width:75em;margin:2em auto;padding:0 1em;line-height:1.4}"
         ".table{overflow-x:auto;max-width:100%;margin:.5em 0}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;vertical-align:top}"
         "img{max-width:100%;border:1px solid #eee}figure{display:inline-block;margin:.5em;"
         "vertical-align:top;max-width:100%}figcaption{font-size:.85em;color:#555}"
         "details{margin:.6em 0}summary{cursor:pointer;font-size:1.25em;font-weight:bold}"
         "nav li{margin:.1em 0}.findings li{margin:.3em 0}")


def _index_html(out: Path, sections, now: Current) -> str:
    """The index page: the findings in plain words first, a table of contents, the tables
    (accuracy, sanity checks, planted-cue recovery, reliance, Table 2), then one collapsible
    section per run with its figures and the executed notebooks; the current results only
    (``current``), and a line for each result left out."""
    runs = now.runs
    summary = out / "runs" / "summary.csv"
    frame = pd.read_csv(summary, dtype={"run": str}) if summary.exists() else None
    if frame is not None:
        frame = frame[frame["run"].isin([r.name for r in runs])]
    comparison = out / "comparison"
    tests = (artifacts.read_json(comparison / "tests.json")
             if now.comparison and (comparison / "tests.json").is_file() else {})
    body = _tables(out, runs, frame, tests, now.comparison)
    notebooks = []
    for title, links in sections:
        items = "".join(f"<li><a href='{html.escape(href)}'>{html.escape(label)}</a></li>" for label, href in links)
        notebooks.append(f"<h3>{html.escape(title)}</h3><ul>{items}</ul>")
    body.append(("notebooks", "Executed notebooks", notebooks))
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>citylib report</title>",
             f"<style>{STYLE}</style></head><body><h1>citylib report</h1>",
             "<p>What makes a city look like itself: how well each network recognises the cities, "
             "which objects it relies on and which an explanation shows, and how much architectures "
             "and initialisations differ. The findings first; the tables and figures they come from "
             "below; every executed notebook at the end.</p>",
             "".join(f"<p class='left-out'>Not shown: {html.escape(line)}</p>" for line in now.left_out),
             "<h2 id='findings'>Findings</h2><ul class='findings'>"
             + "".join(f"<li>{f}</li>" for f in findings(frame, runs, tests)) + "</ul>",
             "<nav><h2>Contents</h2><ul>" + "".join(
                 f"<li><a href='#{html.escape(urllib.parse.quote(a))}'>{html.escape(h)}</a></li>"
                 for a, h, _ in body) + "</ul></nav>"]
    for anchor, heading, content in body:
        if anchor.startswith("run-"):
            parts.append(f"<details id='{html.escape(anchor)}'><summary>{html.escape(heading)}</summary>"
                         + "\n".join(content) + "</details>")
        else:
            parts.append(f"<h2 id='{html.escape(anchor)}'>{html.escape(heading)}</h2>" + "\n".join(content))
    parts.append("</body></html>")
    return "\n".join(parts)


def _tables(out: Path, runs: list[Path], frame: pd.DataFrame | None, tests: dict,
            comparison: bool) -> list[tuple[str, str, list[str]]]:
    """(anchor, heading, HTML parts) of every section before the notebooks: the tables across
    runs, then each run's verdict, table and figures (the stage table's, ``table.report_figures``)."""
    overview, per_run = _reliance(runs)
    body: list[tuple[str, str, list[str]]] = []
    if frame is not None:
        body.append(("accuracy", "Accuracy per run", [
            "<p>Each number with its 95% interval: test accuracy Wilson's (it treats the test images as "
            "independent, though a spot's views are not, so it is somewhat narrow); kNN city agreement in "
            "the 2-D map (chance: the shuffled-city baseline) and planted-cue MRR over the test spots, "
            "resampled within each city. Then per architecture the mean and the range over its seeds.</p>",
            _table(headline(frame)), _table(by_architecture(frame))]))
    checks = _sanity(runs)
    if not checks.empty:
        body.append(("sanity", "Sanity checks of the explanations", [
            "<p>Per run, on its Grad-CAM masks of a few test images (95% intervals over the images). "
            "<i>Deletion</i> (Petsiuk et al.): removing the pixels the mask calls salient first must lower "
            "the target probability faster than removing them at random: passed when the interval of "
            "AUC(salient) − AUC(random) lies below 0. <i>Cascade</i> (Adebayo et al.): with every layer "
            "re-initialised the masks must lose the trained ranking: passed when the upper end of the "
            "Spearman interval is below 0.5. An explanation that ignores the model, or follows only the "
            "image, fails.</p>", _table(checks)]))
    recovery = _recovery(runs)
    if not recovery.empty:
        body.append(("recovery", "Planted-cue recovery", [
            "<p>Generated world: reciprocal rank of each city's planted objects by lift (1 = first, for the "
            "city's best-ranked cue), and the mean over cities (MRR). <i>MRR ceiling</i>: the same for an "
            "ideal detector of the planted objects whose map has the network's size (<i>map</i>): the best "
            "a network could show at that resolution.</p>", _table(recovery)]))
    if overview:
        body.append(("reliance", "Reliance and visibility", overview))
    removal, removal_per_run = removal_section(out, runs)
    if removal:
        body.append(("removal", "Reliance by object removal", removal))
    if where := places_section(runs):
        body.append(("places", "Places: test images near a training image and far from one", where))
    if comparison and (out / "comparison" / "table2.csv").is_file():
        body.append(("comparison", "Architectures versus initialisations (Table 2)",
                     _comparison(out, out / "comparison", tests)))
    for run_dir in runs:
        body.append((f"run-{run_dir.name}", f"Run {run_dir.name}", per_run.get(run_dir.name, [])
                     + removal_per_run.get(run_dir.name, []) + [
            _figures(out, [(run_dir / f"{name}.png", caption) for name, caption in table.report_figures("run")])]))
    return body


def findings(summary: pd.DataFrame | None, runs: list[Path], tests: dict) -> list[str]:
    """The report's first lines, as HTML: per architecture its seeds' test accuracy with
    intervals, per run what it relies on (``methods.verdict``), and the comparison's conclusion."""
    lines = []
    if summary is not None and "test_accuracy" in summary:
        for arch, g in summary.groupby("arch", sort=False):
            done = g.dropna(subset=["test_accuracy"])
            if done.empty:
                continue
            each = "; ".join(
                f"seed {r.seed}: {r.test_accuracy:.3f}"
                + (f" [{r.test_accuracy_low:.3f}, {r.test_accuracy_high:.3f}]" if "test_accuracy_low" in g else "")
                for r in done.itertuples())
            lines.append(f"<b>{html.escape(ar_tables.NAMES.get(arch, arch))}</b> recognises the city of a test "
                         f"image with accuracy {html.escape(each)} (95% intervals{_chance(runs)}).")
    for d in runs:
        if all((d / f).is_file() for f in ("causal.csv", "methods.json")):
            lines.append(html.escape(methods.verdict(d.name, pd.read_csv(d / "causal.csv"),
                                                     artifacts.read_json(d / "methods.json"))))
    if "conclusion" in tests:
        lines.append(f"<b>{html.escape(tests['conclusion']['text'])}</b>")
    return lines or ["No run has finished yet."]


def _chance(runs: list[Path]) -> str:
    """", chance 1/k" for the k cities of the job's runs, or "" when no run says."""
    for d in runs:
        cities = artifacts.read_json(d / "metrics.json").get("cities")
        if cities:
            return f"; chance {1 / len(cities):.2f}"
    return ""


def _comparison(out: Path, comparison: Path, tests: dict) -> list[str]:
    parts = ["<p>Average residual AR (Eq. 2) between two runs' masks of the same test image, with "
             "bootstrap 95% intervals over test images; a row pools its run pairs (mean; the "
             "envelope of their intervals). The paper compares the masks at image resolution, "
             "where a coarse map is upsampled smoothly and a fine one is not: two architectures "
             "always differ in map size, two seeds never do. So each pair is also compared on the "
             "coarser of its two native maps and all runs on one grid (the coarsest map, masks "
             "average-pooled and renormalised), and against its own <i>null</i>: the AR of the "
             "same two runs' masks of <i>different</i> images (AR / null: 1 = as different as "
             "unrelated masks).</p>", _table(ar_tables.table2_display(pd.read_csv(comparison / "table2.csv")))]
    if "conclusion" in tests:
        parts.append(f"<p><b>{html.escape(tests['conclusion']['text'])}</b></p>")
    if tests:
        parts += ["<p>Tests of <i>between-architecture AR &gt; between-seed AR</i>, at image resolution "
                  "and under each control:</p>", _table(ar_tables.tests_table(tests))]
    parts.append(_figures(out, [(comparison / f"{n}.png", c) for n, c in table.report_figures("grid")]))
    return parts


def out_of(run_dirs: list[Path]) -> Path:
    """The outputs folder of run folders (``<outputs>/runs/<run>``)."""
    return run_dirs[0].parent.parent


def _reliance_figure(out: Path, done: list[Path]) -> str:
    """Every run's reliance on every planted cue, one dot per run with its interval, drawn into
    ``report/reliance.png``: what the table says, at a glance."""
    import matplotlib.pyplot as plt

    from citylib.figures import causal_plots, plots

    arch = {d.name: artifacts.read_json(d / "metrics.json").get("config", {}).get("arch", d.name) for d in done}
    fig = causal_plots.plot_reliance({d.name: pd.read_csv(d / "causal.csv") for d in done},
                                     {n: ar_tables.NAMES.get(a, a) for n, a in arch.items()})
    path = plots.save(fig, out / "report" / "reliance.png")
    plt.close(fig)
    return _figures(out, [(path, "What each network relies on: every planted cue removed alone, the change "
                                 "in log p(true city) with its 95% interval, one dot per run")])


def _cue_free_paragraph(done: list[Path], free: dict, decided: dict) -> str:
    """The cue-free check in words: one decision for the grid (``causal.pooled``: the runs' mean
    accuracy against the same with the cities permuted, false-alarm rate 5% for the grid), then
    each run's Holm-adjusted p."""
    frames = {d.name: pd.read_csv(d / "causal_cue_free.csv", dtype={"city": str, "group": str, "predicted": str})
              for d in done}
    chance = next(iter(free.values()))["chance"]
    try:
        grid = causal.pooled(frames, round(1 / chance))
    except ValueError as e:             # runs of other renderings: no pooled test
        grid = None
        why = str(e)
    flagged = [n for n, d in decided.items() if not d["at_chance"]]
    text = ("<p>Cue-free check: on renderings with every cue reset the cities cannot be told apart, so "
            "every network must score what a city-blind one does. ")
    if grid is not None:
        text += (f"One decision for the {len(frames)} runs: their mean accuracy on the {grid['images']} "
                 f"cue-free images is {grid['accuracy']:.3f} (chance {chance:.3f}; with the spots' cities "
                 f"permuted, the same runs score [{grid['interval'][0]:.3f}, {grid['interval'][1]:.3f}]; "
                 f"p = {grid['p']:.3f}): " + ("<b>at chance</b>" if grid["at_chance"] else
                                               "<b>not at chance: the world leaks a difference it does not "
                                               "declare</b>") + ". A grid of runs at chance is called otherwise "
                 "5% of the time at most. ")
    else:
        text += f"(No decision for the grid: {html.escape(why)}.) "
    text += ("Per run, each p-value Holm-adjusted over the runs (the same 5% for the grid): "
             + (f"{', '.join(html.escape(n) for n in flagged)} not at chance." if flagged
                else "every run at chance.") + "</p>")
    return text


def _reliance(runs: list[Path]) -> tuple[list[str], dict[str, list[str]]]:
    """Reliance (causal effects) and visibility (each method's lift ranks) of the runs on a
    generated world: the methods across runs (HTML parts), and per run its verdict and table."""
    done = [d for d in runs if all((d / f).is_file() for f in ("causal.csv", "methods.csv", "methods.json"))]
    if not done:
        return [], {}
    summaries = {d.name: artifacts.read_json(d / "methods.json") for d in done}
    parts = ["<p>Generated world. <i>Reliance</i>: the change in "
             "the network's log-probability of the true city when one planted cue is reset to the "
             "base style and everything else is rendered identically (mean over test images, 95% "
             "bootstrap interval over spots); no explanation method is involved. <i>Visibility</i>: "
             "whether an explanation method ranks the city's causally strongest cue in the lift top "
             f"{next(iter(summaries.values()))['top']}. Below: per method and layer (paper = the "
             "paper's Grad-CAM layer, paper-k = k stages earlier, fusion = all of them on the finest "
             "grid), the cities where it does, of those whose network relies on a cue, the "
             "planted-cue MRR, and Spearman's ρ between the cues' reliance and their lift rank (1 = "
             "the method ranks the cues as the network relies on them) with its 95% interval over "
             "resampled spots. Each run's own table is in its section.</p>", _reliance_figure(out_of(done), done),
             _table(methods.comparison(summaries))]
    free = {d.name: artifacts.read_json(d / "causal.json")["cue_free"] for d in done}
    decided = causal.holm_decision({n: c["p"] for n, c in free.items()})
    parts.append(_cue_free_paragraph(done, free, decided))
    per_run = {}
    for d in done:
        causal_table = pd.read_csv(d / "causal.csv")
        cue_free = free[d.name]
        samples = "; ".join(f"{name} spots {c['accuracy']:.3f} ({c['n']} images, p = {c['p']:.3f})"
                            for name, c in cue_free.get("samples", {}).items())
        recovery = pd.read_csv(d / "planted_recovery.csv") if (d / "planted_recovery.csv").is_file() else None
        per_run[d.name] = [
            f"<p>{html.escape(methods.verdict(d.name, causal_table, summaries[d.name]))} "
            f"On the {cue_free['n']} cue-free renderings it scores {cue_free['accuracy']:.3f} (a city-blind "
            f"network's range [{cue_free['interval'][0]:.3f}, {cue_free['interval'][1]:.3f}], chance "
            f"{cue_free['chance']:.3f}, p = {cue_free['p']:.3f}, Holm-adjusted {decided[d.name]['p_holm']:.3f}"
            + (f"; {html.escape(samples)}" if samples else "") + "): "
            + ("at chance" if decided[d.name]["at_chance"] else "not at chance, at a family-wise 5%") + ".</p>",
            _table(methods.run_table(causal_table, pd.read_csv(d / "methods.csv"),
                                     summaries[d.name]["layers"], recovery))]
    return parts, per_run


HEADLINE = {"test_accuracy": "test accuracy", "knn_2d": "kNN agreement", "planted_mrr": "planted-cue MRR"}


def headline(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary.csv`` for a reader: per run its status and each headline number "x [low, high]"."""
    out = summary[["run", "arch", "seed", "status"]].copy()
    for name, label in HEADLINE.items():
        if name not in summary:
            continue
        low, high = summary.get(f"{name}_low"), summary.get(f"{name}_high")
        out[label] = [("—" if v != v else f"{v:.3f}") + (f" [{lo:.3f}, {hi:.3f}]" if lo == lo and hi == hi else "")
                      for v, lo, hi in zip(summary[name], low if low is not None else [float("nan")] * len(out),
                                           high if high is not None else [float("nan")] * len(out))]
    for name, label in (("knn_2d_shuffled", "kNN, shuffled cities"), ("planted_mrr_ceiling", "MRR ceiling"),
                        ("cue_free_accuracy", "cue-free accuracy"), ("n_test", "test images")):
        if name in summary:
            out[label] = summary[name]
    return out


def by_architecture(summary: pd.DataFrame) -> pd.DataFrame:
    """Per architecture: each headline number's mean over the seeds and their range."""
    rows = []
    for arch, g in summary.groupby("arch", sort=False):
        row = {"architecture": ar_tables.NAMES.get(arch, arch), "seeds done": int((g["status"] == "done").sum())}
        for name, label in HEADLINE.items():
            v = g[name].dropna() if name in g else pd.Series(dtype=float)
            row[label] = f"{v.mean():.3f} ({v.min():.3f}–{v.max():.3f})" if len(v) else "—"
        rows.append(row)
    order = {a: i for i, a in enumerate(ar_tables.NAMES.values())}
    return pd.DataFrame(rows).sort_values("architecture", key=lambda c: c.map(order), kind="stable")


def _recovery(runs: list[Path]) -> pd.DataFrame:
    rows = []
    for run_dir in runs:
        objects = artifacts.read_json(run_dir / "metrics.json").get("objects", {})
        if objects.get("planted_rr"):
            ceiling = objects.get("ceiling", {})
            rows.append({"run": run_dir.name, **objects["planted_rr"], "MRR": objects["planted_mrr"],
                         "map": "x".join(map(str, ceiling.get("map_size", []))) or None,
                         "MRR ceiling": ceiling.get("planted_mrr")})
    return pd.DataFrame(rows)


def _sanity(runs: list[Path]) -> pd.DataFrame:
    rows = []
    for run_dir in runs:
        v = artifacts.read_json(run_dir / "metrics.json").get("sanity_verdict") or {}
        d, c = v.get("deletion"), v.get("cascade")
        if not (d or c):
            continue
        rows.append({"run": run_dir.name,
                     "deletion AUC(salient) − AUC(random)": (
                         f"{d['auc_difference']:.3f} [{d['auc_difference_low']:.3f}, {d['auc_difference_high']:.3f}]"
                         if d else "—"),
                     "deletion": ("passed" if d["passed"] else "failed") if d else "—",
                     "against random pixels (reference)": (
                         f"{d['auc_difference_pixels']:.3f} [{d['auc_difference_pixels_low']:.3f}, "
                         f"{d['auc_difference_pixels_high']:.3f}]"
                         if d and "auc_difference_pixels" in d else "—"),
                     "cascade Spearman, all layers random": (
                         f"{c['spearman_mean']:.2f} [{c['spearman_low']:.2f}, {c['spearman_high']:.2f}]"
                         if c and c.get("spearman_high") is not None else "—"),
                     "cascade": ("passed" if c["passed"] else "failed") if c else "—",
                     "images": (d or c)["n_images"]})
    return pd.DataFrame(rows)
