"""Causal effects of planted cues: a hand-made model whose reliance is known, the cue-free check,
the intervals, and the data stage's counterfactual images of a generated world."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from citylib.data import counterfactual, dataset
from citylib.data.counterfactual import CUE_FREE
from citylib.explain import removal
from citylib.nets import infer
from citylib.stages import causal
from citylib.stats import intervals, resampling
from citylib.world import synth, worldfile


class RedNet(nn.Module):
    """Looks at one thing only: class 0's logit is 4 x the mean red level above black (the
    normalised red channel + MEAN / STD); class 1's is 0.05 and class 2's 0."""

    def forward(self, x):                                           # (B, 3, S, S)
        red = x[:, 0].mean((1, 2)) + infer.MEAN / infer.STD         # (B,) 0 for black

        return torch.stack([4 * red, torch.full_like(red, 0.05), torch.zeros_like(red)], 1)


def _world(n_spots: int = 6, size: int = 16):
    """City 'a' images: black with a red square (cue 'tree') and a green one (cue 'fence') of
    a size that varies by spot; their counterfactuals without each, and without both."""
    rng = np.random.default_rng(0)
    originals, cf, rows = [], [], []
    for spot in range(n_spots):
        img = np.zeros((size, size, 3), np.uint8)
        k = int(rng.integers(2, 8))
        img[:k, :k, 0] = 255                                        # red square
        img[-4:, -4:, 1] = 255                                      # green square
        no_red, no_green = img.copy(), img.copy()
        no_red[:k, :k, 0] = 0
        no_green[-4:, -4:, 1] = 0
        originals.append(img)
        for variant, im in (("tree", no_red), ("fence", no_green), (CUE_FREE, np.zeros_like(img))):
            cf.append(im)
            rows.append((spot, "a", f"a_{spot:04d}", 0, variant))
    cache = SimpleNamespace(images=np.stack(originals))
    cfs = SimpleNamespace(images=np.stack(cf), index=pd.DataFrame(rows, columns=counterfactual.INDEX_COLUMNS),
                          fresh_images=np.zeros((0, size, size, 3), np.uint8),
                          fresh_index=pd.DataFrame(columns=counterfactual.FRESH_COLUMNS))
    return cache, cfs


def _logp0(model, images):
    return torch.log_softmax(model(infer.to_tensor(images)).double(), 1)[:, 0].numpy()


def test_causal_effect_of_a_cue_the_model_uses_and_one_it_ignores():
    model, (cache, cfs) = RedNet().eval(), _world()
    images = causal.effects(model, cache, cfs, ["a", "b", "c"])
    table = causal.summarise(images).set_index("object")
    # by hand: delta log p_0 = log p_0(counterfactual) - log p_0(original), per image
    want = _logp0(model, cfs.images[cfs.index["variant"] == "tree"]) - _logp0(model, cache.images)
    assert table.loc["tree", "effect"] == pytest.approx(want.mean(), abs=1e-9)
    assert table.loc["tree", "ci_high"] < 0 and table.loc["tree", "ci_low"] <= table.loc["tree", "effect"]
    assert table.loc["fence", "effect"] == 0 and table.loc["fence", "ci_low"] == table.loc["fence", "ci_high"] == 0
    assert table.loc["tree", "rank"] == 1 and table.loc["fence", "rank"] == 2
    assert np.isnan(table.loc[CUE_FREE, "rank"])
    assert table.loc["tree", "n"] == table.loc["tree", "spots"] == 6
    # with the red square the model says 'a'; without it, class 1
    assert table.loc["tree", "accuracy_with"] == table.loc["fence", "accuracy_without"] == 1.0
    assert table.loc["tree", "accuracy_without"] == table.loc[CUE_FREE, "accuracy_without"] == 0.0
    # the originals' log-probabilities passed in (as the stage passes them, once for effects and
    # sufficiency) give the same table
    rows = np.arange(len(cache.images))
    known = (rows, infer.log_p(model, cache.images, 4, rows))
    pd.testing.assert_frame_equal(causal.effects(model, cache, cfs, ["a", "b", "c"], originals=known), images,
                                  atol=1e-9)


def test_cue_free_check_fails_for_a_model_that_still_knows_the_city():
    rng = np.random.default_rng(1)
    spots = 90
    city = np.repeat(np.array(["a", "b", "c"]), spots // 3)                     # per spot
    frame = pd.DataFrame({"object": CUE_FREE, "group": np.repeat(np.arange(spots), 4),
                          "city": np.repeat(city, 4)})
    knows = frame.assign(predicted=frame["city"])
    blind = frame.assign(predicted=np.repeat(rng.choice(["a", "b", "c"], spots), 4))
    one = frame.assign(predicted="a")                                           # always the same city
    for f in (knows, blind, one):
        f["correct"] = f["predicted"] == f["city"]
    right, chance, same = (causal.cue_free(f, 3) for f in (knows, blind, one))
    assert right["at_chance"] is False and right["accuracy"] == 1.0 and right["p"] < 0.01
    assert chance["at_chance"] is True and chance["p"] > 0.05
    assert same["accuracy"] == pytest.approx(1 / 3) and same["at_chance"] is True
    # views of one spot predicted alike: the permutation range is wider than a binomial one
    lo, hi = chance["interval"]
    assert lo < 1 / 3 < hi and hi - lo > intervals.wilson(120, 360)[1] - intervals.wilson(120, 360)[0]
    # two samples: each checked, and pooled; a leak in one sample shows in it
    both = pd.concat([blind.assign(sample="test"), knows.assign(sample="fresh", group=knows["group"] + spots)])
    pooled = causal.cue_free(both, 3)
    assert pooled["n"] == 720 and pooled["spots"] == 2 * spots and pooled["at_chance"] is False
    assert pooled["samples"]["test"]["at_chance"] is True and pooled["samples"]["fresh"]["at_chance"] is False


def test_cue_free_predictions_cover_the_test_and_the_fresh_spots():
    model, (cache, cfs) = RedNet().eval(), _world()
    red = np.zeros((4, 16, 16, 3), np.uint8)
    red[:2, :, :, 0] = 255                                       # class 0 ('a') on the first two
    cfs.fresh_images = red
    cfs.fresh_index = pd.DataFrame({"city": ["a", "b", "a", "b"], "group": ["a_0100", "b_0100", "a_0101", "b_0101"],
                                    "view": 0})
    images = causal.effects(model, cache, cfs, ["a", "b", "c"])
    free = causal.cue_free_predictions(model, images, cfs, ["a", "b", "c"])
    assert list(free["sample"]) == ["test"] * 6 + ["fresh"] * 4
    # a black image (every cue reset): class 1 = 'b'; red: 'a'
    assert list(free["predicted"]) == ["b"] * 6 + ["a", "a", "b", "b"]
    assert list(free["correct"]) == [False] * 6 + [True, False, False, True]


def test_holm_by_hand():
    # p sorted 0.01, 0.02, 0.04, 0.3 (m = 4): 4 x 0.01, 3 x 0.02, 2 x 0.04 (monotone), 1 x 0.3
    np.testing.assert_allclose(intervals.holm([0.04, 0.01, 0.3, 0.02]), [0.08, 0.04, 0.3, 0.06])
    np.testing.assert_allclose(intervals.holm([0.5, 0.4]), [0.8, 0.8])            # kept monotone
    np.testing.assert_allclose(intervals.holm([0.9, 0.8]), [1.0, 1.0])            # capped at 1


def test_intervals_by_hand_and_against_scipy():
    from scipy.stats import binomtest

    lo, hi = intervals.wilson(30, 100)
    ref = binomtest(30, 100).proportion_ci(0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-9)
    # a constant value has a zero-width interval; groups are resampled whole
    assert resampling.bootstrap_interval(np.full(8, 2.0), np.arange(8) // 2) == (2.0, 2.0, 2.0)
    values, groups = np.array([0.0, 0.0, 0.0, 10.0]), np.array([0, 0, 0, 1])
    mean, lo, hi = resampling.bootstrap_interval(values, groups, n_boot=4000)
    assert mean == 2.5 and lo == 0.0 and hi == 10.0    # a resample holds group 0 only, or 1 only


def test_data_stage_renders_counterfactuals_of_the_test_spots(tmp_path):
    cfg = dataset.DataConfig(world=synth.SynthConfig(spots_per_city=10, views=2, size=64), image_size=64,
                          cue_free_spots=3)
    result = dataset.run(cfg, tmp_path / "data", progress=False)
    cfs = dataset.load_counterfactuals(cfg, tmp_path / "data")
    cache = dataset.load_cache(result.cache_dir)
    test = cache.split_indices("test")
    world = worldfile.load_world("default")
    # every test image once per variant of its city (its cues, then cue-free)
    assert len(cfs.index) == sum(len(counterfactual.variants(world, c)) for c in cache.index["city"].iloc[test])
    assert set(cfs.index["row"]) == set(test.tolist())
    assert cfs.variants("treeville") == ["tree", "streetlight", CUE_FREE]
    # fresh spots, numbered after the world's own, every view, cue-free
    fresh = cfs.fresh_index
    assert len(fresh) == len(cfs.fresh_images) == 3 * cfg.cue_free_spots * 2
    assert {counterfactual.spot_of(g) for g in fresh["group"]} == set(range(10, 10 + cfg.cue_free_spots))
    assert not set(fresh["group"]) & set(cache.index["group"])
    g = fresh.iloc[-1]
    free = counterfactual.cached_views(world, cfg.world, 64, g["city"], counterfactual.spot_of(g["group"]),
                                       [int(g["view"])], CUE_FREE)[0]
    assert np.array_equal(free, cfs.fresh_images[-1])
    # the same rendering, JPEG and resizing as the cache: with no reset, the cached pixels exactly
    r = int(test[0])
    city, group, view = cache.index.loc[r, ["city", "group", "view"]]
    same = counterfactual.cached_views(world, cfg.world, 64, city, counterfactual.spot_of(group), [int(view)])[0]
    assert np.array_equal(same, cache.images[r])
    at = cfs.index.index[(cfs.index["row"] == r)]
    assert all(not np.array_equal(cfs.images[i], cache.images[r]) for i in at if cfs.index.loc[i, "variant"] == CUE_FREE)
    # reused by a second run; none for a folder of photos
    assert dataset.run(cfg, tmp_path / "data", progress=False).reused


def test_intervals_by_hand():
    # Wilson, 8 of 10 at 95% (z = 1.95996): centre (0.8 + z^2 / 20) / (1 + z^2 / 10) = 0.71674,
    # half-width z sqrt(0.016 + z^2 / 400) / (1 + z^2 / 10) = 0.22658: [0.49016, 0.94332]
    lo, hi = intervals.wilson(8, 10)
    assert (lo, hi) == (pytest.approx(0.49016, abs=1e-5), pytest.approx(0.94332, abs=1e-5))
    # whole groups: spot A has three images of value 0, spot B one of value 1. A resample draws
    # two spots: AA (p 1/4) has mean 0, AB (1/2) mean (0 + 0 + 0 + 1) / 4 = 0.25 - not 0.5, as
    # resampling images or averaging spots would give - and BB (1/4) mean 1
    means = resampling.bootstrap_means(np.array([0, 0, 0, 1.0]), np.array(["A", "A", "A", "B"]), 20000, seed=0)
    values, counts = np.unique(means, return_counts=True)
    assert values.tolist() == [0.0, 0.25, 1.0]
    np.testing.assert_allclose(counts / len(means), [0.25, 0.5, 0.25], atol=0.01)
    assert intervals.percentile(means, 0.95) == (0.0, 1.0)
    assert intervals.percentile(means, 0.40) == (0.25, 0.25)
    # spot weights: within each city every resample keeps the city's number of spots
    w = resampling.spot_weights(["A", "A", "A", "B", "C", "C"], ["x", "x", "x", "x", "y", "y"], 50, seed=1)
    assert (w[:, :3] == w[:, [0]]).all() and (w[:, 4] == w[:, 5]).all()
    assert ((w[:, 0] + w[:, 3]) == 2).all() and (w[:, 4] == 1).all()


def _null_grids(reps: int, runs: int = 8, spots: int = 146, views: int = 4, seed: int = 0):
    """Grids of runs' cue-free predictions on worlds where the cities cannot differ: each spot
    looks like some city to every network alike (shared images make the runs' predictions
    alike), but what it looks like is independent of the city it belongs to. The default job's
    size: 3 cities x 146 spots x 4 views = 1,752 images, 8 runs."""
    rng = np.random.default_rng(seed)
    names = np.array(["a", "b", "c"])
    groups = 3 * spots
    city = np.repeat(names, spots)
    for _ in range(reps):
        look = rng.integers(0, 3, groups)                           # (G,) what each spot looks like
        frames = {}
        for r in range(runs):
            follow = rng.random((groups, views)) < 0.6               # how often a run sees the look
            pred = np.where(follow, look[:, None], rng.integers(0, 3, (groups, views)))
            frame = pd.DataFrame({"sample": "fresh", "city": np.repeat(city, views),
                                  "group": np.repeat(np.arange(groups), views).astype(str),
                                  "view": np.tile(np.arange(views), groups), "predicted": names[pred.ravel()]})
            frames[f"r{r}"] = frame.assign(correct=frame["predicted"] == frame["city"])
        yield frames


def test_the_grids_cue_free_decision_cries_wolf_at_most_five_percent_of_the_time():
    """On worlds where the cities cannot differ, the decision a user reads (summary.csv's
    ``cue_free_at_chance``: Holm over the grid's runs) and the grid's one pooled test call a
    grid "not at chance" 5% of the time at most; each run judged on its own 95% range, as
    before, calls some run of the grid so far more often."""
    cfg = causal.CausalConfig(n_boot=200)
    reps, alone, holm, pooled = 150, 0, 0, 0
    for frames in _null_grids(reps):
        checks = {n: causal.cue_free(f, 3, cfg) for n, f in frames.items()}
        alone += not all(c["at_chance"] for c in checks.values())
        holm += not all(d["at_chance"] for d in causal.holm_decision({n: c["p"] for n, c in checks.items()}).values())
        pooled += not causal.pooled(frames, 3, n_perm=200)["at_chance"]
    bound = 0.05 + 3 * np.sqrt(0.05 * 0.95 / reps)                  # 5% and three of its standard errors
    assert holm / reps <= bound and pooled / reps <= bound, (holm, pooled)
    assert alone / reps > 0.15, alone                               # the old rule: some run, often


def test_data_stage_renders_each_test_spot_without_each_object_kind_it_shows(tmp_path):
    """The true deletions removal operators are calibrated against: the first
    ``deletion_spots`` test spots of each city, every deletable kind a view shows, its mask the
    pixels whose label the deletion changed, the rest of the image the cached one's."""
    from citylib.world import scene

    cfg = dataset.DataConfig(world=synth.SynthConfig(spots_per_city=10, views=2, size=64), image_size=64,
                             cue_free_spots=0, deletion_spots=1)
    dataset.run(cfg, tmp_path / "data", progress=False)
    cfs = dataset.load_counterfactuals(cfg, tmp_path / "data")
    cache = dataset.load_cache(dataset.run(cfg, tmp_path / "data", progress=False).cache_dir)
    gone = cfs.deleted_index
    assert len(gone) == len(cfs.deleted_images) == len(cfs.deleted_masks) > 0
    assert gone.groupby("city")["group"].nunique().to_dict() == {"signtown": 1, "towerville": 1, "treeville": 1}
    test = cache.index.iloc[cache.split_indices("test")]
    assert set(gone["group"]) == {min(g) for _, g in test.groupby("city")["group"]}
    for i, d in gone.iterrows():
        label, mask = cache.labels[d["row"]], cfs.deleted_masks[i]
        assert mask.any() and (label[mask] != 0).all()
        assert (label == scene.VOCAB[d["object"]]).any()               # the kind was in the view
        # JPEG's blocks spread a change a little: far from the mask the image is the cache's, nearly
        far = ~removal.dilate(mask[None], 8)[0]
        differ = np.abs(cfs.deleted_images[i].astype(int) - cache.images[d["row"]]).max(-1)[far]
        assert differ.mean() < 1.0, (d.to_dict(), differ.mean())
    # the same spots with each other city's cues added, one at a time (sufficiency)
    world = worldfile.load_world("default")
    added = cfs.added_index
    assert len(added) == len(cfs.added_images) == 3 * 2 * 4          # 3 cities x 2 views x 4 others' cues
    assert set(added["group"]) == set(gone["group"]) and not (added["city"] == added["donor"]).any()
    assert all(o in dict(world.planted[d]) for d, o in zip(added["donor"], added["object"]))
    changed = [not np.array_equal(cfs.added_images[i], cache.images[r]) for i, r in enumerate(added["row"])]
    assert np.mean(changed) > 0.5


def test_a_cue_added_from_another_city_moves_the_decision_towards_it():
    """Sufficiency: a network that calls anything red city 'a' is moved towards 'a' when a
    red cue is added to a black 'b' street, and away from 'b'; a cue it ignores moves nothing."""
    size, n = 16, 6
    black = np.zeros((n, size, size, 3), np.uint8)
    red, green = black.copy(), black.copy()
    red[:, :8, :8, 0] = 255
    green[:, -4:, -4:, 1] = 255
    rows = [(k, "b", f"b_{k:04d}", 0, "a", obj) for obj in ("tree", "fence") for k in range(n)]
    cfs = SimpleNamespace(added_images=np.concatenate([red, green]),
                          added_index=pd.DataFrame(rows, columns=counterfactual.ADDED_COLUMNS))
    table = causal.sufficiency(RedNet(), SimpleNamespace(images=black), cfs, ["a", "b", "c"],
                               causal.CausalConfig(n_boot=200)).set_index("object")
    assert table.loc["tree", "donor_ci_low"] > 0.5 and table.loc["tree", "true_ci_high"] < 0
    assert table.loc["tree", "called_donor_after"] == 1.0 and table.loc["tree", "called_donor_before"] == 0.0
    assert table.loc["fence", "donor_effect"] == pytest.approx(0, abs=1e-9)
    assert table.loc["fence", "true_effect"] == pytest.approx(0, abs=1e-9)
    assert (table["spots"] == n).all()
    empty = SimpleNamespace(added_images=np.zeros((0, size, size, 3), np.uint8),
                            added_index=pd.DataFrame(columns=counterfactual.ADDED_COLUMNS))
    assert causal.sufficiency(RedNet(), SimpleNamespace(images=black), empty, ["a", "b"]).empty
