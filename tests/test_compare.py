"""Comparison stage: Eq. 2 on hand-made masks, streaming, CIs, both tests, Table 2, the stage."""
from __future__ import annotations

import math
from itertools import combinations
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from citylib.core.artifacts import read_json, write_csv, write_json  # noqa: E402
from citylib.core.config import ConfigError, from_dict  # noqa: E402
from citylib.explain import cams, saliency  # noqa: E402
from citylib.figures import compare_plots
from citylib.nets import models
from citylib.stages import ar_tables, compare, gradcam, residuals
from citylib.stages.compare import CompareConfig  # noqa: E402
from citylib.stats import resampling
from conftest import gradcam_folder  # noqa: E402

CITIES = ["amsterdam", "berlin", "cairo"]


def smooth(n: int, side: int, seed: int) -> np.ndarray:
    """(n, side, side) float16 masks in [0, 1] (min 0, max 1 per mask)."""
    g = torch.from_numpy(np.random.default_rng(seed).random((n, 1, 3, 3), dtype=np.float32))
    up = torch.nn.functional.interpolate(g, size=(side, side), mode="bilinear")[:, 0]
    return saliency.normalise(up).numpy().astype(np.float16)


def fake_run(root, name: str, arch: str, seed: int, masks: np.ndarray, rows, size: int,
             cities=None, data_key: str = "snap"):
    """A run folder as the runner and gradcam.run leave it (no checkpoint)."""
    d = root / name
    rows = np.asarray(rows)
    cities = cities if cities is not None else [CITIES[r % 3] for r in rows]
    write_json(d / "config.json", {"config": {"name": name, "arch": arch, "seed": seed},
                                   "config_hash": name})
    gradcam_folder(d, masks, rows, [f"img/{r}.png" for r in rows], cities, cities,
                   {"image_size": size, "config": {"batch_size": 4, "threshold": 0.5}, "key": f"h-{name}", "data_key": data_key})
    return d


def naive(ma, mb, size):
    """All at once, in numpy: upsample every mask, mean |a - b| per image."""
    return np.abs(saliency.upsample(ma, size) - saliency.upsample(mb, size)).mean((1, 2))


def test_ar_by_hand_self_and_symmetry():
    # S = 2 and 2 x 2 masks: bilinear to the same size is the identity, and min-max
    # renormalisation keeps masks whose min is 0 and max is 1.
    a = np.array([[[1, 0], [0, 0.5]], [[1, 0], [0, 0]]], np.float16)
    b = np.array([[[0, 1], [0.25, 0.5]], [[1, 0], [0, 0]]], np.float16)
    # image 0: |1-0| + |0-1| + |0-0.25| + |0.5-0.5| = 2.25, / (2 x 2) = 0.5625; image 1: 0
    # average over the two images: (0.5625 + 0) / 2 = 0.28125
    mean, rows, ar = residuals.average_residual([5, 9], a, [5, 9], b, size=2)
    assert rows.tolist() == [5, 9] and ar.dtype == np.float32
    assert ar.tolist() == [0.5625, 0.0] and mean == 0.28125
    assert residuals.average_residual([5, 9], b, [5, 9], a, 2)[2].tolist() == ar.tolist()
    assert residuals.average_residual([5, 9], a, [5, 9], a, 2)[0] == 0.0
    m = smooth(20, 7, 0)
    assert residuals.average_residual(range(20), m, range(20), m, 32)[0] == 0.0


def test_different_native_sizes_compared_at_image_size():
    # the same map stored at 4 x 4 and at 8 x 8 (its upsampling): AR ~ 0 at S = 8 (float16
    # rounding only), although the native arrays cannot even be subtracted
    a = smooth(6, 4, 1)
    b = saliency.upsample(a, 8).astype(np.float16)
    assert residuals.average_residual(range(6), a, range(6), b, 8)[0] < 1e-3
    c = smooth(6, 8, 2)
    mean, _, ar = residuals.average_residual(range(6), a, range(6), c, 16)
    np.testing.assert_allclose(ar, naive(a, c, 16), atol=1e-6)
    assert 0.05 < mean < 1


def test_only_common_images_matched_by_row():
    a, b = smooth(4, 4, 3), smooth(3, 2, 4)
    # run a has rows 0..3; run b has rows 4, 3, 2 (another order): common rows 2, 3
    mean, rows, ar = residuals.average_residual([0, 1, 2, 3], a, [4, 3, 2], b, 8)
    assert rows.tolist() == [2, 3]
    np.testing.assert_allclose(ar, naive(a[[2, 3]], b[[2, 1]], 8), atol=1e-6)
    with pytest.raises(ValueError, match="share no test image"):
        residuals.average_residual([0, 1], a[:2], [7, 8], b[:2], 8)


