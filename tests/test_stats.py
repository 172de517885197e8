"""Statistics stage on hand-made masks and label maps: Eq. 1, coverage, lift, filter, bootstrap."""
from __future__ import annotations

import zlib

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from citylib.core import ade20k  # noqa: E402
from citylib.explain import cues as cues_  # noqa: E402
from citylib.figures import stats_plots
from citylib.stages import objects as objects_stage
from citylib.stats import histograms
from citylib.stats.histograms import Histograms, StatsConfig  # noqa: E402

SKY, ROAD, TREE, BUILDING, CAR = 3, 7, 5, 2, 21
NAMES = {i: n for n, i in ade20k.STREET.items()}
NO_FILTER = StatsConfig(min_pixels_224=0.0, bootstrap=200)


def hand_made():
    """Three 4 x 4 images (16 pixels each); cities a, a, b.

    image 0 (a): rows 0-1 sky, rows 2-3 road; mask 1.0 on the sky's left 2 x 2, 0.6 on the
    road's first two pixels of row 2, 0 elsewhere.
    image 1 (a): columns 0-1 tree, columns 2-3 road; mask 0.5 everywhere.
    image 2 (b): all building; mask all zero.
    """
    lab = np.zeros((3, 4, 4), np.uint8)
    lab[0, :2], lab[0, 2:] = SKY, ROAD
    lab[1, :, :2], lab[1, :, 2:] = TREE, ROAD
    lab[2] = BUILDING
    m = np.zeros((3, 4, 4), np.float32)
    m[0, :2, :2] = 1.0
    m[0, 2, :2] = 0.6
    m[1] = 0.5
    return m, lab, np.array(["a", "a", "b"])


def rows(table: pd.DataFrame) -> dict:
    return {(r.city, r.object): r for r in table.itertuples()}


def test_eq1_coverage_lift_by_hand():
    m, lab, cities = hand_made()
    t = rows(Histograms.build(m, lab, cities, NO_FILTER, NAMES, progress=False).table(0.5))
    # t = 0.5, city a. sky: image 0 has 8 sky pixels, 4 of them at mask 1.0 -> R = 4/8.
    # road: image 0 has 8 (2 at 0.6), image 1 has 8 (all at 0.5) -> R = (2+8)/(8+8) = 0.625.
    # tree: image 1 only, 8 of 8 -> R = 1.
    # coverage: image 0 explains 4 + 2 = 6 of 16 pixels, image 1 16 of 16 -> (0.375+1)/2 = 0.6875.
    assert t["a", "sky"].R == 0.5 and t["a", "sky"].pixels == 8
    assert t["a", "road"].R == 0.625 and t["a", "road"].pixels == 16
    assert t["a", "tree"].R == 1.0
    assert t["a", "sky"].coverage == pytest.approx(0.6875)
    assert t["a", "sky"].lift == pytest.approx(0.5 / 0.6875)   # 0.7273
    assert t["a", "road"].lift == pytest.approx(0.625 / 0.6875)  # 0.9091
    assert t["a", "tree"].lift == pytest.approx(1 / 0.6875)   # 1.4545


def test_other_thresholds_by_hand():
    m, lab, cities = hand_made()
    h = Histograms.build(m, lab, cities, NO_FILTER, NAMES, progress=False)
    t = rows(h.table(0.6))
    # t = 0.6: image 0 keeps sky 4 (1.0) and road 2 (0.6 >= 0.6); image 1 (0.5) drops out.
    # R_sky = 4/8, R_road = 2/16, R_tree = 0; coverage = (6/16 + 0)/2 = 0.1875.
    assert (t["a", "sky"].R, t["a", "road"].R, t["a", "tree"].R) == (0.5, 0.125, 0.0)
    assert t["a", "sky"].coverage == pytest.approx(0.1875)
    t = rows(h.table(0.7))
    # t = 0.7: only the 4 sky pixels at 1.0: coverage = (4/16)/2 = 0.125, lift_sky = 0.5/0.125 = 4.
    assert t["a", "sky"].lift == pytest.approx(4.0) and t["a", "road"].R == 0.0
    t = rows(h.table(0.0))  # everything is explained: R = coverage = lift = 1
    assert all(r.R == 1.0 and r.coverage == 1.0 and r.lift == 1.0 for r in t.values())
    t = rows(h.table(1.0))  # a mask of exactly 1 is >= 1: the top bin holds it
    assert t["a", "sky"].R == 0.5 and t["a", "sky"].coverage == pytest.approx(4 / 16 / 2)


