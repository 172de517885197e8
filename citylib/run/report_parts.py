"""Parts of the report page: tables and figures as HTML, and the section on reliance by object
removal (``reliance.csv`` of every run, ``calibration.csv`` where the world could re-render).

Reads the run folders' results; ``removal_section`` draws ``report/removal.png``.
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from citylib.core import artifacts
from citylib.stages import ar_tables, methods_tables, places, reliance


def table_html(frame: pd.DataFrame) -> str:
    """A frame as an HTML table in a box that scrolls sideways when the table is wider than the page."""
    return ("<div class='table'>" + frame.to_html(index=False, float_format=lambda x: f"{x:.4f}", na_rep="—")
            + "</div>")


def figures_html(out: Path, figures: list[tuple[Path, str]]) -> str:
    """Linked thumbnails of the figures that exist (paths relative to ``outputs/report/``)."""
    items = []
    for path, caption in figures:
        if path.is_file():
            href = html.escape("../" + path.relative_to(out).as_posix())
            items.append(f"<figure><a href='{href}'><img src='{href}' style='max-height:28em'></a>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "<div>" + "".join(items) + "</div>"


def calibration_overview(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per operator and measure, over the runs: the mean Spearman ρ and its runs' range, the
    mean of the rest; the rows of ``calibration.csv`` of every run."""
    long = pd.concat([t.assign(run=name) for name, t in tables.items()], ignore_index=True)
    g = long.groupby(["operator", "measure"], sort=False)
    return pd.DataFrame({"runs": g["run"].nunique(), "ρ (mean)": g["spearman_rho"].mean(),
                         "ρ (lowest run)": g["spearman_rho"].min(), "ρ (highest run)": g["spearman_rho"].max(),
                         "pairs per run": g["n_pairs"].mean(), "signs right": g["sign_agreement"].mean(),
                         "error in log p": g["mae"].mean(),
                         "same strongest (cities)": g["strongest_same"].sum().astype(str) + " / "
                         + g["cities"].sum().astype(str)}).reset_index()


def removal_section(out: Path, runs: list[Path]) -> tuple[list[str], dict[str, list[str]]]:
    """The section's HTML parts (what removal measures, one figure across runs, the calibration
    across runs) and per run its verdict in words."""
    done = [d for d in runs if (d / "reliance.csv").is_file()]
    if not done:
        return [], {}
    tables = {d.name: pd.read_csv(d / "reliance.csv", dtype={"city": str, "object": str}) for d in done}
    settings = artifacts.read_json(done[0] / "reliance.json").get("settings", {})
    min_images = int(settings.get("min_images", 5))
    parts = [f"<p>On any images, photos too: each object covering at least {settings.get('min_share', 0.01):.0%} "
             f"of a test image is removed (its pixels, grown by {settings.get('dilation')} px, filled by the "
             f"<i>{html.escape(str(settings.get('operator')))}</i> operator) and the network decides again. The "
             "change in log p(true city), with its 95% interval over groups: below 0, the network relies on the "
             "object. Below: each city's strongest objects, one dot per run.</p>",
             _across_figure(out, tables, done, min_images)]
    calibrated = {d.name: pd.read_csv(d / "calibration.csv") for d in done if (d / "calibration.csv").is_file()}
    if calibrated:
        parts += ["<p>How far removal lands from the truth: on the generated world each test spot is re-rendered "
                  "without each object kind (what stood behind it drawn instead), and every operator fills the "
                  "same pixels of the original. Per operator, over the runs: Spearman ρ between the operator's "
                  "and the true per-(city, object) effects, the share of signs right where the true interval "
                  "excludes 0, the mean error in log p, and the cities whose strongest object both name. "
                  "<i>adjusted</i>: with the matched null subtracted. This error stands beside every number of "
                  "the reliance tables on photos.</p>", table_html(calibration_overview(calibrated))]
    visible = {d.name: artifacts.read_json(d / "methods_removal.json") for d in done
               if (d / "methods_removal.json").is_file()}
    if visible:
        top = next(iter(visible.values()))["top"]
        parts += [f"<p>Which explanation to trust on these images: every CAM method at every layer of the sweep, "
                  f"per run, the cities whose object the network relies on most (by removal) it puts in the lift top "
                  f"{top}, and Spearman's ρ between the objects' reliance and their lift rank (1: the method ranks "
                  "them as removal does), with its 95% interval over resampled groups.</p>",
                  table_html(methods_tables.comparison(visible))]
    per_run = {name: [f"<p><b>Reliance by removal.</b> {html.escape(reliance.verdict(t, min_images)).replace(chr(10), '<br>')}</p>"]
               for name, t in tables.items()}
    return parts, per_run


