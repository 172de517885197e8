"""The comparison's tables and tests: ``ar.csv``'s rows (``ar_frame``), the paper's Table 2
(``table2``), the tests of "architecture AR > seed AR" and their conclusion.

- CI: percentile bootstrap over the pair's images (seeded per pair name).
- Tests of "between-architecture AR > between-seed AR" (one-sided):
  pair level: the units are Table 2's rows (an architecture pair, or an architecture's
  "retrained" row, each the mean over its run pairs); statistic = mean of the architecture
  rows - mean of the seed rows; null by relabelling the rows (which k of the n are
  "architecture"): every labelling when C(n, k) <= ``permutations``, else a seeded Monte Carlo.
  Few units (4 archs: 6 vs 4 rows, C(10, 6) = 210 labellings, so p >= 1/210), and rows sharing
  an architecture are not independent; but it speaks about architectures and retraining.
  Image level: d_i = (mean AR_i over the architecture run pairs) - (mean AR_i over the seed run
  pairs) on the images all those pairs share; statistic = mean d_i; null: d_i symmetric about 0,
  by random sign flips (exact when 2^n <= ``permutations``). Far more power, but it speaks about
  these trained models only, with images as the units.
  Both tests also run on each control of TESTED (AR on the shared grid, and AR / null at image
  resolution and on the pair's grid; not the raw AR on the pair's grid, whose size differs from
  pair to pair); ``conclusion``: the claim holds in a view when both tests give p <= ALPHA (the
  group-relabelling test only where it can reach ALPHA), and survives when it holds at image
  resolution and in every control. The null is one derangement per pair: its own sampling
  error is small next to the AR's interval at a few hundred images, and not in rel's.

Pure functions on the per-image AR of ``citylib.stages.ar``; reads and writes nothing.
"""
from __future__ import annotations

from functools import reduce
from typing import TYPE_CHECKING, Mapping

import numpy as np
import pandas as pd

from citylib.nets import models
from citylib.stages.residuals import VIEWS, col, pair_seed
from citylib.stats import resampling

if TYPE_CHECKING:   # annotations only
    from citylib.stages.compare import CompareConfig


COLUMNS = ["run_a", "run_b", "kind", "ar", "ci_low", "ci_high", "n_images", "arch_a", "arch_b"]


KINDS = ("architecture", "seed", "randomised", "other")


ORDER = models.ARCHS                                        # the paper's order (the registry's)


NAMES = {a.name: a.display for a in models.REGISTRY.values()}


ALPHA = 0.05                     # the level at which the conclusion calls a test significant


# The tests of "architecture AR > seed AR": the paper's, then the resolution controls, each on
# a column of ar.csv (``rel_*``: AR over the pair's own null of unrelated masks).
# Not the raw AR on each pair's coarser map: AR depends on the grid's size (unrelated masks get
# more on 2 x 2 than on 16 x 16), so pairs on different grids are not comparable; over the
# pair's own null they are.
TESTED = {"image": "ar", "shared_grid": "ar_shared_grid", "image_vs_null": "rel_image",
          "pair_grid_vs_null": "rel_pair_grid"}


EXTRA = ["map_a", "map_b", "grid", "shared_grid",
         *(c for v in VIEWS if v != "image" for c in (col("ar", v), col("ci_low", v), col("ci_high", v))),
         *(f"null_{v}" for v in VIEWS), *(f"rel_{v}" for v in VIEWS)]


def kind_of(a: dict, b: dict) -> str:
    return "architecture" if a["arch"] != b["arch"] else "seed" if a["seed"] != b["seed"] else "other"


