"""The linear fill's multigrid solver (citylib.explain.multigrid) against the direct sparse
solve of the same system, on holes of every awkward shape."""
import numpy as np
import pytest
import torch

from citylib.explain import multigrid, removal


def holes(size=96, seed=0):
    """Masks that stress a multigrid: blobs, thin lines, scattered pixels, a hole with one
    known pixel, holes on the image's edges and corners, and one of each size class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = {}
    masks["blob"] = (yy - 40) ** 2 + (xx - 50) ** 2 < 25 ** 2
    masks["sky"] = yy < size // 2                                   # a whole half, on three edges
    masks["pole"] = (xx >= 30) & (xx < 32)                          # 2 px wide, top to bottom
    masks["salt"] = rng.random((size, size)) < 0.5
    masks["almost all"] = rng.random((size, size)) < 0.97
    one = np.ones((size, size), bool)
    one[size // 3, size // 4] = False
    masks["one known pixel"] = one
    masks["stripes"] = (yy % 5 == 0) & (yy > 3)
    masks["corner"] = (yy < 20) & (xx > size - 30)
    masks["small"] = (yy > 60) & (yy < 66) & (xx > 10) & (xx < 17)  # solved directly (one level)
    masks["ring"] = ((yy - 48) ** 2 + (xx - 48) ** 2 < 40 ** 2) & ((yy - 48) ** 2 + (xx - 48) ** 2 > 8 ** 2)
    return masks


@pytest.mark.parametrize("name", sorted(holes()))
def test_multigrid_agrees_with_the_direct_solve(name):
    mask = holes()[name]
    image = np.random.default_rng(1).integers(0, 256, mask.shape + (3,), dtype=np.uint8)
    exact = removal._direct_values(image[None], mask[None], 255.0)
    out = np.empty_like(exact)
    cycles = multigrid.fill(image, mask, 255.0, removal.TOL, removal.MAX_CYCLES, out)
    # settled, and fast: at most 5 cycles on these holes (with one of the coarse levels' Galerkin
    # weights off, it still reaches the answer, in up to 6)
    assert cycles <= 5
    assert np.abs(out - exact).max() < 1e-5                # [0, 1] scale: a 400th of a grey level


def test_the_fill_is_the_same_on_one_thread_or_two_and_falls_back_to_the_direct_solve(monkeypatch):
    masks = np.stack([holes()[k] for k in ("blob", "sky", "pole", "ring")])
    images = np.random.default_rng(2).integers(0, 256, masks.shape + (3,), dtype=np.uint8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = removal._imputed_values(images, masks, 255.0)
        torch.set_num_threads(2)
        two = removal._imputed_values(images, masks, 255.0)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(one, two)
    exact = removal._direct_values(images, masks, 255.0)
    assert 0 < np.abs(one - exact).max() < 1e-5            # iterated, and close
    # a hole that does not settle (one cycle, an unreachable tolerance) is reported ...
    out = np.empty((int(masks[0].sum()), 3))
    assert multigrid.fill(images[0], masks[0], 255.0, 1e-300, 2, out) == 3
    # ... and solved directly instead: every image here
    monkeypatch.setattr(removal, "MAX_CYCLES", 1)
    monkeypatch.setattr(removal, "TOL", 1e-300)
    assert np.array_equal(removal._imputed_values(images, masks, 255.0), exact)


def test_a_batch_mixing_empty_full_and_partial_masks_keeps_every_image_in_its_place():
    rng = np.random.default_rng(3)
    images = rng.random((4, 37, 61, 3))                    # not square: rows and columns apart
    masks = np.zeros((4, 37, 61), bool)
    masks[1] = True                                        # nothing known: kept as it is
    masks[2, 5:30, 10:50] = True
    masks[3] = rng.random((37, 61)) < 0.4
    ours = removal._imputed_values(images, masks)
    exact = removal._direct_values(images, masks)
    assert ours.shape == (masks.sum(), 3)
    assert np.array_equal(ours[:37 * 61], images[1].reshape(-1, 3))
    assert np.abs(ours - exact).max() < 1e-5


@pytest.mark.parametrize("channels", [1, 4, 5])          # 5: more than the solver's NC, solved directly
def test_any_number_of_channels_is_imputed(channels):
    rng = np.random.default_rng(4)
    images = rng.random((2, 40, 52, channels))
    masks = np.stack([rng.random((40, 52)) < 0.3, np.pad(holes(40)["ring"], ((0, 0), (0, 12)))])
    ours = removal.imputed(images, masks)
    exact = images.copy()
    exact[masks] = removal._direct_values(images, masks)
    assert np.abs(ours - exact).max() < 1e-5
    if channels != 3:                                      # the operators take colour images only
        with pytest.raises(ValueError, match="uint8 images"):
            removal.remove("linear", (images * 255).astype(np.uint8), masks)


def test_a_hole_on_one_row_of_a_three_row_image_is_solved():
    image = np.arange(3 * 40 * 3, dtype=np.float64).reshape(3, 40, 3)
    mask = np.zeros((3, 40), bool)
    mask[1, 2:38] = True                                   # 36 unknowns in a strip: one level
    exact = removal._direct_values(image[None], mask[None])
    out = np.empty_like(exact)
    multigrid.fill(image, mask, 1.0, 1e-9, 30, out)
    assert np.abs(out - exact).max() < 1e-9
