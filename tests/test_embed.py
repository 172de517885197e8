"""Embedding stage: PCA clipping, repeatable maps, kNN agreement, run/reuse, explorer panel."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from citylib.core.artifacts import read_json
from citylib.core.config import ConfigError, from_dict
from citylib.explain import saliency
from citylib.figures import gallery, widgets
from citylib.stages import embed, gradcam
from conftest import gradcam_folder

CITIES = ("amsterdam", "berlin", "cairo")


def _masks(n: int, size: int = 8, seed: int = 0, city=None) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) float32 masks in [0, 1], a blob per city at its own place; (n,) city.

    ``city``: (n,) city indices (default: 0, 1, 2, 0, ...).
    """
    rng = np.random.default_rng(seed)
    city = np.arange(n) % len(CITIES) if city is None else np.asarray(city)
    yy, xx = np.mgrid[0:size, 0:size]
    centres = np.array([[1.5, 1.5], [size - 2.5, size - 2.5], [1.5, size - 2.5]])
    c = centres[city] + rng.normal(0, 0.7, (n, 2))                       # (n, 2) jittered
    m = np.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / 4.5)
    m += 0.1 * rng.random(m.shape)
    m -= m.min((1, 2), keepdims=True)
    return (m / m.max((1, 2), keepdims=True)).astype(np.float32), city


def fake_run(tmp_path, n: int = 200, size: int = 32, seed: int = 0):
    """(run_dir, cache): a cache of n + 7 images and a finished gradcam folder for n of them."""
    rng = np.random.default_rng(seed)
    total = n + 7
    y = rng.integers(0, len(CITIES), total)
    cache = SimpleNamespace(
        folder=tmp_path / "cache", cities=CITIES, y=y,
        images=rng.integers(0, 256, (total, size, size, 3), dtype=np.uint8),
        index=pd.DataFrame({"path": [f"img/{i:04d}.jpg" for i in range(total)],
                            "city": [CITIES[k] for k in y], "group": [f"spot{i // 2}" for i in range(total)]}))
    rows = np.sort(rng.choice(total, n, replace=False))                  # test rows, not 0..n-1
    truth = y[rows]
    masks, _ = _masks(n, seed=seed, city=truth)      # the blob's place follows the true city
    pred = np.where(rng.random(n) < 0.8, truth, (truth + 1) % 3)
    gradcam_folder(tmp_path / "run", masks, rows, cache.index["path"].to_numpy()[rows],
                   [CITIES[k] for k in truth], [CITIES[k] for k in pred],
                   {"image_size": size, "n": n, "config": {"threshold": 0.5}, "key": f"gc{seed}"},
                   probs=np.eye(3)[pred] * 0.7 + 0.1)
    return tmp_path / "run", cache


def test_config_validation():
    with pytest.raises(ValueError, match="perplexity"):
        embed.EmbedConfig(perplexity=0)
    with pytest.raises(ValueError, match="gallery_fill"):
        embed.EmbedConfig(gallery_fill=0.5)
    with pytest.raises(ConfigError, match="methd"):
        from_dict(embed.EmbedConfig, {"methd": "umap"})
    with pytest.raises(ConfigError, match="method"):
        from_dict(embed.EmbedConfig, {"method": "pca"})
    assert from_dict(embed.EmbedConfig, {"perplexity": 10}).perplexity == 10.0


def test_pca_dims_clipped():
    x = np.random.default_rng(0).random((12, 64))
    z, var = embed.pca(x, 50)
    assert z.shape == (12, 11) and var.shape == (11,)
    z, _ = embed.pca(x[:, :4], 50)
    assert z.shape == (12, 4)
    z, _ = embed.pca(np.random.default_rng(0).random((300, 64)), 50)
    assert z.shape == (300, 50) and z.dtype == np.float32


def test_descriptors():
    masks, _ = _masks(6)
    assert embed.descriptors(masks).shape == (6, 64)
    images = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    d = embed.descriptors(masks[:3], "explanation", images, 0.5, px=4, rows=[8, 0, 3])
    shown = saliency.explanation(images[[8, 0, 3]], saliency.upsample(masks[:3], 32), 0.5)
    want = shown.reshape(3, 4, 8, 4, 8, 3).mean((2, 4)) / 255.0          # 8 x 8 pixel blocks
    assert d.shape == (3, 48) and shown.any() and not shown.all()
    np.testing.assert_allclose(d, want.reshape(3, -1), atol=1e-6)
    assert not embed.descriptors(np.zeros((3, 8, 8)), "explanation", images, 0.5, 4).any()
    with pytest.raises(ValueError, match="descriptor"):
        embed.descriptors(masks, "pixels")