def ar_frame(per_image: Mapping, infos: Mapping[str, dict], cfg: CompareConfig,
             nulls: Mapping | None = None, grids: Mapping | None = None,
             native: Mapping[str, tuple] | None = None) -> pd.DataFrame:
    """One row per pair: mean AR and bootstrap CI (seeded by cfg.seed and the pair) in COLUMNS;
    given ``views_ar``'s per-view values as ``per_image`` (with ``nulls``, ``grids`` and each
    source's ``native`` map size), also EXTRA: each view's AR and CI, the pair's null in each
    view and AR / null (``rel_*``; its CI is the AR's over the same null)."""
    per_view = per_image if "image" in per_image else {"image": per_image}
    out = []
    for (a, b), (rows, ar) in per_view["image"].items():
        ia = infos[a]
        ib = infos.get(b) or {**ia, "randomised": True}
        kind = "randomised" if ib.get("randomised") else kind_of(ia, ib)
        seed = pair_seed(cfg, a, b)
        lo, hi = _interval(ar, cfg, seed)
        row = dict(zip(COLUMNS, [a, b, kind, float(ar.mean(dtype=np.float64)), lo, hi, len(ar),
                                 ia["arch"], ib["arch"]]))
        if len(per_view) > 1:
            fmt = lambda g: "x".join(map(str, g))  # noqa: E731
            row.update(map_a=fmt(native[a]), map_b=fmt(native[b]), grid=fmt(grids["pair_grid"][a, b]),
                       shared_grid=fmt(grids["shared_grid"][a, b]))
            for view, values in per_view.items():
                v = values[a, b][1]
                if view != "image":
                    row[col("ar", view)] = float(v.mean(dtype=np.float64))
                    row[col("ci_low", view)], row[col("ci_high", view)] = _interval(v, cfg, seed)
                null = nulls[view][a, b]
                row[f"null_{view}"] = null
                row[f"rel_{view}"] = row[col("ar", view)] / null if null > 0 else float("nan")
        out.append(row)
    return pd.DataFrame(out, columns=COLUMNS + (EXTRA if len(per_view) > 1 else []))


def _interval(values: np.ndarray, cfg: CompareConfig, seed) -> tuple[float, float]:
    """A pair's 95% percentile bootstrap interval of the mean AR over its images."""
    return resampling.bootstrap_interval(values, None, cfg.bootstrap, 0.95, seed, chunk=resampling.CHUNK)[1:]


def relative(per_view: Mapping, nulls: Mapping) -> dict:
    """Per-image AR over the pair's null, per view: {"<view>": {pair: (rows, AR_i / null)}}."""
    return {view: {p: (rows, (ar / np.float32(nulls[view][p]) if nulls[view][p] > 0
                              else np.full_like(ar, np.nan)).astype(np.float32))
                   for p, (rows, ar) in values.items()} for view, values in per_view.items()}


def arch_rank(arch: str) -> tuple:
    return (ORDER.index(arch) if arch in ORDER else len(ORDER), arch)


def _groups(frame: pd.DataFrame):
    """(kind, Table 2 label, the run pairs' rows) per Table 2 row, in the paper's order."""
    groups: dict[tuple, list[int]] = {}
    for i, (kind, a, b) in enumerate(zip(frame["kind"], frame["arch_a"], frame["arch_b"])):
        groups.setdefault((KINDS.index(kind), *sorted((a, b), key=arch_rank)), []).append(i)
    suffix = {"architecture": "", "seed": " retrained", "randomised": " randomised",
              "other": " (same seed)"}
    for key in sorted(groups, key=lambda k: (k[0], arch_rank(k[1]), arch_rank(k[2]))):
        kind = KINDS[key[0]]
        yield (kind, f"{NAMES.get(key[1], key[1])}-{NAMES.get(key[2], key[2])}{suffix[kind]}",
               frame.iloc[groups[key]])


