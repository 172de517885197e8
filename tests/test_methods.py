"""The method and layer sweep: the same masks as the Grad-CAM stage, fusion on the finest grid,
and visibility scored against a known causal ranking."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from citylib.core import devices
from citylib.explain import cams, saliency
from citylib.nets import infer, models
from citylib.stages import methods
from citylib.stats import histograms

TREE, FENCE, BUILDING, ROAD, CAR = 5, 33, 2, 7, 21


def test_sweep_matches_the_cam_objects_and_fuses_on_the_finest_grid():
    torch.manual_seed(0)
    model = models.build("simple", 3, 64).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    layers = models.sweep_layers(model)
    masks = methods.sweep(model, images, None, layers, tuple(cams.METHODS), batch_size=2)
    assert [masks["gradcam", n].shape[1:] for n in layers] == [(32, 32), (16, 16), (8, 8)]
    assert masks["layercam", methods.FUSION].shape == (5, 32, 32)
    for (method, layer), m in masks.items():
        assert m.min() >= 0 and m.max() <= 1, (method, layer)
    x = infer.to_tensor(images)
    for method in cams.METHODS:               # one pass per layer serves every method
        for layer in layers:
            with cams.make(method, model, model.get_submodule(layer)) as cam:
                np.testing.assert_allclose(masks[method, layer], cam(x).masks, atol=1e-5)  # batch rounding
    # fusion: the mean of the layers' masks on the finest grid, normalised again
    up = np.mean([saliency.upsample(masks["gradcam", n], (32, 32)) for n in layers], 0)
    np.testing.assert_allclose(masks["gradcam", methods.FUSION],
                               saliency.normalise(torch.from_numpy(up)).numpy(), atol=1e-6)


def _scene(n: int = 6, size: int = 32):
    """City a: a tree top-left, a fence bottom-right, building elsewhere; city b: a car on a road."""
    labels = np.full((2 * n, size, size), BUILDING, np.uint8)
    labels[:n, :8, :8] = TREE
    labels[:n, -8:, -8:] = FENCE
    labels[n:] = ROAD
    labels[n:, 12:20, 12:20] = CAR
    return labels, np.array(["a"] * n + ["b"] * n)


def test_visibility_against_a_known_causal_ranking():
    labels, cities = _scene()
    n = len(labels) // 2
    on_tree, on_fence = np.zeros((2 * n, 4, 4), np.float32), np.zeros((2 * n, 4, 4), np.float32)
    on_tree[:n, 0, 0] = 1
    on_fence[:n, 3, 3] = 1
    on_tree[n:, 1:3, 1:3] = on_fence[n:, 1:3, 1:3] = 1            # city b: on the car in both
    causal = pd.DataFrame({"city": ["a", "a", "b"], "object": ["tree", "fence", "car"],
                           "effect": [-1.0, -0.1, -2.0], "ci_low": [-1.5, -0.2, -3.0],
                           "ci_high": [-0.5, 0.05, -1.0], "rank": [1.0, 2.0, 1.0]})
    planted = {"a": ("tree", "fence"), "b": ("car",)}
    table, summary = methods.score({("m", "good"): on_tree, ("m", "bad"): on_fence}, labels, cities,
                                   planted, causal, histograms.StatsConfig(bootstrap=0), top=1)
    good, bad = summary["scores"]["m"]["good"], summary["scores"]["m"]["bad"]
    assert good["strongest_in_top"] == {"a": True, "b": True} and good["all_strongest_in_top"]
    assert bad["strongest_in_top"] == {"a": False, "b": True} and not bad["all_strongest_in_top"]
    ranks = table.set_index(["layer", "city", "object"])["lift_rank"]
    assert ranks["good", "a", "tree"] == 1 and ranks["bad", "a", "fence"] == 1
    assert good["spearman"] > 0 and good["spearman"] > bad["spearman"]
    # a city whose network relies on no cue (every interval reaches 0) is left out
    none = causal.assign(ci_high=[0.1, 0.1, -1.0])
    _, summary = methods.score({("m", "good"): on_tree}, labels, cities, planted, none,
                               histograms.StatsConfig(bootstrap=0), top=1)
    assert summary["scores"]["m"]["good"]["strongest_in_top"] == {"b": True}
    # the verdict reads the numbers
    summary["layers"] = ["good"]
    text = methods.verdict("run", none, summary)
    assert "car in b" in text and "no reliance on tree in a, fence in a" in text


def _resampled_reference(masks, labels, cities, images, weights, planted, stats_cfg):
    """rho of one resample the slow way: the images repeated as often as drawn, counted again by
    ``histograms.Histograms`` and ranked by ``cues.recovery``, effects as weighted means."""
    from citylib.explain import cues

    take = np.repeat(np.arange(len(labels)), weights.astype(int))
    hist = histograms.Histograms.build(histograms.upsampled(masks[take], labels.shape[-1], saliency.upsample),
                                  labels[take], cities[take], stats_cfg, progress=False)
    rec, _ = cues.recovery(hist.table(ci=False), planted, 3)
    effect = {}
    for (c, o), g in images.groupby(["city", "object"]):
        w = weights[g["row"].to_numpy()]
        effect[c, o] = float(np.sum(w * (g["logp_without"] - g["logp"])) / w.sum())
    reliance = [-effect[c, o] for c, o in zip(rec["city"], rec["object"])]
    from scipy.stats import spearmanr
    return spearmanr(reliance, -rec["rank"]).statistic


def test_rho_interval_resamples_spots_as_a_recount_would():
    labels, cities = _scene(n=6)
    labels[[1, 7], :4] = FENCE
    labels[[2, 8], -3:] = ROAD                                    # object sizes vary by image
    rng = np.random.default_rng(3)
    masks = rng.random((12, 4, 4)).astype(np.float32)
    rows = np.arange(12)
    group = [f"s{r // 2}" for r in rows]                          # two views per spot
    planted = {"a": ("tree", "fence"), "b": ("car", "road")}
    recs = []
    for r in rows:
        for obj in planted[cities[r]]:
            recs.append({"row": r, "city": cities[r], "group": group[r], "object": obj,
                         "logp": 0.0, "logp_without": float(rng.normal(-1 if obj in ("tree", "car") else 0, 0.5))})
    images = pd.DataFrame(recs)
    cfg = histograms.StatsConfig(bootstrap=0)
    boot = methods._resampling(images, rows, cities, n_boot=20, seed=0)
    hist = histograms.Histograms.build(histograms.upsampled(masks, 32, saliency.upsample), labels, cities, cfg, progress=False)
    cue_list = [("a", "tree"), ("a", "fence"), ("b", "car"), ("b", "road")]
    rho = methods.rho_resamples(hist, cue_list, boot)
    # each image's weight is its spot's draw count, spots drawn within their city
    assert (boot.weights[:, 0] == boot.weights[:, 1]).all() and (boot.weights[:, :6].sum(1) == 6).all()
    for b in range(8):
        ref = _resampled_reference(masks, labels, cities, images, boot.weights[b], planted, cfg)
        assert rho[b] == pytest.approx(ref, abs=1e-9, nan_ok=True), b
    lo, hi = methods.rho_interval(hist, cue_list, boot)
    assert lo <= hi and np.nanmin(rho) <= lo


def test_rho_interval_separates_a_faithful_method_from_an_unfaithful_one():
    labels, cities = _scene(n=6)
    n = 6
    on_tree, on_fence = np.zeros((2 * n, 4, 4), np.float32), np.zeros((2 * n, 4, 4), np.float32)
    on_tree[:n, 0, 0] = on_fence[:n, 3, 3] = 1
    on_tree[n:, 1:3, 1:3] = on_fence[n:, 1:3, 1:3] = 1            # city b: on the car in both
    rng = np.random.default_rng(0)
    recs = [{"row": r, "city": cities[r], "group": f"s{r // 2}", "object": obj, "logp": 0.0,
             "logp_without": float(rng.normal(mean, 0.2))}
            for r in range(2 * n) for obj, mean in ((("tree", -1.0), ("fence", -0.1)) if r < n else (("car", -2.0),))]
    images = pd.DataFrame(recs)
    causal = pd.DataFrame({"city": ["a", "a", "b"], "object": ["tree", "fence", "car"],
                           "effect": [-1.0, -0.1, -2.0], "ci_low": [-1.5, -0.2, -3.0],
                           "ci_high": [-0.5, 0.05, -1.0], "rank": [1.0, 2.0, 1.0]})
    _, summary = methods.score({("m", "good"): on_tree, ("m", "bad"): on_fence}, labels, cities,
                               {"a": ("tree", "fence"), "b": ("car",)}, causal, histograms.StatsConfig(bootstrap=0),
                               top=1, images=images, rows=np.arange(2 * n), n_boot=200)
    good, bad = summary["scores"]["m"]["good"], summary["scores"]["m"]["bad"]
    assert good["spearman_ci"][0] <= good["spearman"] <= good["spearman_ci"][1]
    assert good["spearman_ci"][0] > bad["spearman_ci"][1]


def test_mrr_interval_resamples_spots_as_a_recount_would():
    from citylib.explain import cues
    from citylib.stats import resampling

    labels, cities = _scene(n=6)
    labels[[1, 7], :4] = FENCE
    labels[[2, 8], -3:] = ROAD
    masks = np.random.default_rng(4).random((12, 4, 4)).astype(np.float32)
    group = np.array([f"s{r // 2}" for r in range(12)])                 # two views per spot
    planted = {"a": ("tree", "fence"), "b": ("car", "road")}
    cfg = histograms.StatsConfig(bootstrap=0)
    hist = histograms.Histograms.build(histograms.upsampled(masks, 32, saliency.upsample), labels, cities, cfg, progress=False)
    weights = resampling.spot_weights(group, cities, 30, seed=0)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, np.asarray(cities) == "a"].sum(1) == 6).all()
    mrr = cues.mrr_resamples(hist, planted, weights)
    # all weights 1: the stage's own MRR
    _, full = cues.recovery(hist.table(ci=False), planted)
    assert cues.mrr_resamples(hist, planted, np.ones((1, 12)))[0] == pytest.approx(full["planted_mrr"])
    for b in range(10):       # the slow way: images repeated as drawn, counted and ranked again
        take = np.repeat(np.arange(12), weights[b].astype(int))
        again = histograms.Histograms.build(histograms.upsampled(masks[take], 32, saliency.upsample), labels[take],
                                       np.asarray(cities)[take], cfg, progress=False)
        ref = cues.recovery(again.table(ci=False), planted)[1]["planted_mrr"]
        assert mrr[b] == pytest.approx(ref, abs=1e-12), b
    assert len(set(np.round(mrr, 9))) > 1                              # the resamples differ


def test_sweep_reads_rows_in_batches_and_spreads_over_copies_as_one_network():
    torch.manual_seed(0)
    model = models.build("simple", 3, 64).eval()
    store = np.random.default_rng(1).integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
    rows = np.array([7, 0, 4, 2, 8])
    layers = models.sweep_layers(model)
    alone = methods.sweep(model, store[rows], None, layers, ("gradcam", "layercam"), batch_size=2)
    read = []

    class Store(np.ndarray):                      # records what each read asks for
        def __getitem__(self, index):
            read.append(np.size(index))
            return np.asarray(self.view(np.ndarray)[index])

    copies = devices.replicas(model, [torch.device("cpu")] * 2)
    spread = methods.sweep(copies, store.view(Store), None, layers, ("gradcam", "layercam"),
                           batch_size=2, rows=rows)
    assert max(read) <= 2                         # a batch at a time, never the whole set
    assert list(alone) == list(spread) == [(m, n) for n in layers for m in ("gradcam", "layercam")] + [
        ("gradcam", methods.FUSION), ("layercam", methods.FUSION)]     # layer by layer, fusion last
    for k in alone:
        np.testing.assert_array_equal(alone[k], spread[k], err_msg=str(k))


def test_the_stage_counts_the_sweep_batch_by_batch_as_the_whole_masks_would_be():
    torch.manual_seed(0)
    model = models.build("simple", 3, 64).eval()
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    labels = rng.choice([TREE, FENCE, BUILDING, ROAD, CAR], (7, 64, 64)).astype(np.uint8)
    labels[:, :32, :32] = TREE                          # every object present in every city
    cities = np.array(["a", "b", "a", "b", "a", "b", "a"])
    layers, cfg = models.sweep_layers(model), histograms.StatsConfig(bootstrap=0, min_pixels_224=0)
    causal = pd.DataFrame({"city": ["a", "a", "b"], "object": ["tree", "fence", "car"],
                           "effect": [-1.0, -0.1, -2.0], "ci_low": [-1.5, -0.2, -3.0],
                           "ci_high": [-0.5, 0.05, -1.0], "rank": [1.0, 2.0, 1.0]})
    planted = {"a": ("tree", "fence"), "b": ("car",)}
    masks = methods.sweep(model, images, None, layers, ("gradcam", "hirescam"), batch_size=3)
    whole = methods.score(masks, labels, cities, planted, causal, cfg, top=2)
    hists, sizes = methods.counted(methods.sweep_batches(model, images, None, layers, ("gradcam", "hirescam"),
                                                         batch_size=3), labels, cities, cfg)
    streamed = methods.scored(hists, sizes, cities, planted, causal, cfg, top=2)
    assert len(hists) == 2 * (len(layers) + 1) and sizes["gradcam", methods.FUSION] == (32, 32)
    pd.testing.assert_frame_equal(whole[0], streamed[0])
    assert json.dumps(whole[1], sort_keys=True) == json.dumps(streamed[1], sort_keys=True)   # NaN == NaN
    for k, h in hists.items():     # the same counts, pair by pair; at the threshold those of all bins
        full = histograms.Histograms.build(histograms.upsampled(masks[k], 64, saliency.upsample), labels, cities, cfg,
                                      progress=False)
        assert h.above.shape[1] == 3 and full.above.shape[1] == 101
        np.testing.assert_array_equal(h.above[:, [0, 1]], full.above[:, [0, 50]], err_msg=str(k))
    with pytest.raises(ValueError, match="5 targets for 7 images"):
        methods.sweep(model, images, np.zeros(5, np.int64), layers, ("gradcam",))


def test_reliance_by_removal_is_a_reference_of_the_objects_in_enough_images_ranked_again():
    from types import SimpleNamespace

    table = pd.DataFrame({"city": ["a", "a", "a", "b", "b"], "object": ["sky", "car", "tree", "sky", "road"],
                          "n": [9, 2, 7, 8, 6], "effect": [-0.1, -0.9, -0.5, 0.2, -0.3], "rank": [3, 1, 2, 2, 1],
                          "ci_low": 0.0, "ci_high": 0.0})
    images = pd.DataFrame({"row": [0, 0, 1], "city": "a", "group": "g", "object": ["sky", "car", "tree"],
                           "logp": -1.0, "logp_removed": [-1.1, -1.9, -1.5]})
    ref = methods.removal_reference(SimpleNamespace(table=table, images=images, key="k"), min_images=5)
    assert ref.planted == {"a": ("sky", "tree"), "b": ("sky", "road")}            # car: 2 images
    assert dict(zip(zip(ref.table["city"], ref.table["object"]), ref.table["rank"])) == {
        ("a", "sky"): 2, ("a", "tree"): 1, ("b", "sky"): 2, ("b", "road"): 1}
    assert "logp_without" in ref.images and set(ref.images["object"]) == {"sky", "tree"}
    assert methods.removal_reference(None, 5) is None
