"""The method and layer sweep: the same masks as the Grad-CAM stage, fusion on the finest grid,
and visibility scored against a known causal ranking."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from citylib import gradcam, methods, models, stats, train

TREE, FENCE, BUILDING, ROAD, CAR = 5, 33, 2, 7, 21


def test_sweep_matches_the_cam_objects_and_fuses_on_the_finest_grid():
    torch.manual_seed(0)
    model = models.build("simple", 3, 64).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    layers = models.sweep_layers(model)
    masks = methods.sweep(model, images, None, layers, tuple(gradcam.METHODS), batch_size=2)
    assert [masks["gradcam", n].shape[1:] for n in layers] == [(32, 32), (16, 16), (8, 8)]
    assert masks["layercam", methods.FUSION].shape == (5, 32, 32)
    for (method, layer), m in masks.items():
        assert m.min() >= 0 and m.max() <= 1, (method, layer)
    x = train.to_tensor(images)
    for method in gradcam.METHODS:               # one pass per layer serves every method
        for layer in layers:
            with gradcam.make(method, model, model.get_submodule(layer)) as cam:
                np.testing.assert_allclose(masks[method, layer], cam(x).masks, atol=1e-5)  # batch rounding
    # fusion: the mean of the layers' masks on the finest grid, normalised again
    up = np.mean([gradcam.upsample(masks["gradcam", n], (32, 32)) for n in layers], 0)
    np.testing.assert_allclose(masks["gradcam", methods.FUSION],
                               gradcam.normalise(torch.from_numpy(up)).numpy(), atol=1e-6)


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
                                   planted, causal, stats.StatsConfig(bootstrap=0), top=1)
    good, bad = summary["scores"]["m"]["good"], summary["scores"]["m"]["bad"]
    assert good["strongest_in_top"] == {"a": True, "b": True} and good["all_strongest_in_top"]
    assert bad["strongest_in_top"] == {"a": False, "b": True} and not bad["all_strongest_in_top"]
    ranks = table.set_index(["layer", "city", "object"])["lift_rank"]
    assert ranks["good", "a", "tree"] == 1 and ranks["bad", "a", "fence"] == 1
    assert good["spearman"] > 0 and good["spearman"] > bad["spearman"]
    # a city whose network relies on no cue (every interval reaches 0) is left out
    none = causal.assign(ci_high=[0.1, 0.1, -1.0])
    _, summary = methods.score({("m", "good"): on_tree}, labels, cities, planted, none,
                               stats.StatsConfig(bootstrap=0), top=1)
    assert summary["scores"]["m"]["good"]["strongest_in_top"] == {"b": True}
    # the verdict reads the numbers
    summary["layers"] = ["good"]
    text = methods.verdict("run", none, summary)
    assert "car in b" in text and "no reliance on tree in a, fence in a" in text
