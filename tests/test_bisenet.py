"""BiSeNet face parser: parity with the official model (fixtures README section 5) through the
real converter CLI, plus the resampling pieces checked on their own."""


import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ifadit_jax
from ifadit_jax import weights
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets import bisenet, resample
from tests.helpers import convert, fixture, load_npz, nchw_to_nhwc, run_cli

HEADS = ("feat_out", "feat_out16", "feat_out32")
# About 10x the fixture's float64-vs-float32 column (README section 5).
ATOL = {
    "feat_out_lowres": 3.2e-4, "feat_out16_lowres": 5.2e-4, "feat_out32_lowres": 1.7e-4,
    "feat_out_grid": 2.8e-4, "feat_out_crop": 7.8e-5, "feat_out_sum_over_hw": 3.2,
    "feat_out16_grid": 4.6e-4, "feat_out16_crop": 1.4e-4, "feat_out16_sum_over_hw": 9.1,
    "feat_out32_grid": 1.2e-4, "feat_out32_crop": 5.5e-5, "feat_out32_sum_over_hw": 5.9,
}


@pytest.fixture(scope="module")
def io():
    return load_npz("bisenet_512x512_io.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("bisenet") / "bisenet.safetensors"
    return convert("convert_bisenet.py", str(fixture("bisenet_faceparsing.pth")), out=out)


@pytest.fixture(scope="module")
def net(converted):
    return ifadit_jax.load(converted)


@pytest.fixture(scope="module")
def x(io):
    # README: this numpy expression reproduces the official normalised tensor bit-exactly.
    u8 = io["image_u8"]
    return (u8.astype(np.float32) / np.float32(255) - io["mean"]) / io["std"]


@pytest.fixture(scope="module")
def full(net, x):
    return [np.asarray(o) for o in net(x)]


def test_config_and_parameter_count(converted):
    variables, meta = weights.read(converted, kind="bisenet")
    # The fixture model: every official width divided by 8 (README section 5).
    assert meta.config == {"n_classes": 19, "stem_width": 8, "layer_widths": [8, 16, 32, 64],
                           "layer_blocks": [2, 2, 2, 2], "context_width": 16, "fusion_width": 32,
                           "fusion_attention_width": 8, "head_widths": [32, 8, 8]}
    n = sum(v.size for v in weights.flatten(variables["params"]).values())
    assert n == 211_032


def test_lowres_heads_match_official(net, x, io):
    for name, got in zip(HEADS, net.lowres(x)):
        ref = nchw_to_nhwc(io[f"{name}_lowres"])
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=ATOL[f"{name}_lowres"],
                                   err_msg=name)


def test_full_resolution_outputs_match_official(full, io):
    rows, cols = io["grid_rows"], io["grid_cols"]
    y0, x0, s = io["crop_y0x0size"]
    for name, got in zip(HEADS, full):
        assert got.shape == (1, 512, 512, 19)
        got_nchw = np.transpose(got, (0, 3, 1, 2))
        np.testing.assert_allclose(got_nchw[:, :, rows][:, :, :, cols], io[f"{name}_grid"],
                                   rtol=0, atol=ATOL[f"{name}_grid"], err_msg=name)
        np.testing.assert_allclose(got_nchw[:, :, y0:y0 + s, x0:x0 + s], io[f"{name}_crop"],
                                   rtol=0, atol=ATOL[f"{name}_crop"], err_msg=name)
        # Summed in float64 here: the statistic, not the network, should not add rounding.
        np.testing.assert_allclose(got.astype(np.float64).sum((1, 2)), io[f"{name}_sum_over_hw"],
                                   rtol=0, atol=ATOL[f"{name}_sum_over_hw"], err_msg=name)


def test_parsing_matches_official(full, net, x, io):
    labels = np.argmax(full[0], axis=-1)
    clear = io["parsing_ambiguous"] == 0
    np.testing.assert_array_equal(labels[clear], io["parsing"][clear])
    np.testing.assert_array_equal(np.asarray(net.labels(x))[clear], io["parsing"][clear])


