"""Interactive panels for JupyterLab (ipywidgets); each redraws its figure when a control moves.

Reads the stage results it is given (Grad-CAM masks, the statistics histograms, the run's
maps) and, for Grad-CAM++ on demand, the run's best checkpoint. Writes nothing. Each panel keeps what it
computed inside its own closure, never at module level. Figures go to the panel as PNG bytes
in an Image widget, not through an Output widget: a headless run (papermill, nbval) then only
records widget state, and no output is captured and synced back to the kernel mid-cell (with
nbclient's Output-widget mimic that exchange could leave the cell waiting forever). Run
headlessly the panels draw once and show their widget repr.
"""
from __future__ import annotations

import dataclasses
import html
import traceback
from pathlib import Path

import ipywidgets as w
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from citylib.data import imagecache
from citylib.explain import cams, saliency
from citylib.figures import gallery, gradcam_plots, plots, reliance_plots, stats_plots
from citylib.nets import checkpoint
from citylib.stages import embed, gradcam
from citylib.stats import histograms


LABELS = {"description_width": "initial"}  # a control's label at its own width, never cut short


def figure_view(make_figure, controls: dict[str, w.ValueWidget], width: str) -> w.Widget:
    """A picture of ``make_figure(**values of controls)``, redrawn when one of them moves.

    A redraw that raises keeps the last picture and shows the traceback in the panel (an HTML
    widget of class ``citylib-error``, empty while all is well): an exception in a widget
    callback would otherwise reach only JupyterLab's log console, never the notebook. The first
    drawing is not guarded: it runs in the cell, whose error the notebook shows.
    """
    view = w.Image(format="png", layout=w.Layout(max_width=width))
    error = w.HTML()
    error.add_class("citylib-error")

    def picture() -> bytes:
        return plots.png(make_figure(**{k: c.value for k, c in controls.items()}))

    def redraw(_=None):
        try:
            view.value = picture()
            error.value = ""
        except Exception:  # shown, not lost: see above
            plt.close("all")
            error.value = ("<pre style='color:#b00;white-space:pre-wrap'>could not redraw:\n"
                           f"{html.escape(traceback.format_exc())}</pre>")

    for control in controls.values():
        control.observe(redraw, names="value")
    view.value = picture()
    return w.VBox([view, error])


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
                held["model"] = checkpoint.load_model(run_dir)[0]
            cities = list(result.meta["cities"])
            target = cities.index(index["target"].iloc[pos])
            image = np.asarray(cache.images[int(index["index"].iloc[pos])])[None]
            held[(pos, method)] = cams.masks_for(held["model"], image, method, target=target).masks[0]
        return held[(pos, method)]

    def figure(pos: int, method: str, threshold: float):
        image = imagecache.full_view(cache, int(index["index"].iloc[pos]))      # (S', S', 3)
        row = index.iloc[pos]
        title = f"{row['city']} → {row['predicted']} ({method})"
        return gradcam_plots.plot_fig2([image], mask_of(pos, method)[None], threshold, [title])

    controls = {
        "pos": w.Dropdown(options=options, value=0, description="image", style=LABELS),
        "method": w.ToggleButtons(options=list(cams.METHODS), value=stored, description="method",
                                   style=LABELS),
        "threshold": w.FloatSlider(value=result.threshold, min=0.0, max=1.0, step=0.05,
                                   description="threshold", readout_format=".2f",
                                   continuous_update=False, style=LABELS),
    }
    view = figure_view(figure, controls, "760px")
    return w.VBox([w.HBox([controls["pos"], controls["method"]]), controls["threshold"], view])


def removal_panel(result, cfg) -> w.Widget:
    """Pick a test image and an object: the image, the object removed and the null region
    filled, with the change of log p(true city) each made (``reliance.run``'s result and
    settings)."""
    images = result.images.reset_index(drop=True)
    order = images.sort_values(["city", "row", "object"], kind="stable").index
    options = [(f"{r.city} · image {r.row} · {r.object} (Δ log p {r.logp_removed - r.logp:+.2f})", int(i))
               for i, r in zip(order, images.loc[order].itertuples())]

    def figure(pos: int):
        return reliance_plots.plot_removals(result.cache, result.labels, images.loc[[pos]], cfg, result.rows)

    controls = {"pos": w.Dropdown(options=options, value=options[0][1], description="image and object",
                                  style=LABELS, layout=w.Layout(width="560px"))}
    return w.VBox([controls["pos"], figure_view(figure, controls, "760px")])


def threshold_panel(hist: histograms.Histograms, planted: dict | None = None) -> w.Widget:
    """A threshold slider over R (the paper's Fig. 5) or lift; each move is a histogram lookup.
    The slider moves over the histograms' bin edges, in [0, 1] as everywhere else."""
    bins = hist.cfg.bins

    def figure(threshold: float, view: str):
        edge = round(threshold * bins) / bins                 # the slider's value, as a bin edge
        table = hist.table(edge, ci=False)
        fig = (stats_plots.plot_r_histograms if view == "R" else stats_plots.plot_lift)(table, planted)
        fig.suptitle(f"threshold {edge:.2f}", x=0.99, ha="right", fontsize=9)
        return fig

    controls = {
        "threshold": w.FloatSlider(value=round(hist.cfg.threshold * bins) / bins, min=0.0,
                                   max=1.0, step=1 / bins, description="threshold",
                                   readout_format=".2f", continuous_update=False, style=LABELS),
        "view": w.ToggleButtons(options=["R", "lift"], value="R", description="show", style=LABELS),
    }
    view = figure_view(figure, controls, "900px")
    return w.VBox([w.HBox([controls["threshold"], controls["view"]]), view])


