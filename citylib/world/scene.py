"""Drawing primitives of the synthetic street world: flat rectangles in 3-D seen by a pinhole camera.

A scene is a list of `Rect`s (ground patches, facades, billboards, car panels). `render` casts
one ray per pixel, keeps the nearest hit (a z-buffer, so occlusion is exact whatever the order)
and paints colour, class and instance id from that same hit: the label map cannot disagree
with the image. Object builders (`tree`, `car`, ...) say what a thing looks like; `spot`
decides where things go. Reads and writes nothing.

Coordinates: metres; x across the street, y along it, z up. Headings are degrees clockwise
from +y (0 looks along the street, 90 at the +x facades).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from citylib.core.ade20k import STREET as VOCAB  # ADE20K name -> index of the street vocabulary



def _flat_colours() -> np.ndarray:
    """Class index -> a distinct colour (256, 3), so that a flat image reads back into labels."""
    lut = np.zeros((256, 3), np.uint8)
    for k, i in enumerate(sorted(VOCAB.values())):
        lut[i] = ((k * 97) % 256, (k * 57 + 80) % 256, (k * 151 + 30) % 256)
    lut.setflags(write=False)
    return lut


LUT = _flat_colours()

UP = (0.0, 0.0, 1.0)
NEAR = 0.05  # m; geometry closer than this to the camera plane is clipped away


class Rect(NamedTuple):
    """A rectangle origin + s*u + r*v, 0 <= s <= w, 0 <= r <= h (u, v unit, orthogonal)."""
    origin: tuple
    u: tuple
    v: tuple
    w: float
    h: float
    cls: int
    inst: int
    color: tuple            # RGB in [0, 1]
    texture: str = "plain"
    params: tuple = ()      # texture parameters (see `_texture`)
    mask: str = "rect"      # silhouette inside the rectangle (see `_mask`)


@dataclass(frozen=True)
class Camera:
    pos: tuple
    heading: float  # degrees clockwise from +y
    pitch: float    # degrees, up is positive
    fov: float      # horizontal field of view, degrees

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, p = np.radians(self.heading), np.radians(self.pitch)
        fwd = np.array([np.sin(h) * np.cos(p), np.cos(h) * np.cos(p), np.sin(p)])
        right = np.array([np.cos(h), -np.sin(h), 0.0])
        return fwd, right, np.cross(right, fwd)

    def rays(self, size: int) -> tuple[np.ndarray, float]:
        """Unit ray per pixel centre (size, size, 3) and the focal length in pixels."""
        fwd, right, up = self.basis()
        f = (size / 2) / np.tan(np.radians(self.fov) / 2)
        c = (np.arange(size) + 0.5 - size / 2) / f
        d = fwd + c[None, :, None] * right - c[:, None, None] * up  # (S, S, 3), row 0 at the top
        return d / np.linalg.norm(d, axis=-1, keepdims=True), f


def _boxes(cc: np.ndarray, f: float, size: int) -> np.ndarray:
    """Pixel box (i0, i1, j0, j1) per rectangle from its corners in camera coordinates
    (R, 4, 3: right, up, forward); empty where i0 >= i1. A rectangle reaching behind the
    camera gets the whole image (rare: ground and nearby walls; the hit test stays exact)."""
    front = cc[..., 2] > NEAR
    z = np.where(front, cc[..., 2], 1.0)
    cols, rows = size / 2 + f * cc[..., 0] / z, size / 2 - f * cc[..., 1] / z        # (R, 4)
    boxes = np.stack([np.floor(rows.min(1) - 0.5), np.ceil(rows.max(1) + 0.5),
                      np.floor(cols.min(1) - 0.5), np.ceil(cols.max(1) + 0.5)], 1).clip(0, size).astype(int)
    boxes[front.any(1) & ~front.all(1)] = (0, size, 0, size)
    boxes[~front.any(1)] = 0
    return boxes


def _hash(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A repeatable pseudo-random value in [0, 1) per integer cell (a, b)."""
    x = np.sin(a * 12.9898 + b * 78.233) * 43758.5453
    return x - np.floor(x)


