"""Stage `synth`: generate a world of synthetic cities whose every pixel is labelled.

Reads a world file (``citylib.world.worldfile``: `citylib/world/worlds/<name>.yaml` or a user's
file): a shared `base` street style, and `cities` that each override a few entries and name their
`planted` cue objects.
Writes, like a photo collection plus ground truth, into `out/`:
  images/<city>/<city>_<spot:04d>_v<view>.jpg   RGB street views
  labels/<city>/<same stem>.png                 ADE20K class index per pixel (0 = unlabelled)
  manifest.csv                                  path, city, group, view, label_path, lat, lon
                                                (each spot on its city's plan: ``place``)
  world.json                                    the resolved config, world and its hash
A spot is one street layout seen from one place; its views are camera headings into it.
"""
from __future__ import annotations

import multiprocessing
import shutil
import signal
import threading
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from citylib.core.artifacts import ResultFolder, atomic_path, code_key, write_csv, write_json
from citylib.core.config import ConfigError, check, config_hash, to_dict
from citylib.world import scene, street
from citylib.world.scene import VOCAB
from citylib.world.worldfile import CUE_FREE, Style, World, load_world


@dataclass(frozen=True)
class SynthConfig:
    world: str = "default"    # built-in name (citylib/worlds/<name>.yaml) or a path to a YAML
    spots_per_city: int = 130
    views: int = 4            # headings per spot, evenly spaced round the camera
    size: int = 128           # square image side, px
    seed: int = 0
    reset: tuple[str, ...] = ()  # a counterfactual world: these planted cues (or "cue-free": all)
    #                              reset to the base style in every city that plants them

    def __post_init__(self):
        check(self, spots_per_city="in [1, 100000]", views="in [1, 36]", size="in [16, 2048]", seed=">= 0")
        if not self.world:
            raise ValueError("'world' must name a world")
        object.__setattr__(self, "reset", tuple(self.reset))
        if CUE_FREE in self.reset and len(self.reset) > 1:
            raise ValueError(f"'reset' = {list(self.reset)}: '{CUE_FREE}' resets everything; name it alone")

    def resets(self, world: "World", city: str):
        """What ``render_spot`` resets in ``city``: CUE_FREE, or the city's cues among ``reset``."""
        if self.reset == (CUE_FREE,):
            return CUE_FREE
        return tuple(o for o, _ in world.planted[city] if o in self.reset)


def _quiet_worker() -> None:
    """A pool worker ends on SIGTERM (the pool's own ``terminate``) without a traceback,
    whatever handler it inherited by fork (the runner's turns SIGTERM into KeyboardInterrupt);
    Ctrl-C is its parent's to handle, which then ends the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_pool(workers: int):
    """A process pool of ``workers`` for rendering: fork where there is one (workers start at
    once and inherit the world), each worker ended quietly by the pool (``_quiet_worker``). The
    workers are forked with SIGTERM's default action, so that one the pool ends before its
    initializer has run (a busy machine) does not raise the parent's KeyboardInterrupt either."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL) if main else None
    try:
        return multiprocessing.get_context(method).Pool(workers, initializer=_quiet_worker)
    finally:
        if main:
            signal.signal(signal.SIGTERM, before)


# ------------------------------------------------------------------ one spot: layout and views
def _colour(style: Style, group: str, rng: np.random.Generator) -> tuple:
    """One colour of palette ``group`` ("#zenith #horizon" gives six numbers), jittered a little.
    Always the same five draws from ``rng``, whatever the palette's length."""
    colours = style.palette[group]
    hexes = colours[min(int(rng.random() * len(colours)), len(colours) - 1)].split()
    j = style.nuisance.color_jitter
    k = rng.uniform(1 - j, 1 + j) * (1 + 0.3 * j * rng.standard_normal(3))
    return tuple(float(c) for h in hexes
                 for c in np.clip(np.array([int(h[i:i + 2], 16) for i in (1, 3, 5)]) / 255 * k, 0, 1))


