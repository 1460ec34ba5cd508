"""pSp GradualStyleEncoder (E_Attr): converter CLI on pSp and iFADIT checkpoints, parity, init."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifadit_jax
from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets import irse, psp, resample
from ports import convert_arcface, convert_psp
from tests.helpers import convert, fixture, load_npz, nchw_to_nhwc, run_cli

CKPT = "psp_ffhq_encode_256.pt"
IFADIT_CKPT = "ifadit_attr_best.pth"
# 10x the float64-vs-float32 max abs of fixtures README sections 3 and 12.
ATOL = {"codes": 1.2e-6, "codes_plus_avg": 1.4e-6, "attr_codes": 1.1e-6, "attr_codes_of_anon": 1.1e-6}


def close(got, want, name):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL[name], err_msg=name)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("psp")


@pytest.fixture(scope="module")
def net(out_dir):
    return ifadit_jax.load(convert("convert_psp.py", str(fixture(CKPT)),
                                   out=out_dir / "psp.safetensors"))


@pytest.fixture(scope="module")
def ifadit_path(out_dir):
    return convert("convert_psp.py", str(fixture(IFADIT_CKPT)), out=out_dir / "attr.safetensors")


@pytest.fixture(scope="module")
def ifadit_net(ifadit_path):
    return ifadit_jax.load(ifadit_path)


def test_psp_checkpoint_config(net):
    assert isinstance(net, psp.LoadedPSPEncoder)
    # README section 3: widths {64: 16, 128: 32, 256: 48, 512: 64}, style width 64, 14 styles;
    # pSp checkpoints carry opts (start_from_latent_avg) and are fed [-1, 1] images.
    assert net.config == {"in_channels": 3, "widths": [16, 32, 48, 64], "units": [3, 4, 14, 3],
                          "se": True, "n_styles": 14, "style_width": 64, "w_dim": 64,
                          "input_range": [-1.0, 1.0], "start_from_latent_avg": True}


def test_parity_psp_codes_and_latent_avg(net):
    io = load_npz("psp_256_io.npz")
    x = nchw_to_nhwc(io["x"])
    codes = net(x)
    assert codes.shape == (2, int(io["n_styles"]), 64)
    close(codes, io["codes"], "codes")
    np.testing.assert_array_equal(np.asarray(net.latent_avg), io["latent_avg"])
    close(codes + net.latent_avg, io["codes_plus_avg"], "codes_plus_avg")
    close(net.wplus(x), io["codes_plus_avg"], "codes_plus_avg")


def test_ifadit_attr_best_config(ifadit_net, ifadit_path):
    # A bare pSp state dict (encoder.* + unused decoder.*): no latent_avg, no opts, [0, 1] inputs;
    # style conv width 16 decoupled from w_dim 512 (README section 10, change 4).
    assert ifadit_net.latent_avg is None
    assert ifadit_net.config == {"in_channels": 3, "widths": [16, 20, 24, 20], "units": [3, 4, 14, 3],
                                 "se": True, "n_styles": 14, "style_width": 16, "w_dim": 512,
                                 "input_range": [0.0, 1.0], "start_from_latent_avg": False}
    _, meta = weights.read(ifadit_path, kind="psp_encoder")
    assert meta.source_file == IFADIT_CKPT


def test_parity_ifadit_attribute_encoder(ifadit_net):
    """iFADIT's `attr_codes = attr_encoder(x)` on [0, 1] images x: the encoder gets x*2-1 in
    [-1, 1] and maps it back to [0, 1] (input_range of the converted attr_best.pth)."""
    e2e = load_npz("ifadit_e2e_io.npz")
    for image, name in (("x", "attr_codes"), ("img_anon", "attr_codes_of_anon")):
        codes = ifadit_net(nchw_to_nhwc(e2e[image]) * 2 - 1)
        close(codes, e2e[name], name)
        close(ifadit_net.wplus(nchw_to_nhwc(e2e[image]) * 2 - 1), e2e[name], name)  # no latent_avg


def test_input_range_override():
    src = str(fixture(IFADIT_CKPT))
    _, meta = convert_psp.convert(src, input_range="-1,1")
    assert meta.config["input_range"] == [-1.0, 1.0]
    _, meta = convert_psp.convert(str(fixture(CKPT)), input_range="0,1")
    assert meta.config["input_range"] == [0.0, 1.0]


def test_to_encoder_range_by_hand():
    x = jnp.array([-1.0, -0.5, 0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(psp.to_encoder_range(x, (0.0, 1.0))), [0.0, 0.25, 0.5, 1.0])
    assert psp.to_encoder_range(x, (-1.0, 1.0)) is x


def test_bilinear_align_corners_by_hand():
    # align_corners=True keeps the corner samples: 2 -> 3 gives [a, (a+b)/2, b]; 2x2 -> 3x3 has the
    # mean of the four at its centre; 2 -> 5 samples at 0, 1/4, 1/2, 3/4, 1.
    x = jnp.array([[1.0, 3.0], [5.0, 11.0]]).reshape(1, 2, 2, 1)
    y = np.asarray(resample.bilinear_align_corners(x, (3, 3)))[0, :, :, 0]
    np.testing.assert_allclose(y, [[1, 2, 3], [3, 5, 7], [5, 8, 11]], rtol=0, atol=1e-6)
    line = jnp.array([0.0, 4.0]).reshape(1, 1, 2, 1)
    np.testing.assert_allclose(np.asarray(resample.bilinear_align_corners(line, (1, 5))).ravel(),
                               [0, 1, 2, 3, 4], rtol=0, atol=1e-6)
    ones = resample.bilinear_align_corners(jnp.ones((1, 16, 16, 1)), (32, 32))
    np.testing.assert_allclose(ones, 1.0, rtol=0, atol=1e-6)  # weights sum to one


def test_init_from_irse50():
    """pSp copies the IR-SE50 input layer and body (not the output layer) into a fresh encoder."""
    src = str(fixture("arcface_ir_se50.pth"))
    arc_variables, _ = convert_arcface.convert(src)
    module = psp.GradualStyleEncoder(widths=(16, 24, 28, 32), style_width=8, w_dim=8, n_styles=3)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    init = psp.init_from_irse50(fresh, arc_variables)
    weights.check_tree(shapes, init, "initialized encoder")
    got, want = weights.flatten(init), weights.flatten(arc_variables)
    for key, value in got.items():
        if "/body/" in key:
            np.testing.assert_array_equal(value, want[key], err_msg=key)
        else:  # style blocks and lateral layers keep their own values
            assert not value.any(), key
    assert not any("output" in k for k in got)
    no_input = weights.flatten(psp.init_from_irse50(fresh, arc_variables, include_input_layer=False))
    assert not no_input["params/body/input_conv/kernel"].any()
    np.testing.assert_array_equal(no_input["params/body/unit_0/conv1/kernel"],
                                  want["params/body/unit_0/conv1/kernel"])
    # Widths that differ from the ArcFace body are an error, as in torch's load_state_dict.
    wrong = psp.GradualStyleEncoder(widths=(16, 32, 48, 64), style_width=8, w_dim=8, n_styles=3)
    wrong_shapes = jax.eval_shape(wrong.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    with pytest.raises(WeightsError, match="init_from_irse50.*shape"):
        psp.init_from_irse50(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), wrong_shapes),
                             arc_variables)


def test_train_mode_updates_batch_stats_like_torch():
    """train=True: BatchNorm on batch statistics, running mean <- 0.9 old + 0.1 batch mean (torch
    momentum 0.1). A one-unit-per-stage body keeps this cheap; GradualStyleEncoder passes `train`."""
    body = irse.IRBody(widths=(16, 32, 32, 48), units=(1, 1, 1, 1))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    # Random values in place of flax's init (whose RNG ops take long to compile on CPU).
    v = jax.tree.map(lambda s: rng.uniform(0.5, 1.0, s.shape).astype(np.float32) / np.sqrt(s.shape[0]),
                     jax.eval_shape(body.init, jax.random.key(0), x))

    @jax.jit
    def train_and_eval(v, x):
        out, updated = body.apply(v, x, train=True, mutable=["batch_stats"])
        return out[-1], updated, body.apply(v, x)[-1]

    out, updated, out_eval = train_and_eval(v, x)
    h = jax.lax.conv_general_dilated(x, v["params"]["input_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    expected = 0.9 * v["batch_stats"]["input_bn"]["mean"] + 0.1 * np.asarray(h).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(updated["batch_stats"]["input_bn"]["mean"]), expected,
                               rtol=1e-5, atol=1e-6)
    # Every BatchNorm moved, and the eval output (running statistics) differs from the train one.
    for key, value in weights.flatten(updated["batch_stats"]).items():
        assert not np.allclose(value, weights.flatten(v["batch_stats"])[key]), key
    assert not np.allclose(np.asarray(out), np.asarray(out_eval))


def test_bad_input_size_is_refused(ifadit_net):
    # 512x512 leaves the style blocks at 2x2, where the official `view(-1, c)` breaks too.
    with pytest.raises(InputError, match="256x256"):
        ifadit_net(np.zeros((1, 512, 512, 3), np.float32))


def test_wrong_checkpoint_is_one_error_line_and_no_output(out_dir):
    out = out_dir / "wrong.safetensors"
    proc = run_cli("ports/convert_psp.py", str(fixture("arcface_ir_se50.pth")), str(out), check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "convert_arcface.py" in proc.stderr
    assert not out.exists() and not list(out_dir.glob(".tmp-*"))
    # A StyleGAN2 checkpoint (no encoder.* tensors) is refused the same way.
    with pytest.raises(WeightsError, match="no encoder"):
        convert_psp.convert(str(fixture("rosinality_sg2_256.pt")))
