"""FFHQ alignment from five landmarks, the warp, and the paste-back."""

import numpy as np
import pytest

from ifadit_jax import align

# Five landmarks of an upright face: eyes at y=100, nose, mouth corners at y=160.
FACE = np.array([[100.0, 100.0], [160.0, 100.0], [130.0, 130.0], [105.0, 160.0], [155.0, 160.0]])


def test_quad_by_hand():
    """Hand calculation of the FFHQ recipe for the upright face above:
    eye_avg (130,100), eye_to_eye (60,0), mouth_avg (130,160), eye_to_mouth (0,60);
    x = (60,0) - flipud((0,60))*[-1,1] = (60,0) - (-60,0) = (120,0), direction (1,0);
    |x| = max(60*2, 60*1.8) = 120, so x = (120,0); y = flipud(x)*[-1,1] = (0,120);
    c = (130,100) + 0.1*(0,60) = (130,106); quad = c-x-y, c-x+y, c+x+y, c+x-y."""
    quad = align.ffhq_quad(FACE)
    np.testing.assert_allclose(quad, [[10, -14], [10, 226], [250, 226], [250, -14]], atol=1e-9)


def rotate(points, angle, centre=(130.0, 130.0), scale=1.0, shift=(0.0, 0.0)):
    c, s = np.cos(angle), np.sin(angle)
    r = np.array([[c, -s], [s, c]]) * scale
    return (points - centre) @ r.T + centre + shift


@pytest.mark.parametrize("angle,scale,shift", [(0.3, 1.0, (0, 0)), (-0.7, 2.5, (40, -10)), (1.2, 0.6, (5, 5))])
def test_landmarks_land_on_the_same_crop_positions(angle, scale, shift):
    """Alignment removes rotation, scale and translation: the landmarks of a moved face map to
    the same crop coordinates as those of the upright face."""
    a0 = align.crop_transform(FACE, 256)
    moved = rotate(FACE, angle, scale=scale, shift=shift)
    a1 = align.crop_transform(moved, 256)
    np.testing.assert_allclose(align.apply(align.invert(a1), moved),
                               align.apply(align.invert(a0), FACE), atol=1e-6)


def test_warp_samples_the_right_pixels():
    """A linear ramp photo: the crop's value at each pixel equals the ramp evaluated at the
    photo point the transform assigns to that pixel's centre."""
    h, w = 300, 280
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    photo = np.stack([xx / w, yy / h, 0.5 * np.ones_like(xx)], -1).astype(np.float32)
    a = align.crop_transform(rotate(FACE, 0.2, scale=0.8, shift=(10, 20)), 64)
    crop = align.warp_to_crop(photo, a, 64)
    v, u = np.mgrid[0:64, 0:64] + 0.5
    xy = align.apply(a, np.stack([u.ravel(), v.ravel()], -1)).reshape(64, 64, 2)
    inside = (xy[..., 0] > 1) & (xy[..., 0] < w - 1) & (xy[..., 1] > 1) & (xy[..., 1] < h - 1)
    np.testing.assert_allclose(crop[..., 0][inside], (xy[..., 0] / w)[inside], atol=1e-5)
    np.testing.assert_allclose(crop[..., 1][inside], (xy[..., 1] / h)[inside], atol=1e-5)


def test_paste_back_of_an_unchanged_crop_keeps_the_photo():
    rng = np.random.default_rng(0)
    photo = rng.uniform(size=(320, 300, 3)).astype(np.float32)
    a = align.crop_transform(rotate(FACE, 0.4, scale=1.1, shift=(20, 30)), 256)
    # Upscaling keeps detail, so warping back reproduces the photo up to interpolation error.
    smooth = np.asarray(__import__("scipy").ndimage.gaussian_filter(photo, (3, 3, 0)), np.float32)
    crop = align.warp_to_crop(smooth, a, 256)
    out = align.paste_back(smooth, crop, a, feather=0.1)
    assert np.abs(out - smooth).max() < 0.02
    assert out is not smooth and out.dtype == np.float32


def test_paste_back_changes_only_the_crop_region_with_a_feathered_edge():
    photo = np.zeros((300, 300, 3), np.float32)
    a = align.crop_transform(FACE + 20, 128)
    out = align.paste_back(photo, np.ones((128, 128, 3), np.float32), a, feather=0.1)
    corners = align.apply(a, np.array([[0, 0], [0, 128], [128, 128], [128, 0]], float))
    # Far outside the quad: untouched. Deep inside: fully replaced. Near the border: in between.
    assert out[0:5, 0:5].max() == 0 and out[295:, 295:].max() == 0
    centre = align.apply(a, np.array([[64.0, 64.0]]))[0].astype(int)
    np.testing.assert_allclose(out[centre[1], centre[0]], 1.0)
    edge = align.apply(a, np.array([[64.0, 3.0]]))[0].astype(int)  # 3 px inside, margin 12.8 px
    assert 0.05 < out[edge[1], edge[0], 0] < 0.5
    assert corners.min() > 0


def test_paste_back_clips_a_crop_that_leaves_the_photo():
    photo = np.zeros((200, 200, 3), np.float32)
    a = align.crop_transform(FACE - 60, 128)
    assert align.apply(a, np.array([[0.0, 0.0]])).min() < 0
    out = align.paste_back(photo, np.ones((128, 128, 3), np.float32), a)
    assert out.shape == photo.shape and out.max() == 1.0


def test_mask_limits_the_paste():
    photo = np.zeros((300, 300, 3), np.float32)
    a = align.crop_transform(FACE + 20, 128)
    mask = np.zeros((128, 128), np.float32)
    out = align.paste_back(photo, np.ones((128, 128, 3), np.float32), a, mask=mask)
    assert out.max() == 0
