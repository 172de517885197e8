"""Methods stage: which explanation method, at which layer, shows what a run's network relies on.

Every CAM method (``cams.METHODS``: Grad-CAM, Grad-CAM++, HiResCAM, LayerCAM) at every layer
of the sweep (``models.sweep_layers``: the last three stages, the paper's Grad-CAM layer last)
and at their fusion (each layer's masks upsampled to the finest layer's grid, normalised and
averaged: finer maps at the same input size). One forward and one backward per batch and layer
serve all methods. Each method's masks are counted like the objects stage's (``stats``, same
threshold), batch by batch as they are made, so no mask is kept (``counted``), and scored on the
generated world's planted cues:

- *recovery*: the rank by lift of each planted cue among its city's objects (``cues.recovery``);
- *visibility* (faithfulness to the causal ranking of ``citylib.causal``): whether each city's
  causally strongest cue is in the lift top ``top`` (cities where the network relies on no cue,
  every interval reaching 0, are left out), and Spearman's rho between the cues' reliance
  (-effect) and their lift rank within their city (higher = agree), over the run's cues, with a
  percentile interval from resampling the test spots within each city (``n_boot`` times; the
  lift ranks and the effects are recomputed on the same resampled spots, so their dependence
  is kept).

Reads the run's ``best.pt``, the cache, the test label maps and ``causal.csv``. Writes into the
run folder ``methods.csv`` (method, layer, map_size, city, object, lift, lift_rank, effect,
causal_rank) and ``methods.json`` (per method and layer: planted MRR, strongest cue in top
``top`` per city, rho and its interval). ``.results/methods.json`` marks it, keyed by the settings, the
training's, label maps' and causal result's keys and the code.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from tqdm.auto import tqdm

from citylib.core import devices
from citylib.core.artifacts import ResultFolder, code_key, read_json, write_csv, write_json
from citylib.core.config import check, config_hash
from citylib.data import segment
from citylib.explain import cams, cues, saliency
from citylib.nets import checkpoint, infer, models, train
from citylib.stages.methods_tables import FUSION, comparison, position, run_table, verdict  # noqa: F401 (its readers)
from citylib.stats import histograms, resampling

NAME = "methods"


@dataclass(frozen=True)
class MethodsConfig:
    """Settings of the methods stage (the ``methods:`` section of a parameter file)."""

    methods: tuple[str, ...] = tuple(cams.METHODS)
    layers: int = 3           # stages in the sweep, the paper's layer last
    fusion: bool = True       # also the fused multi-layer maps
    top: int = 3              # "in the top k" by lift
    batch_size: int = 32
    n_boot: int = 1000        # spot resamples for rho's interval
    level: float = 0.95
    seed: int = 0             # of the resampling
    device: str = "auto"      # of the sweep's passes (citylib.devices); the key holds its kind

    def __post_init__(self):
        devices.validate(self)
        bad = [m for m in self.methods if m not in cams.METHODS]
        if bad or not self.methods:
            raise ValueError(f"'methods' = {list(self.methods)}: each must be one of {list(cams.METHODS)}")
        object.__setattr__(self, "methods", tuple(self.methods))
        check(self, layers=">= 1", top=">= 1", batch_size=">= 1", n_boot=">= 0", level="in [0.5, 1)")


@dataclass(frozen=True)
class MethodsResult:
    table: pd.DataFrame | None     # methods.csv: against the causal effects (a generated world), else None
    summary: dict | None           # methods.json
    folder: Path                   # the run folder, where these files are
    reused: bool = False
    removal_table: pd.DataFrame | None = None   # methods_removal.csv: against reliance by removal
    removal_summary: dict | None = None         # methods_removal.json


def key(cfg: MethodsConfig, stats_cfg: histograms.StatsConfig, training_key: str, labels_key: str,
        causal_key: str | None, target: str, removal_key: str | None = None) -> str:
    return config_hash(NAME, code_key(__name__), devices.keyed(cfg), stats_cfg, training_key, labels_key,
                       causal_key or "", target, removal_key or "")


def sweep_batches(model: torch.nn.Module | list[torch.nn.Module], images: np.ndarray, target, layers,
                  methods, batch_size: int = 32, fusion: bool = True, rows: np.ndarray | None = None,
                  progress: bool = False):
    """(slice, {(method, layer): masks (B, h, w) float32 in [0, 1]}) per batch of uint8
    ``images[rows]`` (N, S, S, 3; all rows by default), in order: every method at every layer,
    then (with ``fusion`` and several layers) the fused masks; one batch in memory at a time,
    whatever the maps' sizes. ``target``: None (the predicted class) or (N,) class indices, one
    per row of ``rows``. ``model``: the network, or copies of it on several devices
    (``devices.replicas``), the batches shared out among them in turn (``devices.spread``)."""
    nets = model if isinstance(model, list) else [model]
    rows = np.arange(len(images)) if rows is None else np.asarray(rows, np.int64)
    per_image = None if target is None else np.asarray(target)
    if per_image is not None and len(per_image) != len(rows):
        raise ValueError(f"{len(per_image)} targets for {len(rows)} images: give one per row of 'rows'")
    fuse = fusion and len(layers) > 1

    def one(probes: dict, b: int) -> tuple[slice, dict]:
        t = None if per_image is None else per_image[b:b + batch_size]
        x = infer.to_tensor(np.asarray(images[rows[b:b + batch_size]]), infer.normalisation(nets[0]))  # (B, 3, S, S)
        out = {}
        for layer in layers:                     # one forward and backward serve every method
            act, grad, _, _ = probes[layer].forward_backward(x, t)
            with torch.no_grad():
                for m in methods:
                    out[m, layer] = saliency.normalise(cams.METHODS[m].cam(act, grad).clamp_min_(0)).cpu().numpy()
        if fuse:                                 # each layer's masks on the finest grid, averaged
            finest = max((out[methods[0], layer].shape[1:] for layer in layers), key=lambda s: s[0] * s[1])
            for m in methods:
                up = [saliency.upsample(out[m, layer], finest) for layer in layers]       # (B, h, w) each
                out[m, FUSION] = saliency.normalise(torch.from_numpy(np.mean(up, 0))).numpy()
        return slice(b, b + len(x)), out

    with contextlib.ExitStack() as hooks:
        probes = [{layer: hooks.enter_context(cams.GradCAM(net, net.get_submodule(layer))) for layer in layers}
                  for net in nets]
        starts = tqdm(range(0, len(rows), batch_size), desc="methods: sweep", disable=not progress,
                      leave=False, unit="batch")
        yield from devices.spread(one, probes, starts)


def sweep(model: torch.nn.Module | list[torch.nn.Module], images: np.ndarray, target, layers, methods,
          batch_size: int = 32, fusion: bool = True,
          rows: np.ndarray | None = None) -> dict[tuple[str, str], np.ndarray]:
    """``sweep_batches``' masks of all the images, (method, layer) -> (N, h, w) float32, held
    whole (``run`` counts them batch by batch instead)."""
    out: dict[tuple[str, str], list] = {}
    with contextlib.closing(sweep_batches(model, images, target, layers, methods, batch_size, fusion,
                                          rows)) as parts:
        for _, part in parts:
            for k, m in part.items():
                out.setdefault(k, []).append(m)
    return {k: np.concatenate(v) for k, v in out.items()}


def counted(parts, label_maps: np.ndarray, cities, stats_cfg: histograms.StatsConfig) -> tuple[dict, dict]:
    """Each (method, layer)'s ``histograms.Histograms`` and map size (h, w), counted batch by batch
    from ``sweep_batches``' parts (each batch's label maps read once for all of them), so the
    masks are never held whole; counted at the threshold alone (``histograms.at_threshold``), all
    that the scores read, so that the histograms of every method and layer are small too."""
    counting, map_sizes, size = {}, {}, int(label_maps.shape[-1])
    coarse = histograms.at_threshold(stats_cfg)
    with contextlib.closing(iter(parts)) as parts:   # a failure here stops the sweep's passes
        for sl, part in parts:
            lab = np.asarray(label_maps[sl])                              # (B, S, S)
            for k, m in part.items():
                if k not in counting:
                    counting[k], map_sizes[k] = histograms.Counting(label_maps, cities, coarse), tuple(m.shape[1:])
                counting[k].add(saliency.upsample(m, size), lab)
    return {k: c.done() for k, c in counting.items()}, map_sizes


def score(masks: dict, label_maps: np.ndarray, cities, planted: Mapping[str, tuple], causal: pd.DataFrame,
          stats_cfg: histograms.StatsConfig, top: int = 3, images: pd.DataFrame | None = None,
          rows: np.ndarray | None = None, n_boot: int = 1000, level: float = 0.95,
          seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """methods.csv rows and methods.json for ``sweep``'s masks (see the module docstring).

    ``images`` (``causal_images.csv``: row, group, object, logp, logp_without) and ``rows`` (the
    cache row of each label map) give rho's interval; without them it has none."""
    size, coarse = int(label_maps.shape[-1]), histograms.at_threshold(stats_cfg)
    hists = {k: histograms.Histograms.build(histograms.upsampled(m, size, saliency.upsample), label_maps, cities,
                                       coarse, progress=False) for k, m in masks.items()}
    return scored(hists, {k: m.shape[1:] for k, m in masks.items()}, cities, planted, causal, stats_cfg, top,
                  images, rows, n_boot, level, seed)


