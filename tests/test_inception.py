"""pytorch-fid's FID InceptionV3: converter CLI, parity of the resize, every block and the pool3
features with the official outputs (fixtures README section 8), bad input."""

from __future__ import annotations


import numpy as np
import pytest

import ifadit_jax
from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets import inception
from ports import convert_inception
from ports.reader import read_checkpoint
from tests.helpers import convert, fixture, load_npz, nchw_to_nhwc, run_cli

CKPT = "pt_inception_fid_random_div4.pth"
# 10x the float64-vs-float32 max abs of fixtures README section 8.
ATOL = {"x299_crop_tl": 2.1e-6, "x299_crop_br": 4.6e-5, "x299_crop_mid": 2.6e-5,
        "block0_mean": 3.9e-6, "block0_crop": 1.5e-4, "block1_mean": 7.8e-6, "block1_crop": 2.1e-4,
        "block2_mean": 3.8e-5, "block2_crop": 7.2e-4, "pool3": 1.4e-4}
# Crop windows (y0, x0, size) of the stored NCHW arrays (config_json).
X299_CROPS = {"tl": (0, 0, 16), "br": (283, 283, 16), "mid": (100, 140, 32)}
BLOCK_CROPS = {0: (30, 40, 8), 1: (10, 12, 8), 2: (5, 6, 6)}


def close(got, want, name):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL[name], err_msg=name)


def crop_nchw(x_nhwc, y0, x0, size):
    return np.transpose(np.asarray(x_nhwc), (0, 3, 1, 2))[:, :, y0:y0 + size, x0:x0 + size]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inception")


@pytest.fixture(scope="module")
def converted(out_dir):
    return convert("convert_inception.py", str(fixture(CKPT)),
                   out=out_dir / "inception.safetensors")


@pytest.fixture(scope="module")
def net(converted):
    return ifadit_jax.load(converted)


@pytest.fixture(scope="module")
def io():
    return load_npz("fid_inception_io.npz")


@pytest.fixture(scope="module")
def images(io):
    return nchw_to_nhwc(io["images"])  # (4, 256, 352, 3): one axis up-, the other downsampled


def test_converter_reads_widths_from_the_checkpoint(net, converted):
    assert isinstance(net, inception.LoadedInception)
    # Every official channel constant divided by 4 (README section 8); pool3 is 512-d.
    quarter = {k: [c // 4 for c in v] for k, v in inception.OFFICIAL_WIDTHS.items()}
    assert net.config == {"widths": quarter, "feature_dim": 512}
    assert net.feature_dim == 512 and inception.feature_dim(inception.OFFICIAL_WIDTHS) == 2048
    _, meta = weights.read(converted, kind="inception")
    assert meta.source_file == CKPT and meta.source_sha256 == weights.sha256_file(fixture(CKPT))


def test_bilinear_matrix_by_hand():
    # torch align_corners=False: src = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0.
    # 4 -> 2: src = 0.5, 2.5 -> averages of pixel pairs (no antialiasing beyond that).
    np.testing.assert_array_equal(inception.bilinear_matrix(4, 2),
                                  [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    # 2 -> 4: src = -0.25 (-> 0), 0.25, 0.75, 1.25 (next pixel clamped at the edge).
    np.testing.assert_array_equal(inception.bilinear_matrix(2, 4),
                                  [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])


def test_parity_resized_input(io, images):
    x = inception.images_to_input(images)
    assert x.shape == (4, 299, 299, 3)
    for name, (y0, x0, s) in X299_CROPS.items():
        close(crop_nchw(x, y0, x0, s), io[f"x299_crop_{name}"], f"x299_crop_{name}")


def test_parity_blocks(net, io, images):
    blocks = net.blocks(images)
    assert [b.shape for b in blocks] == [(4, 73, 73, 16), (4, 35, 35, 48), (4, 17, 17, 192),
                                         (4, 512)]
    for i, (y0, x0, s) in BLOCK_CROPS.items():
        mean = np.asarray(blocks[i], np.float64).mean(axis=(1, 2))  # float64: no summation error
        close(mean, io[f"block{i}_mean"], f"block{i}_mean")
        close(crop_nchw(blocks[i], y0, x0, s), io[f"block{i}_crop"], f"block{i}_crop")
    close(blocks[3], io["pool3"], "pool3")


def test_parity_pool3_features(net, io, images):
    feats = net(images)
    assert feats.shape == (4, 512)
    close(feats, io["pool3"], "pool3")


def test_bad_input_is_refused(net):
    with pytest.raises(InputError, match="RGB images"):
        net(np.zeros((1, 64, 64), np.float32))


def test_wrong_checkpoint_is_one_error_line_and_no_output(out_dir):
    out = out_dir / "wrong.safetensors"
    proc = run_cli("ports/convert_inception.py", str(fixture("adaface_ir50_random.ckpt")), str(out),
                   check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Conv2d_1a_3x3.conv.weight" in proc.stderr
    assert not out.exists() and not list(out_dir.glob(".tmp-*"))


def test_torchvision_imagenet_inception_is_refused(monkeypatch):
    # Same layer names, but 1000 classes and AuxLogits: not the FID network.
    state = dict(read_checkpoint(fixture(CKPT)))
    state["fc.weight"] = np.zeros((1000, 512), np.float32)
    state["fc.bias"] = np.zeros((1000,), np.float32)
    monkeypatch.setattr(convert_inception.common, "read_checkpoint", lambda path: state)
    with pytest.raises(WeightsError, match="torchvision's ImageNet InceptionV3"):
        convert_inception.convert(str(fixture(CKPT)))


def test_incomplete_checkpoint_names_the_missing_tensor(monkeypatch):
    state = dict(read_checkpoint(fixture(CKPT)))
    del state["Mixed_7c.branch_pool.bn.running_var"]
    monkeypatch.setattr(convert_inception.common, "read_checkpoint", lambda path: state)
    with pytest.raises(WeightsError, match=r"missing Mixed_7c\.branch_pool\.bn\.running_var"):
        convert_inception.convert(str(fixture(CKPT)))
