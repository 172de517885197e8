"""Stage `synth`: generate a world of synthetic cities whose every pixel is labelled.

Reads a world YAML (`citylib/worlds/<name>.yaml` or a user's file): a shared `base` street
style, and `cities` that each override a few entries and name their `planted` cue objects.
Writes, like a photo collection plus ground truth, into `out/`:
  images/<city>/<city>_<spot:04d>_v<view>.jpg   RGB street views
  labels/<city>/<same stem>.png                 ADE20K class index per pixel (0 = unlabelled)
  manifest.csv                                  path, city, group, view, label_path
  world.json                                    the resolved config, world and its hash
A spot is one street layout seen from one place; its views are camera headings into it.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import re
import shutil
import signal
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from citylib.world import scene
from citylib.core.artifacts import ResultFolder, atomic_path, code_key, write_csv, write_json
from citylib.core.config import ConfigError, check, config_hash, from_dict, load_yaml, to_dict
from citylib.core.paths import WORLDS
from citylib.world.scene import VOCAB

Range = tuple[float, float]


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


# ------------------------------------------------------------------ the world YAML's schema
class _Checked:
    """Range fields must read [low, high]; `*_prob` and `*_share` fields must be probabilities."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("Range", "tuple[int, int]") and v[0] > v[1]:
                raise ValueError(f"'{f.name}' = {list(v)} must be [low, high]")
            if f.name.endswith(("_prob", "_share")) and not 0 <= v <= 1:
                raise ValueError(f"'{f.name}' = {v} must be a probability")


@dataclass(frozen=True)
class Street(_Checked):
    road_half_width: Range
    sidewalk: Range           # width, per side
    length: Range             # half length: the street ends in a cross wall at +-length
    verge_prob: float         # chance a side has a strip of open ground along the kerb
    open_ground: dict[str, float]  # ground class of verges and open lots -> weight
    camera_height: Range
    camera_offset: Range      # across the street, from its centre line

    def __post_init__(self):
        super().__post_init__()
        bad = set(self.open_ground) - {"sidewalk", "road", "grass", "earth"}
        if bad or not sum(self.open_ground.values()) > 0:
            raise ValueError(f"'open_ground' needs positive weights of sidewalk/road/grass/earth, got {bad or 0}")


@dataclass(frozen=True)
class Nuisance(_Checked):
    """Things that vary within every city alike and must not identify one."""
    fov: float                # horizontal, degrees
    heading_jitter: float     # degrees, each view
    pitch: Range              # degrees up
    gain: Range               # global brightness (time of day)
    warmth: Range             # colour temperature: + warms (red up, blue down)
    haze: Range               # extinction per metre
    noise: Range              # sensor noise sigma, 0-255 scale
    jpeg_quality: tuple[int, int]
    color_jitter: float       # per-instance spread around palette colours

    def __post_init__(self):
        super().__post_init__()
        if not 10 <= self.fov <= 150:
            raise ValueError(f"'fov' = {self.fov} must be in [10, 150]")
        if not (1 <= self.jpeg_quality[0] and self.jpeg_quality[1] <= 100):
            raise ValueError(f"'jpeg_quality' = {list(self.jpeg_quality)} must be within [1, 100]")


@dataclass(frozen=True)
class Buildings(_Checked):
    height: Range             # front row (low-rise along the sidewalk)
    width: Range
    floor_height: Range
    window_spacing: Range
    lot_prob: float           # chance a front plot is an open lot
    tower_setback: Range      # back row of towers, behind the front row
    tower_height: Range
    tower_width: Range
    tower_gap: Range
    skyscraper_prob: float    # chance a spot's towers include glass skyscrapers ...
    skyscraper_share: float   # ... and the share of its towers that are


@dataclass(frozen=True)
class Thing(_Checked):
    spot_prob: float          # chance a spot has any
    count: tuple[int, int]    # how many it then has (inclusive)
    size: Range               # metres: height; length for car, fence, signboard, awning
    spread: float             # placed within +-spread m of the camera along the street
    palette: str              # palette group its colours come from


@dataclass(frozen=True)
class Things:
    car: Thing
    person: Thing
    tree: Thing
    plant: Thing
    pole: Thing
    streetlight: Thing
    traffic_light: Thing
    signboard: Thing
    awning: Thing
    fence: Thing


