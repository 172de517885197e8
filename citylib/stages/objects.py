"""Objects stage: which objects each city's network attends to, for one run (Shi et al., 3.4).

Reads the run's Grad-CAM masks (``gradcam.load``), the data snapshot's cache and label maps
(``segment.run``: the ground truth of a generated world, else the ADE20K model, once per
dataset). Writes into the run folder: ``r_scores.csv``, ``r_scores.json`` and
``histograms.npz`` (``score``, counted by ``citylib.stats.histograms``); on a generated world
``planted_recovery.csv`` (the rank of each planted cue by lift, beside the rank an ideal cue
detector gets on a map of the network's size: ``cues.ceiling``; the planted-cue MRR's 95%
interval over the test spots, resampled within each city: ``cues.mrr_resamples``); and
``objects.json`` (segmenter, threshold, planted-cue scores). ``.results/objects.json`` marks the
finished result, keyed (``key``) by the statistics settings, the label maps' key, the Grad-CAM
result's key, the planted cues and the code: a threshold change reruns this stage alone. Its
figures (Fig. 5, lift) are ``citylib.figures.stats_plots``'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from citylib.core.artifacts import ResultFolder, code_key, read_json, write_csv, write_json
from citylib.core.config import config_hash, to_dict
from citylib.data import segment
from citylib.explain import cues, saliency
from citylib.stages import gradcam
from citylib.stats import histograms, intervals, resampling

NAME = "objects"


@dataclass(frozen=True)
class ObjectsResult:
    """The objects stage's result for one run."""

    table: pd.DataFrame            # r_scores.csv at the configured threshold
    histograms: histograms.Histograms   # for other thresholds, instantly
    segmenter: str                 # 'ground_truth' or 'ade20k'
    rows: np.ndarray               # (n_test,) cache rows of the test images, as the masks
    labels: segment.Rows           # (n_test, S, S) uint8 label maps of those rows, read lazily
    planted: dict                  # city -> planted cue names (generated world), else {}
    recovery: pd.DataFrame         # rank of each planted cue by lift, and the ideal detector's
                                   # rank on a map of the same size (empty without cues)
    summary: dict                  # objects.json
    folder: Path                   # the run folder, where these files are
    reused: bool = False


def key(stats_cfg: histograms.StatsConfig, labels_key: str, gradcam_key: str,
        planted: Mapping[str, tuple]) -> str:
    """What the scores depend on: the settings, the label maps, the masks, the cues, the code."""
    return config_hash(NAME, code_key(__name__), stats_cfg, labels_key, gradcam_key,
                       {c: list(v) for c, v in planted.items()})