def _mask(kind: str, s: np.ndarray, r: np.ndarray, w: float, h: float, params: tuple) -> np.ndarray:
    x, y = s / w - 0.5, r / h - 0.5  # centred, in [-0.5, 0.5]
    if kind == "ellipse":
        return x * x + y * y <= 0.25
    if kind == "canopy":  # a leafy outline: an ellipse with a bumpy rim
        rim = 0.5 - 0.05 * (1 + np.sin(7 * np.arctan2(y, x) + params[0]))
        return x * x + y * y <= rim * rim
    if kind == "bush":  # flat-bottomed blob sitting on the ground
        return x * x + (y + 0.1) ** 2 / 1.4 <= 0.25
    if kind == "person":  # metric silhouette: head, shoulders/torso, two legs
        sc, top = s - w / 2, h - r
        head = sc * sc + (top - 0.12 * h / 1.7) ** 2 <= (0.11 * h / 1.7) ** 2
        torso = (np.abs(sc) <= 0.23 * w / 0.55) & (top >= 0.22 * h / 1.7) & (r >= 0.48 * h)
        legs = (r < 0.5 * h) & (np.abs(sc) >= 0.02 * w / 0.55) & (np.abs(sc) <= 0.17 * w / 0.55)
        return head | torso | legs
    if kind == "crown":  # a tower narrowing as it rises, its top quarter to a point: a skyline shape
        return np.abs(x) <= np.minimum(0.42 - 0.16 * y, 2.0 * (0.5 - y))
    if kind == "bars":  # railings: vertical bars every params[0] m, two rails
        bar = np.mod(s, params[0]) < params[1]
        return bar | (r > h - 0.09) | ((r > 0.12) & (r < 0.21))
    return np.ones(s.shape, bool)