def test_all_zero_mask_and_absent_objects():
    m, lab, cities = hand_made()
    table = Histograms.build(m, lab, cities, NO_FILTER, NAMES, progress=False).table(0.5)
    t = rows(table)
    # City b's only mask is all zero: R = 0/16 = 0, coverage = 0, lift = 0/0 -> NaN, no CI.
    b = t["b", "building"]
    assert b.R == 0.0 and b.coverage == 0.0 and np.isnan(b.lift)
    assert np.isnan(b.lift_ci_low) and np.isnan(b.lift_ci_high)
    # An object absent from a city has no row (its R would be 0/0); car is nowhere; unlabelled
    # (0) never has a row.
    assert ("b", "sky") not in t and ("a", "building") not in t
    assert "car" not in set(table["object"]) and "0" not in set(table["object"])
    assert list(table.columns) == histograms.TABLE_COLUMNS


def test_threshold_must_be_a_bin_edge():
    m, lab, cities = hand_made()
    h = Histograms.build(m, lab, cities, NO_FILTER, NAMES, progress=False)
    with pytest.raises(ValueError, match="multiple of 1/100"):
        h.table(0.505)
    with pytest.raises(ValueError, match="multiple of 1/8"):
        StatsConfig(bins=8, threshold=0.3)
    assert histograms.edge(0.25, 100) == 25 and histograms.edge(0.375, 8) == 3


def test_value_exactly_on_an_edge():
    lab = np.full((1, 2, 2), ROAD, np.uint8)
    m = np.array([[[0.25, 0.25], [0.2499999, 0.26]]], np.float32)
    h = Histograms.build(m, lab, ["a"], NO_FILTER, NAMES, progress=False)
    # >= 0.25: the two values at exactly 0.25 and 0.26 -> 3/4; >= 0.26: only 0.26 -> 1/4.
    # float32(0.26) lies below the real 0.26, yet counts as >= 0.26, as numpy's m >= 0.26 says.
    assert h.table(0.25)["R"].item() == 0.75 and h.table(0.26)["R"].item() == 0.25
    assert (m >= 0.26).sum() == 1


def brute_force(m, lab, cities, t):
    """R and coverage straight from the arrays (``m >= t``: numpy compares in float32)."""
    explained = m >= t
    out = {}
    for c in np.unique(cities):
        sel = cities == c
        cov = explained[sel].mean(axis=(1, 2)).mean()
        for p in np.unique(lab[sel]):
            if p:
                obj = lab[sel] == p
                out[c, NAMES.get(int(p), str(p))] = ((explained[sel] & obj).sum() / obj.sum(), cov, obj.sum())
    return out


@pytest.mark.parametrize("bins", [100, 7, 256])
def test_histograms_equal_brute_force_at_every_edge(bins):
    rng = np.random.default_rng(bins)
    m = rng.random((40, 24, 24), dtype=np.float32)
    m[3] = 0.0
    m[4] = 1.0
    edges = (np.arange(bins + 1) / bins).astype(np.float32)  # float32 edges: some below k/bins
    m[5:8].flat[:3 * bins + 3] = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 1)])
    lab = rng.choice([0, SKY, ROAD, TREE, BUILDING, CAR], size=(40, 24, 24)).astype(np.uint8)
    cities = np.array(["x", "y", "z"])[rng.integers(0, 3, 40)]
    h = Histograms.build(m, lab, cities, StatsConfig(bins=bins, threshold=0.0, min_pixels_224=0,
                                                     bootstrap=0), NAMES, progress=False)
    for k in range(bins + 1):
        want = brute_force(m, lab, cities, k / bins)
        got = rows(h.table(k / bins))
        assert set(got) == set(want)
        for key, (r, cov, n) in want.items():
            assert got[key].R == pytest.approx(r, abs=1e-12), (k, key)
            assert got[key].coverage == pytest.approx(cov, abs=1e-12)
            assert got[key].pixels == n


