"""Interactive panels for JupyterLab (ipywidgets); each redraws its figure when a control moves.

Reads the stage results it is given (Grad-CAM masks, the statistics histograms) and, for
Grad-CAM++ on demand, the run's best checkpoint. Writes nothing. Each panel keeps what it
computed inside its own closure, never at module level. Figures go to the panel as PNG bytes
in an Image widget, not through an Output widget: a headless run (papermill, nbval) then only
records widget state, and no output is captured and synced back to the kernel mid-cell (with
nbclient's Output-widget mimic that exchange could leave the cell waiting forever). Run
headlessly the panels draw once and show their widget repr.
"""
from __future__ import annotations

from pathlib import Path

import ipywidgets as w
import numpy as np

from citylib import gradcam, gradcam_plots, plots, stats, stats_plots, train


def _figure_view(make_figure, controls: dict[str, w.ValueWidget], width: str) -> w.Image:
    """An Image widget showing ``make_figure(**values of controls)``, redrawn when one moves."""
    view = w.Image(format="png", layout=w.Layout(max_width=width))

    def draw(_=None):
        view.value = plots.png(make_figure(**{k: c.value for k, c in controls.items()}))

    for control in controls.values():
        control.observe(draw, names="value")
    draw()
    return view


def explanation_panel(result: gradcam.GradCAMResult, cache, run_dir: str | Path) -> w.Widget:
    """Threshold slider, test-image chooser and method chooser over the paper's Fig. 2.

    The stored method's masks are shown as computed; the other method is computed for the one
    chosen image on demand with the run's best model (loaded once, on first use).
    """
    index = result.index
    options = [(f"{i}: {r.city} → {r.predicted}{'' if r.correct else '  ✗'}", i)
               for i, r in enumerate(index.itertuples())]
    stored = result.meta["method"]
    held: dict = {}  # the model and computed masks, owned by this panel

    def mask_of(pos: int, method: str) -> np.ndarray:
        if method == stored:
            return np.asarray(result.masks[pos], dtype=np.float32)       # (h, w)
        if (pos, method) not in held:
            if "model" not in held:
                held["model"] = train.load_model(run_dir)[0]
            cities = list(result.meta["cities"])
            target = cities.index(index["target"].iloc[pos])
            image = np.asarray(cache.images[int(index["index"].iloc[pos])])[None]
            held[(pos, method)] = gradcam.masks_for(held["model"], image, method, target=target).masks[0]
        return held[(pos, method)]

    def figure(pos: int, method: str, threshold: float):
        image = np.asarray(cache.images[int(index["index"].iloc[pos])])[None]   # (1, S, S, 3)
        row = index.iloc[pos]
        title = f"{row['city']} → {row['predicted']} ({method})"
        return gradcam_plots.plot_fig2(image, mask_of(pos, method)[None], threshold, [title])

    controls = {
        "pos": w.Dropdown(options=options, value=0, description="image"),
        "method": w.ToggleButtons(options=list(gradcam.METHODS), value=stored, description="method"),
        "threshold": w.FloatSlider(value=result.threshold, min=0.0, max=1.0, step=0.05,
                                   description="threshold", continuous_update=False),
    }
    view = _figure_view(figure, controls, "760px")
    return w.VBox([w.HBox([controls["pos"], controls["method"]]), controls["threshold"], view])


def threshold_panel(histograms: stats.Histograms, planted: dict | None = None) -> w.Widget:
    """A threshold slider over R (the paper's Fig. 5) or lift; each move is a histogram lookup."""
    bins = histograms.cfg.bins

    def figure(k: int, view: str):
        table = histograms.table(k / bins, ci=False)
        fig = (stats_plots.plot_r_histograms if view == "R" else stats_plots.plot_lift)(table, planted)
        fig.suptitle(f"threshold {k / bins:g}", x=0.99, ha="right", fontsize=9)
        return fig

    start = int(round(histograms.cfg.threshold * bins))
    controls = {
        "k": w.IntSlider(value=start, min=0, max=bins, step=1, description=f"threshold ×{bins}",
                         continuous_update=False),
        "view": w.ToggleButtons(options=["R", "lift"], value="R", description="show"),
    }
    view = _figure_view(figure, controls, "900px")
    return w.VBox([w.HBox([controls["k"], controls["view"]]), view])
