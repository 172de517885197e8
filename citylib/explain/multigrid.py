"""ROAD's linear imputation solved by geometric multigrid, compiled with numba.

Every removed pixel ``p`` of an image satisfies ``d_p x_p = sum_n w_n x_n`` over its in-image
neighbours ``n`` (weights ``w``: 1/6 side, 1/12 corner; ``d_p`` their sum), the known pixels
fixed: a discrete Laplace equation on the hole. A direct sparse solve costs most on large holes
(an image's background class); a multigrid cycle costs a few sweeps over the unknowns.

Level 0 is the hole's bounding box grown by ``MARGIN`` pixels (clipped to the image); a coarser
level's cell is unknown when any of the 2 x 2 cells below it is. Corrections go up by
cell-centred bilinear weights ``P`` (9/16, 3/16, 3/16, 1/16; beyond a grid's edge, the parent),
residuals down by ``P'``, and each coarse operator is Galerkin's ``P' A P`` (5 x 5 stencils), so
the coarse levels see the hole's own boundary. Gauss-Seidel smooths over the unknowns only,
forward before the coarse correction and backward after it. Cycles stop when the last change,
times the rate at which changes shrink, puts the error left below ``tol``; a hole that does not
get there within ``max_cycles`` is reported, for the caller to solve directly.
"""
from __future__ import annotations

import numba
import numpy as np

WT = np.array([[1, 2, 1], [2, 0, 2], [1, 2, 1]], np.float64) / 12.0    # ROAD's neighbour weights
COARSEST = 64          # unknowns at which coarsening stops (that level is solved directly)
MARGIN = 2             # known pixels kept around the hole's bounding box
NC = 4                # channels solved together (one SIMD vector of float64; images padded)
SMOOTH = 2            # Gauss-Seidel sweeps each way on level 0 (cheap there: the weights are fixed)


