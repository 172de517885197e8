"""Sanity checks of the Grad-CAM masks: cascading randomisation and deletion curves."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from citylib import gradcam_plots, models, sanity, train

SIZE = 64


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


def test_cascade(simple, images):
    before = {k: v.clone() for k, v in simple.state_dict().items()}
    target = np.array([0, 1, 2, 0])
    out = sanity.cascade(simple, images, target, batch_size=8, seed=0)
    steps = out["steps"]
    assert [s["layer"] for s in steps][:3] == ["none (trained)", "classifier.4", "classifier.2"]
    assert len(steps) == 1 + 7 and steps[0]["spearman_mean"] == pytest.approx(1.0)
    assert all(-1 <= s["spearman_mean"] <= 1 for s in steps if s["spearman_mean"] is not None)
    # once every layer is random the masks have nothing to do with the trained ones
    assert steps[-1]["spearman_mean"] < 0.9
    after = simple.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # the model is untouched
    again = sanity.cascade(simple, images, target, batch_size=8, seed=0)
    assert again == out                                            # seeded


def test_deletion(simple, images):
    target = np.array([0, 1, 2, 0])
    out = sanity.deletion(simple, images, target, steps=4, batch_size=8, seed=0)
    assert out["fractions"] == [0, 0.25, 0.5, 0.75, 1.0]
    sal, rnd = np.array(out["curve_salient"]), np.array(out["curve_random"])
    assert sal.shape == rnd.shape == (5,)
    assert sal[0] == pytest.approx(rnd[0]) and sal[-1] == pytest.approx(rnd[-1])  # same images
    with torch.no_grad():   # nothing removed: the images; everything removed: the fill (0)
        x = train.to_tensor(images)
        whole = torch.softmax(simple(x), 1)[torch.arange(4), torch.from_numpy(target)].mean()
        blank = torch.softmax(simple(torch.zeros_like(x)), 1)[torch.arange(4), torch.from_numpy(target)].mean()
    assert sal[0] == pytest.approx(whole.item(), abs=1e-6) and sal[-1] == pytest.approx(blank.item(), abs=1e-6)
    assert 0 <= out["auc_salient"] <= 1 and 0 <= out["auc_random"] <= 1
    assert out["auc_salient"] == pytest.approx(np.trapezoid(sal, out["fractions"]))
    assert sanity.deletion(simple, images, target, steps=4, batch_size=8, seed=0) == out


def test_plots(simple, images):
    target = np.zeros(4, np.int64)
    fig = gradcam_plots.plot_cascade(sanity.cascade(simple, images[:2], target[:2]))
    assert len(fig.axes) == 1
    fig = gradcam_plots.plot_deletion(sanity.deletion(simple, images[:2], target[:2], steps=2))
    assert len(fig.axes[0].lines) == 2
    masks = np.random.default_rng(0).random((3, 8, 8)).astype(np.float16)
    fig = gradcam_plots.plot_fig2(images[:3], masks, threshold=0.5, titles=["a", "b", "c"])
    assert len(fig.axes) == 12
