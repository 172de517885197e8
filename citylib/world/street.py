"""One spot of the synthetic street world: where things go.

A spot is drawn element by element (``ELEMENTS``), each from its own random stream (``_Draws``):
"layout" is the street, the buildings' geometry and the camera; "open_ground" the verges and
empty lots; "skyscraper" which towers are glass skyscrapers; then one element per object kind
(``OBJECT_KINDS``), whose builder places that kind's things (``BUILDERS``). ``spot`` lays out one
spot from a ``synth.Style``; ``citylib.world.scene`` draws the rectangles. Reads and writes
nothing.
"""
from __future__ import annotations

import numpy as np

from citylib.world import scene

OBJECT_KINDS = ("car", "person", "tree", "plant", "pole", "streetlight", "traffic_light",
                "signboard", "awning", "fence")
ELEMENTS = ("layout", "open_ground", "skyscraper", *OBJECT_KINDS)
# What a spot can be drawn without (``spot``'s ``delete``), by ADE20K name: each object kind, and
# the glass skyscrapers (whatever stood behind them shows instead)
DELETABLE = (*(kind.replace("_", " ") for kind in OBJECT_KINDS), "skyscraper")


_ID_BLOCK = 1 << 20   # instance ids of element k are (k + 1) * _ID_BLOCK + 0, 1, ...


class _Draws:
    """One element's random stream and instance ids: what that element draws, and only it."""

    def __init__(self, element: str, rng: np.random.Generator, colour):
        self.rng, self._colour = rng, colour
        self._ids = iter(range((ELEMENTS.index(element) + 1) * _ID_BLOCK, (ELEMENTS.index(element) + 2) * _ID_BLOCK))

    def uniform(self, bounds) -> float:
        return float(self.rng.uniform(*bounds))

    def chance(self, p: float) -> bool:
        """One uniform draw whatever ``p``: changing a probability changes no later draw."""
        return bool(self.rng.random() < p)

    def pick(self, group: str) -> tuple:
        return self._colour(group, self.rng)

    def id(self) -> int:
        return next(self._ids)


def element_of(inst: np.ndarray) -> np.ndarray:
    """The ELEMENTS index of each instance id (-1 for sky, id 0)."""
    return np.asarray(inst) // _ID_BLOCK - 1


def spot(style, stream, colour, delete=()) -> dict:
    """Lay out one spot from a `synth.Style`: street, two rows of buildings per side, objects.

    ``stream(element)`` gives each of ELEMENTS its own random generator and ``colour(group,
    rng)`` a jittered palette colour drawn from ``rng``. Every element draws from its own
    stream only, and its draws do not depend on another element's settings: rendering the spot
    with one element's settings changed (a counterfactual) changes only that element's
    rectangles. Returns the rects, the camera position ``eye`` and the sky colours; views only
    choose headings. ``delete``: names of ``DELETABLE`` drawn as if they were not there (the
    true deletion a removal operator is scored against); every other draw stays as it was.
    """
    unknown = set(delete) - set(DELETABLE)
    if unknown:
        raise ValueError(f"delete: {', '.join(sorted(unknown))} cannot be deleted; one of {', '.join(DELETABLE)}")
    draws = {e: _Draws(e, stream(e), colour) for e in ELEMENTS}
    lay, st = draws["layout"], style.street
    street = {"rw": lay.uniform(st.road_half_width), "length": lay.uniform(st.length)}
    sky = lay.pick("sky")
    # Curtain walls mirror the sky: what skyscrapers hide of it they show again in their glass.
    street["mirror"] = tuple(0.4 * np.add(sky[:3], sky[3:]))
    eye = (lay.uniform(st.camera_offset), 0.0, lay.uniform(st.camera_height))
    rects = _street(style, draws, street)
    facades, lots = [], []
    for side in (-1, 1):
        rects += _buildings(style, draws, street, side, facades, lots, "skyscraper" in delete)
    rects += _cross_walls(style, lay, street)
    where = {"rw": street["rw"], "xf": street["xf"], "eye": eye, "facades": facades, "lots": lots}
    for kind in OBJECT_KINDS:
        if kind.replace("_", " ") in delete:      # its own stream: nothing else's draws change
            continue
        rects += _place(kind, getattr(style.objects, kind), draws[kind], where, style)
    return {"rects": rects, "eye": eye, "sky": (sky[:3], sky[3:])}


