"""ArcFace IR-SE50 (E_ID): converter CLI, parity with the official pSp/iFADIT outputs, bad input."""

from __future__ import annotations


import jax
import numpy as np
import pytest

import ifadit_jax
from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets import arcface
from ports import convert_arcface
from tests.helpers import convert, fixture, load_npz, nchw_to_nhwc, run_cli

CKPT = "arcface_ir_se50.pth"
IFADIT_CKPT = "ifadit_model_ir_se50.pth"
# 10x the float64-vs-float32 max abs of fixtures README sections 4 and 12.
ATOL = {"emb_raw": 4.5e-5, "emb": 2e-6, "id_pooled_112": 4.6e-7, "id_feats": 2e-6,
        "id_loss": 5.2e-7, "id_sim_improvement": 9.7e-7, "id_diff_target": 9.3e-7,
        "id_diff_input": 4e-6, "id_diff_views": 9.1e-7, "id_vec": 2.9e-6, "id_vec_of_anon": 1.9e-6}


def close(got, want, name):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL[name], err_msg=name)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("arcface")


@pytest.fixture(scope="module")
def converted(out_dir):
    return convert("convert_arcface.py", str(fixture(CKPT)), out=out_dir / "arcface.safetensors")


@pytest.fixture(scope="module")
def net(converted):
    return ifadit_jax.load(converted)


@pytest.fixture(scope="module")
def io():
    return load_npz("arcface_ir_se50_io.npz")


def test_converter_reads_widths_from_the_checkpoint(net, converted):
    assert isinstance(net, arcface.LoadedArcFace)
    # Fixture widths {64: 16, 128: 24, 256: 28, 512: 32} (README section 4).
    assert net.config == {"in_channels": 3, "widths": [16, 24, 28, 32], "units": [3, 4, 14, 3],
                          "se": True, "emb_dim": 512, "input_size": 112, "bn1d_affine": True}
    _, meta = weights.read(converted, kind="arcface")
    assert meta.source_file == CKPT and meta.source_sha256 == weights.sha256_file(fixture(CKPT))


def test_parity_embedding_112(net, io):
    x = nchw_to_nhwc(io["x112"])
    emb = np.asarray(net(x))
    close(emb, io["emb"], "emb")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=0, atol=1e-6)
    raw = jax.jit(lambda v, x: net.module.apply(v, x, normalize=False))(net.variables, x)
    close(raw, io["emb_raw"], "emb_raw")


def test_parity_identity_path_and_id_loss(net, io):
    x256 = nchw_to_nhwc(io["x256"])
    close(arcface.identity_crop_pool(x256), nchw_to_nhwc(io["id_pooled_112"]), "id_pooled_112")
    feats = net.identity(x256)
    close(feats, io["id_feats"], "id_feats")
    # Official IDLoss.forward(y_hat = x256.flip(3) (horizontal), y = x256, x = x256.flip(2)).
    loss, improvement, logs = arcface.id_loss(net.identity(x256[:, :, ::-1]), feats,
                                              net.identity(x256[:, ::-1]))
    close(loss, io["id_loss"], "id_loss")
    close(improvement, io["id_sim_improvement"], "id_sim_improvement")
    for k, v in logs.items():
        close(v, io[f"id_{k}"], f"id_{k}")


def test_parity_ifadit_identity_encoder(out_dir):
    """iFADIT's `id_vec = IDLoss.extract_feats(x * 2 - 1)` on its own model_ir_se50 (README section 12),
    for the input images and for the (unclamped) anonymized images."""
    path = convert("convert_arcface.py", str(fixture(IFADIT_CKPT)),
                   out=out_dir / "ifadit_id.safetensors")
    net = ifadit_jax.load(path)
    assert net.config["widths"] == [16, 20, 24, 18]  # only consecutive stage widths differ
    e2e = load_npz("ifadit_e2e_io.npz")
    close(net.identity(nchw_to_nhwc(e2e["x"]) * 2 - 1), e2e["id_vec"], "id_vec")
    close(net.identity(nchw_to_nhwc(e2e["img_anon"]) * 2 - 1), e2e["id_vec_of_anon"], "id_vec_of_anon")


def test_adaptive_pool_windows_by_hand():
    m, n = arcface.adaptive_pool_matrix(188, 112)
    # Window i = [floor(188 i / 112), ceil(188 (i + 1) / 112)): i=0 -> [0, 2), i=1 -> [1, 4),
    # i=111 -> [floor(186.3), 188) = [186, 188); windows overlap: rows 0 and 1 share column 1.
    np.testing.assert_array_equal(np.flatnonzero(m[0]), [0, 1])
    np.testing.assert_array_equal(np.flatnonzero(m[1]), [1, 2, 3])
    np.testing.assert_array_equal(np.flatnonzero(m[111]), [186, 187])
    assert n[0] == 2 and n[1] == 3 and set(np.unique(n)) == {2.0, 3.0}


def test_bad_inputs_are_refused(net):
    with pytest.raises(InputError, match="112, 112, 3"):
        net(np.zeros((1, 256, 256, 3), np.float32))
    with pytest.raises(InputError, match="256, 256, 3"):
        net.identity(np.zeros((1, 112, 112, 3), np.float32))


def test_wrong_checkpoint_is_one_error_line_and_no_output(out_dir):
    out = out_dir / "wrong.safetensors"
    proc = run_cli("ports/convert_arcface.py", str(fixture("psp_ffhq_encode_256.pt")), str(out),
                   check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "convert_psp.py" in proc.stderr
    assert not out.exists() and not list(out_dir.glob(".tmp-*"))
    # Another network's state dict is refused naming what is missing.
    with pytest.raises(WeightsError, match="input_layer.0.weight"):
        convert_arcface.convert(str(fixture("mobilefacenet_model_best.pth.tar")))