@dataclass(frozen=True)
class Style:
    palette: dict[str, tuple[str, ...]]  # group -> "#rrggbb" colours ("#zenith #horizon" for sky)
    street: Street
    nuisance: Nuisance
    buildings: Buildings
    objects: Things

    def __post_init__(self):
        need = {"sky", "facade", "window", "road", "sidewalk", "grass", "earth", "foliage", "bark",
                "metal", "skin", "paint", "lamp"} | {getattr(self.objects, f.name).palette
                                                      for f in dataclasses.fields(Things)}
        if need - set(self.palette):
            raise ValueError(f"'palette' lacks group(s) {sorted(need - set(self.palette))}")
        for group, colours in self.palette.items():
            n = 2 if group == "sky" else 1  # sky colours come as "#zenith #horizon"
            if not colours or any(len(c.split()) != n or not all(re.fullmatch(r"#[0-9a-fA-F]{6}", h)
                                                               for h in c.split()) for c in colours):
                raise ValueError(f"'palette.{group}' = {list(colours)} must list '#rrggbb' colours ({n} each)")


# What a planted object's counterfactual resets: the style entries of its element.
_OPEN_GROUND = (("street", "open_ground"), ("street", "verge_prob"))
ELEMENT_KEYS = {
    **{kind.replace("_", " "): (("objects", kind),) for kind in scene.OBJECT_KINDS},
    "skyscraper": (("buildings", "skyscraper_prob"), ("buildings", "skyscraper_share")),
    **{name: _OPEN_GROUND for name in ("earth", "grass", "sidewalk", "road")},
}
CUE_FREE = "cue-free"   # the counterfactual with every element of the city reset to base


@dataclass(frozen=True)
class World:
    name: str
    source: str
    definition: dict          # base and cities as written (after `extends`), for world.json
    styles: dict              # city -> Style
    planted: dict             # city -> tuple of (ADE20K name, why)
    undeclared: dict = dataclasses.field(default_factory=dict)  # city -> overridden entries no cue owns

    def style(self, city: str, reset=()) -> "Style":
        """The city's style with the elements of the planted objects in ``reset`` back to the
        base style (CUE_FREE: every entry of the city, the base style itself)."""
        if not reset:
            return self.styles[city]
        over = {k: v for k, v in (self.definition["cities"][city] or {}).items() if k != "planted"}
        if reset == CUE_FREE:
            over = {}
        for name in (reset if reset != CUE_FREE else ()):
            if name not in dict(self.planted[city]):
                raise ValueError(f"{city}: {name!r} is not one of its planted cues "
                                 f"({', '.join(o for o, _ in self.planted[city]) or 'none'})")
            for section, entry in ELEMENT_KEYS[name]:
                over = {**over, section: {k: v for k, v in (over.get(section) or {}).items() if k != entry}}
        return from_dict(Style, _merge(self.definition["base"], over), where=f"{self.source} (cities.{city})")


def _quiet_worker() -> None:
    """A pool worker ends on SIGTERM (the pool's own ``terminate``) without a traceback,
    whatever handler it inherited by fork (the runner's turns SIGTERM into KeyboardInterrupt);
    Ctrl-C is its parent's to handle, which then ends the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_pool(workers: int):
    """A process pool of ``workers`` for rendering: fork where there is one (workers start at
    once and inherit the world), each worker ended quietly by the pool (``_quiet_worker``)."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    return multiprocessing.get_context(method).Pool(workers, initializer=_quiet_worker)


def _undeclared(over: dict, cues) -> list[str]:
    """The entries a city overrides that none of its planted cues' elements owns."""
    owned = {key for name, _ in cues for key in ELEMENT_KEYS[name]}
    return [f"{section}.{entry}" if isinstance(value, dict) else section
            for section, value in over.items() if section != "planted"
            for entry in (value if isinstance(value, dict) else [None])
            if (section, entry) not in owned]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _world_path(world: str) -> Path:
    p = Path(world).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return p.resolve()
    return WORLDS / f"{world}.yaml"