def scored(hists: dict, map_sizes: dict, cities, planted: Mapping[str, tuple], causal: pd.DataFrame,
           stats_cfg: histograms.StatsConfig, top: int = 3, images: pd.DataFrame | None = None,
           rows: np.ndarray | None = None, n_boot: int = 1000, level: float = 0.95,
           seed: int = 0, groups: np.ndarray | None = None) -> tuple[pd.DataFrame, dict]:
    """``score`` from the masks' histograms, (method, layer) -> ``histograms.Histograms``, and their
    map sizes (h, w); ``groups``: each label map's group (default: from ``images``)."""
    cue_rows = causal[causal["object"].isin({o for v in planted.values() for o in v})]
    effect = {(c, o): (e, r) for c, o, e, r in cue_rows[["city", "object", "effect", "rank"]].itertuples(index=False)}
    relied = set(zip(cue_rows.loc[cue_rows["ci_high"] < 0, "city"], cue_rows.loc[cue_rows["ci_high"] < 0, "object"]))
    boot = None
    if images is not None and rows is not None and n_boot > 0:
        boot = _resampling(images, np.asarray(rows), np.asarray(cities).astype(str), n_boot, seed, groups)
    rows_out, summary = [], {}
    for (method, layer), hist in hists.items():
        grid = tuple(int(v) for v in map_sizes[method, layer])
        rec, scores = cues.recovery(hist.table(ci=False), planted, top)
        rec = rec.assign(method=method, layer=layer, map_size="x".join(map(str, grid)),
                         effect=[effect.get((c, o), (np.nan, np.nan))[0] for c, o in zip(rec["city"], rec["object"])],
                         causal_rank=[effect.get((c, o), (np.nan, np.nan))[1] for c, o in zip(rec["city"], rec["object"])])
        rows_out.append(rec)
        # a city counts only where the network relies on its strongest cue (interval below 0)
        relies = np.array([(c, o) in relied for c, o in zip(rec["city"], rec["object"])], bool)
        strongest = rec[(rec["causal_rank"] == 1).to_numpy() & relies]
        in_top = {c: bool(r <= top) for c, r in zip(strongest["city"], strongest["rank"])}
        ok = rec.dropna(subset=["effect", "rank"])
        rho = float(sps.spearmanr(-ok["effect"], -ok["rank"]).statistic) if len(ok) > 2 else float("nan")
        interval = [float("nan"), float("nan")]
        if boot is not None and len(ok) > 2:
            interval = rho_interval(hist, list(zip(ok["city"], ok["object"])), boot, level)
        summary.setdefault(method, {})[layer] = {
            "map_size": list(grid), "planted_mrr": scores["planted_mrr"],
            "strongest_in_top": in_top, "all_strongest_in_top": bool(in_top) and all(in_top.values()),
            "spearman": rho, "spearman_ci": interval}
    table = pd.concat(rows_out, ignore_index=True).rename(columns={"rank": "lift_rank"})
    cols = ["method", "layer", "map_size", "city", "object", "lift", "lift_rank", "effect", "causal_rank"]
    return table[cols], {"top": top, "threshold": stats_cfg.threshold, "n_boot": n_boot if boot is not None else 0,
                         "level": level, "scores": summary}