def _finish(view: dict, rng: np.random.Generator, haze: float, haze_color: tuple,
           gain: float, warmth: float, noise: float) -> np.ndarray:
    """Apply haze (distance), lighting (gain, colour temperature) and sensor noise; uint8 RGB."""
    rgb = view["rgb"]
    fog = 1 - np.exp(-haze * np.where(np.isfinite(view["depth"]), view["depth"], 0.0))
    # Haze also whitens the sky near the horizon, not only distant walls.
    fog = np.where(np.isfinite(view["depth"]), fog, haze * 25 * np.exp(-6 * np.clip(view["elev"], 0, 1)))
    fog = np.clip(fog, 0, 1)[..., None]
    rgb = rgb * (1 - fog) + np.asarray(haze_color) * fog
    rgb = rgb * gain * np.array([1 + warmth, 1.0, 1 - warmth])
    rgb = rgb * 255 + rng.normal(0, noise, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _streams(seed: int, city: str, spot: int):
    """The spot's random streams, each keyed by its name: from the city's name (not its position
    in the file), so that adding a city, a worker process or a view changes nothing else, and
    an element's settings change only that element's draws."""
    def stream(*name) -> np.random.Generator:
        words = [zlib.crc32(str(n).encode()) for n in name]
        return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(city.encode()), spot, *words]))
    return stream


def place(world: World, city: str, spot: int, seed: int = 0) -> dict:
    """Where the spot lies on its city's plan (``Plan``): ``east_m``, ``north_m`` of the plan's
    centre, ``lat``, ``lon``, whether it is in the city's district and the planted cues the
    district takes from it (``dropped``: drawn from the base style, as their counterfactual)."""
    plan = world.plans[city]
    where = _streams(seed, city, spot)("plan")
    east, north = where.uniform(-500, 500, 2) * plan.size_km
    lat, lon = plan.latlon(east, north)
    d = plan.district
    inside = d is not None and np.hypot(east - 1000 * d.centre_km[0], north - 1000 * d.centre_km[1]) < 1000 * d.radius_km
    dropped = tuple(d.cues) if inside and where.random() >= d.keep else ()
    return {"east_m": float(east), "north_m": float(north), "lat": float(lat), "lon": float(lon),
            "district": bool(inside), "dropped": dropped}


def _resets(world: World, city: str, spot: int, seed: int, reset):
    """``reset`` with the cues the spot's district takes from it (unless everything is reset)."""
    if reset == CUE_FREE or world.plans.get(city) is None or world.plans[city].district is None:
        return reset
    dropped = place(world, city, spot, seed)["dropped"]
    return tuple(dict.fromkeys((*reset, *dropped))) if dropped else reset


def layout(world: World, city: str, spot: int, seed: int = 0, reset=(), delete=()) -> dict:
    """The spot's scene (``street.spot``: rects, eye, sky) as ``render_spot`` draws it."""
    style = world.style(city, _resets(world, city, spot, seed, reset))
    return street.spot(style, _streams(seed, city, spot), partial(_colour, style), delete)


def render_spot(world: World, city: str, spot: int, views: int = 4, size: int = 128, seed: int = 0,
                flat: bool = False, reset=(), delete=(), adopt=()) -> list[dict]:
    """Render the views of one spot: dicts of image (S, S, 3) uint8, label (S, S) uint8,
    inst (S, S) instance ids (``street.element_of`` tells their element), heading, pitch and the
    JPEG quality to save it with.

    ``flat`` paints each class in one fixed colour (scene.LUT) with every nuisance off.
    ``reset``: planted objects of the city whose elements take the base style (or CUE_FREE for
    all of them): the counterfactual spot, with everything else drawn identically. ``delete``:
    object kinds (``street.DELETABLE``) drawn as if absent, what lay behind them showing instead.
    ``adopt``: (donor city, planted cue) pairs whose element is drawn as the donor draws it.
    A spot in its city's district (``place``) has the district's cues reset as well.
    """
    style = world.style(city, _resets(world, city, spot, seed, reset), adopt)
    nu, stream = style.nuisance, _streams(seed, city, spot)
    lay = street.spot(style, stream, partial(_colour, style), delete)
    light = stream("light")
    haze, gain, warmth = (float(light.uniform(*r)) for r in (nu.haze, nu.gain, nu.warmth))
    first = 90.0 * int(light.integers(4))
    az, el = light.uniform(0, 2 * np.pi), light.uniform(0.35, 1.1)
    sun = np.array([np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)])
    out = []
    for k in range(views):
        vr = stream("view", k)
        cam = scene.Camera(lay["eye"], first + 360.0 * k / views + vr.uniform(-1, 1) * nu.heading_jitter,
                           float(vr.uniform(*nu.pitch)), nu.fov)
        noise, quality = float(vr.uniform(*nu.noise)), int(vr.integers(nu.jpeg_quality[0], nu.jpeg_quality[1] + 1))
        v = scene.render(lay["rects"], cam, size, lay["sky"], sun, flat=flat)
        if flat:
            image = np.rint(v["rgb"] * 255).astype(np.uint8)
        else:
            image = _finish(v, vr, haze, lay["sky"][1], gain, warmth, noise)
        out.append({"image": image, "label": v["label"], "inst": v["inst"], "heading": cam.heading % 360,
                    "pitch": cam.pitch, "quality": quality})
    return out


