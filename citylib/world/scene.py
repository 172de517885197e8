"""Drawing primitives of the synthetic street world: flat rectangles in 3-D seen by a pinhole camera.

A scene is a list of `Rect`s (ground patches, facades, billboards, car panels). `render` casts
one ray per pixel, keeps the nearest hit (a z-buffer, so occlusion is exact whatever the order)
and paints colour, class and instance id from that same hit: the label map cannot disagree
with the image. Object builders (`tree`, `car`, ...) say what a thing looks like;
``citylib.world.street`` decides where things go. Reads and writes nothing.

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


