"""Embedding: a run's weighted masks on a 2-D map (Shi et al., sections 2.2 and 3.3).

Reads ``<run>/gradcam/`` (``gradcam.load``) and the test images of the data stage's ``Cache``
(for the "explanation" descriptor and the galleries). Writes ``<run>/embedding/``:

- ``<method>_<descriptor>.csv``: index (cache row), path, city, predicted, correct, x, y; row i
  is row i of the Grad-CAM index.
- ``<method>_<descriptor>.json``: config, key, PCA variance, kNN agreement.
- ``.results/<method>_<descriptor>.json``: the marker of the finished map, keyed (``key``) by
  these settings, the Grad-CAM result's key and the code (``artifacts.ResultFolder``).

The map's figures (``<method>_<descriptor>/``: map_city.png, map_correct.png, gallery.png,
gallery_<city>.png, copied to the run folder) are ``citylib.figures.gallery``'s.

Method: descriptors -> PCA to min(pca_dims, n - 1, dim) dimensions -> t-SNE (or UMAP) to 2-D.
The paper's descriptor is the normalised weighted mask itself ("mask", h*w values); the
alternative is the visual explanation (the image, black below the threshold) averaged down to
explanation_px x explanation_px x 3 ("explanation"). Everything is seeded: the same inputs
and seed give bit-identical coordinates.

t-SNE implementation, chosen by measurement (``benchmarks/bench_embed.py``: 10,000 14 x 14
masks with cluster structure, PCA 50, 750 t-SNE iterations each, median of 2, on 2 cores that
another job kept busy, load average ~3.4; in brackets: a round at load ~1.5):

    openTSNE 1.0.4, n_jobs=1          23 s (23)   <- used
    openTSNE 1.0.4, n_jobs=2          33 s (21)
    scikit-learn 1.9.1 TSNE, 2 thr.   55 s (19)
    scikit-learn 1.9.1 TSNE, 1 thr.   33 s (32)
    umap-learn 0.5.12 (n_jobs=1)       9 s  + 27 s numba compilation on a process's first call

All gave the same 10-NN city agreement (0.775). Threads pay only on an idle machine and cost
up to 10x on a busy one (1,500 points: 3 s on one thread, 21 s on two), so one thread.
Repeatable: a fixed random_state gave bit-identical maps for openTSNE (exact neighbours and
Barnes-Hut below 1,000 / 10,000 points, Annoy and FFT above; with n_jobs=1 and with 2, though
Annoy's trees differ between the two settings), scikit-learn and UMAP (which umap-learn runs
single-threaded when seeded).

What the eye sees, as a number: the kNN city agreement, the share of each point's k nearest
neighbours (itself excluded) that come from the same true city, averaged over points; in the
2-D map and in the PCA space, each against a permutation baseline (the cities shuffled
``permutations`` times over the same neighbour graph): mean, 95th percentile and
p = (1 + #{perm >= observed}) / (1 + permutations); and, with the cache, a 95% interval of the
observed agreement over the test spots (resampled within each city, the graph held fixed).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch.nn.functional as F
from tqdm.auto import tqdm

from citylib.core.artifacts import ResultFolder, code_key, read_json, write_csv, write_json
from citylib.core.config import check, config_hash, to_dict
from citylib.explain import saliency
from citylib.stages import gradcam
from citylib.stats import intervals, resampling

FOLDER = "embedding"
METHODS = ("tsne", "umap")
DESCRIPTORS = ("mask", "explanation")
COLUMNS = ["index", "path", "city", "predicted", "correct", "x", "y"]
MIN_POINTS = 5      # fewer test images than this make no neighbourhood to embed


@dataclass(frozen=True)
class EmbedConfig:
    """Embedding stage settings; every one is part of the result's hash."""

    method: Literal["tsne", "umap"] = "tsne"
    descriptor: Literal["mask", "explanation"] = "mask"
    pca_dims: int = 50            # the paper: PCA to 50 dimensions before t-SNE
    perplexity: float = 30.0      # t-SNE; clipped to (n - 1) / 3 for few points
    umap_neighbors: int = 15      # UMAP; clipped to n - 1
    umap_min_dist: float = 0.1
    explanation_px: int = 16      # "explanation" descriptor: px x px x 3 values
    seed: int = 0                 # PCA, t-SNE/UMAP, permutations, gallery subsets
    knn: int = 10                 # neighbours for the agreement score
    permutations: int = 100       # shuffles for its baseline (0: none)
    gallery_tiles: int = 500      # the paper's Fig. 4: ~500 explanations at their map positions
    tile_px: int = 64             # tile side on the gallery canvas
    gallery_fill: float = 2.0     # grid cells per tile: room for tiles to stay near their points

    def __post_init__(self):
        check(self, method=METHODS, descriptor=DESCRIPTORS, pca_dims=">= 2", perplexity="> 0",
              umap_neighbors=">= 2", umap_min_dist="in [0, 1]", explanation_px=">= 1", seed=">= 0",
              knn=">= 1", permutations=">= 0", gallery_tiles=">= 1", tile_px=">= 8", gallery_fill=">= 1")

    @property
    def tag(self) -> str:
        return f"{self.method}_{self.descriptor}"