def _texture(rect: Rect, s: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Colour (n, 3) of the hits at surface coordinates (s, r) in metres."""
    base, p, kind = np.asarray(rect.color), rect.params, rect.texture
    col = np.broadcast_to(base, (len(s), 3)).copy()
    if kind == "windows":  # punched windows; a shop front on the ground floor
        floor, spacing, wf, hf, ground = p[:5]
        glass = np.asarray(p[5:8])
        fx = np.mod(s - np.mod(rect.w, spacing) / 2, spacing) - spacing / 2
        fy = np.mod(r - ground, floor)
        upper = (r > ground) & (np.abs(fx) < wf * spacing / 2) & (np.abs(fy - floor * 0.55) < hf * floor / 2)
        shop = (r > 0.3) & (r < ground - 0.6) & (np.abs(fx) < 0.4 * spacing)
        edge = (s > 0.6) & (s < rect.w - 0.6) & (r < rect.h - 0.8)
        col[(upper | shop) & edge] = glass
    elif kind == "diagrid":  # glass curtain wall on a lattice of diagonal braces, p[3] m apart:
        # a pattern coarse enough to read at 64 px, which no punched-window facade has; braces
        # wide enough to give the tower about the dark share that windows give a plain one
        d = p[3]
        col[(np.mod(s + r, d) > 0.36 * d) & (np.mod(s - r, d) > 0.36 * d)] = p[0:3]
    elif kind == "leaves":  # blotchy foliage / grass / soil, fixed to the surface
        cell = p[0]
        col *= (0.72 + 0.5 * _hash(np.floor(s / cell), np.floor(r / cell)))[:, None]
    elif kind == "stripes":
        col[np.mod(s, 1.0) < 0.5] = p[:3]
    elif kind == "sign":  # lettering: rows of glyph blocks in a second colour
        rows, ink = p[0], np.asarray(p[1:4])
        line = rect.h / rows
        cell = 0.7 * line
        inside = (s > 0.15 * line) & (s < rect.w - 0.15 * line) & (np.mod(r, line) > 0.25 * line)
        glyph = _hash(np.floor(s / cell) + 31 * rect.inst, np.floor(r / line)) > 0.3
        col[inside & glyph & (np.mod(s, cell) > 0.15 * cell) & (np.mod(r, line) < 0.85 * line)] = ink
    elif kind == "person":  # trousers, top, skin
        col[:] = p[0:3]
        col[r > 0.48 * rect.h] = p[3:6]
        col[r > rect.h * 0.83] = p[6:9]
    elif kind == "lamps":  # traffic light: three lenses, one lit
        for k, c in enumerate((p[0:3], p[3:6], p[6:9])):
            cy = rect.h * (5 - 2 * k) / 6
            col[(s - rect.w / 2) ** 2 + (r - cy) ** 2 < (0.3 * rect.w) ** 2] = c
    elif kind == "road":  # dashed centre line and solid edge lines
        paint = np.asarray(p[0:3])
        centre = (np.abs(s - rect.w / 2) < 0.08) & (np.mod(r, 9.0) < 4.5)
        col[centre | (np.abs(s - 0.35) < 0.08) | (np.abs(s - rect.w + 0.35) < 0.08)] = paint
    return col


def render(rects: list[Rect], cam: Camera, size: int, sky: tuple, sun: np.ndarray,
           flat: bool = False) -> dict[str, np.ndarray]:
    """Ray-cast the scene: rgb (S, S, 3) float in [0, 1], label (S, S) uint8, inst (S, S) int32,
    depth (S, S) metres (inf for sky) and elevation (S, S) of each ray (sine)."""
    d, f = cam.rays(size)
    c = np.asarray(cam.pos, float)
    rgb = np.zeros((size, size, 3))
    label = np.zeros((size, size), np.uint8)
    inst = np.zeros((size, size), np.int32)
    depth = np.full((size, size), np.inf)
    o = np.array([q.origin for q in rects], float)                   # (R, 3)
    u, v = np.array([q.u for q in rects], float), np.array([q.v for q in rects], float)
    wh = np.array([(q.w, q.h) for q in rects], float)
    n = np.cross(u, v)
    corners = o[:, None] + np.stack([0 * u, wh[:, :1] * u, wh[:, :1] * u + wh[:, 1:] * v, wh[:, 1:] * v], 1)
    fwd, right, up = cam.basis()
    boxes = _boxes((corners - c) @ np.stack([right, up, fwd], 1), f, size)
    for k in np.nonzero((boxes[:, 0] < boxes[:, 1]) & (boxes[:, 2] < boxes[:, 3]))[0]:
        rect, (i0, i1, j0, j1) = rects[k], boxes[k]
        proj = d[i0:i1, j0:j1] @ np.stack([n[k], u[k], v[k]], 1)      # (h, w, 3)
        rel = (o[k] - c) @ np.stack([n[k], u[k], v[k]], 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = rel[0] / proj[..., 0]                                 # distance along each ray
        s, r = t * proj[..., 1] - rel[1], t * proj[..., 2] - rel[2]  # surface coordinates, metres
        hit = (t > 0) & (t < depth[i0:i1, j0:j1]) & (s >= 0) & (s <= rect.w) & (r >= 0) & (r <= rect.h)
        if rect.mask != "rect" and hit.any():
            hit[hit] = _mask(rect.mask, s[hit], r[hit], rect.w, rect.h, rect.params)
        if not hit.any():
            continue
        ii, jj = np.nonzero(hit)
        ii, jj = ii + i0, jj + j0
        if flat:
            rgb[ii, jj] = LUT[rect.cls] / 255.0
        else:
            # Lambert shading with the normal turned towards the camera; ambient keeps shadows readable.
            # Mirror glass (diagrid) shows the sky, which no shadow darkens.
            nn = n[k] if rel[0] <= 0 else -n[k]
            shade = 1.0 if rect.texture == "diagrid" else 0.62 + 0.45 * max(0.0, float(nn @ sun))
            rgb[ii, jj] = _texture(rect, s[hit], r[hit]) * shade
        label[ii, jj], inst[ii, jj], depth[ii, jj] = rect.cls, rect.inst, t[hit]
    elev = d[..., 2]
    open_sky = ~np.isfinite(depth)
    label[open_sky] = VOCAB["sky"]
    if flat:
        rgb[open_sky] = LUT[VOCAB["sky"]] / 255.0
    else:  # brighter towards the horizon
        a = np.clip(elev, 0, 1)[..., None] ** 0.6
        rgb[open_sky] = ((1 - a) * np.asarray(sky[1]) + a * np.asarray(sky[0]))[open_sky]
    return {"rgb": rgb, "label": label, "inst": inst, "depth": depth, "elev": elev}


# ---------------------------------------------------------------- builders: what things look like
def ground(x0, x1, y0, y1, layer, cls, inst, color, texture="plain", params=()) -> Rect:
    """A ground patch; layers are stacked 2 mm apart so that a later layer covers an earlier one."""
    return Rect((x0, y0, 0.002 * layer), (1.0, 0, 0), (0, 1.0, 0), x1 - x0, y1 - y0,
                cls, inst, color, texture, params)


def wall_x(x, y0, y1, z0, z1, cls, inst, color, texture="plain", params=(), mask="rect") -> Rect:
    """A vertical rectangle in the plane x = const (a facade along the street)."""
    return Rect((x, y0, z0), (0, 1.0, 0), UP, y1 - y0, z1 - z0, cls, inst, color, texture, params, mask)


def wall_y(y, x0, x1, z0, z1, cls, inst, color, texture="plain", params=(), mask="rect") -> Rect:
    """A vertical rectangle in the plane y = const (across the street)."""
    return Rect((x0, y, z0), (1.0, 0, 0), UP, x1 - x0, z1 - z0, cls, inst, color, texture, params, mask)


def billboard(x, y, z0, w, h, eye, cls, inst, color, texture="plain", params=(), mask="rect") -> Rect:
    """An upright rectangle centred on (x, y) and turned to face the camera position ``eye``."""
    dx, dy = eye[0] - x, eye[1] - y
    n = np.hypot(dx, dy) or 1.0
    u = (dy / n, -dx / n, 0.0)
    return Rect((x - u[0] * w / 2, y - u[1] * w / 2, z0), u, UP, w, h, cls, inst, color, texture, params, mask)


def box(x0, x1, y0, y1, z0, z1, cls, inst, color, top=None) -> list[Rect]:
    return [wall_x(x0, y0, y1, z0, z1, cls, inst, color), wall_x(x1, y0, y1, z0, z1, cls, inst, color),
            wall_y(y0, x0, x1, z0, z1, cls, inst, color), wall_y(y1, x0, x1, z0, z1, cls, inst, color),
            Rect((x0, y0, z1), (1.0, 0, 0), (0, 1.0, 0), x1 - x0, y1 - y0, cls, inst, top or color)]


def tree(x, y, height, eye, inst, leaf, bark, phase) -> list[Rect]:
    crown = 0.62 * height
    return [billboard(x, y, 0, 0.22 + 0.03 * height, 0.5 * height, eye, VOCAB["tree"], inst, bark),
            billboard(x, y, height - crown, crown * 0.85, crown, eye, VOCAB["tree"], inst, leaf,
                      "leaves", (0.3, phase), "canopy")]


def car(x, y, length, body, glass, inst) -> list[Rect]:
    """Body box with a cabin on top and four dark wheels; parked along the street."""
    w, half = 1.8, length / 2
    rects = box(x - w / 2, x + w / 2, y - half, y + half, 0.3, 1.0, VOCAB["car"], inst, body)
    rects += box(x - w / 2 + 0.1, x + w / 2 - 0.1, y - half * 0.55, y + half * 0.45, 1.0, 1.5,
                 VOCAB["car"], inst, glass, top=body)
    tyre = (0.08, 0.08, 0.09)
    for side in (x - w / 2 - 0.02, x + w / 2 + 0.02):
        for yc in (y - half * 0.65, y + half * 0.65):
            rects.append(wall_x(side, yc - 0.35, yc + 0.35, 0.0, 0.7, VOCAB["car"], inst, tyre, mask="ellipse"))
    return rects


def streetlight(x, y, height, side, inst, metal, lamp, eye) -> list[Rect]:
    """Post at the kerb, an arm reaching over the road, a lamp head facing the camera."""
    arm = 2.0
    return [billboard(x, y, 0, 0.38, height, eye, VOCAB["streetlight"], inst, metal),
            wall_y(y, min(x, x - side * arm), max(x, x - side * arm), height - 0.3, height,
                   VOCAB["streetlight"], inst, metal),
            billboard(x - side * arm, y, height - 0.55, 1.4, 0.55, eye, VOCAB["streetlight"], inst, lamp)]


def traffic_light(x, y, height, eye, inst, metal, lit, k) -> list[Rect]:
    dim = (0.2, 0.2, 0.18)
    lenses = [lit if i == k else dim for i in range(3)]
    return [billboard(x, y, 0, 0.22, height, eye, VOCAB["pole"], inst, metal),
            billboard(x, y, height, 0.5, 1.3, eye, VOCAB["traffic light"], inst,
                      (0.12, 0.12, 0.12), "lamps", tuple(np.ravel(lenses)))]


# ---------------------------------------------------------------- one spot: where things go
# The elements of a spot, each drawn from its own random stream (see `spot`). "layout" is the
# street, the buildings' geometry and the camera; "open_ground" the verges and empty lots;
# "skyscraper" which towers are glass skyscrapers; then one element per object kind.
OBJECT_KINDS = ("car", "person", "tree", "plant", "pole", "streetlight", "traffic_light",
                "signboard", "awning", "fence")
ELEMENTS = ("layout", "open_ground", "skyscraper", *OBJECT_KINDS)
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


def spot(style, stream, colour) -> dict:
    """Lay out one spot from a `synth.Style`: street, two rows of buildings per side, objects.

    ``stream(element)`` gives each of ELEMENTS its own random generator and ``colour(group,
    rng)`` a jittered palette colour drawn from ``rng``. Every element draws from its own
    stream only, and its draws do not depend on another element's settings: rendering the spot
    with one element's settings changed (a counterfactual) changes only that element's
    rectangles. Returns the rects, the camera position ``eye`` and the sky colours; views only
    choose headings.
    """
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
        rects += _buildings(style, draws, street, side, facades, lots)
    rects += _cross_walls(style, lay, street)
    where = {"rw": street["rw"], "xf": street["xf"], "eye": eye, "facades": facades, "lots": lots}
    for kind in OBJECT_KINDS:
        rects += _place(kind, getattr(style.objects, kind), draws[kind], where, style)
    return {"rects": rects, "eye": eye, "sky": (sky[:3], sky[3:])}


def _street(style, draws, street) -> list[Rect]:
    """The road, the sidewalks and (open_ground) the verges along the kerb."""
    lay, st, rw, half = draws["layout"], style.street, street["rw"], street["length"]
    road = lay.pick("road")
    rects = [ground(-2000, 2000, -2000, 2000, 0, VOCAB["road"], lay.id(), road),
             ground(-rw, rw, -half, half, 1, VOCAB["road"], lay.id(), road, "road", lay.pick("paint"))]
    pave, street["xf"] = lay.pick("sidewalk"), {}
    for side in (-1, 1):
        xf = street["xf"][side] = side * (rw + lay.uniform(st.sidewalk))
        rects.append(ground(*sorted((side * rw, xf + side)), -half, half, 1, VOCAB["sidewalk"], lay.id(), pave))
        if draws["open_ground"].chance(st.verge_prob):
            rects.append(_open_ground(style, draws["open_ground"], side * (rw + 0.3), side * (rw + 1.5), -half, half))
    return rects


def _open_ground(style, og: _Draws, x0, x1, y0, y1) -> Rect:
    """A verge or an empty lot: grass, soil or paving, by the street's open-ground mix."""
    kinds = sorted(style.street.open_ground)
    weights = np.cumsum([style.street.open_ground[k] for k in kinds])
    kind = kinds[min(int(np.searchsorted(weights, og.rng.random() * weights[-1], side="right")), len(kinds) - 1)]
    tex = "leaves" if kind in ("grass", "earth") else "plain"
    return ground(*sorted((x0, x1)), y0, y1, 2, VOCAB[kind], og.id(), og.pick(kind), tex, (0.3,))


def _buildings(style, draws, street, side, facades, lots) -> list[Rect]:
    """One side's front row (low-rise facades along the sidewalk, or open lots) and its back
    row of towers (glass skyscrapers where the skyscraper element says so, else plain)."""
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
            rects.append(wall_x(xf, y, y + w, 0, h, VOCAB["building"], inst, col, "windows", tex))
            for yy in (y, y + w):  # side walls show over lower neighbours and across lots
                rects.append(wall_y(yy, *sorted((xf, xf + 12 * side)), 0, h, VOCAB["building"], inst, col))
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
            cls, col, tex = VOCAB["skyscraper"], glass, ("diagrid", street["mirror"] + (w / 2,), "crown")
        else:
            cls, tex = VOCAB["building"], plain
        rects.append(wall_x(xb, y, y + w, 0, h, cls, inst, col, *tex))
        for yy in (y, y + w):
            rects.append(wall_y(yy, *sorted((xb, xb + side * w)), 0, h, cls, inst, col, *tex))
        y += w + lay.uniform(bl.tower_gap)
    return rects


def _cross_walls(style, lay: _Draws, street) -> list[Rect]:
    """The street ends in a cross street's facade at either end."""
    bl, rects = style.buildings, []
    for y in (-street["length"], street["length"]):
        tex = (lay.uniform(bl.floor_height), lay.uniform(bl.window_spacing), 0.5, 0.55, 4.0) + lay.pick("window")
        rects.append(wall_y(y, street["xf"][-1] - 60, street["xf"][1] + 60, 0, lay.uniform(bl.height) + 4,
                            VOCAB["building"], lay.id(), lay.pick("facade"), "windows", tex))
    return rects


def _place(kind: str, thing, d: _Draws, where: dict, style) -> list[Rect]:
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
    return car(side * (0.45 * rw if lane else rw - 1.2), y, size, col, d.pick("window"), d.id())


def _person(d, where, side, y, size, col, thing):
    x = side * d.uniform((where["rw"] + 0.6, abs(where["xf"][side]) - 0.4))
    colours = tuple(0.45 * np.array(col)) + col + d.pick("skin")  # trousers, top, skin
    return [billboard(x, y, 0, 0.55 * size / 1.7, size, where["eye"], VOCAB["person"], d.id(), col,
                      "person", colours, "person")]


def _tree(d, where, side, y, size, col, thing):
    return tree(side * (where["rw"] + 0.9), y, size, where["eye"], d.id(), col, d.pick("bark"), d.uniform((0, 6.3)))


def _plant(d, where, side, y, size, col, thing):
    x = side * (abs(where["xf"][side]) - d.uniform((0.7, 1.3)))
    return [billboard(x, y, 0, 1.5 * size, size, where["eye"], VOCAB["plant"], d.id(), col, "leaves", (0.15,), "bush")]


def _pole(d, where, side, y, size, col, thing):
    return [billboard(side * (where["rw"] + 0.35), y, 0, 0.3, size, where["eye"], VOCAB["pole"], d.id(), col)]


def _streetlight(d, where, side, y, size, col, thing):
    return streetlight(side * (where["rw"] + 0.4), y, size, side, d.id(), col, d.pick("lamp"), where["eye"])


def _traffic_light(d, where, side, y, size, col, thing):
    k = min(int(d.rng.random() * 3), 2)
    lit = ((0.95, 0.15, 0.1), (0.95, 0.7, 0.1), (0.1, 0.85, 0.35))[k]
    return traffic_light(side * (where["rw"] + 0.5), y, size, where["eye"], d.id(), col, lit, k)


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
        return [wall_x(x, yc - w / 2, yc + w / 2, z, z + 0.6 * w, VOCAB["signboard"], d.id(), col, "sign", (2,) + ink)]
    # a blade sign sticking out over the sidewalk, readable along the street
    z = 2.8 + u2 * (max(2.9, h - size) - 2.8)
    return [wall_y(yc, *sorted((x - fs * 0.1, x - fs * (0.1 + 0.45 * size))), z, z + size,
                   VOCAB["signboard"], d.id(), col, "sign", (max(2, round(size / 0.6)),) + ink)]


def _awning(d, where, side, y, size, col, thing):
    z, paint = d.uniform((2.7, 3.3)), d.pick("paint")
    if not where["facades"]:
        return []
    fs, y0, y1, h = _facade_near(where["facades"], side, y)
    w = min(size, y1 - y0 - 0.4)
    yc = float(np.clip(y, y0 + w / 2 + 0.2, y1 - w / 2 - 0.2))
    slope = np.array([-fs * 1.4, 0.0, -0.6]) * (0.4 + w / 6)  # longer awnings reach further out
    return [Rect((where["xf"][fs] - fs * 0.05, yc - w / 2, z), (0, 1.0, 0), tuple(slope / np.linalg.norm(slope)),
                 w, float(np.linalg.norm(slope)), VOCAB["awning"], d.id(), col, "stripes", paint)]


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
        return [wall_x(x, y0, y1, 0, height, VOCAB["fence"], d.id(), col, "plain", (gap, 0.07), "bars")]
    return [wall_x(x, y0, y1, 0, height + 0.7, VOCAB["fence"], d.id(), hoarding)]   # a solid hoarding


BUILDERS = {"car": _car, "person": _person, "tree": _tree, "plant": _plant, "pole": _pole,
            "streetlight": _streetlight, "traffic_light": _traffic_light, "signboard": _signboard,
            "awning": _awning, "fence": _fence}
