"""Maps of the places stage: where in each city the network finds a street typical of it.

One column per city, on the city's own local plane (metres east and north of its centre, equal
aspect; no map tiles are downloaded):

1. the test images, coloured by typicality (p of the true city), over a smoothed typicality
   surface: a Gaussian-weighted mean of the images near each cell (bandwidth ``bandwidth_m``,
   default a tenth of the city's extent), blank where fewer than 2 images' weight supports it;
2. how many images stand behind each cell of that surface (the summed weights);
3. each image's top object: the object whose removal lowers p(true city) the most (the reliance
   stage), one colour per object, the six most frequent named.

``plot_objects`` draws the small multiples: per city, one map per strongest object of the
reliance stage, where removing it changes the decision most.

A generated world's districts (``plan.district``: where a planted cue is rare) are outlined in
red dashes on every map of their city: the truth the maps should find.

Reads nothing; ``draw`` writes ``places.png`` and ``places_objects.png`` into the run folder.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from citylib.data import places
from citylib.figures import plots
from citylib.world import worldfile

OTHER = (0.6, 0.6, 0.6, 1.0)      # the objects after the six most frequent


def surface(xy: np.ndarray, values: np.ndarray, bandwidth: float, cells: int = 60, pad: float | None = None):
    """(x edges, y edges, mean (cells, cells), support (cells, cells)): the Gaussian-weighted
    mean of ``values`` at each cell centre and the sum of the weights (the images behind it),
    on a grid ``pad`` (default: the bandwidth) beyond the points."""
    pad = bandwidth if pad is None else pad
    lo, hi = xy.min(0) - pad, xy.max(0) + pad
    xe, ye = np.linspace(lo[0], hi[0], cells + 1), np.linspace(lo[1], hi[1], cells + 1)
    cx, cy = np.meshgrid((xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2)              # (cells, cells)
    d2 = (cx[..., None] - xy[:, 0]) ** 2 + (cy[..., None] - xy[:, 1]) ** 2           # (cells, cells, n)
    w = np.exp(-0.5 * d2 / bandwidth ** 2)
    support = w.sum(-1)
    mean = np.where(support >= 2, (w * values).sum(-1) / np.maximum(support, 1e-12), np.nan)
    return xe, ye, mean, support


def plot_places(table: pd.DataFrame, bandwidth_m: float | None = None, districts: dict | None = None):
    """The three rows of maps (see the module docstring), one column per city; ``districts``
    (city -> (lat, lon, radius in metres)): known districts, outlined on every map of the city."""
    cities = sorted(table["city"].unique())
    fig, axes = plt.subplots(3, len(cities), figsize=(4.2 * len(cities) + 1.5, 12), squeeze=False,
                             layout="constrained")
    named = table.loc[table["top_object"].astype(str) != "", "top_object"].value_counts().index[:6].tolist()
    colours = {o: plt.cm.tab10(i) for i, o in enumerate(named)}
    for k, city in enumerate(cities):
        part = table[table["city"] == city]
        ref = places.centre(part["lat"].to_numpy(float), part["lon"].to_numpy(float))
        xy = places.metres(part["lat"].to_numpy(float), part["lon"].to_numpy(float), ref) / 1000    # km
        span = np.ptp(xy, 0).max()
        bw = bandwidth_m / 1000 if bandwidth_m else max(span / 10, 0.05)     # km; 50 m at least
        # a few places close together are still shown on at least a kilometre of their plan
        xe, ye, mean, support = surface(xy, part["p_true"].to_numpy(float), bw, pad=max(bw, (1 - span) / 2))
        top, mid, low = axes[:, k]
        image = top.pcolormesh(xe, ye, mean, cmap="viridis", vmin=0, vmax=1, alpha=0.55, shading="flat")
        top.scatter(*xy.T, c=part["p_true"], cmap="viridis", vmin=0, vmax=1, s=18, edgecolors="k", linewidths=0.3)
        spots = part["group"].nunique() if "group" in part else len(part)
        top.set_title(f"{city}\ntypicality of {len(part)} test images, {spots} place{'s' * (spots != 1)}")
        counts = mid.pcolormesh(xe, ye, support, cmap="Greys", shading="flat")
        mid.scatter(*xy.T, s=3, c="tab:red")
        mid.set_title(f"images behind the surface\n(Gaussian, {bw:.2g} km wide)")
        fig.colorbar(counts, ax=mid, shrink=0.7)
        kinds = part["top_object"].astype(str).to_numpy()
        groups = {obj: kinds == obj for obj in named}
        groups["other"] = (kinds != "") & ~np.isin(kinds, named)
        for obj, sel in groups.items():
            if sel.any():
                low.scatter(*xy[sel].T, s=16, color=colours.get(obj, OTHER), edgecolors="k", linewidths=0.2)
        low.set_title("the object whose removal\nlowers p(true city) most")
        for ax in (top, mid, low):
            _frame(ax, city, ref, (xe[0], xe[-1], ye[0], ye[-1]), districts)
    fig.colorbar(image, ax=axes[0, :].tolist(), shrink=0.7, label="p(true city)")
    if named:
        handles = [plt.Line2D([], [], marker="o", ls="", color=colours.get(o, OTHER), label=o)
                   for o in [*named, "other"]]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(7, len(handles)), frameon=False)
    return fig


def _frame(ax, city: str, ref, limits, districts: dict | None) -> None:
    """A map's frame: equal aspect in km, the city's known district outlined."""
    if districts and city in districts:
        lat, lon, radius = districts[city]
        c = places.metres([lat], [lon], ref)[0] / 1000
        ax.add_patch(plt.Circle(c, radius / 1000, fill=False, ls="--", lw=1.2, color="crimson"))
    ax.set_aspect("equal")
    ax.set_xlim(*limits[:2])
    ax.set_ylim(*limits[2:])
    ax.set_xlabel("km east")
    ax.set_ylabel("km north")


def plot_objects(table: pd.DataFrame, objects: pd.DataFrame, districts: dict | None = None):
    """Small multiples, one row per city and one map per strongest object (``objects``: the
    places stage's ``places_objects.csv``): each test image the object was removed from, coloured
    by the change in log p(true city) (red: removal lowers it), ringed where the removal turned a
    right decision wrong; the city's other test images in grey."""
    cities = sorted(objects["city"].unique())
    cols = int(objects["rank"].max())
    fig, axes = plt.subplots(len(cities), cols, figsize=(4.2 * cols + 1.5, 4.2 * len(cities)), squeeze=False,
                             layout="constrained")
    limit = max(0.5, float(np.quantile(np.abs(objects["effect"]), 0.98)))
    image = None
    for i, city in enumerate(cities):
        part = table[table["city"] == city]
        ref = places.centre(part["lat"].to_numpy(float), part["lon"].to_numpy(float))
        xy = places.metres(part["lat"].to_numpy(float), part["lon"].to_numpy(float), ref) / 1000
        pad = max(0.05, (1 - np.ptp(xy, 0).max()) / 2)
        limits = (xy[:, 0].min() - pad, xy[:, 0].max() + pad, xy[:, 1].min() - pad, xy[:, 1].max() + pad)
        mine = objects[objects["city"] == city]
        for j in range(cols):
            ax = axes[i, j]
            obj = mine[mine["rank"] == j + 1]
            if obj.empty:
                ax.axis("off")
                continue
            ax.scatter(*xy.T, s=4, color="0.8")
            oxy = places.metres(obj["lat"].to_numpy(float), obj["lon"].to_numpy(float), ref) / 1000
            image = ax.scatter(*oxy.T, c=obj["effect"], cmap="RdBu", vmin=-limit, vmax=limit, s=18,
                               edgecolors=np.where(obj["flipped"].astype(bool), "k", "none"), linewidths=1.0)
            name = obj["object"].iloc[0]
            ax.set_title(f"{city}: {name} removed\n{len(obj)} images, mean change {obj['effect'].mean():+.2f}, "
                         f"{int(obj['flipped'].astype(bool).sum())} turned wrong")
            _frame(ax, city, ref, limits, districts)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="change in log p(true city) on removal")
    return fig


def world_districts(data_cfg) -> dict:
    """City -> (lat, lon, radius m) of the districts of a generated world's plans (none elsewhere)."""
    if data_cfg.source != "world":
        return {}
    out = {}
    for city, plan in worldfile.load_world(data_cfg.world.world).plans.items():
        if plan.district is not None:
            lat, lon = plan.latlon(*(1000 * v for v in plan.district.centre_km))
            out[city] = (lat, lon, 1000 * plan.district.radius_km)
    return out


def draw(run, result) -> dict[str, Path]:
    """The places stage's figure: ``places.png`` (a generated world's districts outlined)."""
    if result is None or result.table.empty:
        return {}
    districts = world_districts(run.cfg.data)
    fig = plot_places(result.table, districts=districts)
    out = {"places": plots.save(fig, Path(run.dir) / "places.png")}
    plt.close(fig)
    if not result.objects.empty:
        fig = plot_objects(result.table, result.objects, districts)
        out["places_objects"] = plots.save(fig, Path(run.dir) / "places_objects.png")
        plt.close(fig)
    return out