class Explorer:
    """Notebook panel: a map (method and descriptor chosen) and the image behind one point.

    Maps are read where ``embed.run`` stored them, else computed in memory on first use, and
    kept in ``self.maps`` keyed by (method, descriptor), so switching back costs nothing.
    Display the object itself (or ``.widget``): controls for method, descriptor and colouring,
    a slider choosing the point. Its pictures are PNG images inside the widgets, so it runs
    headless (papermill, nbval) without a display; ``map_figure`` and ``point_figure`` give the
    same pictures as static figures, which an executed notebook keeps.
    """

    def __init__(self, run_dir: str | Path, cache, cfg: embed.EmbedConfig | None = None):
        self.run_dir, self.cache = Path(run_dir), cache
        self.cfg = cfg or embed.EmbedConfig()
        self.result = gradcam.load(self.run_dir)
        self.rows = embed.image_rows(cache, self.result)
        self.colours = gallery.city_colours(list(self.result.meta["cities"]))
        self.maps: dict[tuple[str, str], embed.EmbedResult] = {}
        self._widget = None

    def map(self, method: str | None = None, descriptor: str | None = None) -> embed.EmbedResult:
        """The map for ``method`` and ``descriptor`` (the config's by default)."""
        cfg = dataclasses.replace(self.cfg, method=method or self.cfg.method,
                                  descriptor=descriptor or self.cfg.descriptor)
        if (cfg.method, cfg.descriptor) not in self.maps:
            self.maps[cfg.method, cfg.descriptor] = (
                embed.stored(cfg, self.run_dir, self.result)
                or embed.compute(cfg, self.result, self.cache))
        return self.maps[cfg.method, cfg.descriptor]

    def map_figure(self, method: str | None = None, descriptor: str | None = None,
                   point: int | None = None, hue: str = "city") -> Figure:
        """The map, with ``point`` (a row) marked."""
        emb = self.map(method, descriptor)
        return gallery.map_figure(emb.frame, hue, self.colours, gallery.title(emb), point)

    def point_figure(self, point: int) -> Figure:
        """Image, weighted mask and visual explanation of one row, side by side."""
        fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
        fig.suptitle(self._panels(axes, int(point)), fontsize=9)
        fig.tight_layout()
        return fig

    def examples(self) -> Figure:
        """``point_figure``'s panels for the first test image of each city, one row each."""
        points = self.result.index.reset_index(drop=True).groupby("city", sort=False).head(1).index
        fig, axes = plt.subplots(len(points), 3, figsize=(7.5, 2.8 * len(points)), squeeze=False)
        for row, point in zip(axes, points):
            row[0].set_ylabel(self._panels(row, int(point)).replace("   ", "\n"), fontsize=8)
        fig.tight_layout()
        return fig

    def _panels(self, axes, point: int) -> str:
        """Draw row ``point``'s image, weighted mask and explanation on three ``axes``; its caption."""
        info = self.result.index.iloc[point]
        image = imagecache.full_view(self.cache, int(self.rows[point]))     # (S', S', 3)
        up = saliency.upsample(np.asarray(self.result.masks[[point]]), image.shape[0])[0]
        panels = (("image", image), ("weighted mask", up),
                  (f"explanation (≥ {self.result.threshold:g})",
                   saliency.explanation(image, up, self.result.threshold)))
        for ax, (head, p) in zip(axes, panels):
            ax.imshow(p, **({"cmap": "jet", "vmin": 0, "vmax": 1} if p.ndim == 2 else {}))
            ax.set(xticks=[], yticks=[], title=head)
        prob = info.get(f"prob_{info['predicted']}", float("nan"))
        return (f"row {point}: {info['city']} → {info['predicted']} (p = {prob:.2f})   "
                f"{Path(str(info['path'])).name}")

    @property
    def widget(self):
        """The ipywidgets panel (built on first use)."""
        if self._widget is None:
            self._widget = self._build()
        return self._widget

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _build(self):
        method = w.Dropdown(options=[("t-SNE", "tsne"), ("UMAP", "umap")],
                            value=self.cfg.method, description="method", style=LABELS)
        descriptor = w.Dropdown(options=[("weighted mask", "mask"),
                                         ("visual explanation", "explanation")],
                                value=self.cfg.descriptor, description="descriptor",
                                style=LABELS)
        hue = w.ToggleButtons(options=[("city", "city"), ("correct?", "correct")], value="city")
        point = w.IntSlider(0, 0, max(len(self.result.index) - 1, 0), description="point",
                            continuous_update=False, style=LABELS)
        status = w.Label()

        def draw_map(method_value, descriptor_value, point_value, hue_value):
            status.value = f"computing {method.label} of {descriptor.label}s …"
            fig = self.map_figure(method_value, descriptor_value, point_value, hue_value)
            status.value = gallery.title(self.map(method_value, descriptor_value))
            return fig

        point_img = figure_view(self.point_figure, {"point": point}, "760px")
        map_img = figure_view(draw_map, {"method_value": method, "descriptor_value": descriptor,
                                          "point_value": point, "hue_value": hue}, "640px")
        return w.VBox([w.HBox([method, descriptor, hue]), point, status, map_img, point_img])


def explorer(run_dir: str | Path, cache, cfg: embed.EmbedConfig | None = None) -> Explorer:
    """The notebook panel for a run (see ``Explorer``)."""
    return Explorer(run_dir, cache, cfg)
