"""AdaFace IR-50 (evaluation identity network): converter CLI, parity with the official outputs
(fixtures README section 7), preprocessing, bad input."""

from __future__ import annotations


import jax
import numpy as np
import pytest

import ifadit_jax
from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets import adaface
from ports import convert_adaface
from ports.reader import read_checkpoint
from tests.helpers import convert, fixture, load_npz, nchw_to_nhwc, run_cli

CKPT = "adaface_ir50_random.ckpt"
# 10x the float64-vs-float32 max abs of fixtures README section 7.
ATOL = {"body_out": 1.7e-4, "emb_raw": 7.8e-5, "feature": 3.3e-6, "norm": 5e-5}


def close(got, want, name):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL[name], err_msg=name)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adaface")


@pytest.fixture(scope="module")
def converted(out_dir):
    return convert("convert_adaface.py", str(fixture(CKPT)), out=out_dir / "adaface.safetensors")


@pytest.fixture(scope="module")
def net(converted):
    return ifadit_jax.load(converted)


@pytest.fixture(scope="module")
def io():
    return load_npz("adaface_ir50_io.npz")


def test_converter_reads_depth_and_widths_and_drops_the_head(net, converted):
    assert isinstance(net, adaface.LoadedAdaFace)
    # Fixture widths {64: 16, 128: 32, 256: 48, 512: 64}, IR-50 (README section 7).
    assert net.config == {"num_layers": 50, "widths": [16, 32, 48, 64], "units": [3, 4, 14, 3],
                          "emb_dim": 512, "input_size": 112}
    _, meta = weights.read(converted, kind="adaface")
    assert meta.source_file == CKPT and meta.source_sha256 == weights.sha256_file(fixture(CKPT))
    # The Lightning file holds the training head next to the backbone; it is not converted.
    raw = read_checkpoint(fixture(CKPT))["state_dict"]
    assert "head.kernel" in raw and "model.input_layer.0.weight" in raw
    state = convert_adaface.state_dict(str(fixture(CKPT)))
    assert "input_layer.0.weight" in state and not any(k.startswith("head") for k in state)


def test_preprocess_is_the_official_to_input(io):
    want = nchw_to_nhwc(io["x"])
    # uint8 in: bit-exact with inference.to_input (float64 then float32).
    np.testing.assert_array_equal(np.asarray(adaface.preprocess(io["image_rgb_u8"])), want)
    # float in [0, 1]: float32 arithmetic, at most one ulp away (README: max 5.9e-08).
    got = adaface.preprocess(io["image_rgb_u8"].astype(np.float32) / 255)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=6e-8)
    # The channel order is reversed (RGB -> BGR): the first output channel is the blue input.
    blue = ((io["image_rgb_u8"][..., 2] / 255.0 - 0.5) / 0.5).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(adaface.preprocess(io["image_rgb_u8"]))[..., 0], blue)


def test_parity_feature_and_norm(net, io):
    feature, norm = net(nchw_to_nhwc(io["x"]))
    assert feature.shape == (2, 512) and norm.shape == (2, 1)
    close(feature, io["feature"], "feature")
    close(norm, io["norm"], "norm")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(feature), axis=1), 1.0, rtol=0, atol=1e-6)
    # embed_rgb = preprocess + net on the RGB uint8 images.
    close(net.embed_rgb(io["image_rgb_u8"]), io["feature"], "feature")


def test_parity_body_and_raw_embedding(net, io):
    def raw(v, x):
        return net.module.apply(v, x, method="raw_embedding",
                                capture_intermediates=lambda m, _: m.name == "body")

    emb_raw, state = jax.jit(raw)(net.variables, nchw_to_nhwc(io["x"]))
    close(emb_raw, io["emb_raw"], "emb_raw")
    body_out = state["intermediates"]["body"]["__call__"][0][-1]  # the body's last unit
    assert body_out.shape == (2, 7, 7, 64)
    close(np.transpose(np.asarray(body_out), (0, 3, 1, 2)), io["body_out"], "body_out")


def test_bad_input_is_refused(net):
    with pytest.raises(InputError, match="112, 112, 3"):
        net(np.zeros((1, 128, 128, 3), np.float32))
    with pytest.raises(InputError, match="RGB"):
        adaface.preprocess(np.zeros((1, 112, 112), np.uint8))


def test_wrong_checkpoint_is_one_error_line_and_no_output(out_dir):
    out = out_dir / "wrong.safetensors"
    proc = run_cli("ports/convert_adaface.py", str(fixture("arcface_ir_se50.pth")), str(out),
                   check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "convert_arcface.py" in proc.stderr
    assert not out.exists() and not list(out_dir.glob(".tmp-*"))
    with pytest.raises(WeightsError, match="input_layer.0.weight"):
        convert_adaface.convert(str(fixture("pt_inception_fid_random_div4.pth")))


def test_incomplete_checkpoint_names_the_missing_tensor(monkeypatch):
    tree = read_checkpoint(fixture(CKPT))
    del tree["state_dict"]["model.body.7.res_layer.2.running_var"]
    monkeypatch.setattr(convert_adaface.common, "read_checkpoint", lambda path: tree)
    with pytest.raises(WeightsError, match=r"missing body\.7\.res_layer\.2\.running_var"):
        convert_adaface.convert(str(fixture(CKPT)))