def _street(style, draws, street) -> list[scene.Rect]:
    """The road, the sidewalks and (open_ground) the verges along the kerb."""
    lay, st, rw, half = draws["layout"], style.street, street["rw"], street["length"]
    road = lay.pick("road")
    rects = [scene.ground(-2000, 2000, -2000, 2000, 0, scene.VOCAB["road"], lay.id(), road),
             scene.ground(-rw, rw, -half, half, 1, scene.VOCAB["road"], lay.id(), road, "road", lay.pick("paint"))]
    pave, street["xf"] = lay.pick("sidewalk"), {}
    for side in (-1, 1):
        xf = street["xf"][side] = side * (rw + lay.uniform(st.sidewalk))
        rects.append(scene.ground(*sorted((side * rw, xf + side)), -half, half, 1, scene.VOCAB["sidewalk"], lay.id(), pave))
        if draws["open_ground"].chance(st.verge_prob):
            rects.append(_open_ground(style, draws["open_ground"], side * (rw + 0.3), side * (rw + 1.5), -half, half))
    return rects


def _open_ground(style, og: _Draws, x0, x1, y0, y1) -> scene.Rect:
    """A verge or an empty lot: grass, soil or paving, by the street's open-ground mix."""
    kinds = sorted(style.street.open_ground)
    weights = np.cumsum([style.street.open_ground[k] for k in kinds])
    kind = kinds[min(int(np.searchsorted(weights, og.rng.random() * weights[-1], side="right")), len(kinds) - 1)]
    tex = "leaves" if kind in ("grass", "earth") else "plain"
    return scene.ground(*sorted((x0, x1)), y0, y1, 2, scene.VOCAB[kind], og.id(), og.pick(kind), tex, (0.3,))


def _buildings(style, draws, street, side, facades, lots, no_skyscrapers=False) -> list[scene.Rect]:
    """One side's front row (low-rise facades along the sidewalk, or open lots) and its back
    row of towers (glass skyscrapers where the skyscraper element says so, else plain; none of
    the glass ones with ``no_skyscrapers``)."""
    lay, sky, bl, half = draws["layout"], draws["skyscraper"], style.buildings, street["length"]
    xf, rects = street["xf"][side], []
    xb = xf + side * lay.uniform(bl.tower_setback)
    y = -half
    while y < half:
        w = lay.uniform(bl.width)
        lot = lay.chance(bl.lot_prob)
        h, inst, col = lay.uniform(bl.height), lay.id(), lay.pick("facade")
        tex = (lay.uniform(bl.floor_height), lay.uniform(bl.window_spacing), 0.5, 0.55,
               lay.uniform((3.6, 4.4))) + lay.pick("window")
        if lot:
            rects.append(_open_ground(style, draws["open_ground"], xf, xb, y, y + w))
            lots.append((side, y, y + w))
        else:
            rects.append(scene.wall_x(xf, y, y + w, 0, h, scene.VOCAB["building"], inst, col, "windows", tex))
            for yy in (y, y + w):  # side walls show over lower neighbours and across lots
                rects.append(scene.wall_y(yy, *sorted((xf, xf + 12 * side)), 0, h, scene.VOCAB["building"], inst, col))
            facades.append((side, y, y + w, h))
        y += w
    towers = sky.chance(bl.skyscraper_prob)
    y = -half + lay.uniform((0, bl.tower_gap[1]))
    while y < half:
        w, h, inst, col, glass = (lay.uniform(bl.tower_width), lay.uniform(bl.tower_height), lay.id(),
                                  lay.pick("facade"), lay.pick("window"))
        floor, spacing = lay.uniform(bl.floor_height), lay.uniform(bl.window_spacing)
        plain = ("windows", (floor, spacing, 0.85, 0.8, floor) + glass)   # punched windows throughout
        if sky.chance(bl.skyscraper_share) and towers:  # dark steel braces, mirror glass
            cls, col, tex = scene.VOCAB["skyscraper"], glass, ("diagrid", street["mirror"] + (w / 2,), "crown")
        else:
            cls, tex = scene.VOCAB["building"], plain
        if not (no_skyscrapers and cls == scene.VOCAB["skyscraper"]):
            rects.append(scene.wall_x(xb, y, y + w, 0, h, cls, inst, col, *tex))
            for yy in (y, y + w):
                rects.append(scene.wall_y(yy, *sorted((xb, xb + side * w)), 0, h, cls, inst, col, *tex))
        y += w + lay.uniform(bl.tower_gap)
    return rects