@pytest.mark.parametrize("threshold, bins", [(0.5, 2), (0.37, 100), (0.25, 4), (0.0, 1), (1.0, 1)])
def test_fewest_bins_count_as_all_bins_at_the_threshold(threshold, bins):
    rng = np.random.default_rng(1)
    m = rng.random((30, 16, 16), dtype=np.float32)
    at = np.float32(threshold)
    m[2].flat[:3] = [at, np.nextafter(at, np.float32(0)), np.nextafter(at, np.float32(1))]  # on the edge
    m[3] = 1.0
    lab = rng.choice([0, SKY, ROAD, TREE, BUILDING, CAR], size=(30, 16, 16)).astype(np.uint8)
    cities = np.array(["x", "y"])[rng.integers(0, 2, 30)]
    cfg = StatsConfig(threshold=threshold, min_pixels_224=0, bootstrap=200)
    coarse = histograms.at_threshold(cfg)
    assert coarse.bins == bins and coarse.threshold == threshold
    full = Histograms.build(m, lab, cities, cfg, NAMES, progress=False)
    few = Histograms.build(m, lab, cities, coarse, NAMES, progress=False)
    pd.testing.assert_frame_equal(few.table(), full.table())      # R, coverage, lift and their CIs
    w = np.random.default_rng(2).integers(0, 3, (5, 30)).astype(float)
    for c, (objects, lift) in full.resampled_lift(w).items():
        np.testing.assert_array_equal(few.resampled_lift(w)[c][0], objects)
        np.testing.assert_array_equal(few.resampled_lift(w)[c][1], lift)


def test_batches_iterator_and_callable_match_array():
    rng = np.random.default_rng(0)
    m = rng.random((10, 8, 8), dtype=np.float32)
    lab = rng.choice([SKY, ROAD, TREE], size=(10, 8, 8)).astype(np.uint8)
    cities = ["a"] * 5 + ["b"] * 5
    whole = Histograms.build(m, lab, cities, NO_FILTER, NAMES, progress=False).table()
    batches = Histograms.build(iter([m[:3], m[3:4], m[4:]]), lab, cities, NO_FILTER, NAMES,
                               progress=False).table()
    func = Histograms.build(lambda: (m[i:i + 4] for i in range(0, 10, 4)), lab, cities, NO_FILTER,
                            NAMES, progress=False).table()
    small = np.repeat(np.repeat(m[:, ::2, ::2], 2, axis=1), 2, axis=2)  # an 8 x 8 "upsampled" 4 x 4
    up = Histograms.build(histograms.upsampled(m[:, ::2, ::2], 8, lambda b, s: np.repeat(np.repeat(b, 2, 1), 2, 2),
                                          batch=3), lab, cities, NO_FILTER, NAMES, progress=False).table()
    pd.testing.assert_frame_equal(whole, batches)
    pd.testing.assert_frame_equal(whole, func)
    pd.testing.assert_frame_equal(up, Histograms.build(small, lab, cities, NO_FILTER, NAMES,
                                                       progress=False).table())
    with pytest.raises(ValueError, match="masks for 3 images but 10"):
        Histograms.build(iter([m[:3]]), lab, cities, NO_FILTER, NAMES, progress=False)


def test_bad_masks_fail_clearly():
    m, lab, cities = hand_made()
    for bad, match in [(m * 2, "image 0 spans 0.0..2.0"), (np.full_like(m, np.nan), "expected"),
                       (m[:, :2, :2], "upsample")]:
        with pytest.raises(ValueError, match=match):
            Histograms.build(bad, lab, cities, NO_FILTER, NAMES, progress=False)
    # Interpolation may overshoot 1 by a rounding error: clipped, counted as 1.
    h = Histograms.build(m * np.float32(1.0000001), lab, cities, NO_FILTER, NAMES, progress=False)
    assert rows(h.table(1.0))["a", "sky"].R == 0.5


