"""iFADIT refinement: soft face mask and blending (fixtures README sections 13 and 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifadit_jax
from ifadit_jax import refine
from ifadit_jax.nets import bisenet, resample
from tests.helpers import convert, fixture, load_npz, nchw_to_nhwc


@pytest.fixture(scope="module")
def blend_io():
    return {k: (nchw_to_nhwc(v) if v.ndim == 4 else v)
            for k, v in load_npz("ifadit_blend_io.npz").items()}


@pytest.fixture(scope="module")
def parser_io():
    return load_npz("bisenet_512x512_io.npz")


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    out = tmp_path_factory.mktemp("refine") / "bisenet.safetensors"
    return ifadit_jax.load(convert("convert_bisenet.py", str(fixture("bisenet_faceparsing.pth")),
                                   out=out))


# ----------------------------------------------------------------------------- get_masked_imgs

def test_gaussian_taps_are_opencvs(blend_io):
    assert refine.gaussian_sigma(15) == pytest.approx(2.6, abs=1e-15)
    assert refine.gaussian_sigma(15) == float(blend_io["gaussian_sigma"])
    np.testing.assert_array_equal(refine.gaussian_taps(15), blend_io["gaussian_kernel_cv2_f32"])


def test_dilate_matches_official(blend_io):
    got = refine.dilate(jnp.asarray(blend_io["masks"]))
    assert got.shape == (2, 64, 96, 3)
    np.testing.assert_array_equal(np.asarray(got), blend_io["mask_dilated"])


def test_soften_and_blend_match_official(blend_io):
    # Tolerance: about 10x the fixture's float64-vs-float32 column (2e-7 and 2.2e-7).
    soft = jax.jit(refine.soften)(jnp.asarray(blend_io["masks"]))
    np.testing.assert_allclose(np.asarray(soft), blend_io["mask_blurred"], rtol=0, atol=2e-6)
    out = jax.jit(refine.soften_and_blend)(blend_io["fg"], blend_io["bg"], blend_io["masks"])
    assert out.shape == (2, 64, 96, 3)
    np.testing.assert_allclose(np.asarray(out), blend_io["out"], rtol=0, atol=2.2e-6)


def test_dilate_by_hand():
    m = np.zeros((1, 8, 10, 1), np.float32)
    m[0, 0, 0, 0] = 0.5   # corner: the window is cut by the zero padding, nothing wraps around
    m[0, 5, 6, 0] = 1.0
    got = np.asarray(refine.dilate(jnp.asarray(m)))[0, :, :, 0]
    want = np.zeros((8, 10), np.float32)
    want[0:3, 0:3] = 0.5
    want[3:8, 4:9] = 1.0
    np.testing.assert_array_equal(got, want)


def test_blur_by_hand():
    ones = jnp.ones((1, 20, 30, 1))
    # The float32 taps sum to 0.9999999953, so a constant stays constant to float32 precision.
    np.testing.assert_allclose(np.asarray(refine.gaussian_blur(ones)), 1.0, atol=1e-6)
    # One bright pixel away from the border spreads as the outer product of the taps.
    img = np.zeros((1, 20, 30, 1), np.float32)
    img[0, 10, 12, 0] = 1.0
    got = np.asarray(refine.gaussian_blur(jnp.asarray(img)))[0, :, :, 0]
    taps = refine.gaussian_taps(15).astype(np.float64)
    np.testing.assert_allclose(got[3:18, 5:20], np.outer(taps, taps), rtol=0, atol=1e-7)
    # Reflect-101 at the border (row -i reads row i; row 0 is not repeated): a pixel on row 1.
    img = np.zeros((1, 20, 30, 1), np.float32)
    img[0, 1, 12, 0] = 1.0
    got = np.asarray(refine.gaussian_blur(jnp.asarray(img)))[0, :, 12, 0]
    col = np.zeros(20)
    for r in range(20):
        for k in range(-7, 8):
            i = r + k
            i = -i if i < 0 else (2 * 19 - i if i > 19 else i)
            col[r] += taps[7 + k] if i == 1 else 0.0
    np.testing.assert_allclose(got, col * taps[7], rtol=0, atol=1e-7)


def test_blend_formula_by_hand():
    fg = jnp.full((1, 2, 2, 3), 0.8)
    bg = jnp.full((1, 2, 2, 3), 0.2)
    mask = jnp.asarray([[[[0.0], [1.0]], [[0.25], [0.5]]]])
    got = np.asarray(refine.blend(fg, bg, mask))[0, :, :, 0]
    np.testing.assert_allclose(got, [[0.2, 0.8], [0.35, 0.5]], atol=1e-7)


# ----------------------------------------------------------------------------- labels -> mask

def test_face_classes_by_hand():
    labels = jnp.arange(19, dtype=jnp.int32).reshape(1, 1, 19)
    got = np.asarray(refine.binary_face_mask(labels))[0, 0, :, 0]
    # CelebAMask-HQ: 1 skin, 2/3 brows, 4/5 eyes, 6 glasses, 10 nose, 11 mouth, 12/13 lips.
    want = [0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(got, want)
    got = np.asarray(refine.binary_face_mask(labels, background=10 / 255))[0, 0, :, 0]
    np.testing.assert_allclose(got, np.where(np.asarray(want) == 1, 1.0, 10 / 255), rtol=1e-7)


def test_cv2_nearest_index_by_hand():
    np.testing.assert_array_equal(refine.cv2_nearest_index(512, 256), np.arange(256) * 2)
    np.testing.assert_array_equal(refine.cv2_nearest_index(4, 3), [0, 1, 2])  # floor(x * 4/3)
    np.testing.assert_array_equal(refine.cv2_nearest_index(3, 4), [0, 0, 1, 2])  # floor(x * 3/4)


def test_labels_from_official_parser_output(parser_io):
    # The official low-res main head -> our upsampling, argmax and nearest resize.
    lowres = nchw_to_nhwc(parser_io["feat_out_lowres"])
    parsing, clear = parser_io["parsing"], parser_io["parsing_ambiguous"] == 0
    at512 = np.asarray(refine.face_labels_from_lowres(lowres, (512, 512), (512, 512)))
    np.testing.assert_array_equal(at512[clear], parsing[clear])
    # cv2 INTER_NEAREST 512 -> 256 keeps the even rows and columns.
    at256 = np.asarray(refine.face_labels_from_lowres(lowres, (512, 512), (256, 256)))
    assert at256.shape == (1, 256, 256)
    np.testing.assert_array_equal(at256[clear[:, ::2, ::2]], parsing[:, ::2, ::2][clear[:, ::2, ::2]])
    full = resample.bilinear_align_corners(lowres, (512, 512))
    via_full = np.asarray(refine.face_labels(full, (256, 256)))
    np.testing.assert_array_equal(via_full[clear[:, ::2, ::2]], at256[clear[:, ::2, ::2]])
    # The face mask selects exactly the listed classes of the official parsing.
    binary = np.asarray(refine.binary_face_mask(jnp.asarray(at256)))[..., 0]
    face = np.isin(at256, [1, 2, 3, 4, 5, 6, 10, 11, 12, 13])
    np.testing.assert_array_equal(binary, face.astype(np.float32))
    assert 0 < face.mean() < 1


def _far_from(bad: np.ndarray, radius: int) -> np.ndarray:
    """Pixels with no `bad` pixel within `radius` (Chebyshev distance)."""
    b = np.pad(bad, radius)
    near = np.zeros_like(bad)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            near |= b[dy:dy + bad.shape[0], dx:dx + bad.shape[1]]
    return ~near


def test_face_mask_from_images_matches_official_parsing(parser, parser_io):
    images = parser_io["image_u8"].astype(np.float32) / np.float32(255)  # 512: no resize
    got = np.asarray(refine.face_mask_from_images(parser, images))
    assert got.shape == (1, 512, 512, 1)
    want = np.asarray(refine.soften(refine.binary_face_mask(jnp.asarray(parser_io["parsing"]))))
    # A near-tie pixel may flip class on another backend; it reaches 2 + 7 pixels (dilate + blur).
    ok = _far_from(parser_io["parsing_ambiguous"][0] == 1, 9)
    assert ok.mean() > 0.2
    np.testing.assert_allclose(got[0, ok, 0], want[0, ok, 0], rtol=0, atol=1e-6)


def test_face_mask_from_256_images(parser, parser_io):
    # iFADIT's 256x256 faces: resized to 512 for the parser, labels brought back to 256.
    u8 = parser_io["image_u8"].astype(np.float32)
    images = (u8.reshape(1, 256, 2, 256, 2, 3).mean((2, 4)) / 255).astype(np.float32)
    got = np.asarray(refine.face_mask_from_images(parser, images))
    assert got.shape == (1, 256, 256, 1)
    assert got.min() >= 0 and got.max() <= 1 + 1e-6
    # Same as the plain composition through the full-resolution logits (away from near-ties,
    # which the two float paths may break differently).
    logits = parser(bisenet.preprocess(images, clip=True))[0]
    want = np.asarray(refine.face_mask(logits, (256, 256)))
    top2 = np.sort(np.asarray(logits)[0, ::2, ::2], axis=-1)[..., -2:]
    ok = _far_from(top2[..., 1] - top2[..., 0] < 1e-4, 9)
    assert ok.mean() > 0.5
    np.testing.assert_allclose(got[0, ok], want[0, ok], rtol=0, atol=1e-6)