@dataclass(frozen=True)
class _Resampling:
    """Spot resamples shared by every method and layer of a run: image weights and per-image
    effects of each cue."""

    weights: np.ndarray                       # (B, N): draws of each image's spot, within its city
    delta: dict                               # (city, object) -> (N,) delta log p (NaN elsewhere)


def _resampling(images: pd.DataFrame, rows: np.ndarray, cities: np.ndarray, n_boot: int, seed: int,
                groups: np.ndarray | None = None) -> _Resampling:
    at = pd.Series(np.arange(len(rows)), index=rows)
    if groups is None:
        groups = images.groupby("row")["group"].first().reindex(rows)
        if groups.isna().any():
            raise ValueError(f"{int(groups.isna().sum())} label-map rows have no counterfactual images")
    groups = pd.Series(np.asarray(groups))
    # whole spots, within each city, as causal.csv does
    weights = resampling.spot_weights(groups.to_numpy(), cities, n_boot, seed)
    delta = {}
    for (city, obj), g in images[images["row"].isin(rows)].groupby(["city", "object"], sort=False):
        d = np.full(len(rows), np.nan)
        d[at[g["row"]].to_numpy()] = (g["logp_without"] - g["logp"]).to_numpy()
        delta[city, obj] = d
    return _Resampling(weights, delta)