def _cross_walls(style, lay: _Draws, street) -> list[scene.Rect]:
    """The street ends in a cross street's facade at either end."""
    bl, rects = style.buildings, []
    for y in (-street["length"], street["length"]):
        tex = (lay.uniform(bl.floor_height), lay.uniform(bl.window_spacing), 0.5, 0.55, 4.0) + lay.pick("window")
        rects.append(scene.wall_y(y, street["xf"][-1] - 60, street["xf"][1] + 60, 0, lay.uniform(bl.height) + 4,
                            scene.VOCAB["building"], lay.id(), lay.pick("facade"), "windows", tex))
    return rects


def _place(kind: str, thing, d: _Draws, where: dict, style) -> list[scene.Rect]:
    """The objects of one kind: how many (spot_prob, count), then each one's side, position
    along the street, size and colour, handed to its builder."""
    if not d.chance(thing.spot_prob):
        return []
    n = int(d.rng.integers(thing.count[0], thing.count[1] + 1))
    rects = []
    for _ in range(n):
        side, y = (1 if d.rng.random() < 0.5 else -1), d.uniform((-thing.spread, thing.spread))
        size, col = d.uniform(thing.size), d.pick(thing.palette)
        rects += BUILDERS[kind](d, where, side, y, size, col, thing)
    return rects


def _facade_near(facades, side, y):
    """The facade at (side, y), or the nearest one on that side (or any side)."""
    cands = [f for f in facades if f[0] == side] or facades
    return min(cands, key=lambda f: 0 if f[1] <= y <= f[2] else min(abs(y - f[1]), abs(y - f[2])))


def _car(d, where, side, y, size, col, thing):
    rw = where["rw"]
    lane = d.chance(0.3)
    if lane and abs(y) < 6:  # nothing drives through the camera
        y += 12 * np.sign(y or 1)
    return scene.car(side * (0.45 * rw if lane else rw - 1.2), y, size, col, d.pick("window"), d.id())


def _person(d, where, side, y, size, col, thing):
    x = side * d.uniform((where["rw"] + 0.6, abs(where["xf"][side]) - 0.4))
    colours = tuple(0.45 * np.array(col)) + col + d.pick("skin")  # trousers, top, skin
    return [scene.billboard(x, y, 0, 0.55 * size / 1.7, size, where["eye"], scene.VOCAB["person"], d.id(), col,
                      "person", colours, "person")]


def _tree(d, where, side, y, size, col, thing):
    return scene.tree(side * (where["rw"] + 0.9), y, size, where["eye"], d.id(), col, d.pick("bark"), d.uniform((0, 6.3)))


def _plant(d, where, side, y, size, col, thing):
    x = side * (abs(where["xf"][side]) - d.uniform((0.7, 1.3)))
    return [scene.billboard(x, y, 0, 1.5 * size, size, where["eye"], scene.VOCAB["plant"], d.id(), col, "leaves", (0.15,), "bush")]


def _pole(d, where, side, y, size, col, thing):
    return [scene.billboard(side * (where["rw"] + 0.35), y, 0, 0.3, size, where["eye"], scene.VOCAB["pole"], d.id(), col)]


def _streetlight(d, where, side, y, size, col, thing):
    return scene.streetlight(side * (where["rw"] + 0.4), y, size, side, d.id(), col, d.pick("lamp"), where["eye"])