@numba.njit(cache=True)
def _hierarchy(unknown):
    """The levels of ``unknown`` (H, W) bool: shapes (L, 2); grid offsets (L + 1) into the flat
    grids; ``index`` (cell number or -1 per grid position); the cells' flat positions and their
    offsets per level (L + 1)."""
    grids = [unknown.copy()]
    while True:                            # each level halves both sides (rounding up)
        u = grids[-1]
        if u.sum() <= COARSEST or (u.shape[0] < 3 and u.shape[1] < 3):
            break
        c = np.zeros(((u.shape[0] + 1) // 2, (u.shape[1] + 1) // 2), np.bool_)
        for i, j in zip(*np.nonzero(u)):
            c[i // 2, j // 2] = True       # P' A P keeps the known pixels' pull: never singular
        grids.append(c)
    levels = len(grids)
    shapes = np.zeros((levels, 2), np.int64)
    grid_off = np.zeros(levels + 1, np.int64)
    cell_off = np.zeros(levels + 1, np.int64)
    for lv in range(levels):
        shapes[lv, 0], shapes[lv, 1] = grids[lv].shape
        grid_off[lv + 1] = grid_off[lv] + grids[lv].size
        cell_off[lv + 1] = cell_off[lv] + grids[lv].sum()
    index = np.full(grid_off[levels], -1, np.int64)
    cells = np.empty(cell_off[levels], np.int64)
    for lv in range(levels):
        cells[cell_off[lv]:cell_off[lv + 1]] = np.flatnonzero(grids[lv])
        index[grid_off[lv] + cells[cell_off[lv]:cell_off[lv + 1]]] = np.arange(cell_off[lv], cell_off[lv + 1])
    return shapes, grid_off, index, cells, cell_off


@numba.njit(cache=True)
def _parents(i, j, hc, wc):
    """The four coarse cells fine cell (i, j) interpolates from, and their weights: its parent
    and the ones beside it towards (i, j) (the parent itself beyond the grid's edge)."""
    pi, pj, oi, oj = i // 2, j // 2, i // 2 - 1 + 2 * (i % 2), j // 2 - 1 + 2 * (j % 2)
    oi, oj = oi if 0 <= oi < hc else pi, oj if 0 <= oj < wc else pj
    return ((pi, pj, 9.0 / 16), (oi, pj, 3.0 / 16), (pi, oj, 3.0 / 16), (oi, oj, 1.0 / 16))


@numba.njit(cache=True)
def _links(shapes, grid_off, index, cells, cell_off):
    """Per cell, its four coarse cells (grid positions) and their weights in ``P`` (0 for a
    known coarse cell, whose correction is 0); the last level has none."""
    to = np.zeros((cell_off[-1], 4), np.int32)
    weight = np.zeros((cell_off[-1], 4))
    for lv in range(shapes.shape[0] - 1):
        w, hc, wc, c0 = shapes[lv, 1], shapes[lv + 1, 0], shapes[lv + 1, 1], grid_off[lv + 1]
        for k in range(cell_off[lv], cell_off[lv + 1]):
            t = 0
            for ci, cj, wt in _parents(cells[k] // w, cells[k] % w, hc, wc):
                to[k, t] = c0 + ci * wc + cj
                weight[k, t] = wt if index[c0 + ci * wc + cj] >= 0 else 0.0
                t += 1
    return to, weight


@numba.njit(cache=True)
def _entry(coef, diag0, k, i, j, h, w, dy, dx):
    """Row ``k``'s coefficient at offset (dy, dx): level 0's rows from ROAD's weights, a coarse
    level's from its Galerkin stencil (``coef`` row ``k - len(diag0)``)."""
    if k >= diag0.size:
        return coef[k - diag0.size, (dy + 2) * 5 + dx + 2]
    if dy == 0 and dx == 0:
        return diag0[k]
    if abs(dy) > 1 or abs(dx) > 1 or not (0 <= i + dy < h and 0 <= j + dx < w):
        return 0.0
    return -WT[dy + 1, dx + 1]


@numba.njit(cache=True)
def _galerkin(shapes, grid_off, index, cells, cell_off, coef, diag0, lv):
    """Level ``lv + 1``'s stencils, ``P' A P`` over level ``lv``'s unknowns."""
    h, w = shapes[lv, 0], shapes[lv, 1]
    hc, wc = shapes[lv + 1, 0], shapes[lv + 1, 1]
    reach = 1 if lv == 0 else 2
    ap = np.zeros((5, 5))                      # (A P)[p, D] for D within 2 coarse cells of p's parent
    for k in range(cell_off[lv], cell_off[lv + 1]):
        i, j = cells[k] // w, cells[k] % w
        pi, pj = i // 2, j // 2
        ap[:] = 0.0
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                a = _entry(coef, diag0, k, i, j, h, w, dy, dx)
                y, x = i + dy, j + dx
                if a == 0.0 or not (0 <= y < h and 0 <= x < w) or index[grid_off[lv] + y * w + x] < 0:
                    continue
                for ci, cj, wq in _parents(y, x, hc, wc):
                    ap[ci - pi + 2, cj - pj + 2] += a * wq
        for ci, cj, wp in _parents(i, j, hc, wc):
            row = index[grid_off[lv + 1] + ci * wc + cj]
            if row < 0:
                continue
            for a in range(5):
                for b in range(5):
                    v = ap[a, b]
                    if v != 0.0:
                        coef[row - diag0.size, (pi + a - ci) * 5 + pj + b - cj] += wp * v


@numba.njit(cache=True, inline="always")
def _inner_sum(x, p, w, ch):
    """The weighted sum of level-0 cell ``p``'s 8 neighbours, all in the image (weights sum to 1)."""
    return (x[p - w - 1, ch] + x[p - w + 1, ch] + x[p + w - 1, ch] + x[p + w + 1, ch]
            + 2.0 * (x[p - w, ch] + x[p + w, ch] + x[p - 1, ch] + x[p + 1, ch])) * (1.0 / 12.0)


@numba.njit(cache=True)
def _edge_sum(x, p, i, j, h, w, ch):
    """The weighted sum of level-0 cell ``p``'s in-image neighbours (channel ``ch``)."""
    acc = 0.0
    for dy in range(-1, 2):
        for dx in range(-1, 2):
            if (dy or dx) and 0 <= i + dy < h and 0 <= j + dx < w:
                acc += WT[dy + 1, dx + 1] * x[p + dy * w + dx, ch]
    return acc


@numba.njit(cache=True, inline="always")
def _coarse_sum(x, p, lo, hi, nz_off, nz_val):
    """The sum of value * x over coarse cell ``p``'s off-diagonal entries ``lo:hi``, per channel."""
    a0 = a1 = a2 = a3 = 0.0                        # NC = 4 accumulators, in one pass over the entries
    for e in range(lo, hi):
        v, q = nz_val[e], p + nz_off[e]
        a0 += v * x[q, 0]
        a1 += v * x[q, 1]
        a2 += v * x[q, 2]
        a3 += v * x[q, 3]
    return a0, a1, a2, a3


@numba.njit(cache=True)
def _sweep(x, rhs, shapes, grid_off, cells, cell_off, coef, diag0, lv, backward, nz_ptr, nz_off, nz_val):
    """One Gauss-Seidel sweep over level ``lv``'s unknowns; x, rhs: (grid positions, C). Coarse
    levels read their stencils' nonzero entries (``nz_*``: offsets and values per cell)."""
    h, w, g0 = shapes[lv, 0], shapes[lv, 1], grid_off[lv]
    if lv == 0:                                   # ROAD's weights, no right-hand side
        for t in range(cell_off[1]):
            k = cell_off[1] - 1 - t if backward else t
            p = cells[k]
            i, j = p // w, p % w
            for ch in range(NC):                  # inside: all 8 neighbours, weights sum to 1
                x[p, ch] = (_inner_sum(x, p, w, ch) if 0 < i < h - 1 and 0 < j < w - 1
                            else _edge_sum(x, p, i, j, h, w, ch) / diag0[k])
        return
    lo, hi = cell_off[lv], cell_off[lv + 1]
    for t in range(hi - lo):
        k = hi - 1 - t if backward else lo + t
        p = g0 + cells[k]
        inv = 1.0 / coef[k - diag0.size, 12]
        off = _coarse_sum(x, p, nz_ptr[k], nz_ptr[k + 1], nz_off, nz_val)
        for ch in range(NC):
            x[p, ch] = (rhs[p, ch] - off[ch]) * inv


@numba.njit(cache=True)
def _compact(shapes, grid_off, index, cell_off, cells, coef):
    """The coarse levels' off-diagonal nonzeros between unknowns (a known cell's correction is
    0): per cell, their flat grid offsets and values."""
    n, n0 = cell_off[-1], cell_off[1]
    ptr = np.zeros(n + 1, np.int64)
    nonzero = np.count_nonzero(coef) - np.count_nonzero(coef[:, 12])
    off = np.empty(nonzero, np.int64)
    val = np.empty(nonzero)
    e = 0
    for lv in range(shapes.shape[0]):
        w = shapes[lv, 1]
        for k in range(cell_off[lv], cell_off[lv + 1]):
            ptr[k] = e
            if lv == 0:
                continue
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    a = coef[k - n0, (dy + 2) * 5 + dx + 2]
                    if (dy or dx) and a != 0.0 and index[grid_off[lv] + cells[k] + dy * w + dx] >= 0:
                        off[e], val[e] = dy * w + dx, a
                        e += 1
    ptr[n] = e
    return ptr, off[:e], val[:e]


@numba.njit(cache=True)
def _coarsest(shapes, grid_off, cells, cell_off, coef, diag0):
    """The last level's operator, inverted (dense)."""
    lv = shapes.shape[0] - 1
    h, w = shapes[lv, 0], shapes[lv, 1]
    lo, hi = cell_off[lv], cell_off[lv + 1]
    m = np.zeros((hi - lo, hi - lo))
    where = np.full(h * w, -1, np.int64)
    for k in range(lo, hi):
        where[cells[k]] = k - lo
    for k in range(lo, hi):
        i, j = cells[k] // w, cells[k] % w
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                y, x = i + dy, j + dx
                a = _entry(coef, diag0, k, i, j, h, w, dy, dx)
                if a != 0.0 and 0 <= y < h and 0 <= x < w and where[y * w + x] >= 0:   # level 0: known aside
                    m[k - lo, where[y * w + x]] = a
    return np.linalg.inv(m)


@numba.njit(cache=True)
def _residual(x, rhs, shapes, grid_off, cells, cell_off, coef, diag0, lv, r, nz_ptr, nz_off, nz_val):
    """r[k - first] = (rhs - A x) at level ``lv``'s cells."""
    h, w = shapes[lv, 0], shapes[lv, 1]
    g0 = grid_off[lv]
    lo = cell_off[lv]
    for k in range(lo, cell_off[lv + 1]):
        p = cells[k]
        i, j = p // w, p % w
        if lv == 0 and 0 < i < h - 1 and 0 < j < w - 1:    # inside: ROAD's weights, no right-hand side
            for ch in range(NC):
                r[k - lo, ch] = _inner_sum(x, p, w, ch) - x[p, ch]
            continue
        off = _coarse_sum(x, g0 + p, nz_ptr[k], nz_ptr[k + 1], nz_off, nz_val)    # (0 on level 0)
        for ch in range(NC):
            if lv == 0:                                    # at the image's edge
                acc = _edge_sum(x, p, i, j, h, w, ch) - diag0[k] * x[p, ch]
            else:
                acc = rhs[g0 + p, ch] - coef[k - diag0.size, 12] * x[g0 + p, ch] - off[ch]
            r[k - lo, ch] = acc


@numba.njit(cache=True)
def _restrict(x, rhs, shapes, grid_off, links, cells, cell_off, coef, diag0, lv, r, nz_ptr, nz_off, nz_val):
    """Level ``lv``'s residual carried down (``P'``) as level ``lv + 1``'s right-hand side; that
    level's correction starts at 0. ``r``: scratch, (level 0's cells, C)."""
    to, weight = links
    c0 = grid_off[lv + 1]
    for k in range(cell_off[lv + 1], cell_off[lv + 2]):
        for ch in range(NC):
            x[c0 + cells[k], ch] = 0.0
            rhs[c0 + cells[k], ch] = 0.0
    _residual(x, rhs, shapes, grid_off, cells, cell_off, coef, diag0, lv, r, nz_ptr, nz_off, nz_val)
    lo = cell_off[lv]
    for k in range(lo, cell_off[lv + 1]):
        for t in range(4):
            wt, q = weight[k, t], to[k, t]
            if wt != 0.0:
                for ch in range(NC):
                    rhs[q, ch] += wt * r[k - lo, ch]


@numba.njit(cache=True)
def _prolong(x, grid_off, links, cells, cell_off, lv):
    """Level ``lv + 1``'s correction added to level ``lv``'s unknowns (``P``)."""
    to, weight = links
    for k in range(cell_off[lv], cell_off[lv + 1]):
        p = grid_off[lv] + cells[k]
        w0, w1, w2, w3 = weight[k, 0], weight[k, 1], weight[k, 2], weight[k, 3]
        q0, q1, q2, q3 = to[k, 0], to[k, 1], to[k, 2], to[k, 3]
        for ch in range(NC):
            x[p, ch] += w0 * x[q0, ch] + w1 * x[q1, ch] + w2 * x[q2, ch] + w3 * x[q3, ch]


@numba.njit(cache=True)
def _direct(x, rhs, inverse, cells, lo, g):
    """x = inverse @ rhs over one level's cells (numbered from ``lo``, grid offset ``g``)."""
    for a in range(inverse.shape[0]):
        for ch in range(NC):
            acc = 0.0
            for b in range(inverse.shape[0]):
                acc += inverse[a, b] * rhs[g + cells[lo + b], ch]
            x[g + cells[lo + a], ch] = acc


@numba.njit(cache=True)
def _start(x, unknown, cells, n0):
    """Every unknown of level 0 set to one mean of the known pixels bordering the hole (each
    counted once per unknown neighbour), a first guess near the smooth fill. Returns level 0's
    diagonal (``d_p``; its other entries are ``-w_n``, from ``WT``) and, for a direct solve, the
    right-hand side: per unknown, the weighted sum of its known neighbours."""
    h, w = unknown.shape
    total, count = np.zeros(NC), 0
    known_sum, diag0 = np.zeros((n0, NC)), np.zeros(n0)
    for k in range(n0):
        i, j = cells[k] // w, cells[k] % w
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if (dy or dx) and 0 <= i + dy < h and 0 <= j + dx < w:
                    diag0[k] += WT[dy + 1, dx + 1]
                    if not unknown[i + dy, j + dx]:
                        count += 1
                        for ch in range(NC):
                            total[ch] += x[(i + dy) * w + j + dx, ch]
                            known_sum[k, ch] += WT[dy + 1, dx + 1] * x[(i + dy) * w + j + dx, ch]
    for k in range(n0):
        for ch in range(NC):
            x[cells[k], ch] = total[ch] / max(count, 1)
    return diag0, known_sum


@numba.njit(cache=True)
def _moved(x, before, cells, n0):
    """The largest change of level 0's unknowns since ``before``, which then takes their values."""
    moved = 0.0
    for k in range(n0):
        for ch in range(NC):
            moved = max(moved, abs(x[cells[k], ch] - before[k, ch]))
            before[k, ch] = x[cells[k], ch]
    return moved


@numba.njit(cache=True)
def solve_crop(values, unknown, tol, max_cycles, smooth):
    """``values`` (H, W, NC) float64 with its ``unknown`` (H, W) pixels solved in place (every
    unknown pixel at least one pixel inside the crop, or on the image's edge); returns the
    cycles taken, ``max_cycles + 1`` when the estimated error did not fall below ``tol``."""
    shapes, grid_off, index, cells, cell_off = _hierarchy(unknown)
    levels, n0 = shapes.shape[0], cell_off[1]
    h, w, _ = values.shape
    x = np.zeros((grid_off[levels], NC))
    rhs = np.zeros((grid_off[levels], NC))
    x[:h * w] = values.reshape(h * w, NC)
    diag0, known_sum = _start(x, unknown, cells, n0)
    coef = np.zeros((cell_off[levels] - n0, 25))                # the coarse levels' stencils
    for lv in range(levels - 1):
        _galerkin(shapes, grid_off, index, cells, cell_off, coef, diag0, lv)
    lo = cell_off[levels - 1]                   # the last level: at most COARSEST unknowns, or 4 cells
    inverse = _coarsest(shapes, grid_off, cells, cell_off, coef, diag0)
    nz_ptr, nz_off, nz_val = _compact(shapes, grid_off, index, cell_off, cells, coef)
    links = _links(shapes, grid_off, index, cells, cell_off)
    done = max_cycles + 1
    if levels == 1:                              # a small hole: solved directly
        rhs[cells[:n0]] = known_sum
        _direct(x, rhs, inverse, cells, lo, 0)
        done = 1
    before, r, last = x[cells[:n0]], np.empty((n0, NC)), np.inf
    for cycle in range(1, max_cycles + 1 if levels > 1 else 1):
        for lv in range(levels - 1):
            for _ in range(smooth if lv == 0 else 1):
                _sweep(x, rhs, shapes, grid_off, cells, cell_off, coef, diag0, lv, False, nz_ptr, nz_off, nz_val)
            _restrict(x, rhs, shapes, grid_off, links, cells, cell_off, coef, diag0, lv, r, nz_ptr, nz_off, nz_val)
        _direct(x, rhs, inverse, cells, lo, grid_off[levels - 1])          # the coarsest, solved
        for lv in range(levels - 2, -1, -1):
            _prolong(x, grid_off, links, cells, cell_off, lv)
            for _ in range(smooth if lv == 0 else 1):
                _sweep(x, rhs, shapes, grid_off, cells, cell_off, coef, diag0, lv, True, nz_ptr, nz_off, nz_val)
        moved = _moved(x, before, cells, n0)
        rate = moved / last                      # the error shrinks about this much a cycle: what is
        last = moved                             # left is about moved * rate / (1 - rate)
        if cycle >= 2 and rate < 1.0 and moved * rate <= tol * (1.0 - rate):
            done = cycle
            break
    values[:] = x[:h * w].reshape(h, w, NC)
    return done


@numba.njit(cache=True, nogil=True)
def fill(image, mask, scale, tol, max_cycles, out):
    """The masked pixels of ``image`` (H, W, C <= NC), divided by ``scale``, imputed into ``out``
    (masked pixels, C) in row-major order; the image needs one known pixel. Returns the cycles
    taken, ``max_cycles + 1`` when the values did not settle (``out`` is then not to be used)."""
    h, w, c = image.shape
    ys, xs = np.nonzero(mask)
    y0, y1 = max(ys.min() - MARGIN, 0), min(ys.max() + MARGIN + 1, h)
    x0, x1 = max(xs.min() - MARGIN, 0), min(xs.max() + MARGIN + 1, w)
    values = np.zeros((y1 - y0, x1 - x0, NC))
    values[:, :, :c] = image[y0:y1, x0:x1] / scale
    unknown = mask[y0:y1, x0:x1].copy()
    cycles = solve_crop(values, unknown, tol, max_cycles, SMOOTH)
    k = 0
    for i in range(y1 - y0):
        for j in range(x1 - x0):
            if unknown[i, j]:
                for ch in range(c):
                    out[k, ch] = values[i, j, ch]
                k += 1
    return cycles