def test_knn_agreement_hand_made():
    # four points on a line, k = 1: 0 <-> 1 and 2 <-> 3 are each other's nearest neighbours
    x = np.array([[0.0], [1.0], [10.0], [11.5]])
    assert embed.knn_agreement(x, ["a", "a", "b", "a"], k=1, permutations=0) == {
        "k": 1, "observed": 0.5, "baseline_mean": None, "baseline_p95": None,
        "p_value": None, "permutations": 0}
    assert embed.knn_agreement(x, list("aabb"), k=10, permutations=5)["k"] == 3   # clipped


def test_knn_agreement_separated_and_random():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 100)
    x = rng.normal(size=(300, 5)) * 0.1 + labels[:, None] * 10.0         # 3 far-apart clusters
    sep = embed.knn_agreement(x, labels, 10, 100, seed=1)
    assert sep["observed"] == 1.0
    assert abs(sep["baseline_mean"] - 1 / 3) < 0.03 and sep["baseline_p95"] < 0.4
    assert sep["p_value"] == pytest.approx(1 / 101)
    rand = embed.knn_agreement(x, rng.permutation(labels), 10, 100, seed=1)
    assert abs(rand["observed"] - rand["baseline_mean"]) < 0.05 and rand["p_value"] > 0.01
    assert embed.knn_agreement(x, labels, 10, 20, seed=1) == \
        embed.knn_agreement(x, labels, 10, 20, seed=1)


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_projection_repeatable(method):
    masks, city = _masks(200)
    z, _ = embed.pca(embed.descriptors(masks), 50)
    cfg = embed.EmbedConfig(method=method)
    a, b = embed.project(z, cfg), embed.project(z, cfg)
    assert a.shape == (200, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, embed.project(z, dataclasses.replace(cfg, seed=1)))
    assert embed.knn_agreement(a, city, 10, 0)["observed"] > 0.9     # the blobs stay apart
    small = embed.project(z[:8], cfg)                # perplexity / neighbours clipped
    assert small.shape == (8, 2) and np.isfinite(small).all()
    with pytest.raises(ValueError, match="too few"):
        embed.project(z[:3], cfg)


def test_run_writes_and_reuses(tmp_path):
    run_dir, cache = fake_run(tmp_path)
    cfg = embed.EmbedConfig(gallery_tiles=1000, tile_px=16, permutations=20)
    res = embed.run(cfg, run_dir, cache, progress=False)
    assert not res.reused and not res.figures            # the stage computes; its figures draw
    res = dataclasses.replace(res, figures=gallery.draw_into(run_dir, cfg, res, cache))
    frame = pd.read_csv(run_dir / "embedding" / "tsne_mask.csv")
    assert list(frame.columns) == embed.COLUMNS and len(frame) == 200
    gc = gradcam.load(run_dir)
    assert (frame["index"] == gc.index["index"]).all() and (frame["path"] == gc.index["path"]).all()
    summary = read_json(run_dir / "embedding" / "tsne_mask.json")
    assert summary["key"] == embed.key(cfg, gc.meta["key"]) and summary["method"] == "tsne"
    assert summary["knn_2d"]["observed"] > 0.9 > summary["knn_2d"]["baseline_p95"]
    assert summary["knn_pca"]["p_value"] == pytest.approx(1 / 21)

    # every figure, in the tagged folder and copied to the run folder; galleries sized by grid
    for name in ["map_city", "map_correct", "gallery"] + [f"gallery_{c}" for c in CITIES]:
        assert (run_dir / f"{name}.png").is_file() and res.figures[name].is_file()
    for c in CITIES:                                  # all of a city's points (tiles >= n)
        xy = res.xy[frame["city"].to_numpy() == c]
        rows, cols = gallery.grid_shape(xy, len(xy), cfg.gallery_fill)
        with Image.open(run_dir / f"gallery_{c}.png") as im:
            assert im.size == (cols * cfg.tile_px, rows * cfg.tile_px)
            assert round(im.info["dpi"][0]) == gallery.DPI
    rows, cols = gallery.grid_shape(res.xy, 200, cfg.gallery_fill)
    with Image.open(run_dir / "gallery.png") as im:
        assert im.size[0] == cols * cfg.tile_px and im.size[1] > rows * cfg.tile_px  # + legend

    stamp = (run_dir / "embedding" / "tsne_mask.csv").stat().st_mtime_ns
    again = embed.run(cfg, run_dir, cache, progress=False)
    assert again.reused and (run_dir / "embedding" / "tsne_mask.csv").stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.xy, res.xy)
    assert again.summary == res.summary

    other = embed.run(dataclasses.replace(cfg, knn=5), run_dir, cache, progress=False)
    assert not other.reused and other.summary["knn_2d"]["k"] == 5
    assert embed.stored(cfg, run_dir) is None        # the same file name, another key now

    wrong = SimpleNamespace(**{**vars(cache), "index": cache.index.iloc[::-1]})
    with pytest.raises(ValueError, match="not the one"):
        embed.run(cfg, run_dir, wrong, progress=False)


