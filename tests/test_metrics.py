"""Evaluation metrics: SSIM/PSNR/MSE against scikit-image's values (fixtures README section 9),
the Frechet distance and its statistics against pytorch-fid (section 8), identity metrics and
KFFA by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifadit_jax import metrics
from ifadit_jax.errors import InputError
from tests.helpers import load_npz, nchw_to_nhwc

# README section 9: atol 1e-5 on SSIM and 1e-4 dB on PSNR for a float32 port.
SSIM_ATOL, PSNR_ATOL = 1e-5, 1e-4
# The float32 SSIM map (per pixel, before averaging) is measured 1.1e-5 from the float64 one: its
# small local variances lose digits in E[x^2] - E[x]^2; the float64 path is checked at 1e-10.
SSIM_MAP_F32_ATOL = 3e-5


@pytest.fixture(scope="module")
def sp():
    d = load_npz("ssim_psnr_io.npz")
    return d, nchw_to_nhwc(d["x"]), nchw_to_nhwc(d["y"])


@pytest.fixture(scope="module")
def fid():
    return load_npz("fid_inception_io.npz")


def test_ssim_matches_scikit_image(sp):
    d, x, y = sp
    got = metrics.ssim(x, y)
    assert got.shape == (4,)
    np.testing.assert_allclose(np.asarray(got), d["ssim_skimage"], rtol=0, atol=SSIM_ATOL)
    # Not skimage's default (7x7 uniform) SSIM, which differs by up to 0.066 here.
    assert np.abs(d["ssim_skimage_uniform7_default"] - d["ssim_skimage"]).max() > 100 * SSIM_ATOL
    m = np.transpose(np.asarray(metrics.ssim_map(x, y), np.float64), (0, 3, 1, 2))
    np.testing.assert_allclose(m.mean(axis=(2, 3)), d["ssim_gauss11_per_channel"], rtol=0,
                               atol=SSIM_ATOL)
    np.testing.assert_allclose(m, d["ssim_gauss11_map"], rtol=0, atol=SSIM_MAP_F32_ATOL)
    # skimage's full map, cropped by its 5-pixel border, is the same valid map.
    np.testing.assert_allclose(m, d["ssim_skimage_map"][:, :, 5:-5, 5:-5], rtol=0,
                               atol=SSIM_MAP_F32_ATOL)
    np.testing.assert_array_equal(metrics.gaussian_window(), d["gauss_win_1d"])


def test_ssim_formula_is_exact_in_float64(sp):
    d, x, y = sp
    with jax.enable_x64(True):
        m = metrics.ssim_map(x.astype(np.float64), y.astype(np.float64))
        assert m.dtype == jnp.float64
        np.testing.assert_allclose(np.transpose(np.asarray(m), (0, 3, 1, 2)), d["ssim_gauss11_map"],
                                   rtol=0, atol=1e-10)


def test_ssim_of_identical_images_is_one_and_it_has_gradients(sp):
    _, x, y = sp
    np.testing.assert_allclose(np.asarray(metrics.ssim(x, x)), 1.0, rtol=0, atol=1e-6)
    g = jax.grad(lambda a: jnp.sum(metrics.ssim(a, y)))(jnp.asarray(x))
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_psnr_and_mse_match_scikit_image(sp):
    d, x, y = sp
    np.testing.assert_allclose(np.asarray(metrics.mse(x, y)), d["mse"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(metrics.psnr(x, y)), d["psnr"], rtol=0, atol=PSNR_ATOL)
    # The PSNR of the batch as one image is not the mean of the per-image PSNRs.
    whole = metrics.psnr(x.reshape(1, -1, *x.shape[2:]), y.reshape(1, -1, *y.shape[2:]))
    np.testing.assert_allclose(np.asarray(whole), [d["psnr_batch"]], rtol=0, atol=PSNR_ATOL)
    assert abs(float(d["psnr_batch"]) - float(d["psnr"].mean())) > 1
    # By hand: a uniform error of 0.1 is MSE 0.01, i.e. 20 dB.
    z = np.zeros((1, 4, 4, 3), np.float32)
    np.testing.assert_allclose(np.asarray(metrics.psnr(z, z + 0.1)), [20.0], rtol=0, atol=1e-4)
    assert np.isinf(np.asarray(metrics.psnr(z, z))).all()


def test_image_metrics_refuse_mismatched_or_tiny_images():
    with pytest.raises(InputError, match="same shape"):
        metrics.psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))
    with pytest.raises(InputError, match="11x11"):
        metrics.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_identity_metrics_by_hand():
    e1 = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    e2 = np.array([[1.0, 1.0], [0.0, -3.0]], np.float32)
    np.testing.assert_allclose(np.asarray(metrics.cosine(e1, e2)), [1 / np.sqrt(2), -1.0],
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(metrics.l1(e1, e2)), [0.5, 2.5], atol=1e-7)


def test_kffa_is_the_mean_pairwise_angle_in_degrees():
    # Directions at 0, 90 and 180 degrees (lengths do not matter): pairs 90, 180, 90 -> 120.
    e = np.array([[2.0, 0, 0], [0, 0.5, 0], [-1.0, 0, 0]], np.float32)
    np.testing.assert_allclose(float(metrics.kffa(e)), 120.0, atol=1e-4)
    # 60 degrees apart, and nearly identical (1e-3 rad = 0.0573 degrees: arccos would lose it).
    two = np.array([[[1.0, 0], [0.5, np.sqrt(3) / 2]], [[1.0, 0], [np.cos(1e-3), np.sin(1e-3)]]],
                   np.float32)
    np.testing.assert_allclose(np.asarray(metrics.kffa(two)), [60.0, np.degrees(1e-3)], rtol=1e-4)
    with pytest.raises(InputError, match="K >= 2"):
        metrics.kffa(np.ones((1, 512)))


@pytest.mark.parametrize("case", ["fullrank", "lowrank"])
def test_frechet_distance_matches_pytorch_fid(fid, case):
    s = {k: fid[f"fid_{case}_{k}"] for k in ("mu_a", "sigma_a", "mu_b", "sigma_b", "fid")}
    got = metrics.frechet_distance(s["mu_a"], s["sigma_a"], s["mu_b"], s["sigma_b"])
    np.testing.assert_allclose(got, float(s["fid"]), rtol=1e-6)  # README section 8


@pytest.mark.parametrize("case", ["fullrank", "lowrank"])
def test_streaming_statistics_equal_np_cov_and_self_fid_is_zero(fid, case):
    feats_a, feats_b = fid[f"fid_{case}_feats_a"], fid[f"fid_{case}_feats_b"]
    a = metrics.FIDStatistics()
    for lo, hi in [(0, 7), (7, 8), (8, 30), (30, len(feats_a))]:  # uneven batches, one of size 1
        a.update(feats_a[lo:hi])
    assert a.count == len(feats_a)
    np.testing.assert_allclose(a.mean, fid[f"fid_{case}_mu_a"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.cov, fid[f"fid_{case}_sigma_a"], rtol=0, atol=1e-12)
    b = metrics.FIDStatistics().update(feats_b)
    np.testing.assert_allclose(a.frechet_distance(b), float(fid[f"fid_{case}_fid"]), rtol=1e-6)
    assert abs(a.frechet_distance(a)) < 1e-6


def test_frechet_distance_by_hand_and_statistics_files(tmp_path):
    # 1-D: (0 - 3)^2 + 4 + 1 - 2 sqrt(4 * 1) = 10.
    got = metrics.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]])
    assert got == pytest.approx(10.0, abs=1e-12)
    stats = metrics.FIDStatistics().update(np.arange(12.0).reshape(4, 3) ** 2)
    stats.save(tmp_path / "stats.npz")
    mu, sigma = metrics.load_statistics(tmp_path / "stats.npz")
    np.testing.assert_array_equal(mu, stats.mean)
    np.testing.assert_array_equal(sigma, stats.cov)
    with pytest.raises(InputError, match="different sizes"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(InputError, match=r"\[N, 3\]"):
        stats.update(np.zeros((2, 4)))
