"""Sanity checks of saliency masks: cascading randomisation, deletion curves and their verdict.

Mechanics on an untrained network and random noise; then the checks as claims that can fail: a
trained network's Grad-CAM passes both, and three broken explainers each fail a named check.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from citylib.explain import cams, saliency, sanity
from citylib.figures import gradcam_plots
from citylib.nets import infer, models, train

SIZE = 64
CLASSES = 3
SQUARE = 16              # side of the class's square in the synthetic task
SMALL_CONVS = ((5, 16), (5, 32), (5, 32), (3, 32))   # Table 1's "simple", fewer channels
EPOCHS = 12
MAP = SIZE // 8          # its Grad-CAM map (the ReLU before the 4th pool): 8 x 8


@pytest.fixture(scope="module")
def simple():
    torch.manual_seed(0)
    return models.build("simple", 3, SIZE).eval()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)


def test_spearman_rows_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.random((5, 4, 4))
    b = a + rng.normal(0, 0.3, a.shape)
    b[1] = np.round(b[1], 1)                                        # ties
    b[2] = 0.0                                                      # constant: undefined
    rho = sanity.spearman_rows(a, b)
    for i in (0, 1, 3, 4):
        assert rho[i] == pytest.approx(scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())[0])
    assert np.isnan(rho[2])
    assert sanity.spearman_rows(a, a) == pytest.approx(np.ones(5))


def test_cascade_steps_top_down():
    torch.manual_seed(0)
    resnet = models.build("resnet18", 3, SIZE)
    steps = sanity.cascade_steps(resnet)
    names = [n for n, _ in steps]
    assert names[0] == "fc" and names[-1] == "conv1" and len(steps) == 21   # 20 convs + fc
    first = dict(steps)["conv1"]
    assert first[1] is resnet.bn1                                  # BN goes with its conv
    assert [n for n, _ in sanity.cascade_steps(models.build("vgg11", 3, SIZE))][:3] == \
        ["classifier.6", "classifier.3", "classifier.0"]


def test_cascade_mechanics(simple, images):
    before = {k: v.clone() for k, v in simple.state_dict().items()}
    target = np.array([0, 1, 2, 0])
    out = sanity.cascade(simple, images, target, batch_size=8, seed=0, n_boot=200)
    steps = out["steps"]
    assert [s["layer"] for s in steps][:3] == ["none (trained)", "classifier.4", "classifier.2"]
    assert len(steps) == 1 + 7 and out["method"] == "gradcam" and out["level"] == 0.95
    for s in steps:   # the summary is that of the per-image values it stores
        rho = np.array([r for r in s["spearman_per_image"] if r is not None])
        assert len(s["spearman_per_image"]) == 4 and s["n_defined"] == len(rho)
        if len(rho):
            assert s["spearman_mean"] == pytest.approx(rho.mean())
            assert s["spearman_low"] <= s["spearman_mean"] + 1e-12 <= s["spearman_high"] + 2e-12
    after = simple.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # the model is untouched
    assert sanity.cascade(simple, images, target, batch_size=8, seed=0, n_boot=200) == out


def test_explain_hook_sees_each_model_and_is_checked(simple, images):
    seen = []

    def ones(model, imgs, target):
        seen.append((model, target.dtype))
        return np.ones((len(imgs), 2, 2))

    sanity.cascade(simple, images, [0, 1, 2, 0], explain=ones, n_boot=10)
    assert len(seen) == 1 + 7 and seen[0][0] is simple              # trained, then each step
    assert all(m is not simple for m, _ in seen[1:])                # then randomised copies
    assert {d for _, d in seen} == {np.dtype(np.int64)}
    with pytest.raises(ValueError, match=r"expected finite masks \(4, h, w\)"):
        sanity.deletion(simple, images, [0, 1, 2, 0], explain=lambda m, i, t: np.ones((3, 2, 2)))


def test_deletion_mechanics(simple, images):
    target = np.array([0, 1, 2, 0])
    out = sanity.deletion(simple, images, target, steps=4, batch_size=8, seed=0, n_boot=200)
    assert out["fractions"] == [0, 0.25, 0.5, 0.75, 1.0]
    sal, rnd = np.array(out["curve_salient"]), np.array(out["curve_random"])
    assert sal.shape == rnd.shape == (5,)
    assert sal[0] == pytest.approx(rnd[0]) and sal[-1] == pytest.approx(rnd[-1])  # same images
    with torch.no_grad():   # nothing removed: the images; everything removed: the fill (0)
        x = infer.to_tensor(images)
        whole = torch.softmax(simple(x), 1)[torch.arange(4), torch.from_numpy(target)].mean()
        blank = torch.softmax(simple(torch.zeros_like(x)), 1)[torch.arange(4), torch.from_numpy(target)].mean()
    assert sal[0] == pytest.approx(whole.item(), abs=1e-6) and sal[-1] == pytest.approx(blank.item(), abs=1e-6)
    assert out["auc_salient"] == pytest.approx(np.trapezoid(sal, out["fractions"]))
    # per image, paired: their means are the AUCs of the mean curves; the difference is paired
    per_sal, per_rnd = np.array(out["auc_salient_per_image"]), np.array(out["auc_random_per_image"])
    assert per_sal.shape == per_rnd.shape == (4,) and ((0 <= per_sal) & (per_sal <= 1)).all()
    assert per_sal.mean() == pytest.approx(out["auc_salient"])
    assert per_rnd.mean() == pytest.approx(out["auc_random"])
    assert out["auc_difference"] == pytest.approx((per_sal - per_rnd).mean())
    assert out["auc_difference_low"] <= out["auc_difference"] <= out["auc_difference_high"]
    # the pixel baseline beside it, paired the same way; both baselines start and end as one
    pix = np.array(out["curve_random_pixels"])
    assert pix[0] == pytest.approx(rnd[0]) and pix[-1] == pytest.approx(rnd[-1])
    assert out["auc_difference_pixels"] == pytest.approx(
        (per_sal - np.array(out["auc_random_pixels_per_image"])).mean())
    assert out["map_size"] == list(cams.masks_for(simple, images, "gradcam", target).masks.shape[1:])
    assert sanity.deletion(simple, images, target, steps=4, batch_size=8, seed=0, n_boot=200) == out


@pytest.mark.parametrize("grid, S, sizes", [((2, 2), 4, [4, 4, 4, 4]),
                                            ((3, 3), 4, [4, 2, 2, 2, 1, 1, 2, 1, 1])])
def test_block_order_removes_the_mask_cells_one_whole_cell_at_a_time(grid, S, sizes):
    # pixel (i, j) is in cell (i * h // S, j * w // S): on 3 x 3 cells over 4 x 4 pixels rows
    # 0-1 are cell row 0, row 2 cell row 1, row 3 cell row 2 (sizes 2, 1, 1 per axis)
    h, w = grid
    cell = np.array([[i * h // S * w + j * w // S for j in range(S)] for i in range(S)]).ravel()
    assert list(np.bincount(cell)) == sizes
    orders = sanity.block_order(grid, S, 500, np.random.default_rng(0))
    assert orders.shape == (500, S * S)
    assert (np.sort(orders, axis=1) == np.arange(S * S)).all()       # each a permutation
    seq = cell[orders]                                               # the cell of each step
    runs = (np.diff(seq, axis=1) != 0).sum(1) + 1
    assert (runs == h * w).all()                                     # every cell in one run
    # the cells in uniformly random order, whatever their size (not by pixel count)
    firsts = np.bincount(seq[:, 0], minlength=h * w) / 500
    assert abs(firsts - 1 / (h * w)).max() < 0.05


def _checks(rho_high: float, n_defined: int, auc_high: float, n: int = 20) -> dict:
    """Hand-made results of ``n`` images with just what ``verdict`` reads."""
    last = {"layer": "features.0", "spearman_mean": rho_high - 0.1, "spearman_low": rho_high - 0.2,
            "spearman_high": rho_high, "n_defined": n_defined}
    return {"cascade": {"n_images": n, "level": 0.95, "steps": [{"spearman_high": 1.0}, last]},
            "deletion": {"level": 0.95, "n_images": n, "auc_salient": 0.3, "auc_random": 0.4,
                         "auc_difference": auc_high - 0.1, "auc_difference_low": auc_high - 0.2,
                         "auc_difference_high": auc_high}}


def test_verdict_rules_on_hand_made_results():
    v = sanity.verdict(_checks(0.49, 20, -0.01))
    assert v["passed"] and v["cascade"]["passed"] and v["deletion"]["passed"]
    assert v["cascade"]["spearman_high"] == 0.49 and v["deletion"]["auc_difference_high"] == -0.01
    assert not sanity.verdict(_checks(0.5, 20, -0.01))["cascade"]["passed"]    # strict: < 0.5
    assert sanity.verdict(_checks(0.5, 20, -0.01), max_rho=0.6)["cascade"]["passed"]
    assert not sanity.verdict(_checks(0.1, 9, -0.01))["cascade"]["passed"]     # 9 of 20 defined
    v = sanity.verdict(_checks(0.1, 9, -0.01), min_defined=0.4, min_images=9)
    assert v["cascade"]["passed"]
    v = sanity.verdict(_checks(0.1, 20, 0.0))                                  # touches 0
    assert not v["deletion"]["passed"] and v["cascade"]["passed"] and not v["passed"]
    v = sanity.verdict(_checks(0.1, 6, -0.5, n=6))              # too few images to trust either
    assert not v["cascade"]["passed"] and not v["deletion"]["passed"]
    assert sanity.verdict(_checks(0.1, 6, -0.5, n=6), min_images=6)["passed"]
    assert sanity.verdict({}) == {"passed": None}
    only = {"deletion": _checks(0.1, 20, -0.1)["deletion"]}
    assert set(sanity.verdict(only)) == {"deletion", "passed"}


# --- the checks as claims: a trained network passes, broken explainers fail ----------------

def _world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark noise images, each with a square whose red, green or blue channel (the class) is
    full, in a random corner region, never the centre: the evidence is local and moves."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = rng.integers(0, 96, (n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, k in enumerate(y):
        r, c = rng.integers(0, 2, 2) * (SIZE - SQUARE - 8) + rng.integers(0, 9, 2)
        x[i, r:r + SQUARE, c:c + SQUARE, k] = 255
    return x, y.astype(np.int64)


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.TableNet(SMALL_CONVS, CLASSES, SIZE)


@pytest.fixture(scope="module")
def trained():
    """A small Table 1 network trained on the square task (5-10 s); 16 test images, with the
    predicted class as the target, as ``gradcam.run`` explains it."""
    x, y = _world(96, 0)
    model = _net(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = train.TrainConfig(batch_size=16, flip=False, crop_jitter=0)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    # one thread: on two shared cores a second one mostly waits, and the weights are the same
    # on every machine
    torch.set_num_threads(1)
    try:
        for _ in range(EPOCHS):
            train.train_one_epoch(model, opt, x, torch.from_numpy(y), np.arange(len(y)), cfg,
                                  gen, progress=False)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    test, truth = _world(16, 1)
    pred = infer.predict(model, test).argmax(1)
    assert (pred == truth).mean() >= 0.9                   # it did learn the task
    return model, test, pred


def _verdict(trained, explain=None) -> dict:
    model, x, target = trained
    checks = {"cascade": sanity.cascade(model, x, target, explain=explain),
              "deletion": sanity.deletion(model, x, target, steps=8, explain=explain)}
    return sanity.verdict(checks)


def test_trained_grad_cam_passes_both_checks(trained):
    v = _verdict(trained)
    # removing what Grad-CAM calls salient lowers the probability faster than random removal
    assert v["deletion"]["passed"] and v["deletion"]["auc_difference_high"] < 0
    # and once every layer is re-initialised its masks have lost most of their ranking
    assert v["cascade"]["passed"] and v["cascade"]["spearman_high"] < sanity.MAX_RHO
    assert v["passed"]


def _input_edges(model, x, target):
    """Gradient magnitude of the grey image, averaged to the map size: ignores the model."""
    grey = x.astype(np.float32).mean(-1)                                  # (N, S, S)
    mag = np.hypot(*np.gradient(grey, axis=(1, 2)))
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(mag)[:, None], MAP)[:, 0]   # (N, h, w)
    return saliency.normalise(pooled).numpy()


def _centre_blob(model, x, target):
    """The same Gaussian blob in the centre for every image and every model."""
    yy, xx = np.mgrid[:MAP, :MAP] - (MAP - 1) / 2
    return np.repeat(np.exp(-(yy ** 2 + xx ** 2) / MAP)[None], len(x), 0)


def test_input_edge_map_fails_the_cascade(trained):
    # an edge detector does not depend on the weights: after full randomisation its masks are
    # the trained ones (Spearman 1), so the cascade fails. Deletion need not catch it: the
    # square's border is where the evidence is.
    v = _verdict(trained, _input_edges)
    assert not v["cascade"]["passed"] and v["cascade"]["spearman_low"] == pytest.approx(1.0)
    assert not v["passed"]


def test_centre_blob_fails_the_cascade(trained):
    # one fixed mask, whatever the model: Spearman 1 at every step, the cascade fails
    v = _verdict(trained, _centre_blob)
    assert not v["cascade"]["passed"] and v["cascade"]["spearman_low"] == pytest.approx(1.0)
    assert not v["passed"]


def test_untrained_network_masks_fail_both_checks(trained):
    untrained = _net(1).eval()

    def untrained_masks(model, x, target):   # Grad-CAM of the untrained net, whatever `model` is
        return cams.masks_for(untrained, x, "gradcam", target).masks

    v = _verdict(trained, untrained_masks)
    # the masks do not follow the model given: unchanged by randomisation, the cascade fails
    assert not v["cascade"]["passed"] and v["cascade"]["spearman_low"] == pytest.approx(1.0)
    # nor do they point at the trained model's evidence: deletion no better than random order
    assert not v["deletion"]["passed"] and v["deletion"]["auc_difference_high"] >= 0


def test_plots(simple, images):
    target = np.zeros(4, np.int64)
    fig = gradcam_plots.plot_cascade(sanity.cascade(simple, images[:2], target[:2], n_boot=50))
    assert len(fig.axes) == 1 and "interval" in fig.axes[0].get_title()
    old = {"steps": [{"layer": "x", "spearman_mean": 1.0, "spearman_std": 0.0}]}   # no interval
    assert "std" in gradcam_plots.plot_cascade(old).axes[0].get_title()
    fig = gradcam_plots.plot_deletion(sanity.deletion(simple, images[:2], target[:2], steps=2,
                                                      n_boot=50))
    assert "AUC difference" in fig.axes[0].get_title()
    labels = [line.get_label() for line in fig.axes[0].lines]   # salient, the baseline, pixels
    assert len(labels) == 3 and labels[1].startswith("random cells") and labels[2].startswith("random pixels")
    masks = np.random.default_rng(0).random((3, 8, 8)).astype(np.float16)
    fig = gradcam_plots.plot_fig2(images[:3], masks, threshold=0.5, titles=["a", "b", "c"])
    assert len(fig.axes) == 12