def test_streaming_equals_all_at_once():
    rng = np.random.default_rng(0)
    sizes = (7, 14, 3)
    masks = [smooth(50, s, 10 + s) for s in sizes]
    rows = [rng.permutation(60)[:50] for _ in sizes]                 # overlapping, shuffled
    sources = list(zip(rows, masks))
    big = residuals.pairwise_ar(sources, 28, batch_size=1000)
    for bs in (1, 7):
        small = residuals.pairwise_ar(sources, 28, batch_size=bs)
        for p in big:
            assert np.array_equal(small[p][0], big[p][0])
            np.testing.assert_allclose(small[p][1], big[p][1], rtol=0, atol=1e-7)
    for (i, j), (common, ar) in big.items():
        pi = [np.flatnonzero(rows[i] == r)[0] for r in common]
        pj = [np.flatnonzero(rows[j] == r)[0] for r in common]
        np.testing.assert_allclose(ar, naive(masks[i][pi], masks[j][pj], 28), atol=1e-6)


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    v = np.random.default_rng(1).random(500).astype(np.float32)
    lo, hi = resampling.bootstrap_interval(v, None, 1000, 0.95, [0, 7], chunk=resampling.CHUNK)[1:]
    assert lo < v.mean() < hi and hi - lo < 0.1
    assert resampling.bootstrap_interval(v, None, 1000, 0.95, [0, 7], chunk=resampling.CHUNK)[1:] == (lo, hi)
    assert resampling.bootstrap_interval(v, None, 1000, 0.95, [1, 7], chunk=resampling.CHUNK)[1:] != (lo, hi)


