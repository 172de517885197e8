"""Pictures of the embedding: maps and explanation galleries (the paper's Figs. 3 and 4).

Reads a map (``embed.EmbedResult``), the Grad-CAM masks behind it and the cached test images.
Writes, through ``figures`` (``draw``: the embedding stage's figures), into the folder it is given:
``map_city.png`` and ``map_correct.png`` (the map coloured by true city / by correct
prediction), ``gallery.png`` (``gallery_tiles`` visual explanations at their map positions,
framed in their city's colour) and ``gallery_<city>.png`` (the same for each city's points).

A gallery is composed as one uint8 array, not drawn by matplotlib: the map's bounding box is
laid on a grid of ``gallery_fill`` cells per tile, each tile goes to its point's cell or, if
that is taken, to the nearest free one (``place_tiles``), and the canvas is saved as a PNG
marked 300 dpi (64 px tiles: ~5 mm each in print).

Draws only: the notebook panel that browses the maps is ``widgets.Explorer``. Figures returned
to a notebook are pyplot figures, like ``citylib.plots``'; those saved here are closed.
"""
from __future__ import annotations

import base64
import html
import math
import re
import shutil
from pathlib import Path

# seaborn is imported inside the functions that draw with it: it brings scipy.stats, a second
# of every notebook kernel's start that the other notebooks need not pay.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from citylib.core.artifacts import atomic_path
from citylib.data import dataset
from citylib.explain import saliency
from citylib.figures import plots
from citylib.stages import embed, gradcam

DPI = 300
WHITE = 255


def place_tiles(xy: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Grid cells (n, 2) int (row, col) for points xy (n, 2), no two in one cell.

    The points' bounding box is laid on the cell centres (x: columns left to right; y: rows
    from the bottom up, so the map keeps its orientation) and each point snaps to the nearest
    centre. Points claim cells in order of their distance to that centre (ties: lower index
    first); a point whose cell is taken goes to the nearest free cell (ties: row-major first).
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    rows, cols = map(int, grid)
    n = len(xy)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid {grid}: rows and cols must be >= 1")
    if n > rows * cols:
        raise ValueError(f"{n} tiles do not fit a {rows} x {cols} grid ({rows * cols} cells); "
                         "use a larger grid or fewer tiles")
    if not np.isfinite(xy).all():
        raise ValueError("tile positions must be finite")
    out = np.zeros((n, 2), np.int64)
    if n == 0:
        return out
    lo, span = xy.min(0), np.ptp(xy, 0)
    u = np.where(span > 0, (xy - lo) / np.where(span > 0, span, 1), 0.5)       # (n, 2) in [0, 1]
    pos = np.stack([(1 - u[:, 1]) * (rows - 1), u[:, 0] * (cols - 1)], 1)    # (n, 2) row, col
    snap = np.rint(pos).astype(np.int64)
    order = np.lexsort((np.arange(n), ((pos - snap) ** 2).sum(1)))
    taken = np.zeros(rows * cols, bool)
    centres = np.indices((rows, cols)).reshape(2, -1).T                      # (R*C, 2)
    for i in order:
        cell = snap[i, 0] * cols + snap[i, 1]
        if taken[cell]:
            free = np.flatnonzero(~taken)
            cell = free[np.argmin(((centres[free] - pos[i]) ** 2).sum(1))]   # first = row-major
        taken[cell] = True
        out[i] = divmod(int(cell), cols)
    return out


def grid_shape(xy: np.ndarray, n: int, fill: float = 2.0) -> tuple[int, int]:
    """(rows, cols) with >= max(n, fill * n) cells, shaped like the points' bounding box."""
    span = np.ptp(np.asarray(xy, np.float64).reshape(-1, 2), 0) if len(xy) else np.ones(2)
    aspect = float(np.clip(span[1] / span[0], 0.5, 2.0)) if span.min() > 0 else 1.0
    cells = max(n, math.ceil(fill * n), 1)
    cols = max(1, math.ceil(math.sqrt(cells / aspect)))
    return math.ceil(cells / cols), cols


