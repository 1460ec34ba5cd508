"""MTCNN (facenet-pytorch, real weights) vs the official outputs in mtcnn_io.npz, through the real
converter CLI. Fixture README section 15."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import ifadit_jax
from ifadit_jax import weights
from ifadit_jax.errors import InputError
from ifadit_jax.nets import mtcnn
from tests.helpers import convert, fixture, load_npz, nchw_to_nhwc, run_cli

# float64-vs-float32 max abs differences of the official run (fixture README section 15);
# the tests allow 10 times these.
F64_VS_F32 = {
    "pnet_reg": 3.7e-07, "pnet_prob": 9.3e-07,
    "rnet_reg": 1.5e-07, "rnet_prob": 1e-06,
    "onet_reg": 1.5e-07, "onet_landmarks": 2e-07, "onet_prob": 4.1e-08,
    "det_boxes": 1.8e-05, "det_probs": 2.9e-08, "det_landmarks": 2.2e-05,
}


def tol(name: str) -> float:
    return 10 * F64_VS_F32[name]


@pytest.fixture(scope="module")
def io():
    return load_npz("mtcnn_io.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("mtcnn") / "mtcnn.safetensors"
    return convert("convert_mtcnn.py", str(fixture("mtcnn_weights")), out=out)


@pytest.fixture(scope="module")
def net(converted):
    return ifadit_jax.load(converted)


@pytest.fixture(scope="module")
def astronaut(io):
    image = np.asarray(Image.open(fixture("mtcnn_images/astronaut.png")).convert("RGB"))
    # The official run's decoded pixels: any decoder difference would show here first.
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image.shape[:2], io["image_hw"])
    np.testing.assert_array_equal(image.reshape(-1, 3).sum(0, dtype=np.int64), io["image_channel_sums"])
    return image


@pytest.fixture(scope="module")
def stages(net, astronaut):
    return net.detect_stages(astronaut)


# ---- converter ------------------------------------------------------------------------------


def test_converted_file_holds_three_nets(converted):
    variables, meta = weights.read(converted, kind="mtcnn")
    assert set(variables["params"]) == {"pnet", "rnet", "onet"}
    assert meta.config == {"pnet_widths": [10, 16, 32], "rnet_widths": [28, 48, 64, 128],
                           "onet_widths": [32, 64, 64, 128, 256]}
    shas = meta.extra["source_sha256"]
    assert shas["pnet.pt"] == "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"
    assert shas["onet.pt"] == "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"
    # torch Linear [out, in] -> Flax [in, out]; conv OIHW -> HWIO.
    assert variables["params"]["rnet"]["dense4"]["kernel"].shape == (576, 128)
    assert variables["params"]["onet"]["conv4"]["kernel"].shape == (2, 2, 64, 128)


def test_converter_missing_file_is_one_line_error(tmp_path):
    src = tmp_path / "weights"
    src.mkdir()
    for name in ("pnet.pt", "rnet.pt"):
        shutil.copy(fixture("mtcnn_weights") / name, src / name)
    out = tmp_path / "out.safetensors"
    proc = run_cli("ports/convert_mtcnn.py", str(src), str(out), check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "onet.pt" in lines[0], proc.stderr
    assert not out.exists()


def test_converter_wrong_network_is_one_line_error(tmp_path):
    src = tmp_path / "weights"
    src.mkdir()
    for name in ("pnet.pt", "rnet.pt", "onet.pt"):
        shutil.copy(fixture("mtcnn_weights") / name, src / name)
    shutil.copy(fixture("mtcnn_weights") / "rnet.pt", src / "pnet.pt")  # RNet where PNet belongs
    out = tmp_path / "out.safetensors"
    proc = run_cli("ports/convert_mtcnn.py", str(src), str(out), check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "pnet.pt" in lines[0], proc.stderr
    assert "conv4_1" in lines[0]  # names what is missing
    assert not out.exists()


# ---- raw nets -------------------------------------------------------------------------------


def test_pnet_matches_official(net, io):
    reg, prob = net.pnet(nchw_to_nhwc(io["pnet_in"]))
    np.testing.assert_allclose(reg, nchw_to_nhwc(io["pnet_reg"]), rtol=0, atol=tol("pnet_reg"))
    np.testing.assert_allclose(prob, nchw_to_nhwc(io["pnet_prob"]), rtol=0, atol=tol("pnet_prob"))


def test_rnet_matches_official(net, io):
    reg, prob = net.rnet(nchw_to_nhwc(io["rnet_in"]))
    np.testing.assert_allclose(reg, io["rnet_reg"], rtol=0, atol=tol("rnet_reg"))
    np.testing.assert_allclose(prob, io["rnet_prob"], rtol=0, atol=tol("rnet_prob"))


def test_onet_matches_official(net, io):
    reg, landmarks, prob = net.onet(nchw_to_nhwc(io["onet_in"]))
    np.testing.assert_allclose(reg, io["onet_reg"], rtol=0, atol=tol("onet_reg"))
    np.testing.assert_allclose(landmarks, io["onet_landmarks"], rtol=0, atol=tol("onet_landmarks"))
    np.testing.assert_allclose(prob, io["onet_prob"], rtol=0, atol=tol("onet_prob"))


def test_pnet_padded_to_bucket_equals_unpadded(net, io):
    # Odd sizes: the ceil-mode pool keeps a partial last window that the padding must not enter.
    level = nchw_to_nhwc(io["pnet_in"])[0, :61, :75]
    assert mtcnn._bucket(61) > 61 and mtcnn._bucket(75) > 75
    reg, face = net._pnet_maps(level)
    ref_reg, ref_prob = (np.asarray(a)[0] for a in net.pnet(level[None]))
    assert reg.shape == ref_reg.shape == (26, 33, 4)
    np.testing.assert_allclose(reg, ref_reg, rtol=0, atol=1e-6)
    np.testing.assert_allclose(face, ref_prob[..., 1], rtol=0, atol=1e-6)


def test_max_pool_ceil_mode_by_hand():
    # 6x6, window 3, stride 2, ceil mode: windows [0:3], [2:5], [4:6] (the last one partial) per
    # axis -> 3x3. All values negative and decreasing, so each max is the window's top-left value
    # (a zero-padded partial window would give 0).
    x = -(np.arange(36, dtype=np.float32).reshape(1, 6, 6, 1) + 1)
    out = np.asarray(mtcnn.max_pool_ceil(x, 3, 2))[0, :, :, 0]
    np.testing.assert_array_equal(out, [[-1, -3, -5], [-13, -15, -17], [-25, -27, -29]])
    # 5 wide: ceil((5 - 3) / 2) + 1 = 2 windows, none partial.
    assert mtcnn.max_pool_ceil(x[:, :5, :5], 3, 2).shape == (1, 2, 2, 1)


def test_area_resize_by_hand():
    # 5 -> 2 adaptive windows [0, 3) and [2, 5) (overlapping, non-integer ratio).
    image = np.zeros((1, 5, 3), np.uint8)
    image[0, :, 0] = [10, 20, 30, 40, 50]
    out = mtcnn.area_resize(mtcnn.integral_image(image), np.array([0]), np.array([1]),
                            np.array([0]), np.array([5]), 1, 2)
    np.testing.assert_allclose(out[0, 0, :, 0], [20., 40.], rtol=1e-7)


def test_nms_variants_by_hand():
    # torchvision NMS (stages 1, 2): IoU without +1, suppress only IoU > t. A=100, B=70, inter 70:
    # IoU 0.7 exactly -> kept (with +1 areas it would be 88/121 = 0.73 and B would go).
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 7]], np.float32)
    np.testing.assert_array_equal(mtcnn.nms_iou(boxes, np.array([0.9, 0.8], np.float32), 0.7), [0, 1])
    np.testing.assert_array_equal(mtcnn.nms_iou(boxes, np.array([0.8, 0.9], np.float32), 0.69), [1])
    # facenet "Min" NMS (stage 3): +1 areas, inter / min(area), keep overlap <= t, best score first.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 7], [20, 0, 30, 10]], np.float32)
    np.testing.assert_array_equal(mtcnn.nms_min(boxes, np.array([0.9, 0.95, 0.5], np.float32), 0.7),
                                  [1, 2])  # B inside A: overlap 88/88 = 1
    boxes = np.array([[0, 0, 9, 9], [0, 3, 9, 12]], np.float32)  # +1 areas 100, 100; inter 10*7
    np.testing.assert_array_equal(mtcnn.nms_min(boxes, np.array([0.9, 0.8], np.float32), 0.7), [0, 1])


def test_box_arithmetic_by_hand():
    # rerec: 10x4 box -> 10x10 square around the same centre.
    np.testing.assert_array_equal(mtcnn.square(np.array([[0, 0, 10, 4, 0.5]], np.float32)),
                                  [[0, -3, 10, 7, 0.5]])
    box = np.array([[0, 0, 9, 19]], np.float32)
    reg = np.array([[0.5, 0.25, 0, -0.5]], np.float32)
    # bbreg sizes are x2 - x1 + 1 = 10 and 20; stage-1 sizes are 9 and 19.
    np.testing.assert_array_equal(mtcnn.regress(box, reg, plus_one=True), [[5, 5, 9, 9]])
    np.testing.assert_array_equal(mtcnn.regress(box, reg, plus_one=False), [[4.5, 4.75, 9, 9.5]])
    # pad: truncate, clip to 1-based [1, W] x [1, H], crop rows y-1:ey.
    y0, y1, x0, x1, ok = mtcnn.crop_windows(
        np.array([[-3.7, 2.9, 50.2, 8.1], [60, 1, 70, 5]], np.float32), width=40, height=30)
    np.testing.assert_array_equal([y0, y1, x0, x1, ok], [[1, 0], [8, 5], [0, 59], [40, 40], [True, False]])


# ---- full detection -------------------------------------------------------------------------


def test_pyramid_matches_official(stages, io):
    np.testing.assert_array_equal(np.asarray(stages.scales, np.float64), io["det_scales"])
    np.testing.assert_array_equal(np.asarray(stages.pnet_input_hw), io["det_pnet_input_hw"])


def test_rnet_candidates_match_official(stages, io):
    assert stages.rnet_reg.shape == io["det_rnet_reg"].shape  # same 153 candidates, same order
    np.testing.assert_allclose(stages.rnet_reg, io["det_rnet_reg"], rtol=0, atol=tol("rnet_reg"))
    np.testing.assert_allclose(stages.rnet_prob, io["det_rnet_prob"], rtol=0, atol=tol("rnet_prob"))


def test_onet_candidates_match_official(stages, io):
    assert stages.onet_reg.shape == io["det_onet_reg"].shape
    np.testing.assert_allclose(stages.onet_reg, io["det_onet_reg"], rtol=0, atol=tol("onet_reg"))
    np.testing.assert_allclose(stages.onet_landmarks, io["det_onet_landmarks"], rtol=0,
                               atol=tol("onet_landmarks"))
    np.testing.assert_allclose(stages.onet_prob, io["det_onet_prob"], rtol=0, atol=tol("onet_prob"))


def test_detect_matches_official(net, astronaut, io):
    boxes, probs, landmarks = net.detect(astronaut)
    assert boxes.shape == io["det_boxes"].shape and landmarks.shape == io["det_landmarks"].shape
    assert boxes.dtype == probs.dtype == landmarks.dtype == np.float32
    np.testing.assert_allclose(boxes, io["det_boxes"], rtol=0, atol=tol("det_boxes"))
    np.testing.assert_allclose(probs, io["det_probs"], rtol=0, atol=tol("det_probs"))
    np.testing.assert_allclose(landmarks, io["det_landmarks"], rtol=0, atol=tol("det_landmarks"))


def test_no_face_gives_empty_results(net):
    # A flat gray photo, and an image too small for the pyramid (min side < min_face_size).
    for image in (np.full((500, 500, 3), 128, np.uint8), np.full((15, 40, 3), 200, np.uint8)):
        boxes, probs, landmarks = net.detect(image)
        assert boxes.shape == (0, 4) and probs.shape == (0,) and landmarks.shape == (0, 5, 2)
        assert boxes.dtype == probs.dtype == landmarks.dtype == np.float32


def test_other_image_sizes_reuse_compiled_pnet(net, stages):
    # 500x500 has other pyramid sizes than 512x512 but the same size buckets: no new PNet program.
    assert mtcnn.pyramid_sizes(500, 500, mtcnn.pyramid_scales(500, 500)) != stages.pnet_input_hw
    compiled = net._pnet._cache_size()
    net.detect(np.full((500, 500, 3), 90, np.uint8))
    assert net._pnet._cache_size() == compiled


def test_detect_rejects_non_uint8_rgb(net):
    with pytest.raises(InputError, match="uint8 RGB"):
        net.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InputError, match="uint8 RGB"):
        net.detect(np.zeros((64, 64), np.uint8))


def test_detect_many_matches_the_official_detection_per_frame(net, astronaut, io):
    """Frames batched through each stage: every frame gets what the official code gives for it
    alone (the astronaut, and for a face-free frame nothing), with three frames (a padded PNet
    batch of four) and crops of several frames in one RNet / ONet call."""
    blank = np.full_like(astronaut, 128)
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    got = net.detect_many([astronaut, blank, mirrored])
    boxes, probs, landmarks = got[0]
    np.testing.assert_allclose(boxes, io["det_boxes"], rtol=0, atol=tol("det_boxes"))
    np.testing.assert_allclose(probs, io["det_probs"], rtol=0, atol=tol("det_probs"))
    np.testing.assert_allclose(landmarks, io["det_landmarks"], rtol=0, atol=tol("det_landmarks"))
    assert got[1][0].shape == (0, 4) and got[1][2].shape == (0, 5, 2)
    # The mirrored frame: the same face, its box mirrored (x -> W - x) within a few pixels.
    w = astronaut.shape[1]
    assert len(got[2][0]) == len(io["det_boxes"])
    np.testing.assert_allclose(np.sort(w - got[2][0][:, [2, 0]], 0),
                               np.sort(io["det_boxes"][:, [0, 2]], 0), atol=3)
    with pytest.raises(InputError, match="one size"):
        net.detect_many([astronaut, blank[:100]])