def table2(frame: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 2: one row per architecture pair and kind ("VGG11-ResNet18",
    "VGG11-VGG11 retrained", "VGG11-VGG11 randomised"). With several seeds a row pools its run
    pairs: ar = their mean, ar_min / ar_max their spread, ci_low / ci_high the envelope of
    their CIs (the lowest low, the highest high), n_pairs how many. With the views' columns
    (EXTRA) also the maps and, per view, the pooled AR, CI envelope, null and AR / null."""
    views = "grid" in frame
    rows = []
    for kind, label, g in _groups(frame):
        row = {"models": label, "kind": kind, "ar": g["ar"].mean(), "ci_low": g["ci_low"].min(),
               "ci_high": g["ci_high"].max(), "ar_min": g["ar"].min(), "ar_max": g["ar"].max(),
               "n_pairs": len(g)}
        if views:
            row.update(maps=" / ".join(sorted({*g["map_a"], *g["map_b"]}, key=lambda m: -int(m.split("x")[0]))),
                       grid=g["grid"].iloc[0], shared_grid=g["shared_grid"].iloc[0])
            for view in VIEWS:
                if view != "image":
                    row[col("ar", view)] = g[col("ar", view)].mean()
                    row[col("ci_low", view)] = g[col("ci_low", view)].min()
                    row[col("ci_high", view)] = g[col("ci_high", view)].max()
                row[f"null_{view}"] = g[f"null_{view}"].mean()
                row[f"rel_{view}"] = g[f"rel_{view}"].mean()
        rows.append(row)
    base = ["models", "kind", "ar", "ci_low", "ci_high", "ar_min", "ar_max", "n_pairs"]
    return pd.DataFrame(rows, columns=base + ([c for c in rows[0] if c not in base] if views and rows else []))


def table2_display(table: pd.DataFrame) -> pd.DataFrame:
    """Table 2 for a reader: per view "AR [CI]" and AR / null, three decimals."""
    out = table[["models", "kind"]].copy()
    if "maps" in table:
        out["maps"] = table["maps"]
    for view, label in (("image", "image"), ("pair_grid", "pair's coarser map"),
                        ("shared_grid", "one grid")):
        if col("ar", view) not in table:
            continue
        out[f"AR, {label}"] = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in
                               zip(table[col("ar", view)], table[col("ci_low", view)], table[col("ci_high", view)])]
        if f"null_{view}" in table:
            out[f"AR / null, {label}"] = [f"{r:.2f}" for r in table[f"rel_{view}"]]
        if view == "pair_grid":
            out["pair grid"] = table["grid"]
        if view == "shared_grid":
            out["shared grid"] = table["shared_grid"]
    return out


def tests(frame: pd.DataFrame, per_image: Mapping, cfg: CompareConfig, column: str = "ar") -> dict:
    """Both tests of "architecture AR > seed AR" on an ar frame's ``column`` and the matching
    per-image values {pair: (rows, values)}."""
    arch = frame[frame["kind"] == "architecture"]
    seed = frame[frame["kind"] == "seed"]
    used = {"architecture": arch[["run_a", "run_b"]].values.tolist(),
            "seed": seed[["run_a", "run_b"]].values.tolist()}
    groups = [(k, label, g) for k, label, g in _groups(frame) if k in ("architecture", "seed")]
    units = {k: {label: g[["run_a", "run_b"]].values.tolist() for kk, label, g in groups if kk == k}
             for k in ("architecture", "seed")}
    pair = resampling.relabelling_test([g[column].mean() for k, _, g in groups if k == "architecture"],
                                  [g[column].mean() for k, _, g in groups if k == "seed"],
                                  cfg.permutations, cfg.seed)
    pair["units"] = units
    keys = [tuple(p) for p in used["architecture"] + used["seed"]]
    if arch.empty or seed.empty:
        image = {"statistic": None, "p_value": None, "method": "needs both kinds of pairs"}
    else:
        common = reduce(np.intersect1d, [per_image[k][0] for k in keys])
        vals = np.stack([per_image[k][1][np.searchsorted(per_image[k][0], common)]
                         for k in keys]).astype(np.float64)             # (pairs, n)
        d = vals[:len(arch)].mean(0) - vals[len(arch):].mean(0)         # (n,)
        image = resampling.sign_flip_test(d, cfg.permutations, cfg.seed)
    return {"pairs": used, "pair_permutation": pair, "image_sign_flip": image}


def all_tests(frame: pd.DataFrame, per_view: Mapping, nulls: Mapping, cfg: CompareConfig) -> dict:
    """The paper's tests at image resolution (top level, as ``tests``), the same tests under
    each resolution control of TESTED (``controls``), and the ``conclusion``."""
    rel = relative(per_view, nulls)
    values = {**per_view, **{f"{v}_vs_null": rel[v] for v in ("image", "pair_grid")}}
    out = tests(frame, per_view["image"], cfg)
    out["controls"] = {}
    for name, column in TESTED.items():
        if name != "image":
            t = tests(frame, values[name], cfg, column)
            out["controls"][name] = {"column": column, "pair_permutation": t["pair_permutation"],
                                     "image_sign_flip": t["image_sign_flip"]}
    out["conclusion"] = conclusion(out)
    return out


def conclusion(result_tests: dict, alpha: float = ALPHA) -> dict:
    """Does "architecture AR > seed AR" hold at image resolution, and does it survive every
    resolution control? It holds in a test set when both tests give p <= ``alpha``; the
    group-relabelling test counts only where it can (few runs: its smallest possible p, 1 / the
    number of labellings, can exceed ``alpha``), and the text says so. Returns {"alpha",
    "holds": {test set: bool or None}, "survives": bool or None, "text"}."""
    sets = {"image": result_tests, **result_tests.get("controls", {})}
    holds, ps = {}, {}
    pair = result_tests["pair_permutation"]
    coarse = pair.get("min_p") is not None and pair["min_p"] > alpha
    for name, t in sets.items():
        ps[name] = [t[k]["p_value"] for k in ("pair_permutation", "image_sign_flip")]
        used = ps[name][1:] if coarse else ps[name]
        holds[name] = None if None in used else bool(max(used) <= alpha)
    if holds["image"] is None:
        return {"alpha": alpha, "holds": holds, "survives": None,
                "text": "Not tested: it needs runs of two architectures, one of them with two seeds."}
    controls = [n for n in holds if n != "image"]
    failed = [n for n in controls if not holds[n]]
    each = "; ".join(f"{TESTED_LABELS.get(n, n)}: {'yes' if holds[n] else 'no'} (p = {ps[n][0]:.3g}, "
                     f"{ps[n][1]:.3g})" for n in holds)
    which = ("the images' sign flips (the group-relabelling test cannot reach it with these runs: its "
             f"smallest possible p is {pair['min_p']:.3g})" if coarse else
             "both tests, groups relabelled and images' sign flips")
    text = f"Architecture pairs differ more than seed pairs at the {alpha:g} level ({which})? {each}. "
    survives = bool(holds["image"] and controls and not failed)
    if not controls:
        text += "No resolution control was computed."
    elif survives:
        text += "The difference survives every resolution control: map size does not explain it."
    elif holds["image"]:
        text += ("It does not survive every resolution control: part of the image-resolution difference "
                 "can be built in by the maps' different sizes.")
    else:
        held = [TESTED_LABELS.get(n, n) for n in controls if holds[n]]
        text += ("The paper's test at image resolution does not establish it here"
                 + (f"; judged on {', '.join(held)} it holds." if held else ", nor does any control."))
    return {"alpha": alpha, "holds": holds, "survives": survives if controls else None, "text": text}


def tests_table(result_tests: dict) -> pd.DataFrame:
    """``tests.json`` as a table: one row per comparison and test (statistic, p-value, n,
    method); the paper's image-resolution tests first, then the controls."""
    names = {"pair_permutation": "architecture groups relabelled",
             "image_sign_flip": "per-image sign flips"}
    sets = {"image": result_tests, **result_tests.get("controls", {})}
    return pd.DataFrame([{"compared on": TESTED_LABELS.get(s, s), "test": label,
                          "statistic": t[k].get("statistic"), "p_value": t[k].get("p_value"),
                          "n": t[k].get("n"), "method": t[k].get("method")}
                         for s, t in sets.items() for k, label in names.items()])


TESTED_LABELS = {"image": "AR at image resolution (paper)", "shared_grid": "AR on one grid for all runs",
                 "image_vs_null": "AR / null at image resolution",
                 "pair_grid_vs_null": "AR / null on the pair's coarser map"}