def test_explanation_descriptor_run(tmp_path):
    run_dir, cache = fake_run(tmp_path, n=60)
    cfg = embed.EmbedConfig(descriptor="explanation", explanation_px=8, gallery_tiles=20,
                            tile_px=16, permutations=5)
    res = embed.run(cfg, run_dir, cache, progress=False)
    assert (run_dir / "embedding" / "tsne_explanation.csv").is_file()
    assert res.summary["pca_dims"] == 50 and res.summary["descriptor"] == "explanation"


def test_explorer_panel(tmp_path):
    import ipywidgets

    run_dir, cache = fake_run(tmp_path, n=60)
    cfg = embed.EmbedConfig(permutations=5, tile_px=16)
    first = embed.run(cfg, run_dir, cache, progress=False)
    ex = widgets.explorer(run_dir, cache, cfg)
    panel = ex.widget
    assert isinstance(panel, ipywidgets.VBox)
    assert ex.maps[("tsne", "mask")].reused         # read from disk, not recomputed
    np.testing.assert_allclose(ex.maps[("tsne", "mask")].xy, first.xy)
    controls = panel.children[0].children
    controls[0].value = "umap"                       # computed on demand, in memory
    controls[1].value = "explanation"
    controls[2].value = "correct"
    panel.children[1].value = 7                       # the point slider
    assert set(ex.maps) == {("tsne", "mask"), ("umap", "mask"), ("umap", "explanation")}
    assert ex.maps[("umap", "explanation")].folder is None
    assert bytes(panel.children[3].children[0].value[:4]) == b"\x89PNG"     # the map, as an image
    assert bytes(panel.children[4].children[0].value[:4]) == b"\x89PNG"     # image, mask, explanation
    assert panel.children[3].children[1].value == panel.children[4].children[1].value == ""   # no error
    assert "UMAP of explanations" in panel.children[2].value
    fig = ex.point_figure(7)
    assert len(fig.axes) == 3
    plt.close(fig)
    assert sorted(p.name for p in (run_dir / "embedding" / ".results").iterdir()) == [
        "tsne_mask.json"]                          # the maps made in memory are not stored
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_identical_masks_map_to_one_point(tmp_path, method):
    """All-zero masks (an inactive Grad-CAM layer) give a degenerate map, not NaN or a crash."""
    run_dir, cache = fake_run(tmp_path, n=60)
    masks = np.load(run_dir / "gradcam" / "masks.npy")
    np.save(run_dir / "gradcam" / "masks.npy", np.zeros_like(masks))
    cfg = embed.EmbedConfig(method=method, gallery_tiles=20, tile_px=16, permutations=20)
    with pytest.warns(UserWarning, match="all 60 descriptors are identical"):
        res = embed.run(cfg, run_dir, cache, progress=False)
    assert np.array_equal(res.xy, np.zeros((60, 2)))
    assert res.summary["pca_variance"] == 0
    for space in ("knn_2d", "knn_pca"):          # no structure: the observed is no better than chance
        knn = res.summary[space]
        assert np.isfinite(knn["observed"]) and knn["p_value"] > 0.05
    gallery.draw_into(run_dir, cfg, res, cache)
    assert (run_dir / "gallery.png").is_file()