def _read_world(world: str) -> tuple[Path, dict]:
    path = _world_path(world)
    if not path.is_file():
        raise ConfigError(f"world '{world}': no file {path}")
    raw = load_yaml(path.read_text(), str(path)) or {}
    unknown = sorted(set(raw) - {"description", "extends", "base", "cities"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: base, cities, description, extends")
    if "extends" in raw:  # a world may start from another world's base
        raw = {**raw, "base": _merge(_read_world(raw["extends"])[1]["base"], raw.get("base") or {})}
    return path, raw


def load_world(world: str) -> World:
    """Read and check a world YAML; unknown keys anywhere raise ConfigError naming key and file.

    A planted object must be one the generator can reset (ELEMENT_KEYS): an object kind, the
    skyscraper or an open-ground class. ``undeclared`` lists what a city overrides beyond its
    cues' elements: differences a network can use that the ground truth does not name.
    """
    path, raw = _read_world(world)
    cities, styles, planted, undeclared = raw.get("cities") or {}, {}, {}, {}
    if not isinstance(cities, dict) or not cities:
        raise ConfigError(f"{path}: 'cities' must map at least one city name to its settings")
    for city, over in cities.items():
        city, where = str(city), f"{path} (cities.{city})"
        if not re.fullmatch(r"[A-Za-z0-9_]+", city):
            raise ConfigError(f"{where}: city names use letters, digits and '_' only")
        over = dict(over or {})
        cues = []
        for i, cue in enumerate(over.pop("planted", None) or []):
            if not isinstance(cue, dict) or set(cue) - {"object", "why"} or cue.get("object") not in ELEMENT_KEYS:
                raise ConfigError(f"{where}: 'planted[{i}]' = {cue!r} must be {{object: <one of "
                                  f"{', '.join(sorted(ELEMENT_KEYS))}>, why: ...}}")
            cues.append((cue["object"], str(cue.get("why", ""))))
        styles[city] = from_dict(Style, _merge(raw.get("base") or {}, over), where=where)
        planted[city] = tuple(cues)
        undeclared[city] = _undeclared(over, cues)
    definition = {"description": raw.get("description", ""), "base": raw.get("base") or {},
                  "cities": {str(c): v for c, v in cities.items()}}
    return World(path.stem, str(path), definition, styles, planted, undeclared)


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


def layout(world: World, city: str, spot: int, seed: int = 0, reset=()) -> dict:
    """The spot's scene (``scene.spot``: rects, eye, sky) as ``render_spot`` draws it."""
    style = world.style(city, reset)
    return scene.spot(style, _streams(seed, city, spot), partial(_colour, style))


def render_spot(world: World, city: str, spot: int, views: int = 4, size: int = 128, seed: int = 0,
                flat: bool = False, reset=()) -> list[dict]:
    """Render the views of one spot: dicts of image (S, S, 3) uint8, label (S, S) uint8,
    inst (S, S) instance ids (``scene.element_of`` tells their element), heading, pitch and the
    JPEG quality to save it with.

    ``flat`` paints each class in one fixed colour (scene.LUT) with every nuisance off.
    ``reset``: planted objects of the city whose elements take the base style (or CUE_FREE for
    all of them): the counterfactual spot, with everything else drawn identically.
    """
    style = world.style(city, reset)
    nu, stream = style.nuisance, _streams(seed, city, spot)
    lay = scene.spot(style, stream, partial(_colour, style))
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
    rows = []
    for k, view in enumerate(render_spot(world, city, spot, cfg.views, cfg.size, cfg.seed,
                                         reset=cfg.resets(world, city))):
        stem = f"{city}_{spot:04d}_v{k}"
        img, lab = f"images/{city}/{stem}.jpg", f"labels/{city}/{stem}.png"
        with atomic_path(out / img) as tmp:
            Image.fromarray(view["image"], "RGB").save(tmp, format="JPEG", quality=view["quality"])
        with atomic_path(out / lab) as tmp:
            Image.fromarray(view["label"], "L").save(tmp, format="PNG")
        rows.append((img, city, f"{city}_{spot:04d}", k, lab))
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
    write_csv(out / "manifest.csv", pd.DataFrame(rows, columns=["path", "city", "group", "view", "label_path"]))
    write_json(out / "world.json", {
        "hash": chash, "config": to_dict(cfg), "source": world.source,
        "cities": list(world.styles), "images": len(rows),
        "planted": {c: [{"object": o, "index": VOCAB[o], "why": w} for o, w in p] for c, p in world.planted.items()},
        "undeclared": world.undeclared,
        "vocabulary": VOCAB, "world": world.definition,
    })
    folder.commit(["manifest.csv", "world.json", *(p for r in rows for p in (r[0], r[4]))])
    return out / "manifest.csv"
