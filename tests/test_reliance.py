"""The reliance stage's measurement (citylib.stages.reliance) on hand-made worlds and networks
whose reliance is known."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from citylib.stages import reliance

NAMES = {1: "wall", 2: "signboard", 3: "car"}
S = 32


def world(n_groups=16, seed=0):
    """Images of two cities on a noisy grey wall (class 1): city a's carry a red signboard
    (class 2), every image a blue car (class 3); two views per group."""
    rng = np.random.default_rng(seed)
    images, labels, target, groups = [], [], [], []
    for g in range(2 * n_groups):
        city = g % 2
        for view in range(2):
            im = np.clip(rng.normal(128, 12, (S, S, 3)), 0, 255).astype(np.uint8)
            lab = np.ones((S, S), np.uint8)
            y, x = rng.integers(2, 10), rng.integers(2, 20)
            im[24:30, x:x + 8] = (30, 40, 200)
            lab[24:30, x:x + 8] = 3
            if city == 0:
                im[y:y + 7, x:x + 9] = (220, 20, 30)
                lab[y:y + 7, x:x + 9] = 2
            images.append(im); labels.append(lab); target.append(city); groups.append(f"g{g}")
    return np.stack(images), np.stack(labels), np.array(target), np.array(groups)


class Redness(nn.Module):
    """City a's logit grows with the share of red pixels; city b's is 0."""
    def forward(self, x):                                    # (B, 3, S, S) in [-1, 1]
        red = torch.relu(x[:, 0] - (x[:, 1] + x[:, 2]) / 2 - 0.5).mean((1, 2))
        return torch.stack([40 * red - 1.0, torch.zeros_like(red)], 1)


class Blind(nn.Module):
    """The same answer whatever the image."""
    def forward(self, x):
        return torch.tensor([[0.3, -0.2]]).expand(len(x), 2)


def measured(net, operator="telea"):
    images, labels, target, groups = world()
    cfg = reliance.RelianceConfig(operator=operator, n_boot=500, dilation=1, ring=3, batch_size=16, device="cpu")
    rows = np.arange(len(images))
    pairs = reliance.measure(net, images, labels, rows, target, ["a", "b"], groups, cfg, names=NAMES)
    return pairs, reliance.summarise(pairs, cfg)


@pytest.mark.parametrize("operator", ["telea", "mean", "linear"])
def test_a_network_that_relies_on_one_objects_colour_ranks_it_first(operator):
    pairs, table = measured(Redness(), operator)
    a = table[table["city"] == "a"].set_index("object")
    assert a.loc["signboard", "rank"] == 1
    assert a.loc["signboard", "ci_high"] < -0.5                    # removing it costs the city
    assert a.loc["signboard", "adjusted_ci_high"] < -0.5
    assert abs(a.loc["signboard", "null_effect"]) < 0.05          # filling wall elsewhere does not
    assert a.loc["signboard", "null_ci_low"] <= 0 <= a.loc["signboard", "null_ci_high"] or \
        abs(a.loc["signboard", "null_effect"]) < 0.01
    assert abs(a.loc["car", "effect"]) < 0.05
    small = pairs[pairs["object"] != "wall"]
    assert (small["null_cover"] > 0.99).all()                      # every null region lies on the wall
    assert (pairs.loc[pairs["object"] == "wall", "null_cover"] == 0).all()   # the wall's fits nowhere
    assert set(table["object"]) == {"wall", "signboard", "car"}
    assert (a.loc["signboard", "accuracy_with"], a.loc["signboard", "accuracy_without"]) == (1.0, 0.0)


def test_a_network_that_ignores_its_input_gives_intervals_that_all_include_0():
    _, table = measured(Blind())
    for prefix in ("", "null_", "adjusted_"):
        assert (table[f"{prefix}ci_low"] <= 0).all() and (table[f"{prefix}ci_high"] >= 0).all()
    assert np.allclose(table[["effect", "null_effect", "adjusted"]], 0)


def test_objects_are_those_covering_the_minimum_share():
    _, labels, *_ = world(n_groups=1)
    found = reliance.objects(labels[:2], 0.04)                    # city a: wall, signboard, car
    assert found == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert reliance.objects(labels[:2], 0.5) == [(0, 1), (1, 1)]
    labels = labels.copy()
    labels[0][:] = 0                                               # unlabelled is never an object
    assert reliance.objects(labels[:1], 0.01) == []


def test_the_null_region_has_the_objects_shape_on_its_surrounding_class_and_off_the_object():
    labels = np.ones((40, 40), np.uint8)
    labels[:, 30:] = 3                                             # another object to the right
    labels[5:12, 4:10] = 2
    mask = labels == 2
    null, cover = reliance.null_mask(labels, mask, ring=3, dilation=2)
    assert null.sum() == mask.sum() and cover == 1.0
    assert (labels[null] == 1).all()                               # on the wall, off the other object
    ys, xs = np.nonzero(null)
    assert (ys.max() - ys.min(), xs.max() - xs.min()) == (6, 5)    # the same shape
    grown = np.zeros_like(mask)
    grown[1:16, 0:14] = True                                       # the object grown twice over
    assert not (null & grown).any()


def test_a_null_that_fits_nowhere_is_said_by_its_cover():
    labels = np.full((20, 20), 2, np.uint8)
    labels[0, 0] = 1
    null, cover = reliance.null_mask(labels, labels == 2, ring=2, dilation=1)
    assert cover == 0.0 and not null.any()


def test_a_bad_setting_names_its_key():
    with pytest.raises(ValueError, match="reliance.operator"):
        reliance.RelianceConfig(operator="paint")
    with pytest.raises(ValueError, match="min_share"):
        reliance.RelianceConfig(min_share=0)


def test_the_examples_take_each_citys_largest_drops_and_do_with_few_images():
    from citylib.figures import reliance_plots

    pairs, _ = measured(Redness(), "mean")
    shown = reliance_plots.examples(pairs, 4)
    assert shown["row"].notna().all() and len(shown) == 4
    assert shown.iloc[0][["city", "object"]].tolist() == ["a", "signboard"]     # a's largest drop first
    assert set(shown["city"].iloc[:2]) == {"a", "b"}                           # then each city in turn
    few = pairs.groupby(["city", "object"]).head(2)                           # no pair in 5 images
    assert reliance_plots.examples(few, 3)["row"].notna().all() and len(reliance_plots.examples(few, 3)) == 3


def test_the_calibration_scores_removal_against_the_true_deletion_image_by_image():
    """calibration.changes on a hand-made world whose true deletion paints the wall where the
    object was: the truth's change by hand, an operator close to it, a null of 0 where none fits."""
    from types import SimpleNamespace

    from citylib.nets import infer
    from citylib.stages import calibration

    images, labels, target, groups = world(n_groups=4)
    rows, gone, masks, objs = [], [], [], []
    for i in range(len(images)):
        for cls, name in ((2, "signboard"), (3, "car")):
            m = labels[i] == cls
            if m.any():
                im = images[i].copy()
                im[m] = 128                                                   # the wall behind it
                rows.append(i); gone.append(im); masks.append(m); objs.append(name)
    index = pd.DataFrame({"row": rows, "city": np.array(["a", "b"])[target[rows]], "group": groups[rows],
                          "view": 0, "object": objs})
    cfs = SimpleNamespace(deleted_index=index, deleted_images=np.stack(gone), deleted_masks=np.stack(masks))
    cache = SimpleNamespace(images=images, labels=labels)
    cfg = reliance.RelianceConfig(operator="mean", calibrate=("linear",), dilation=1, ring=3, batch_size=7, device="cpu",
                                  calibrate_null=True)
    out = calibration.changes(Redness(), cache, cfs, ["a", "b"], cfg)
    plain = calibration.changes(Redness(), cache, cfs, ["a", "b"], replace(cfg, calibrate_null=False))
    assert "mean_null" not in plain and np.allclose(plain[["true", "mean", "linear"]], out[["true", "mean", "linear"]])
    logp = lambda x: torch.log_softmax(Redness()(infer.to_tensor(x)).double(), 1).numpy()   # noqa: E731
    by_hand = logp(np.stack(gone))[np.arange(len(rows)), target[rows]] - logp(images[rows])[np.arange(len(rows)), target[rows]]
    assert np.allclose(out["true"], by_hand)
    sign = out["object"] == "signboard"
    assert (out.loc[sign, "true"] < -0.5).all() and np.allclose(out.loc[sign, "mean"], out.loc[sign, "true"], atol=0.1)
    assert np.allclose(out.loc[~sign, ["true", "mean", "linear"]], 0, atol=0.02)
    assert np.allclose(out["mean_adjusted"], out["mean"] - out["mean_null"])
    assert "linear" in out and "linear_null" not in out and "blur" not in out     # the null: the run's operator's