def filter_case(size: int):
    """City a, two images of side ``size``, filter f = 100 * size^2 / 224^2 (100 at 224, 25 at
    112). Per image: tree f pixels (mean f: not above f, dropped), car f + 1 (kept), sky 1.5 f
    in one image only (mean 0.75 f: the average runs over all the city's images; dropped)."""
    f = 100 * size * size // (224 * 224)
    lab = np.full((2, size, size), ROAD, np.uint8)
    flat = lab.reshape(2, -1)
    flat[:, :f] = TREE
    flat[:, f:2 * f + 1] = CAR
    flat[0, 2 * f + 1:2 * f + 1 + 3 * f // 2] = SKY
    return np.full(lab.shape, 0.5, np.float32), lab, ["a", "a"]


@pytest.mark.parametrize("size", [224, 112])
def test_object_filter_scales_with_area(size):
    m, lab, cities = filter_case(size)
    h = Histograms.build(m, lab, cities, StatsConfig(bootstrap=0), NAMES, progress=False)
    assert histograms.min_pixels(h.cfg, size) == 100 * size ** 2 / 224 ** 2  # 100 at 224, 25 at 112
    assert set(h.table()["object"]) == {"car", "road"}


def test_bootstrap_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(5)
    m = rng.random((60, 16, 16), dtype=np.float32) ** 2
    lab = rng.choice([SKY, ROAD, TREE, CAR], size=(60, 16, 16)).astype(np.uint8)
    lab[:30, :6] = SKY  # city a: more sky, and sky gets brighter masks
    m[:30, :6] = np.sqrt(m[:30, :6])
    cities = np.repeat(["a", "b"], 30)
    cfg = StatsConfig(min_pixels_224=0, bootstrap=500, seed=3)
    one = Histograms.build(m, lab, cities, cfg, NAMES, progress=False).table()
    two = Histograms.build(m, lab, cities, cfg, NAMES, progress=False).table()
    pd.testing.assert_frame_equal(one, two)  # deterministic for a seed
    assert ((one.lift_ci_low <= one.lift) & (one.lift <= one.lift_ci_high)).all()
    assert (one.lift_ci_high - one.lift_ci_low > 0).all()
    other = Histograms.build(m, lab, cities, StatsConfig(min_pixels_224=0, bootstrap=500, seed=4),
                             NAMES, progress=False).table()
    assert not np.allclose(one.lift_ci_low, other.lift_ci_low)
    pd.testing.assert_series_equal(one.lift, other.lift)
    none = Histograms.build(m, lab, cities, StatsConfig(min_pixels_224=0, bootstrap=0), NAMES,
                            progress=False).table()
    assert none.lift_ci_low.isna().all() and none.lift_ci_high.isna().all()


def test_bootstrap_matches_explicit_resampling():
    """The weighted-sum bootstrap equals drawing images and recomputing lift for each draw."""
    rng = np.random.default_rng(9)
    m = rng.random((12, 8, 8), dtype=np.float32)
    lab = rng.choice([SKY, ROAD], size=(12, 8, 8)).astype(np.uint8)
    cfg = StatsConfig(min_pixels_224=0, bootstrap=300, seed=1)
    got = rows(Histograms.build(m, lab, ["a"] * 12, cfg, NAMES, progress=False).table(0.5))
    draws = np.random.default_rng([1, zlib.crc32(b"a")]).integers(0, 12, size=(300, 12))
    explained = m >= 0.5
    for p, name in [(SKY, "sky"), (ROAD, "road")]:
        lifts = [(explained[d] & (lab[d] == p)).sum() / (lab[d] == p).sum() / explained[d].mean()
                 for d in draws]
        lo, hi = np.percentile(lifts, [2.5, 97.5])
        assert got["a", name].lift_ci_low == pytest.approx(lo, rel=1e-5)
        assert got["a", name].lift_ci_high == pytest.approx(hi, rel=1e-5)


def constructed_table() -> pd.DataFrame:
    data = [("a", "x", 3.0), ("a", "y", 2.0), ("a", "z", 1.5), ("a", "w", 1.0),
            ("b", "p", 2.0), ("b", "q", 1.0),
            ("d", "r", 2.0), ("d", "s", 2.0), ("d", "t", 1.0)]
    frame = pd.DataFrame(data, columns=["city", "object", "lift"])
    return frame.assign(R=frame.lift / 4, pixels=1000, coverage=0.25, lift_ci_low=np.nan,
                        lift_ci_high=np.nan)[histograms.TABLE_COLUMNS]


def test_planted_recovery_ranks_and_mrr():
    cues = {"a": [("y", "why"), ("w", "why")], "b": ["p"], "c": ["missing"], "d": ["s"],
            "e": []}
    c = constructed_table()
    c = pd.concat([c, pd.DataFrame([{**c.iloc[0].to_dict(), "city": "c", "object": "k"}])])
    frame, metrics = cues_.recovery(c, cues)
    ranks = {(r.city, r.object): r.rank for r in frame.itertuples()}
    # a: lifts x 3, y 2, z 1.5, w 1 -> y rank 2, w rank 4: RR 1/2, not all in the top 3.
    # b: p first: RR 1, all in top 3. c: its cue has no row: rank NaN, RR 0.
    # d: r and s tie at 2.0 -> both rank 1 (ties share the better rank): RR 1.
    assert ranks["a", "y"] == 2 and ranks["a", "w"] == 4 and ranks["b", "p"] == 1
    assert np.isnan(ranks["c", "missing"]) and ranks["d", "s"] == 1
    assert metrics["planted_rr"] == {"a": 0.5, "b": 1.0, "c": 0.0, "d": 1.0}
    assert metrics["planted_mrr"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert metrics["planted_all_in_top"] == {"a": False, "b": True, "c": False, "d": True}
    assert "e" not in metrics["planted_rr"]  # a city without cues is left out


def test_ideal_masks_pool_each_citys_own_cues_by_hand():
    S = ade20k.STREET
    lab = np.full((3, 4, 4), S["road"], np.uint8)
    lab[0, :2, :2] = S["tree"]         # city a: its cue fills the top-left cell ...
    lab[0, 0, 2] = S["tree"]           # ... and 1 of the top-right cell's 4 pixels
    lab[0, 3, 3] = S["sky"]            # city b's cue in a's image: not a's cue, ignored
    lab[2] = S["sky"]                  # image 2 (b): its cue everywhere, a constant map
    cues = {"a": ["tree"], "b": [("sky", "why")]}
    m = cues_.ideal_masks(lab, ["a", "b", "b"], cues, (2, 2), NAMES)
    assert m.shape == (3, 2, 2) and m.dtype == np.float32
    # image 0: cell shares [[1, 0.25], [0, 0]]; min 0, max 1 -> unchanged
    np.testing.assert_allclose(m[0], [[1.0, 0.25], [0.0, 0.0]])
    # image 1 (b) has no sky pixel; image 2 is all cue, a constant map: both all zero, no NaN
    assert (m[1] == 0).all() and (m[2] == 0).all()


def test_ideal_masks_read_the_label_maps_a_batch_at_a_time_and_give_the_whole_sets_masks():
    S = ade20k.STREET
    rng = np.random.default_rng(0)
    lab = rng.choice([S["road"], S["tree"], S["sky"]], (5, 8, 8)).astype(np.uint8)
    cities, cues = ["a", "b", "a", "b", "b"], {"a": ["tree"], "b": ["sky"]}
    whole = cues_.ideal_masks(lab, cities, cues, (4, 4), NAMES)
    read = []

    class Maps(np.ndarray):                       # records how many maps each read takes
        def __getitem__(self, index):
            out = np.asarray(self.view(np.ndarray)[index])
            read.append(len(out))
            return out

    batched = cues_.ideal_masks(lab.view(Maps), cities, cues, (4, 4), NAMES, batch=2)
    assert read and max(read) <= 2
    np.testing.assert_array_equal(batched, whole)
    assert not (whole == 0).all()


def test_ceiling_tells_a_cue_finer_than_the_map():
    """8 x 8 images of city a: cue 'tree' is the 2 x 2 block at rows/cols 2-3 (inner corner of
    the top-left quadrant), 'building' the rest of that quadrant (12 px), 'road' elsewhere.

    Full resolution: the ideal mask is the tree itself -> tree R 1, rank 1.
    A 2 x 2 map: the top-left cell (share 4/16) normalises to 1, the others to 0; bilinear
    upsampling (half-pixel centres) gives 1, 1, 0.875, 0.625 along rows/cols 0-3 and <= 0.375
    beyond, so at t = 0.5 every building pixel is explained (R 1) but the tree's (3, 3) pixel
    is not (0.625 * 0.625 < 0.5): tree R 3/4 < building's -> rank 2, out of the top 1."""
    from citylib.explain import saliency

    S = ade20k.STREET
    lab = np.full((2, 8, 8), S["road"], np.uint8)
    lab[:, :4, :4] = S["building"]
    lab[:, 2:4, 2:4] = S["tree"]
    cues = {"a": ["tree"]}
    fine, best = cues_.ceiling(lab, ["a", "a"], cues, (8, 8), saliency.upsample, NO_FILTER, top=1, names=NAMES)
    assert fine["rank"].tolist() == [1] and fine["R"].tolist() == [1.0]
    assert best["planted_all_in_top"] == {"a": True} and best["planted_mrr"] == 1.0
    coarse, worst = cues_.ceiling(lab, ["a", "a"], cues, (2, 2), saliency.upsample, NO_FILTER, top=1, names=NAMES)
    assert coarse["rank"].tolist() == [2] and coarse["R"].tolist() == [0.75]
    assert worst["planted_all_in_top"] == {"a": False} and worst["planted_mrr"] == 0.5


def test_planted_cues_of_the_default_world():
    cues = cues_.planted("default")
    assert len(cues) >= 2 and all(cues.values())
    assert all(o in ade20k.STREET for objects in cues.values() for o in objects)


def test_run_writes_table_and_reloads(tmp_path):
    m, lab, cities = hand_made()
    result = objects_stage.score(NO_FILTER, tmp_path, m, lab, cities, names=NAMES, progress=False)
    saved = pd.read_csv(tmp_path / "r_scores.csv")
    assert list(saved.columns) == histograms.TABLE_COLUMNS and len(saved) == len(result.table) == 4
    again = Histograms.load(tmp_path / "histograms.npz")
    pd.testing.assert_frame_equal(again.table(0.6), result.histograms.table(0.6))
    assert (tmp_path / "r_scores.json").exists()
    with pytest.raises(ValueError, match="bins=100"):
        Histograms.load(tmp_path / "histograms.npz", StatsConfig(bins=50))


def test_plots_return_figures():
    from matplotlib.figure import Figure
    m, lab, cities = hand_made()
    table = Histograms.build(m, lab, cities, NO_FILTER, NAMES, progress=False).table()
    cues = {"a": ["tree"]}
    assert isinstance(stats_plots.plot_r_histograms(table, cues), Figure)
    assert isinstance(stats_plots.plot_lift(table, cues), Figure)


def test_threshold_panel_redraws_its_image_when_a_control_moves():
    from citylib.figures import widgets

    m, lab, cities = hand_made()
    h = Histograms.build(m, lab, cities, NO_FILTER, NAMES, progress=False)
    panel = widgets.threshold_panel(h)
    (slider, view), (image, error) = panel.children[0].children, panel.children[1].children
    assert (slider.min, slider.max, slider.value) == (0.0, 1.0, h.cfg.threshold)   # as everywhere: [0, 1]
    first = bytes(image.value)
    assert first[:4] == b"\x89PNG"
    slider.value = slider.max                      # threshold 1: only the sky pixels of image 0
    at_one = bytes(image.value)
    assert at_one[:4] == b"\x89PNG" and at_one != first
    view.value = "lift"
    assert bytes(image.value) not in (first, at_one) and error.value == ""


def test_a_redraw_that_raises_keeps_the_picture_and_shows_the_error():
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from citylib.figures import widgets

    def figure(k):
        if k == 2:
            raise ValueError("no figure for two")
        fig = plt.figure(figsize=(1, 1))
        fig.text(0.5, 0.5, str(k))
        return fig

    k = w.IntSlider(0, 0, 3)
    image, error = widgets.figure_view(figure, {"k": k}, "100px").children
    k.value = 1
    one = bytes(image.value)
    k.value = 2                                    # raises inside the callback: shown, not lost
    assert bytes(image.value) == one and "ValueError: no figure for two" in error.value
    assert "citylib-error" in error._dom_classes
    k.value = 3
    assert bytes(image.value) != one and error.value == ""


def test_differences_ratio_floor_and_declared_cues():
    share = pd.DataFrame([("a", "tree", 0.10), ("b", "tree", 0.0),          # b lacks trees
                          ("a", "awning", 0.02), ("b", "awning", 0.005),    # undeclared, 4x
                          ("a", "road", 0.20), ("b", "road", 0.20)],
                         columns=["city", "object", "share"])
    d = cues_.differences(share, {"a": [("tree", "why")], "b": ["tree"]}, floor=0.001).set_index("object")
    assert list(d.index) == ["tree", "awning", "road"]                      # by ratio
    assert d.loc["tree", "ratio"] == pytest.approx(0.10 / 0.001)            # 0 counted as the floor
    assert d.loc["awning", "ratio"] == pytest.approx(4.0) and d.loc["road", "ratio"] == 1.0
    assert d.loc["tree", "planted"] == "a, b" and d.loc["awning", "planted"] == ""
    assert d.loc["tree", "a"] == 0.10 and d.loc["tree", "b"] == 0.0
    assert list(cues_.differences(share).planted.unique()) == [""]           # no world, no cues
