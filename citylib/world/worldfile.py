"""The world file: a declarative street style per city (``citylib/world/worlds/<name>.yaml`` or a
user's file). A shared ``base`` style, and ``cities`` that each override a few entries and name
their ``planted`` cue objects; anything else a city overrides is listed as ``undeclared``.

``load_world`` reads, checks and resolves one into a ``World`` (each city's ``Style``, the
planted cues and the counterfactual styles: a cue's element reset to the base, or ``CUE_FREE``:
every element) and each city's ``Plan``: where its spots lie (a square around a centre, by
default a made-up place) and, optionally, a ``district`` where some of its planted cues are rare,
the ground truth for the places maps. Reads the YAML file; writes nothing.
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from citylib.core.config import ConfigError, from_dict, load_yaml
from citylib.core.paths import WORLDS
from citylib.world import street

Range = tuple[float, float]
EARTH_RADIUS_M = 6_371_008.8          # the mean Earth radius (IUGG), for plans and places


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


@dataclass(frozen=True)
class District:
    """Part of a city's plan where its planted ``cues`` are rare: a spot within ``radius_km`` of
    ``centre_km`` (km east and north of the plan's centre) shows them with chance ``keep``, else
    draws their elements from the base style, as the cue's counterfactual does."""
    cues: tuple[str, ...]
    centre_km: tuple[float, float] = (0.0, 0.0)
    radius_km: float = 0.8
    keep: float = 0.1

    def __post_init__(self):
        if not self.cues or not self.radius_km > 0 or not 0 <= self.keep <= 1:
            raise ValueError(f"'district' needs cues, radius_km > 0 and keep in [0, 1]; got {self}")


@dataclass(frozen=True)
class Plan:
    """Where a city's spots lie: uniformly over a square ``size_km`` wide centred on ``centre``
    (lat, lon; default a made-up place derived from the city's name, on no real map)."""
    centre: tuple[float, float] | None = None
    size_km: float = 3.0
    district: District | None = None

    def latlon(self, east_m: float, north_m: float) -> tuple[float, float]:
        """(lat, lon) of a point ``east_m``, ``north_m`` from the plan's centre (the local plane
        the plan is drawn on; longitudes wrap at +-180)."""
        lat0, lon0 = self.centre
        lat = lat0 + math.degrees(north_m / EARTH_RADIUS_M)
        lon = lon0 + math.degrees(east_m / (EARTH_RADIUS_M * math.cos(math.radians(lat0))))
        return lat, (lon + 180) % 360 - 180

    def __post_init__(self):
        if not self.size_km > 0:
            raise ValueError(f"'size_km' = {self.size_km} must be > 0")
        if self.centre is not None and not (-80 <= self.centre[0] <= 80 and -180 <= self.centre[1] <= 180):
            raise ValueError(f"'centre' = {list(self.centre)} must be [lat, lon] with |lat| <= 80")


def made_up_centre(city: str) -> tuple[float, float]:
    """A city plan's default centre: a made-up place, fixed by the city's name (lat 40-60, lon -10-30)."""
    h = zlib.crc32(city.encode())
    return 40 + (h % 2001) / 100, -10 + (h // 2001 % 4001) / 100


# What a planted object's counterfactual resets: the style entries of its element.
_OPEN_GROUND = (("street", "open_ground"), ("street", "verge_prob"))


ELEMENT_KEYS = {
    **{kind.replace("_", " "): (("objects", kind),) for kind in street.OBJECT_KINDS},
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
    plans: dict = dataclasses.field(default_factory=dict)       # city -> Plan (where its spots lie)

    def style(self, city: str, reset=(), adopt=()) -> "Style":
        """The city's style with the elements of the planted objects in ``reset`` back to the
        base style (CUE_FREE: every entry of the city, the base style itself), and with the
        element of each (donor city, planted cue) of ``adopt`` as the donor draws it: another
        city's cue added to this one (sufficiency)."""
        if not reset and not adopt:
            return self.styles[city]
        over = {k: v for k, v in (self.definition["cities"][city] or {}).items() if k not in ("planted", "plan")}
        if reset == CUE_FREE:
            over = {}
        for name in (reset if reset != CUE_FREE else ()):
            if name not in dict(self.planted[city]):
                raise ValueError(f"{city}: {name!r} is not one of its planted cues "
                                 f"({', '.join(o for o, _ in self.planted[city]) or 'none'})")
            for section, entry in ELEMENT_KEYS[name]:
                over = {**over, section: {k: v for k, v in (over.get(section) or {}).items() if k != entry}}
        for donor, name in adopt:
            if name not in dict(self.planted.get(donor, ())):
                raise ValueError(f"adopt: {name!r} is not a planted cue of {donor!r}")
            theirs = self.definition["cities"][donor] or {}
            for section, entry in ELEMENT_KEYS[name]:
                mine = {k: v for k, v in (over.get(section) or {}).items() if k != entry}
                if entry in (theirs.get(section) or {}):
                    mine[entry] = theirs[section][entry]
                over = {**over, section: mine}
        return from_dict(Style, _merge(self.definition["base"], over), where=f"{self.source} (cities.{city})")


def _undeclared(over: dict, cues) -> list[str]:
    """The entries a city overrides that none of its planted cues' elements owns."""
    owned = {key for name, _ in cues for key in ELEMENT_KEYS[name]}
    return [f"{section}.{entry}" if isinstance(value, dict) else section
            for section, value in over.items() if section not in ("planted", "plan")
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
    cities, styles, planted, undeclared, plans = raw.get("cities") or {}, {}, {}, {}, {}
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
        plans[city] = _plan(over.pop("plan", None), city, cues, where)
        styles[city] = from_dict(Style, _merge(raw.get("base") or {}, over), where=where)
        planted[city] = tuple(cues)
        undeclared[city] = _undeclared(over, cues)
    definition = {"description": raw.get("description", ""), "base": raw.get("base") or {},
                  "cities": {str(c): v for c, v in cities.items()}}
    return World(path.stem, str(path), definition, styles, planted, undeclared, plans)


def _plan(given: dict | None, city: str, cues, where: str) -> Plan:
    """A city's ``plan`` entry read and checked: a district's cues must be the city's planted ones."""
    plan = from_dict(Plan, given or {}, where=f"{where} plan")
    if plan.centre is None:
        plan = dataclasses.replace(plan, centre=made_up_centre(city))
    if plan.district is not None:
        unknown = set(plan.district.cues) - {o for o, _ in cues}
        if unknown:
            raise ConfigError(f"{where}: 'plan.district.cues' = {sorted(unknown)}: not planted in {city} "
                              f"(planted: {', '.join(o for o, _ in cues) or 'none'})")
    return plan