def run(stats_cfg: histograms.StatsConfig, run_dir: str | Path, cache, planted: Mapping[str, tuple], *,
        segment_cfg: segment.SegmentConfig, segment_dir: str | Path | None = None,
        progress: bool = True) -> ObjectsResult:
    """Label the run's test images (label maps kept under ``segment_dir``), then R, coverage and
    lift per city and object, written into ``run_dir`` (reused when the key matches);
    ``planted``: city -> cue names of a generated world, else empty."""
    run_dir = Path(run_dir)
    cams = gradcam.load(run_dir)
    rows = cams.index["index"].to_numpy(np.int64)                      # cache rows of the masks
    labels_key = segment.key(segment_cfg, cache, rows)
    folder = ResultFolder(run_dir, NAME, key(stats_cfg, labels_key, cams.meta["key"], planted))
    seg = segment.run(segment_cfg, segment_dir, cache, rows=rows, progress=progress)
    label_maps = seg.of(rows)                                         # (n, S, S) uint8, read lazily
    if folder.done() is not None:
        return _load(run_dir, stats_cfg, seg.segmenter, rows, label_maps, planted)

    folder.begin()
    size, cities = cache.images.shape[1], cams.index["city"].to_numpy(str)
    result = score(stats_cfg, run_dir, histograms.upsampled(cams.masks, size, saliency.upsample),
                   label_maps, cities, progress=progress)
    recovery, scores = pd.DataFrame(), {}
    if planted:   # the ranks, and the best a map of this size allows: missed vs. could not show
        recovery, scores = cues.recovery(result.table, planted)
        grid = tuple(cams.masks.shape[1:])
        ideal, best = cues.ceiling(label_maps, cities, planted, grid, saliency.upsample, stats_cfg)
        recovery = recovery.merge(ideal[["city", "object", "rank"]].rename(
            columns={"rank": "ceiling_rank"}), on=["city", "object"], how="left")
        if stats_cfg.bootstrap > 0:   # whole test spots resampled within each city
            weights = resampling.spot_weights(cache.index["group"].to_numpy()[rows], cities,
                                             stats_cfg.bootstrap, stats_cfg.seed)
            scores["planted_mrr_ci"] = list(intervals.percentile(
                cues.mrr_resamples(result.histograms, planted, weights)))
        scores["ceiling"] = {"map_size": list(grid), "planted_mrr": best["planted_mrr"],
                             "planted_rr": best["planted_rr"],
                             "planted_all_in_top": best["planted_all_in_top"]}
    write_csv(run_dir / "planted_recovery.csv", recovery)
    summary = {"segmenter": seg.segmenter, "threshold": stats_cfg.threshold,
               "r_scores": "r_scores.csv", **scores}
    write_json(run_dir / "objects.json", summary)
    folder.commit(["r_scores.csv", "r_scores.json", "histograms.npz", "planted_recovery.csv",
                   "objects.json"], gradcam_key=cams.meta["key"])
    return ObjectsResult(result.table, result.histograms, seg.segmenter, rows, label_maps,
                         dict(planted), recovery, summary, run_dir)


@dataclass(frozen=True)
class StatsResult:
    table: pd.DataFrame  # TABLE_COLUMNS, at cfg.threshold
    histograms: histograms.Histograms
    folder: Path  # where r_scores.csv, r_scores.json and histograms.npz are


def score(cfg: histograms.StatsConfig, out: str | Path, masks, label_maps: np.ndarray, cities, *,
        names: Mapping[int, str] | None = None, progress: bool = True) -> StatsResult:
    """Count, tabulate at ``cfg.threshold`` and write ``r_scores.csv``, ``r_scores.json`` (the
    settings, per-city image counts and coverage) and ``histograms.npz`` into ``out``
    (``citylib.stats.histograms``)."""
    out_dir = Path(out)
    hist = histograms.Histograms.build(masks, label_maps, cities, cfg, names, progress)
    table = hist.table()
    write_csv(out_dir / "r_scores.csv", table)
    hist.save(out_dir / "histograms.npz")
    write_json(out_dir / "r_scores.json", {
        "config": to_dict(cfg), "hash": config_hash(cfg), "image_size": hist.size,
        "min_pixels": histograms.min_pixels(cfg, hist.size),
        "images": dict(zip(hist.cities, hist.images.tolist())),
        "coverage": dict(zip(hist.cities, hist.coverage(cfg.threshold).tolist()))})
    return StatsResult(table, hist, out_dir)


def _load(run_dir: Path, stats_cfg, segmenter: str, rows, label_maps, planted) -> ObjectsResult:
    """The finished result in ``run_dir`` (its files as ``run`` wrote them)."""
    table = pd.read_csv(run_dir / "r_scores.csv", keep_default_na=False,
                        dtype={"city": str, "object": str}, na_values=[""])
    try:
        recovery = pd.read_csv(run_dir / "planted_recovery.csv")
    except pd.errors.EmptyDataError:   # no planted cues: an empty table
        recovery = pd.DataFrame()
    return ObjectsResult(table, histograms.Histograms.load(run_dir / "histograms.npz", stats_cfg),
                         segmenter, rows, label_maps, dict(planted), recovery,
                         read_json(run_dir / "objects.json"), run_dir, reused=True)