def explanation_tiles(images: np.ndarray, masks: np.ndarray, threshold: float, px: int,
                      rows: np.ndarray | None = None, batch: int = 64) -> np.ndarray:
    """Visual explanations of ``images[rows[i]]`` with ``masks[i]`` as (n, px, px, 3) uint8."""
    out = np.empty((len(masks), px, px, 3), np.uint8)
    for sl, x in saliency.explanation_batches(images, masks, threshold, rows, batch):
        small = F.interpolate(x, size=(px, px), mode="bilinear", antialias=True,
                              align_corners=False)                           # (B, 3, px, px)
        out[sl] = small.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def canvas(tiles: np.ndarray, cells: np.ndarray, grid: tuple[int, int],
           frames: np.ndarray | None = None, pad: int = 1) -> np.ndarray:
    """Tiles (n, t, t, 3) uint8 at their cells (n, 2) on a white (R*c, C*c, 3) canvas.

    c = t + 2 * pad (white between tiles); ``frames`` (n, 3) uint8 paints a 2 px frame of
    that colour over each tile's edge.
    """
    t = tiles.shape[1]
    c = t + 2 * pad
    rows, cols = grid
    out = np.full((rows * c, cols * c, 3), WHITE, np.uint8)
    tiles = tiles.copy()
    if frames is not None:
        b = min(2, t // 4)
        edge = np.ones((t, t), bool)
        edge[b:t - b, b:t - b] = False
        tiles[:, edge] = np.asarray(frames, np.uint8)[:, None, :]
    for (r, col), tile in zip(cells, tiles):
        out[r * c + pad:r * c + pad + t, col * c + pad:col * c + pad + t] = tile
    return out


def legend_strip(width: int, labels: list[str], colours: np.ndarray,
                 height: int = 48) -> np.ndarray:
    """A white (height, width, 3) uint8 strip: a colour square and the label per entry."""
    im = Image.new("RGB", (width, height), (WHITE,) * 3)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=height // 2)
    x, box = height // 3, height // 2
    for label, colour in zip(labels, colours):
        draw.rectangle([x, (height - box) // 2, x + box, (height + box) // 2],
                       fill=tuple(int(v) for v in colour))
        x += box + box // 3
        draw.text((x, height // 2), label, fill=(0, 0, 0), font=font, anchor="lm")
        x += int(draw.textlength(label, font=font)) + box
    return np.asarray(im)


def save_png(array: np.ndarray, path: str | Path, dpi: int = DPI) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG marked ``dpi``, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", dpi=(dpi, dpi))
    return Path(path)


def city_colours(cities) -> dict[str, np.ndarray]:
    """A fixed colour per city (in the given order), shared by the maps and galleries."""
    import seaborn as sns
    palette = sns.color_palette("colorblind" if len(cities) <= 10 else "husl", len(cities))
    return {c: np.round(np.asarray(rgb) * 255).astype(np.uint8) for c, rgb in zip(cities, palette)}


def gallery(xy: np.ndarray, tiles: np.ndarray, fill: float = 2.0,
            frames: np.ndarray | None = None) -> np.ndarray:
    """The canvas of tiles (n, t, t, 3) placed at their map positions xy (n, 2), no overlap."""
    grid = grid_shape(xy, len(tiles), fill)
    return canvas(tiles, place_tiles(xy, grid), grid, frames)


def map_figure(frame: pd.DataFrame, hue: str = "city", colours: dict | None = None,
               title: str = "", highlight: int | None = None) -> Figure:
    """The map (columns x, y) coloured by "city" or by "correct"; ``highlight``: a row to mark."""
    import seaborn as sns
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    size = float(np.clip(4000 / max(len(frame), 1), 2, 30))
    if hue == "correct":
        data = frame.assign(prediction=np.where(frame["correct"].astype(bool), "correct", "wrong"))
        data = data.sort_values("prediction", kind="stable")   # wrong ones drawn on top
        sns.scatterplot(data=data, x="x", y="y", hue="prediction", hue_order=["correct", "wrong"],
                        palette={"correct": "#b0b0b0", "wrong": "#d62728"}, s=size,
                        linewidth=0, ax=ax)
    else:
        colours = colours or city_colours(sorted(frame["city"].unique()))
        sns.scatterplot(data=frame, x="x", y="y", hue="city", hue_order=list(colours),
                        palette={c: v / 255 for c, v in colours.items()}, s=size, alpha=0.8,
                        linewidth=0, ax=ax)
    if highlight is not None:
        row = frame.iloc[int(highlight)]
        ax.scatter([row["x"]], [row["y"]], s=220, marker="*", c="gold", edgecolors="black",
                   linewidths=1, zorder=5)
    ax.set(xticks=[], yticks=[], xlabel="", ylabel="", title=title)
    ax.legend(loc="best", fontsize=8, markerscale=1.5, frameon=True)
    fig.tight_layout()
    return fig


def title(emb: embed.EmbedResult) -> str:
    """'t-SNE of masks: kNN city agreement 0.91 (shuffled 0.35)' for a map."""
    s, knn = emb.summary, emb.summary["knn_2d"]
    name = {"tsne": "t-SNE", "umap": "UMAP"}[s["method"]]
    chance = "" if knn["baseline_mean"] is None else f" (shuffled {knn['baseline_mean']:.2f})"
    return f"{name} of {s['descriptor']}s, n = {s['n']}: {knn['k']}-NN city agreement " \
           f"{knn['observed']:.2f}{chance}"


def figures(emb: embed.EmbedResult, result: gradcam.GradCAMResult, images: np.ndarray,
            rows: np.ndarray, cfg: embed.EmbedConfig, folder: str | Path) -> dict[str, Path]:
    """Write the maps and galleries of ``emb`` into ``folder``; name -> path."""
    folder = Path(folder)
    colours = city_colours(list(result.meta["cities"]))
    out = {}
    for hue in ("city", "correct"):
        fig = map_figure(emb.frame, hue, colours, title(emb))
        out[f"map_{hue}"] = plots.save(fig, folder / f"map_{hue}.png", dpi=150)
        plt.close(fig)           # saved, not shown: a notebook would display it at cell end
    cities = emb.frame["city"].to_numpy()
    groups = [("gallery", np.arange(len(cities)))] + [
        (f"gallery_{_slug(c)}", np.flatnonzero(cities == c)) for c in colours]
    for k, (name, members) in enumerate(groups):
        if len(members) == 0:
            continue
        rng = np.random.default_rng((cfg.seed, k))     # one stream per gallery: independent
        pick = np.sort(rng.choice(members, min(cfg.gallery_tiles, len(members)), replace=False))
        frames = np.stack([colours[c] for c in cities[pick]])                # (n, 3)
        tiles = explanation_tiles(images, result.masks[pick], result.threshold,
                                  cfg.tile_px - 2, rows[pick])
        art = gallery(emb.xy[pick], tiles, cfg.gallery_fill, frames)
        if k == 0 and len(colours) > 1:
            present = [c for c in colours if (cities == c).any()]
            art = np.concatenate([art, legend_strip(art.shape[1], present,
                                                    np.stack([colours[c] for c in present]))])
        out[name] = save_png(art, folder / f"{name}.png")
    return out


def draw(run, emb: embed.EmbedResult) -> dict[str, Path]:
    """The embedding stage's figures (``draw_into``) for a run (``pipeline.Run``), with the
    images of its current data snapshot."""
    return draw_into(run.dir, run.cfg.embed, emb, dataset.load(run.cfg.data, run.data_dir))


def draw_into(run_dir: str | Path, cfg: embed.EmbedConfig, emb: embed.EmbedResult, cache) -> dict[str, Path]:
    """``figures`` of the run's map into ``<run>/embedding/<method>_<descriptor>/``, each copied to
    the run folder (``gallery.png``, ``map_city.png``, ...; another map's city galleries there are
    removed). Returns name -> path in the run folder."""
    run_dir = Path(run_dir)
    result = gradcam.load(run_dir)
    made = figures(emb, result, cache.images, embed.image_rows(cache, result), cfg, run_dir / embed.FOLDER / cfg.tag)
    for old in run_dir.glob("gallery_*.png"):
        if old.stem not in made:
            old.unlink(missing_ok=True)
    published = {}
    for name, src in made.items():
        with atomic_path(run_dir / f"{name}.png") as tmp:
            shutil.copyfile(src, tmp)
        published[name] = run_dir / f"{name}.png"
    return published


def city_galleries(emb: embed.EmbedResult, width: int = 600):
    """The per-city galleries that ``figures`` wrote, one under another, each under its city's
    name: one notebook output (an HTML block with the PNGs inside, so a saved notebook keeps them)."""
    from IPython.display import HTML

    parts = [f"<figure><figcaption>{html.escape(name.removeprefix('gallery_'))}</figcaption>"
             f"<img width='{width}' src='data:image/png;base64,"
             f"{base64.b64encode(Path(path).read_bytes()).decode()}'></figure>"
             for name, path in sorted(emb.figures.items()) if name.startswith("gallery_")]
    return HTML("".join(parts) or "<p>no per-city gallery</p>")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "_"