def test_pair_permutation_exact_enumeration():
    arch, seed = [0.43, 0.43, 0.45, 0.41, 0.41, 0.31], [0.27, 0.23, 0.24, 0.25]   # Table 2
    res = resampling.relabelling_test(arch, seed, permutations=10000)
    assert "C(10,6) = 210" in res["method"] and res["n"] == 10
    # the observed labelling is the most extreme one of 210: p = 1/210
    assert res["p_value"] == pytest.approx(1 / 210)
    assert res["statistic"] == pytest.approx(np.mean(arch) - np.mean(seed))
    # by brute force on a case without a clear answer
    x = np.array([3.0, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    obs = x[:6].mean() - x[6:].mean()
    count = sum(x[list(c)].mean() - np.delete(x, c).mean() >= obs - 1e-12
                for c in combinations(range(10), 6))
    res = resampling.relabelling_test(x[:6], x[6:])
    assert res["p_value"] == pytest.approx(count / math.comb(10, 6))
    # the same distribution on both sides: statistic 0, p not small
    res = resampling.relabelling_test([1, 2, 3, 4, 5, 6], [2, 3, 4, 5])
    assert res["statistic"] == 0 and res["p_value"] > 0.3
    # Monte Carlo when the labellings outnumber the permutations; seeded
    mc = resampling.relabelling_test(arch, seed, permutations=100, seed=3)
    assert mc["method"].startswith("Monte Carlo") and mc["p_value"] == 1 / 101
    assert resampling.relabelling_test([1.0], [])["p_value"] is None


def test_image_sign_flip():
    rng = np.random.default_rng(2)
    res = resampling.sign_flip_test(0.05 + 0.01 * rng.standard_normal(1000), 2000, seed=0)
    assert res["p_value"] == 1 / 2001 and res["n"] == 1000
    d = rng.standard_normal(500)
    res = resampling.sign_flip_test(np.concatenate([d, -d]), 2000, seed=0)
    assert res["statistic"] == pytest.approx(0, abs=1e-12) and res["p_value"] > 0.3
    assert resampling.sign_flip_test(np.concatenate([d, -d]), 2000, seed=0) == res
    # exact: d = (1, 2, 3); of the 8 sign patterns only (+, +, +) reaches mean 2: p = 1/8
    res = resampling.sign_flip_test([1.0, 2.0, 3.0], 10000)
    assert res["p_value"] == 1 / 8 and "2^3" in res["method"]


def test_table2_pools_seeds():
    f = pd.DataFrame([
        ["v0", "r0", "architecture", 0.40, 0.38, 0.42, 10, "vgg11", "resnet18"],
        ["r1", "v1", "architecture", 0.44, 0.41, 0.47, 10, "resnet18", "vgg11"],
        ["v0", "v1", "seed", 0.25, 0.20, 0.30, 10, "vgg11", "vgg11"],
        ["v0", "v0 (randomised)", "randomised", 0.6, 0.5, 0.7, 10, "vgg11", "vgg11"],
    ], columns=ar_tables.COLUMNS)
    t = ar_tables.table2(f).set_index("models")
    assert list(t.index) == ["VGG11-ResNet18", "VGG11-VGG11 retrained", "VGG11-VGG11 randomised"]
    r = t.loc["VGG11-ResNet18"]
    assert r.ar == pytest.approx(0.42) and (r.ci_low, r.ci_high) == (0.38, 0.47)
    assert (r.ar_min, r.ar_max, r.n_pairs) == (0.40, 0.44, 2)


def grid(tmp_path, n=40, size=16):
    """2 archs x 2 seeds; seeds of one arch share most of the map, archs do not."""
    runs = []
    for arch, side, base in (("vgg11", 4, 0), ("resnet18", 2, 1)):
        shared = smooth(n, side, 100 + base).astype(np.float32)
        for seed in (0, 1):
            noise = smooth(n, side, 200 + 10 * base + seed).astype(np.float32)
            m = saliency.normalise(torch.from_numpy(0.8 * shared + 0.2 * noise)).numpy()
            runs.append(fake_run(tmp_path, f"{arch}_seed{seed}", arch, seed, m, np.arange(n) * 2,
                                 size))
    return runs


def test_stage_on_fake_runs_and_reuse(tmp_path):
    runs = grid(tmp_path / "runs")
    for d, shift in zip(runs[:2], (0.0, 2.5)):
        write_csv(d / "r_scores.csv", pd.DataFrame({
            "city": "amsterdam", "object": list("abcd"), "pixels": 1, "R": 0.5, "coverage": 0.5,
            "lift": [1.0 + shift, 2, 3, 4], "lift_ci_low": 0, "lift_ci_high": 5}))
    cfg = CompareConfig(batch_size=7, bootstrap=200, permutations=2000, randomised=False)
    out = tmp_path / "comparison"
    res = compare.run(cfg, out, runs, None, progress=False)
    frame = pd.read_csv(out / "ar.csv")
    assert list(frame.columns)[:6] == ["run_a", "run_b", "kind", "ar", "ci_low", "ci_high"]
    assert sorted(frame["kind"]) == ["architecture"] * 4 + ["seed"] * 2
    assert (frame["ci_low"] <= frame["ar"]).all() and (frame["ar"] <= frame["ci_high"]).all()
    seed_ar = frame[frame["kind"] == "seed"]["ar"]
    assert seed_ar.max() < frame[frame["kind"] == "architecture"]["ar"].min()
    tests = read_json(out / "tests.json")
    # units: 1 architecture row (VGG11-ResNet18) vs 2 retrained rows: C(3, 1) = 3 labellings
    assert tests["pair_permutation"]["p_value"] == pytest.approx(1 / 3)
    assert tests["pair_permutation"]["units"]["seed"]["VGG11-VGG11 retrained"] == [
        ["vgg11_seed0", "vgg11_seed1"]]
    assert tests["image_sign_flip"]["p_value"] == 1 / 2001 and tests["image_sign_flip"]["n"] == 40
    assert len(tests["pairs"]["seed"]) == 2
    assert list(res.table2["models"]) == ["VGG11-ResNet18", "VGG11-VGG11 retrained",
                                          "ResNet18-ResNet18 retrained"]
    # ranks (1, 2, 3, 4) vs (3, 1, 2, 4): 1 - 6 (4 + 1 + 1 + 0) / (4 (16 - 1)) = 0.4
    assert res.lift_correlation.iloc[0]["spearman"] == pytest.approx(0.4)
    assert len(res.fig6_rows) == 3 * cfg.fig6_per_city
    # the stored per-image values are the ones returned, and a rerun reuses the folder
    mtime = (out / "ar.csv").stat().st_mtime_ns
    again = compare.run(cfg, out, runs, None, progress=False)
    assert again.reused and (out / "ar.csv").stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again.ar, res.ar)
    for k, (rows, ar) in res.per_image.items():
        assert np.array_equal(again.per_image[k][1], ar) and np.array_equal(again.per_image[k][0], rows)
    other = compare.run(CompareConfig(batch_size=7, bootstrap=100, permutations=2000,
                                      randomised=False), out, runs, None, progress=False)
    assert not other.reused
    for fig in (compare_plots.plot_ar_heatmap(res.ar), compare_plots.plot_lift_comparison(
            compare.lift_scores(runs)), compare_plots.plot_fig6(
                SimpleNamespace(images=np.zeros((80, 16, 16, 3), np.uint8),
                                index=pd.DataFrame({"city": [CITIES[i % 3] for i in range(80)],
                                                    "path": [f"gone/{i}.png" for i in range(80)]})),
                runs, res.fig6_rows)):
        assert isinstance(fig, matplotlib.figure.Figure)
        matplotlib.pyplot.close(fig)


def test_runs_of_different_data_snapshots_are_not_compared(tmp_path):
    rows = np.arange(12)
    a = fake_run(tmp_path, "simple_seed0", "simple", 0, smooth(12, 4, 1), rows, 8)
    b = fake_run(tmp_path, "simple_seed1", "simple", 1, smooth(12, 4, 2), rows, 8,
                 data_key="other")
    cfg = CompareConfig(bootstrap=10, permutations=10, randomised=False)
    with pytest.raises(compare.StaleError, match="different data snapshots.*simple_seed1: other"):
        compare.run(cfg, tmp_path / "out", [a, b], None, progress=False)
    assert not (tmp_path / "out" / "ar.csv").exists()
    cache = SimpleNamespace(key="newer")      # both on one snapshot, but not the current one
    c = fake_run(tmp_path / "c", "simple_seed1", "simple", 1, smooth(12, 4, 2), rows, 8)
    with pytest.raises(compare.StaleError, match="current snapshot: newer"):
        compare.run(cfg, tmp_path / "out", [a, c], cache, progress=False)
    assert compare.run(cfg, tmp_path / "out", [a, c], None, progress=False).ar.shape[0] == 1


def test_randomised_reference(tmp_path):
    size, rows = 64, np.arange(6)
    rng = np.random.default_rng(0)
    cache = SimpleNamespace(images=rng.integers(0, 255, (6, size, size, 3), dtype=np.uint8),
                            key="snap")
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = models.build("simple", 3, size).eval()
        res = cams.masks_for(model, cache.images[rows])
        d = fake_run(tmp_path, f"simple_seed{seed}", "simple", seed, res.masks, rows, size,
                     [CITIES[t] for t in res.target])
        torch.save({"model": model.state_dict(), "config": {
            "arch": "simple", "cities": CITIES, "image_size": size}}, d / "best.pt")
        runs.append(d)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rand = residuals.randomise(model, 0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # untouched
    weights = [k for k, v in before.items() if v.dim() >= 2]        # every conv and linear layer
    assert weights and not any(torch.equal(rand.state_dict()[k], before[k]) for k in weights)
    cfg = CompareConfig(batch_size=4, bootstrap=50, permutations=100)
    r1, a1 = residuals.randomised_ar(runs[0], cache, cfg)
    assert r1.tolist() == rows.tolist() and ((a1 >= 0) & (a1 <= 1)).all()
    assert np.array_equal(residuals.randomised_ar(runs[0], cache, cfg)[1], a1)    # seeded
    res = compare.run(cfg, tmp_path / "cmp", runs, cache, progress=False)
    assert sorted(res.ar["kind"]) == ["randomised", "randomised", "seed"]
    assert res.tests["pair_permutation"]["p_value"] is None                  # no arch pairs
    assert "simple_seed0 (randomised)" in set(res.ar["run_b"])


def test_config_checks():
    with pytest.raises(ValueError, match="batch_size"):
        CompareConfig(batch_size=0)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(CompareConfig, {"bootstraps": 10})
    with pytest.raises(ConfigError, match="permutations"):
        from_dict(CompareConfig, {"permutations": "many"})


def test_tests_on_the_paper_grid():
    # 4 archs x 2 seeds: 24 architecture run pairs pooled into 6 Table 2 rows, 4 retrained rows
    archs = ["vgg11", "resnet18", "simple", "simpler"]
    infos = {f"{a}_s{s}": {"name": f"{a}_s{s}", "arch": a, "seed": s} for a in archs for s in (0, 1)}
    rng, rows = np.random.default_rng(0), np.arange(300)
    per_image = {(a, b): (rows, (rng.random(300) * 0.1 + (0.4 if infos[a]["arch"] != infos[b]["arch"]
                                                          else 0.25)).astype(np.float32))
                 for a, b in combinations(infos, 2)}
    cfg = CompareConfig(bootstrap=100, permutations=10000)
    frame = ar_tables.ar_frame(per_image, infos, cfg)
    res = ar_tables.tests(frame, per_image, cfg)
    pair = res["pair_permutation"]
    assert (pair["n_architecture"], pair["n_seed"]) == (6, 4) and "C(10,6) = 210" in pair["method"]
    assert pair["p_value"] == pytest.approx(1 / 210)
    assert len(pair["units"]["architecture"]["VGG11-ResNet18"]) == 4
    assert len(res["pairs"]["architecture"]) == 24 and len(res["pairs"]["seed"]) == 4
    image = res["image_sign_flip"]
    assert image["n"] == 300 and image["p_value"] == 1 / 10001
    assert image["statistic"] == pytest.approx(0.15, abs=0.01)
    assert list(ar_tables.table2(frame)["models"])[:7] == [
        "VGG11-ResNet18", "VGG11-Simple", "VGG11-Simpler", "ResNet18-Simple", "ResNet18-Simpler",
        "Simple-Simpler", "VGG11-VGG11 retrained"]


def test_tests_table_and_single_run_heatmap():
    frame = pd.DataFrame([["a", "a (randomised)", "randomised", 0.3, 0.28, 0.32, 10, "vgg11", "vgg11"]],
                         columns=ar_tables.COLUMNS)
    table = ar_tables.tests_table(ar_tables.tests(frame, {("a", "a (randomised)"): (np.arange(10), np.ones(10))},
                                              CompareConfig()))
    assert list(table["test"]) == ["architecture groups relabelled", "per-image sign flips"]
    assert table["p_value"].isna().all()            # one run: nothing to test, said so
    assert table["method"].str.contains("needs both kinds").all()
    fig = compare_plots.plot_ar_heatmap(frame)       # the run itself, AR 0 with itself
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a"]


def test_pool_and_coarser_by_hand():
    # a 4 x 4 mask pooled to 2 x 2: block means (0.25, 0.5 / 0.75, 0), renormalised by the
    # range 0.75: (1/3, 2/3 / 1, 0)
    m = np.array([[[0, 1, 1, 1],             # blocks: top-left 0.25, top-right 0.5,
                   [0, 0, 0, 0],
                   [1, 1, 0, 0],             # bottom-left 0.75, bottom-right 0
                   [1, 0, 0, 0]]], np.float32)
    np.testing.assert_allclose(residuals.pool(m, (2, 2)), [[[1 / 3, 2 / 3], [1, 0]]], atol=1e-6)
    same = smooth(3, 4, 0)
    assert np.array_equal(residuals.pool(same, (4, 4)), same.astype(np.float32))   # already there
    assert residuals.coarser((8, 8), (2, 4)) == (2, 4)


def test_relabelled_is_a_seeded_derangement():
    rows = np.arange(10, 60, 5)
    r = residuals.relabelled(rows, 3)
    assert sorted(r) == sorted(rows) and not (r == rows).any()       # every mask filed elsewhere
    assert np.array_equal(residuals.relabelled(rows, 3), r) and not np.array_equal(residuals.relabelled(rows, 4), r)
    with pytest.raises(ValueError, match="at least 2"):
        residuals.relabelled([7], 0)


def four_archs(tmp_path, own_view: bool, n: int = 48, size: int = 16):
    """4 archs x 2 seeds with maps of 16, 8, 4, 2 cells, as the default job's networks. Each
    image has one underlying 16 x 16 map with fine texture; a run's mask is that map pooled to
    its own size plus a little seed noise. With ``own_view`` every architecture has its own
    underlying map (they look at different things); without, all look at the same map and an
    architecture pair differs only by what a coarser map cannot show."""
    rng = np.random.default_rng(0)

    def underlying():
        base = torch.from_numpy(smooth(n, 16, int(rng.integers(1 << 30))).astype(np.float32))
        return (base + 0.8 * torch.from_numpy(rng.random((n, 16, 16), dtype=np.float32))).numpy()
    common = underlying()
    runs = []
    for arch, side in (("vgg11", 4), ("resnet18", 2), ("simple", 8), ("simpler", 16)):
        u = underlying() if own_view else common
        for seed in (0, 1):
            noisy = residuals.pool(u, (side, side)) + 0.03 * rng.random((n, side, side), dtype=np.float32)
            m = saliency.normalise(torch.from_numpy(noisy)).numpy()
            runs.append(fake_run(tmp_path, f"{arch}_seed{seed}", arch, seed, m, np.arange(n), size))
    return runs


def test_resolution_controls_catch_a_difference_made_by_map_size(tmp_path):
    cfg = CompareConfig(batch_size=16, bootstrap=200, permutations=2000, randomised=False)
    # every network looks at the same map: at image resolution the architecture pairs still
    # differ more than the seed pairs (the coarse maps cannot show the texture the fine ones
    # do), but on one grid for all runs the difference is gone
    same = compare.run(cfg, tmp_path / "c1", four_archs(tmp_path / "same", own_view=False), None, progress=False)
    holds = same.tests["conclusion"]["holds"]
    assert holds["image"] is True and holds["shared_grid"] is False
    assert same.tests["conclusion"]["survives"] is False
    text = same.tests["conclusion"]["text"]
    assert "AR on one grid for all runs: no" in text and "does not survive" in text
    row = same.ar.set_index(["run_a", "run_b"]).loc[("vgg11_seed0", "resnet18_seed0")]
    assert (row.map_a, row.map_b, row.grid, row.shared_grid) == ("4x4", "2x2", "2x2", "2x2")
    # a seed pair on its own (shared) map: AR by hand, no upsampling
    runs = {n: gradcam.load(tmp_path / "same" / n) for n in ("simpler_seed0", "simpler_seed1")}
    hand = np.abs(runs["simpler_seed0"].masks.astype(np.float32) - runs["simpler_seed1"].masks.astype(np.float32))
    seed_row = same.ar.set_index(["run_a", "run_b"]).loc[("simpler_seed0", "simpler_seed1")]
    assert seed_row.grid == "16x16" and seed_row.ar_pair_grid == pytest.approx(hand.mean(), abs=1e-6)
    # the null of unrelated masks is far above any pair of related ones, in every view
    assert (same.ar["rel_image"] < 1).all() and (same.ar["rel_shared_grid"] < 1).all()
    # each architecture looks at its own map: the difference survives every control
    own = compare.run(cfg, tmp_path / "c2", four_archs(tmp_path / "own", own_view=True), None, progress=False)
    assert own.tests["conclusion"]["survives"] is True
    assert all(own.tests["conclusion"]["holds"].values())
    assert "survives every resolution control" in own.tests["conclusion"]["text"]
    table = ar_tables.tests_table(own.tests)
    assert len(table) == 2 * len(ar_tables.TESTED) and (table["p_value"] <= 0.05).all()
    shown = ar_tables.table2_display(own.table2)
    assert {"AR, image", "AR / null, image", "AR, pair's coarser map", "AR, one grid"} <= set(shown.columns)
    # stored and loaded alike
    back = compare.load(tmp_path / "c2")
    assert set(back.per_view) == set(residuals.VIEWS)
    for view, values in own.per_view.items():
        for p, (rows, ar) in values.items():
            assert np.array_equal(back.per_view[view][p][1], ar)


def test_conclusion_says_when_a_test_cannot_reach_alpha_and_dead_masks_do_not_crash(tmp_path):
    # 2 archs x 2 seeds: 1 architecture row against 2 retrained rows, so the group test's
    # smallest p is 1/3: the conclusion rests on the sign flips and says why
    cfg = CompareConfig(batch_size=7, bootstrap=50, permutations=500, randomised=False)
    res = compare.run(cfg, tmp_path / "c", grid(tmp_path / "runs"), None, progress=False)
    c = res.tests["conclusion"]
    assert "cannot reach it with these runs" in c["text"] and "0.333" in c["text"]
    assert c["holds"]["image"] is True                  # by the sign flips (p = 1/501)
    old = {k: v for k, v in res.tests.items() if k != "controls"}      # a folder from before
    assert "No resolution control" in ar_tables.conclusion(old)["text"]
    assert ar_tables.conclusion(old)["survives"] is None
    # two runs whose masks are all zero: the null is 0, AR / null undefined, nothing raises
    zero = [fake_run(tmp_path / "z", f"simple_seed{s}", "simple", s, np.zeros((6, 4, 4)), np.arange(6), 8)
            for s in (0, 1)]
    dead = compare.run(cfg, tmp_path / "cz", zero, None, progress=False)
    assert dead.ar["null_image"].iloc[0] == 0 and np.isnan(dead.ar["rel_image"].iloc[0])
    assert ar_tables.ar_frame({}, {}, cfg).empty
