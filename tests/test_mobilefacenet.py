"""MobileFaceNet landmark network (E_LM): converter CLI, parity with the official outputs, inputs."""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest

import ifadit_jax
from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets import mobilefacenet as mfn
from ports import common, convert_mobilefacenet
from tests.helpers import convert, fixture, load_npz, nchw_to_nhwc, run_cli

CKPT = "mobilefacenet_model_best.pth.tar"
# 10x the float64-vs-float32 max abs of fixtures README section 14.
ATOL_LANDMARKS = 1.1e-4
ATOL_FEATURES = 1.6e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert("convert_mobilefacenet.py", str(fixture(CKPT)),
                   out=tmp_path_factory.mktemp("mobilefacenet") / "mobilefacenet.safetensors")


@pytest.fixture(scope="module")
def net(converted):
    return ifadit_jax.load(converted)


@pytest.fixture(scope="module")
def io():
    return load_npz("mobilefacenet_io.npz")


def test_load_dispatches_on_kind(net, converted):
    assert isinstance(net, mfn.LoadedMobileFaceNet)
    assert net.config == {"embedding_size": 136}
    _, meta = weights.read(converted, kind="mobilefacenet")
    assert meta.source_file == CKPT
    assert meta.source_sha256 == weights.sha256_file(fixture(CKPT))


def test_parity_landmarks_and_conv_features(net, io):
    x = nchw_to_nhwc(io["x"])
    landmarks, conv_features = net.features(x)
    assert landmarks.shape == (2, 136) and conv_features.shape == (2, 7, 7, 512)
    np.testing.assert_allclose(np.asarray(landmarks), io["landmarks"], rtol=0, atol=ATOL_LANDMARKS)
    np.testing.assert_allclose(np.asarray(conv_features), nchw_to_nhwc(io["conv_features"]),
                               rtol=0, atol=ATOL_FEATURES)
    # `net(x)` is the landmarks alone (the first official output).
    np.testing.assert_allclose(np.asarray(net(x)), io["landmarks"], rtol=0, atol=ATOL_LANDMARKS)


def test_landmark_pairs_layout(io):
    lm = io["landmarks"]
    pts = np.asarray(mfn.landmark_pairs(jnp.asarray(lm)))
    assert pts.shape == (2, 68, 2)
    # Official demo: landmarks.reshape(-1, 2) -> (x, y) pairs, times the crop size.
    np.testing.assert_array_equal(pts[1, 5], lm[1, 10:12] * 112)


def test_preprocess_flips_to_bgr_and_maps_to_unit_range():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)
    out = np.asarray(mfn.preprocess(rgb))
    # At 112x112 there is no resize: out = ((x + 1) / 2) with channels reversed.
    np.testing.assert_allclose(out, ((rgb + 1) / 2)[..., ::-1], rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(mfn.preprocess(rgb * 127.5 + 127.5, value_range=(0, 255))),
                               out, rtol=0, atol=1e-6)


def test_preprocess_resizes_to_112():
    # A constant colour stays that colour under any normalised resize filter.
    colour = np.array([-1.0, 0.0, 0.5], np.float32)  # R, G, B
    img = np.broadcast_to(colour, (1, 256, 256, 3))
    out = np.asarray(mfn.preprocess(img))
    assert out.shape == (1, 112, 112, 3)
    np.testing.assert_allclose(out, np.broadcast_to([0.75, 0.5, 0.0], out.shape), atol=1e-6)


def test_rejects_wrong_input_shape(net):
    with pytest.raises(InputError, match="112"):
        net(np.zeros((1, 128, 128, 3), np.float32))


def test_module_prefix_is_stripped(monkeypatch):
    real = convert_mobilefacenet.common.read_checkpoint

    def prefixed(path):
        sd = real(path)["state_dict"]
        return {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}

    plain, _ = convert_mobilefacenet.convert(str(fixture(CKPT)))
    monkeypatch.setattr(convert_mobilefacenet.common, "read_checkpoint", prefixed)
    stripped, _ = convert_mobilefacenet.convert(str(fixture(CKPT)))
    a, b = weights.flatten(plain), weights.flatten(stripped)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_converter_rejects_other_network(tmp_path):
    out = tmp_path / "x.safetensors"
    proc = run_cli("ports/convert_mobilefacenet.py", str(fixture("lpips_vgg_div8_lins.pth")),
                   str(out), check=False)
    assert proc.returncode == WeightsError.exit_code
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "output_layer.linear.weight" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_converter_rejects_truncated_file(tmp_path, capsys):
    bad = tmp_path / "cut.pth.tar"
    bad.write_bytes(fixture(CKPT).read_bytes()[:100_000])
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        common.converter_main(convert_mobilefacenet.__doc__, convert_mobilefacenet.convert,
                              argv=[str(bad), str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == WeightsError.exit_code
    assert err.startswith("error: ") and err.count("\n") == 1 and "cut.pth.tar" in err
    assert not out.exists()