def test_upsample_reproduces_official_from_official_lowres(io):
    # Isolates the align_corners=True bilinear upsampling: official low-res in, official out.
    rows, cols = io["grid_rows"], io["grid_cols"]
    y0, x0, s = io["crop_y0x0size"]
    for name in HEADS:
        up = resample.bilinear_align_corners(nchw_to_nhwc(io[f"{name}_lowres"]), (512, 512))
        up = np.transpose(np.asarray(up), (0, 3, 1, 2))
        # Values up to 11: 2e-6 is two float32 ulps there.
        np.testing.assert_allclose(up[:, :, rows][:, :, :, cols], io[f"{name}_grid"],
                                   rtol=0, atol=2e-6)
        np.testing.assert_allclose(up[:, :, y0:y0 + s, x0:x0 + s], io[f"{name}_crop"],
                                   rtol=0, atol=2e-6)
        sub = resample.bilinear_align_corners(nchw_to_nhwc(io[f"{name}_lowres"]),
                                                      (512, 512), rows=rows, cols=cols)
        np.testing.assert_allclose(np.asarray(sub),
                                   np.transpose(up[:, :, rows][:, :, :, cols], (0, 2, 3, 1)),
                                   rtol=0, atol=2e-6)


def test_align_corners_taps_by_hand():
    # 3 -> 5 with align_corners=True: sources 0, 0.5, 1, 1.5, 2.
    x = jnp.asarray([0.0, 10.0, 30.0])[None, :, None, None] * jnp.ones((1, 3, 2, 1))
    up = resample.bilinear_align_corners(x, (5, 2))
    np.testing.assert_allclose(np.asarray(up)[0, :, 0, 0], [0, 5, 10, 20, 30], atol=1e-6)


def test_nearest_upsample_by_hand():
    x = jnp.arange(3.0)[None, :, None, None] * jnp.ones((1, 3, 1, 1))
    np.testing.assert_array_equal(np.asarray(bisenet.upsample_nearest(x, (6, 1)))[0, :, 0, 0],
                                  [0, 0, 1, 1, 2, 2])
    # torch 'nearest' for 3 -> 4: floor(i * 0.75) = 0, 0, 1, 2
    np.testing.assert_array_equal(np.asarray(bisenet.upsample_nearest(x, (4, 1)))[0, :, 0, 0],
                                  [0, 0, 1, 2])


def test_preprocess_matches_official_normalisation(io, x):
    got = bisenet.preprocess(io["image_u8"].astype(np.float32) / np.float32(255))
    np.testing.assert_allclose(np.asarray(got), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resample,pil_filter", [("bicubic", Image.BICUBIC),
                                                   ("bilinear", Image.BILINEAR)])
@pytest.mark.parametrize("shape,size", [((256, 256), (512, 512)), ((37, 50), (64, 29))])
def test_resize_matches_pil_float_path(resample, pil_filter, shape, size):
    a = np.random.default_rng(7).random(shape).astype(np.float32)
    ref = np.asarray(Image.fromarray(a, mode="F").resize(size[::-1], pil_filter))
    got = bisenet.resize_pil(jnp.asarray(a)[None, :, :, None], size, resample)
    np.testing.assert_allclose(np.asarray(got)[0, :, :, 0], ref, rtol=0, atol=1e-6)


def test_resize_close_to_pil_uint8_rgb():
    # What the official code does: PIL resize of a uint8 RGB image (rounded to uint8 per pass).
    u8 = np.random.default_rng(8).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(u8).resize((512, 512))) / 255.0  # default filter = bicubic
    got = np.asarray(bisenet.resize_pil(jnp.asarray(u8[None] / np.float32(255)), (512, 512),
                                        clip=True))[0]
    # PIL rounds to 1/255 after each of its two passes; nothing else differs.
    assert np.abs(got - ref).max() <= 1.5 / 255


def test_converter_rejects_other_network(tmp_path):
    out = tmp_path / "x.safetensors"
    proc = run_cli("ports/convert_bisenet.py", str(fixture("lpips_weights/v0.1/alex.pth")), str(out),
                   check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "BiSeNet" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("edit,message", [
    ("drop", "missing cp.arm32.bn_atten.running_var"),
    ("reshape", "params/conv_out/conv/conv/kernel has shape"),
])
def test_converter_names_missing_or_misshapen_tensor(monkeypatch, tmp_path, edit, message):
    from ports import convert_bisenet

    src = str(fixture("bisenet_faceparsing.pth"))
    state = dict(convert_bisenet.state_dict(src))
    if edit == "drop":
        del state["cp.arm32.bn_atten.running_var"]
    else:
        state["conv_out.conv.conv.weight"] = np.zeros((32, 31, 3, 3), np.float32)
    monkeypatch.setattr(convert_bisenet, "state_dict", lambda path: state)
    with pytest.raises(WeightsError, match=message):
        convert_bisenet.convert(src)


def test_bad_input_shape_is_one_line_error(net):
    with pytest.raises(InputError):
        net(np.zeros((1, 64, 64, 4), np.float32))