def rho_interval(hist: histograms.Histograms, cue_list: list[tuple[str, str]], boot: _Resampling,
                 level: float = 0.95) -> list[float]:
    """Percentile interval of Spearman's rho between the cues' reliance (-effect) and their lift
    rank over the spot resamples (``rho_resamples``)."""
    rho = rho_resamples(hist, cue_list, boot)
    if np.isnan(rho).all():
        return [float("nan"), float("nan")]
    return [float(v) for v in np.nanquantile(rho, [(1 - level) / 2, (1 + level) / 2])]


def rho_resamples(hist: histograms.Histograms, cue_list: list[tuple[str, str]], boot: _Resampling) -> np.ndarray:
    """(B,) Spearman's rho of each spot resample: the effects and ``hist``'s lift ranks
    recomputed on the resampled images (the objects ranked are those the object filter keeps
    on all images); NaN where fewer than three cues are ranked or a ranking is constant."""
    index = {name: i for i, name in hist.names.items()}
    w = boot.weights                                                          # (B, N)
    lifts = hist.resampled_lift(w)                                            # {c: (objects, (B, q))}
    reliance, lift_rank = np.full((len(w), len(cue_list)), np.nan), np.full((len(w), len(cue_list)), np.nan)
    for c, city in enumerate(hist.cities):
        members = np.flatnonzero(hist.city == c)
        objects, lift = lifts[c]
        wc = w[:, members]                                                    # (B, n_c)
        for j, (cue_city, obj) in enumerate(cue_list):
            if cue_city != city or obj not in index or index[obj] not in objects:
                continue
            mine = lift[:, np.searchsorted(objects, index[obj])][:, None]
            lift_rank[:, j] = np.where(np.isnan(mine[:, 0]), np.nan, 1 + (lift > mine).sum(1))
            d = boot.delta[city, obj][members]
            with np.errstate(invalid="ignore"):            # NaN: a resample without the cue's images
                reliance[:, j] = -(wc @ np.nan_to_num(d)) / (wc @ np.isfinite(d))
    rho = np.full(len(w), np.nan)
    full = ~np.isnan(reliance).any(1) & ~np.isnan(lift_rank).any(1)
    rx, ry = sps.rankdata(reliance[full], axis=1), sps.rankdata(-lift_rank[full], axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho[full] = (rx * ry).sum(1) / np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))   # nan: a constant ranking
    for b in np.flatnonzero(~full):          # a cue absent from a resample: rho over the others
        ok = ~np.isnan(reliance[b]) & ~np.isnan(lift_rank[b])
        if ok.sum() > 2:
            rho[b] = sps.spearmanr(reliance[b, ok], -lift_rank[b, ok]).statistic
    return rho