@dataclass(frozen=True)
class EmbedResult:
    """One map: its table, summary and (when stored) where its files are."""

    frame: pd.DataFrame        # COLUMNS; row i = Grad-CAM index row i
    summary: dict              # method, descriptor, n, pca_dims, knn_2d, knn_pca, config, hash
    folder: Path | None        # <run>/embedding; None when computed in memory only
    figures: dict = field(default_factory=dict)   # name -> path of each PNG (``gallery.draw``)
    reused: bool = False

    @property
    def xy(self) -> np.ndarray:
        """(N, 2) float64 map coordinates."""
        return self.frame[["x", "y"]].to_numpy(np.float64)


def descriptors(masks: np.ndarray, kind: str = "mask", images: np.ndarray | None = None,
                threshold: float = 0.5, px: int = 16, rows: np.ndarray | None = None,
                batch: int = 256) -> np.ndarray:
    """(N, h, w) masks -> (N, D) float32 descriptors.

    "mask": the flattened mask (D = h*w). "explanation": ``saliency.explanation`` of the images
    (M, S, S, 3) uint8, area-averaged to px x px, scaled to [0, 1] (D = 3 px^2); mask i goes
    with ``images[rows[i]]`` (default: ``images[i]``), read a batch at a time, so a memory-mapped
    cache is never loaded whole.
    """
    masks = np.asarray(masks)
    if kind == "mask":
        return masks.reshape(len(masks), -1).astype(np.float32)
    if kind != "explanation":
        raise ValueError(f"unknown descriptor {kind!r}; known: {', '.join(DESCRIPTORS)}")
    rows = np.arange(len(masks)) if rows is None else np.asarray(rows, np.int64)
    if images is None or len(rows) != len(masks):
        raise ValueError("the 'explanation' descriptor needs one image per mask")
    out = np.empty((len(masks), 3 * px * px), np.float32)
    for sl, x in saliency.explanation_batches(images, masks, threshold, rows, batch):
        small = F.adaptive_avg_pool2d(x / 255.0, px)                      # (B, 3, px, px)
        out[sl] = small.permute(0, 2, 3, 1).reshape(len(x), -1).numpy()
    return out