# ------------------------------------------------------------------ the stage
class WorldExistsError(FileExistsError, ValueError):
    """``out`` already holds a different generated world."""


def _write_spot(world: World, cfg: SynthConfig, out: Path, task: tuple[str, int]) -> list[tuple]:
    city, spot = task
    rows, at = [], place(world, city, spot, cfg.seed)
    for k, view in enumerate(render_spot(world, city, spot, cfg.views, cfg.size, cfg.seed,
                                         reset=cfg.resets(world, city))):
        stem = f"{city}_{spot:04d}_v{k}"
        img, lab = f"images/{city}/{stem}.jpg", f"labels/{city}/{stem}.png"
        with atomic_path(out / img) as tmp:
            Image.fromarray(view["image"], "RGB").save(tmp, format="JPEG", quality=view["quality"])
        with atomic_path(out / lab) as tmp:
            Image.fromarray(view["label"], "L").save(tmp, format="PNG")
        rows.append((img, city, f"{city}_{spot:04d}", k, lab, f"{at['lat']:.7f}", f"{at['lon']:.7f}"))
    return rows


def world_hash(cfg: SynthConfig, world=None) -> str:
    """What the files of ``cfg``'s world depend on: the generator's code (this module and the
    scene renderer), the settings and the world definition."""
    return config_hash(code_key(__name__), cfg, (world or load_world(cfg.world)).definition)


def run(cfg: SynthConfig, out: str | Path, overwrite: bool = False, workers: int = 2) -> Path:
    """Generate the world of ``cfg`` into ``out`` and return its manifest path.

    An identical finished world in ``out`` is reused. A different one raises WorldExistsError
    unless ``overwrite``. ``workers`` processes share the spots; the files do not depend on it.
    """
    out = Path(out)
    world = load_world(cfg.world)
    unknown = set(cfg.reset) - {CUE_FREE} - {o for cues in world.planted.values() for o, _ in cues}
    if unknown:
        raise ConfigError(f"reset: {', '.join(sorted(unknown))} is no planted cue of world '{cfg.world}' "
                          f"(planted: {', '.join(sorted({o for c in world.planted.values() for o, _ in c}))})")
    chash = world_hash(cfg, world)
    folder = ResultFolder(out, "world", chash)
    if folder.done() is not None:
        return out / "manifest.csv"
    old = (folder.read() or {}).get("key")
    if old not in (None, chash):
        if not overwrite:
            raise WorldExistsError(f"{out} holds a different world (hash {old}, wanted {chash}); "
                                   f"choose another folder or overwrite it (overwrite=True, --overwrite)")
        for sub in ("images", "labels"):
            shutil.rmtree(out / sub, ignore_errors=True)
    # The manifest and world.json go first and come back last: an interrupted run leaves no
    # manifest that points at missing or half-written files.
    folder.begin()
    for name in ("world.json", "manifest.csv"):
        (out / name).unlink(missing_ok=True)
    tasks = [(city, spot) for city in world.styles for spot in range(cfg.spots_per_city)]
    job = partial(_write_spot, world, cfg, out)
    if workers > 1:  # fork where there is one: workers start at once and inherit the world
        with worker_pool(workers) as pool:
            chunks = list(pool.imap(job, tasks, chunksize=4))
    else:
        chunks = [job(t) for t in tasks]
    rows = [r for chunk in chunks for r in chunk]
    write_csv(out / "manifest.csv", pd.DataFrame(rows, columns=["path", "city", "group", "view", "label_path",
                                                                "lat", "lon"]))
    write_json(out / "world.json", {
        "hash": chash, "config": to_dict(cfg), "source": world.source,
        "cities": list(world.styles), "images": len(rows),
        "planted": {c: [{"object": o, "index": VOCAB[o], "why": w} for o, w in p] for c, p in world.planted.items()},
        "undeclared": world.undeclared,
        "plans": {c: to_dict(p) for c, p in world.plans.items()},
        "vocabulary": VOCAB, "world": world.definition,
    })
    folder.commit(["manifest.csv", "world.json", *(p for r in rows for p in (r[0], r[4]))])
    return out / "manifest.csv"