def _traffic_light(d, where, side, y, size, col, thing):
    k = min(int(d.rng.random() * 3), 2)
    lit = ((0.95, 0.15, 0.1), (0.95, 0.7, 0.1), (0.1, 0.85, 0.35))[k]
    return scene.traffic_light(side * (where["rw"] + 0.5), y, size, where["eye"], d.id(), col, lit, k)


def _signboard(d, where, side, y, size, col, thing):
    flat, u1, u2 = d.chance(0.5), d.rng.random(), d.rng.random()   # always three draws
    if not where["facades"]:
        return []
    fs, y0, y1, h = _facade_near(where["facades"], side, y)
    xf = where["xf"][fs]
    # ink: white on dark signs; on light ones a dark grey, not black, which nothing else is
    x, ink = xf - fs * 0.12, (0.95, 0.95, 0.9) if sum(col) < 1.6 else (0.16, 0.17, 0.19)
    yc = float(np.clip(y, y0 + 1, y1 - 1))
    if flat:  # flat over the shop front
        w = min(size, y1 - y0 - 0.4)
        yc = float(np.clip(yc, y0 + w / 2 + 0.2, y1 - w / 2 - 0.2))
        z = 3.0 + u1 * (max(3.1, h - 0.6 * w - 0.3) - 3.0)
        return [scene.wall_x(x, yc - w / 2, yc + w / 2, z, z + 0.6 * w, scene.VOCAB["signboard"], d.id(), col, "sign", (2,) + ink)]
    # a blade sign sticking out over the sidewalk, readable along the street
    z = 2.8 + u2 * (max(2.9, h - size) - 2.8)
    return [scene.wall_y(yc, *sorted((x - fs * 0.1, x - fs * (0.1 + 0.45 * size))), z, z + size,
                   scene.VOCAB["signboard"], d.id(), col, "sign", (max(2, round(size / 0.6)),) + ink)]


def _awning(d, where, side, y, size, col, thing):
    z, paint = d.uniform((2.7, 3.3)), d.pick("paint")
    if not where["facades"]:
        return []
    fs, y0, y1, h = _facade_near(where["facades"], side, y)
    w = min(size, y1 - y0 - 0.4)
    yc = float(np.clip(y, y0 + w / 2 + 0.2, y1 - w / 2 - 0.2))
    slope = np.array([-fs * 1.4, 0.0, -0.6]) * (0.4 + w / 6)  # longer awnings reach further out
    return [scene.Rect((where["xf"][fs] - fs * 0.05, yc - w / 2, z), (0, 1.0, 0), tuple(slope / np.linalg.norm(slope)),
                 w, float(np.linalg.norm(slope)), scene.VOCAB["awning"], d.id(), col, "stripes", paint)]


def _fence(d, where, side, y, size, col, thing):
    near = [lot for lot in where["lots"] if lot[0] == side and abs(lot[1] + lot[2]) / 2 < thing.spread]
    at_lot, which, bars = d.chance(0.6), d.rng.random(), d.chance(0.5)
    height, gap, hoarding = d.uniform((1.1, 1.6)), d.uniform((0.18, 0.3)), d.pick("facade")
    if near and at_lot:  # round an open lot
        _, y0, y1 = near[min(int(which * len(near)), len(near) - 1)]
        x = where["xf"][side]
    else:  # a railing along the kerb
        y0, y1, x = y, y + size, side * (where["rw"] + 0.25)
    if bars:
        return [scene.wall_x(x, y0, y1, 0, height, scene.VOCAB["fence"], d.id(), col, "plain", (gap, 0.07), "bars")]
    return [scene.wall_x(x, y0, y1, 0, height + 0.7, scene.VOCAB["fence"], d.id(), hoarding)]   # a solid hoarding


BUILDERS = {"car": _car, "person": _person, "tree": _tree, "plant": _plant, "pole": _pole,
            "streetlight": _streetlight, "traffic_light": _traffic_light, "signboard": _signboard,
            "awning": _awning, "fence": _fence}