def _across_figure(out: Path, tables: dict[str, pd.DataFrame], done: list[Path], min_images: int, top: int = 3) -> str:
    import matplotlib.pyplot as plt

    from citylib.figures import causal_plots, plots

    pooled = pd.concat(tables.values())
    if (pooled["n"] >= min_images).any():          # else every object, however few its images
        pooled = pooled[pooled["n"] >= min_images]
    pooled = pooled.groupby(["city", "object"])["effect"].mean().reset_index()
    keep = set(map(tuple, pooled.sort_values("effect").groupby("city").head(top)[["city", "object"]].to_numpy()))
    shown = {n: t[[(c, o) in keep for c, o in zip(t["city"], t["object"])]] for n, t in tables.items()}
    arch = {d.name: _run_config(d).get("arch", d.name) for d in done}
    fig = causal_plots.plot_reliance(shown, {n: ar_tables.NAMES.get(a, a) for n, a in arch.items()},
                                     xlabel="Δ log p(true city) when the object is removed (95% interval)")
    path = plots.save(fig, out / "report" / "removal.png")
    plt.close(fig)
    return figures_html(out, [(path, f"Each city's {top} objects whose removal lowers p(true city) most (mean over "
                                     "runs), one dot per run with its 95% interval")])


def places_section(runs: list[Path]) -> list[str]:
    """Where the data has coordinates: per run and city, the accuracy of every test image (under
    the run's own split) beside that of the test images with a training image of their city
    nearby and of the rest (``places_near.csv``): the rest are what a blocked split tests."""
    done = [d for d in runs if (d / "places_near.csv").is_file()]
    if not done:
        return []
    rows, within = [], None
    for d in done:
        split = _run_config(d).get("data", {}).get("split_by", "—")
        near = pd.read_csv(d / "places_near.csv", dtype={"city": str}).reindex(columns=places.NEAR_COLUMNS)
        within = near["within_m"].iloc[0] if within is None else within
        for r in near.itertuples(index=False):      # a column an older result lacks: shown as —
            rows.append({"run": d.name, "split by": split, "city": r.city, "test images": r.n_all,
                         "accuracy [95%]": _interval(r.accuracy_all, r.all_low, r.all_high),
                         "near: images": r.n_near, "near: accuracy [95%]": _interval(r.accuracy_near, r.near_low, r.near_high),
                         "far: images": r.n_far, "far: accuracy [95%]": _interval(r.accuracy_far, r.far_low, r.far_high)})
    return [f"<p>Accuracy under two splits. <i>accuracy</i>: every test image, under the split the run used "
            "(<code>group</code>: by panorama, or spot; <code>block</code>: by blocks of "
            f"<code>data.block_m</code> = {within:g} m). A test image is <i>near</i> when a training image of "
            f"its city lies within {within:g} m of it, <i>far</i> otherwise. Neighbouring panoramas look alike: a "
            "blocked split keeps no near image, so the far images' accuracy estimates what it would measure "
            "(of a network trained on this run's split; a blocked split's own accuracy needs a run of its "
            "own, <code>data.split_by: block</code>), and where the near images are right more often than "
            "the far ones, a split by panorama flatters the test accuracy. Each accuracy has its 95% "
            "interval over panoramas (spots); where the intervals overlap, no difference is shown.</p>", table_html(pd.DataFrame(rows))]


def _run_config(run_dir: Path) -> dict:
    """The run's resolved settings (``config.json``), or {} where the folder has none."""
    path = run_dir / "config.json"
    return artifacts.read_json(path).get("config", {}) if path.is_file() else {}


def _interval(value: float, low: float, high: float) -> str:
    return "—" if value != value else f"{value:.3f} [{low:.3f}, {high:.3f}]"
