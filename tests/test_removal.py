"""Removal operators (citylib.explain.removal): only the masked pixels change, a constant image
stays constant, and ROAD's linear imputation is pytorch-grad-cam's."""
import numpy as np
from scipy import ndimage
import pytest
import torch

from citylib.explain import removal


def scene(n=3, size=48, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), bool)
    masks[0, 10:20, 5:30] = True
    masks[1, 0:8, 40:48] = True                    # touches two image edges
    masks[1, 30:44, 2:9] = True                    # two holes in one image
    masks[2, 20:21, 20:21] = True                  # one pixel
    return images, masks


@pytest.mark.parametrize("operator", sorted(removal.OPERATORS))
def test_each_operator_changes_only_the_pixels_inside_the_dilated_mask(operator):
    images, masks = scene()
    out = removal.remove(operator, images, masks, dilation=2)
    grown = removal.dilate(masks, 2)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.array_equal(out[~grown], images[~grown])
    assert (out[grown] != images[grown]).any(-1).mean() > 0.5          # and it does change them


@pytest.mark.parametrize("operator", sorted(removal.OPERATORS))
def test_each_operator_leaves_a_constant_image_constant(operator):
    _, masks = scene()
    images = np.full(masks.shape + (3,), 77, np.uint8)
    out = removal.remove(operator, images, masks, dilation=1, noise=0.0)
    # OpenCV's Telea is off by up to 4 grey levels on a constant image (its own rounding)
    tolerance = 4 if operator == "telea" else 0
    assert np.abs(out.astype(int) - 77).max() <= tolerance


def test_dilation_grows_a_mask_by_a_square():
    m = np.zeros((1, 9, 9), bool)
    m[0, 4, 4] = True
    grown = removal.dilate(m, 2)
    assert grown.sum() == 25 and grown[0, 2:7, 2:7].all()
    assert np.array_equal(removal.dilate(m, 0), m)
    # irregular masks touching the edges, against scipy's binary dilation by the same square
    masks = np.random.default_rng(5).random((3, 40, 31)) < 0.02
    masks[0, 0, :] = True
    for pixels in (1, 3, 12):
        theirs = np.stack([ndimage.binary_dilation(k, np.ones((2 * pixels + 1,) * 2, bool)) for k in masks])
        assert np.array_equal(removal.dilate(masks, pixels), theirs)


def test_the_linear_imputation_is_pytorch_grad_cams_noisy_linear_imputer():
    """Without noise, ours and pytorch-grad-cam's NoisyLinearImputer (the ROAD authors' code)
    solve the same system: equal within 1e-5 on [0, 1] images (ours is iterated to that), holes on
    the edges included."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    images, masks = scene()
    ours = removal.imputed(images / 255.0, masks)
    for k in range(len(images)):
        theirs = NoisyLinearImputer(noise=0.0)(torch.from_numpy(images[k].transpose(2, 0, 1) / 255.0).float(),
                                               torch.from_numpy((~masks[k]).astype(np.float32)))
        assert np.abs(theirs.numpy().transpose(1, 2, 0) - ours[k]).max() < 1e-5


def test_the_linear_fill_adds_the_noise_asked_for_and_repeats_with_its_seed():
    images = np.full((1, 64, 64, 3), 128, np.uint8)
    masks = np.zeros((1, 64, 64), bool)
    masks[0, 8:56, 8:56] = True
    a = removal.remove("linear", images, masks, noise=0.02, seed=3)
    assert np.array_equal(a, removal.remove("linear", images, masks, noise=0.02, seed=3))
    assert abs((a[masks].astype(float) - 128).std() / 255 - 0.02) < 0.002


def test_a_whole_image_masked_is_filled_without_failing():
    images, _ = scene()
    masks = np.ones(images.shape[:3], bool)
    for operator in removal.OPERATORS:
        assert removal.remove(operator, images, masks).shape == images.shape


def test_bad_input_is_one_clear_error():
    images, masks = scene()
    with pytest.raises(ValueError, match="removal operator 'paint'"):
        removal.remove("paint", images, masks)
    with pytest.raises(ValueError, match="uint8 images"):
        removal.remove("mean", images.astype(float), masks)