def run(cfg: MethodsConfig, run_dir: str | Path, cache, planted: Mapping[str, tuple], causal_result, *,
        stats_cfg: histograms.StatsConfig, segment_cfg: segment.SegmentConfig,
        segment_dir: str | Path | None = None, target: str = "predicted", removal_result=None,
        min_images: int = 5, progress: bool = True) -> MethodsResult:
    """Sweep every method at every layer on the run's test images (labelled as the objects stage
    labels them) and score it against each reference there is: ``causal_result`` (``causal.run``,
    a generated world: ``methods.csv``) and ``removal_result`` (``reliance.run``, any data, objects
    in ``min_images`` images or more: ``methods_removal.csv``), written into ``run_dir``."""
    run_dir = Path(run_dir)
    rows = cache.split_indices("test")
    labels_key = segment.key(segment_cfg, cache, rows)
    seg = segment.run(segment_cfg, segment_dir, cache, rows=rows, progress=progress)
    label_maps = seg.of(rows)                                     # (n, S, S) uint8, read lazily
    model, cities, config = checkpoint.load_model(run_dir, device=cfg.device)
    checkpoint.check_data(run_dir, config, cache)
    trained = ResultFolder(run_dir, train.NAME).finished()
    folder = ResultFolder(run_dir, NAME, key(cfg, stats_cfg, trained["key"], labels_key, getattr(causal_result, "key", None),
                                             target, getattr(removal_result, "key", None)))
    references = {name: ref for name, ref in (("methods", causal_result),
                                              ("methods_removal", removal_reference(removal_result, min_images)))
                  if ref is not None}
    if folder.done() is not None:
        return _result(run_dir, list(references), reused=True)
    folder.begin()
    y = np.asarray(cache.y, np.int64)[rows]
    layers = models.sweep_layers(model, cfg.layers)
    nets = devices.replicas(model, devices.every(cfg.device))     # one per device (cuda:all)
    true_city = np.asarray(cities)[y]
    hists, map_sizes = counted(sweep_batches(nets, cache.images, None if target == "predicted" else y, layers,
                                             cfg.methods, cfg.batch_size, cfg.fusion, rows=rows,
                                             progress=progress), label_maps, true_city, stats_cfg)
    groups = cache.index["group"].to_numpy(str)[rows]
    for name, ref in references.items():
        scored_on = ref.planted if name == "methods_removal" else planted
        table, summary = scored(hists, map_sizes, true_city, scored_on, ref.table, stats_cfg, cfg.top,
                                ref.images, rows, cfg.n_boot, cfg.level, cfg.seed, groups)
        summary["layers"] = list(layers) + ([FUSION] if cfg.fusion and len(layers) > 1 else [])
        summary["reference"] = "causal" if name == "methods" else "removal"
        write_csv(run_dir / f"{name}.csv", table)
        write_json(run_dir / f"{name}.json", summary)
    folder.commit([f"{n}.{x}" for n in references for x in ("csv", "json")])
    return _result(run_dir, list(references))


def removal_reference(result, min_images: int):
    """``reliance.run``'s result as a reference to score methods against: the objects in
    ``min_images`` images or more (ranked again among themselves), their per-image changes under
    the causal stage's column names, and the city -> objects they are."""
    if result is None:
        return None
    table = result.table[result.table["n"] >= min_images].copy()
    table["rank"] = table.groupby("city")["effect"].rank(method="min")
    images = result.images.rename(columns={"logp_removed": "logp_without"})
    planted = {c: tuple(g["object"]) for c, g in table.groupby("city")}
    return SimpleNamespace(table=table, images=images[images["object"].isin(set(table["object"]))],
                           planted=planted, key=result.key)


def _result(run_dir: Path, names: list[str], reused: bool = False) -> MethodsResult:
    read = {n: (pd.read_csv(run_dir / f"{n}.csv"), read_json(run_dir / f"{n}.json")) if n in names else (None, None)
            for n in ("methods", "methods_removal")}
    return MethodsResult(*read["methods"], run_dir, reused, *read["methods_removal"])