def pca(x: np.ndarray, dims: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> ((N, d) float32 scores, (d,) explained variance ratios), d = min(dims, N-1, D)."""
    from sklearn.decomposition import PCA

    d = max(1, min(dims, len(x) - 1, x.shape[1]))
    x = np.asarray(x, np.float64)
    if not np.ptp(x, axis=0).any():  # every row the same (all-zero masks): no direction to keep
        return np.zeros((len(x), d), np.float32), np.zeros(d)
    model = PCA(n_components=d, random_state=seed)
    z = model.fit_transform(x)
    return z.astype(np.float32), model.explained_variance_ratio_


def project(z: np.ndarray, cfg: EmbedConfig) -> np.ndarray:
    """(N, d) -> (N, 2) float64 map by ``cfg.method``; the same inputs and seed, the same map."""
    n = len(z)
    if n < MIN_POINTS:
        raise ValueError(f"{n} points are too few to embed (at least {MIN_POINTS})")
    z = np.ascontiguousarray(z, dtype=np.float64)
    if not np.ptp(z, axis=0).any():
        # Identical points (a network whose masks are all zero, say) have no neighbourhoods to
        # keep: t-SNE and UMAP would return NaN. The honest map puts them all in one place.
        warnings.warn(f"all {n} descriptors are identical; every image is mapped to (0, 0)")
        return np.zeros((n, 2))
    if cfg.method == "tsne":
        import openTSNE

        # perplexity above (n - 1) / 3 has no neighbourhood to fill; openTSNE would clip too.
        # One thread: as fast on an idle 2-core machine and far faster on a busy one.
        tsne = openTSNE.TSNE(perplexity=min(cfg.perplexity, (n - 1) / 3), n_jobs=1,
                             random_state=cfg.seed, verbose=False)
        return np.asarray(tsne.fit(z), dtype=np.float64)
    import umap

    with warnings.catch_warnings():   # small inputs: spectral init falls back, with a warning
        warnings.simplefilter("ignore")
        model = umap.UMAP(n_neighbors=min(cfg.umap_neighbors, n - 1), min_dist=cfg.umap_min_dist,
                          random_state=cfg.seed, n_jobs=1)
        return np.asarray(model.fit_transform(z), dtype=np.float64)


def knn_agreement(x: np.ndarray, labels, k: int = 10, permutations: int = 100,
                  seed: int = 0, groups=None, n_boot: int = 1000) -> dict:
    """Share of each point's k nearest neighbours with its label, averaged; with a baseline.

    x (N, D); labels (N,). The baseline shuffles the labels ``permutations`` times over the
    same neighbour graph. Returns k, observed, baseline_mean, baseline_p95, p_value (None
    without permutations), permutations; given ``groups`` (N,) (the spots: a spot's views are
    not independent), also ``ci``, the 95% percentile interval of the mean of the points'
    agreements over ``n_boot`` resamples of whole groups within each label (the neighbour
    graph held fixed), and ``ci_unit``.
    """
    from sklearn.neighbors import NearestNeighbors

    codes = pd.factorize(np.asarray(labels))[0]                          # (N,) int
    n = len(codes)
    if n < 2:
        raise ValueError("kNN agreement needs at least 2 points")
    k = min(k, n - 1)
    idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(return_distance=False)  # (N, k)
    # integer counts: the p-value's >= must not depend on float rounding of the mean
    observed = int((codes[idx] == codes[:, None]).sum())
    null = resampling.permutation_null(codes, lambda c: (c[idx] == c[:, None]).sum(), permutations, seed)
    total = n * k
    extra = {}
    if groups is not None:
        own = (codes[idx] == codes[:, None]).mean(1)                          # (N,) per point
        w = resampling.spot_weights(groups, codes, n_boot, seed)              # (B, N)
        extra = {"ci": list(intervals.percentile(w @ own / w.sum(1))), "ci_unit": "spots"}
    return {**extra, "k": k, "observed": observed / total,
            "baseline_mean": float(null.mean() / total) if permutations else None,
            "baseline_p95": float(np.percentile(null, 95) / total) if permutations else None,
            "p_value": float((1 + (null >= observed).sum()) / (1 + permutations))
            if permutations else None,
            "permutations": permutations}


def compute(cfg: EmbedConfig, result: gradcam.GradCAMResult, cache=None,
            progress: bool = False) -> EmbedResult:
    """The map of a Grad-CAM result, in memory (nothing written); ``cache`` for "explanation"."""
    index = result.index
    steps = tqdm(total=4, desc=f"embed {cfg.tag}", disable=not progress, leave=False)
    rows = image_rows(cache, result) if cfg.descriptor == "explanation" else None
    x = descriptors(np.asarray(result.masks), cfg.descriptor,
                    None if rows is None else cache.images,
                    result.threshold, cfg.explanation_px, rows)          # (N, D)
    steps.update()
    z, variance = pca(x, cfg.pca_dims, cfg.seed)                         # (N, d)
    steps.update()
    xy = project(z, cfg)                                                 # (N, 2)
    steps.update()
    cities = index["city"].to_numpy()
    groups = None if cache is None else cache.index["group"].to_numpy()[index["index"].to_numpy(np.int64)]
    knn = {name: knn_agreement(space, cities, cfg.knn, cfg.permutations, cfg.seed, groups)
           for name, space in (("knn_2d", xy), ("knn_pca", z))}
    steps.update()
    steps.close()
    frame = index[["index", "path", "city", "predicted", "correct"]].assign(x=xy[:, 0],
                                                                            y=xy[:, 1])
    summary = {"method": cfg.method, "descriptor": cfg.descriptor, "n": len(frame),
               "pca_dims": int(z.shape[1]), "pca_variance": float(variance.sum()), **knn,
               "gradcam_key": result.meta["key"], "config": to_dict(cfg),
               "key": key(cfg, result.meta["key"])}
    return EmbedResult(frame, summary, None)


def key(cfg: EmbedConfig, gradcam_key: str) -> str:
    """What a map depends on: these settings, the Grad-CAM result it reads (its key), the code."""
    return config_hash("embed", code_key(__name__), cfg, gradcam_key)


def run(cfg: EmbedConfig, run_dir: str | Path, cache, *, progress: bool = True) -> EmbedResult:
    """Map and agreement of a run's test images; reuse if the key matches. Its figures are
    ``citylib.figures.gallery``'s."""
    run_dir = Path(run_dir)
    result = gradcam.load(run_dir)
    image_rows(cache, result)             # checks the cache is the one Grad-CAM read
    done = stored(cfg, run_dir, result)
    if done is None:
        out = run_dir / FOLDER
        folder = ResultFolder(out, cfg.tag, key(cfg, result.meta["key"]))
        folder.begin()
        emb = compute(cfg, result, cache, progress)
        write_csv(out / f"{cfg.tag}.csv", emb.frame)
        write_json(out / f"{cfg.tag}.json", emb.summary)
        folder.commit([f"{cfg.tag}.csv", f"{cfg.tag}.json"])
        done = dataclasses.replace(emb, folder=out)
    return done


def stored(cfg: EmbedConfig, run_dir: str | Path,
           result: gradcam.GradCAMResult | None = None) -> EmbedResult | None:
    """The stored map made with exactly these settings (reused=True), or None."""
    run_dir = Path(run_dir)
    result = gradcam.load(run_dir) if result is None else result
    out = run_dir / FOLDER
    if ResultFolder(out, cfg.tag, key(cfg, result.meta["key"])).done() is None:
        return None
    summary = read_json(out / f"{cfg.tag}.json")
    frame = pd.read_csv(out / f"{cfg.tag}.csv", keep_default_na=False,
                        dtype={"path": str, "city": str, "predicted": str})
    return EmbedResult(frame, summary, out, reused=True)


def image_rows(cache, result: gradcam.GradCAMResult) -> np.ndarray:
    """(N,) cache rows of the masks' images, once the cache is checked to be the right one."""
    if cache is None:
        raise ValueError("this step needs the data stage's cache (the test images)")
    rows = result.index["index"].to_numpy(np.int64)
    paths = cache.index["path"].to_numpy()
    if (list(map(str, cache.cities)) != list(result.meta["cities"])
            or (len(rows) and rows.max() >= len(paths))
            or not np.array_equal(paths[rows].astype(str), result.index["path"].to_numpy(str))):
        raise ValueError(f"{result.folder}: the cache {getattr(cache, 'folder', '')} is not the "
                         "one these masks were computed from")
    return rows


