"""Training losses (ifadit_jax.losses) against hand calculations and independent implementations
(scikit-image SSIM; the loss networks through their own loaded-network classes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from ifadit_jax import losses, random_nets
from ifadit_jax.errors import InputError
from ifadit_jax.nets import bisenet, lpips, mobilefacenet
from ifadit_jax.training import networks


def unit(*v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_constants_are_the_papers():
    assert (losses.VQ_ALPHA, losses.VQ_BETA, losses.VQ_WEIGHT) == (0.84, 0.16, 0.01)
    assert losses.IMG_TERMS == ("l1", "lpips", "landmarks", "parser")
    assert losses.IMG_LAMBDAS == {"rec": (10, 1, 0.1, 0.01), "anon": (0.01, 0.1, 0.1, 0.01),
                                  "wrong": (0.01, 0.1, 0.1, 0.01)}


def test_vq_loss_matches_scikit_image_ssim():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    ssim = [structural_similarity(x[i].astype(np.float64), y[i].astype(np.float64), data_range=1.0,
                                  channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False) for i in range(2)]
    want = 0.84 * (1 - np.mean(ssim)) + 0.16 * np.mean(np.abs(y.astype(np.float64) - x))
    assert abs(float(losses.vq_loss(y, x)) - want) < 2e-6
    assert abs(float(losses.vq_loss(x, x))) < 1e-6  # SSIM 1, L1 0


def test_semantic_and_phase1_loss_by_hand():
    id_x = np.zeros((2, 4), np.float32)
    id_t = np.full((2, 4), 0.5, np.float32)  # |diff| = 0.5 everywhere
    lm_x = np.zeros((2, 6), np.float32)
    lm_t = np.array([[1, -1, 1, -1, 1, -1], [3, 3, 3, -3, -3, -3]], np.float32)  # mean |.| = 2
    assert float(losses.semantic_loss(id_t, id_x, lm_t, lm_x)) == pytest.approx(2.5)
    assert float(losses.phase1_loss(2.0, 3.0)) == pytest.approx(3.02)  # 0.01 * 2 + 3


def test_theta_by_hand():
    e1 = np.stack([unit(1, 0), unit(1, 0), unit(0, 1)])
    e2 = np.stack([unit(1, 1), unit(-1, 0), unit(0, 1)])
    np.testing.assert_allclose(losses.theta(e1, e2), [np.sqrt(0.5), -1, 1], atol=1e-6)
    np.testing.assert_allclose(losses.theta_plus(e1, e2), [np.sqrt(0.5), 0, 1], atol=1e-6)
    np.testing.assert_allclose(losses.theta_minus(e1, e2), [1 - np.sqrt(0.5), 2, 0], atol=1e-6)
    # not unit vectors: theta is the cosine, not the dot product
    assert float(losses.theta(np.array([[3.0, 0]]), np.array([[2.0, 2]]))[0]) == pytest.approx(np.sqrt(0.5))


def at_angle(cos):
    """A unit vector whose cosine with (1, 0, 0) is `cos`."""
    return unit(cos, np.sqrt(1 - cos * cos), 0)


def test_anonymity_loss_by_hand():
    x = np.stack([unit(1, 0, 0)] * 2)
    anon = np.stack([at_angle(0.5), at_angle(-0.5)])
    assert float(losses.anonymity_loss(anon, x)) == pytest.approx((0.5 + 0) / 2, abs=1e-6)


def test_diversity_loss_by_hand():
    # Inter-identity pairs (0, 1) and (2, 3): cosines 0.6 and -0.3 -> theta+ 0.6 and 0.
    anon = np.stack([unit(1, 0, 0), at_angle(0.6), unit(1, 0, 0), at_angle(-0.3)])
    np.testing.assert_allclose(losses.diversity_pairs(anon), [0.6, 0.0], atol=1e-6)
    # Inter-key pairs (same face, other key): cosines 1, 0.8, -1, 0 -> theta+ 1, 0.8, 0, 0.
    e3 = unit(0, 0, 1)  # orthogonal to every anon row
    other = np.stack([anon[0], 0.8 * anon[1] + 0.6 * e3, -anon[2], e3])
    want = (0.6 + 0) / 2 + (1 + 0.8 + 0 + 0) / 4
    assert float(losses.diversity_loss(anon, other)) == pytest.approx(want, abs=1e-6)
    with pytest.raises(InputError, match="even"):
        losses.diversity_pairs(anon[:3])


def test_deanonymization_loss_by_hand():
    x = np.stack([unit(1, 0, 0)] * 2)
    rec = np.stack([unit(1, 0, 0), at_angle(0.5)])  # theta- = 0 and 0.5
    wrong = np.stack([at_angle(0.2), at_angle(-0.4)])  # theta+ = 0.2 and 0
    assert float(losses.deanonymization_loss(rec, wrong, x)) == pytest.approx(0.25 + 0.1, abs=1e-6)


def test_image_loss_lambdas_and_phase2_sum_by_hand():
    terms = {"l1": 1.0, "lpips": 2.0, "landmarks": 3.0, "parser": 4.0}
    assert float(losses.image_loss(terms, losses.IMG_LAMBDAS["rec"])) == pytest.approx(12.34)
    assert float(losses.image_loss(terms, losses.IMG_LAMBDAS["anon"])) == pytest.approx(0.55)
    assert float(losses.image_loss(terms, losses.IMG_LAMBDAS["wrong"])) == pytest.approx(0.55)
    assert float(losses.phase2_loss(0.5, 1.5, 2.0, 4.0)) == pytest.approx(8.0)


@pytest.fixture(scope="module")
def loss_nets():
    return networks._random_loss_nets(0)


@pytest.fixture(scope="module")
def parser():
    config = random_nets.TINY_CONFIGS["parser"]
    module = bisenet.module_from_config(config)
    variables = random_nets.random_like(jax.eval_shape(module.init, jax.random.key(0),
                                                    jnp.zeros((1, 64, 64, 3))), 3)
    return bisenet.LoadedBiSeNet(config, variables)


def test_image_distances_match_the_loaded_networks(loss_nets, parser):
    """Each distance through the networks' public loaded-network paths: LPIPS on [0, 1] images
    with normalize=True, E_LM on its own preprocessing of [0, 1] images, E_FP's main head before
    upsampling on its ImageNet-normalised 512 input."""
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(2, 64, 64, 3)).astype(np.float32)
    b = rng.uniform(size=(2, 64, 64, 3)).astype(np.float32)
    distances = jax.jit(losses.image_distances, static_argnums=1)
    got = distances(loss_nets, parser.module, parser.variables, a, b)
    lp = lpips.LoadedLPIPS(networks.RANDOM_LPIPS, loss_nets.lpips_vars)
    lm = mobilefacenet.LoadedMobileFaceNet(networks.RANDOM_LANDMARKS, loss_nets.landmark_vars)
    lm_a = np.asarray(lm(mobilefacenet.preprocess(a, (0.0, 1.0))), np.float64)
    lm_b = np.asarray(lm(mobilefacenet.preprocess(b, (0.0, 1.0))), np.float64)
    fp_a = np.asarray(parser.lowres(bisenet.preprocess(a))[0], np.float64)
    fp_b = np.asarray(parser.lowres(bisenet.preprocess(b))[0], np.float64)
    assert fp_a.shape == (2, 64, 64, 19)
    want = {"l1": np.abs(a.astype(np.float64) - b).mean(axis=(1, 2, 3)),
            "lpips": np.asarray(lp(a, b, normalize=True)),
            "landmarks": np.abs(lm_a - lm_b).mean(axis=1),
            "parser": np.square(fp_a - fp_b).mean(axis=(1, 2, 3))}
    for name in losses.IMG_TERMS:
        assert got[name].shape == (2,)
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, err_msg=name)
    assert np.all(want["lpips"] > 0) and np.all(want["landmarks"] > 0)
