"""Aligning in-the-wild faces to the FFHQ crop, and pasting edited crops back.

The FFHQ recipe (Karras et al., `ffhq-dataset/download_ffhq.py`) builds an oriented square
("quad") from the eye centres and mouth corners; MTCNN's five landmarks (left eye, right eye,
nose, left mouth corner, right mouth corner) provide exactly those points. The quad defines a
similarity transform between the aligned crop and the photo, which we keep as a 2x3 matrix
`A` mapping crop pixel centres (u + 0.5, v + 0.5, 1) to photo coordinates (x, y) (pixel centres
of the photo at integer + 0.5). The same matrix serves the warp, the inverse warp and the sidecar
that lets recovery find the crop again without detecting anything.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def ffhq_quad(landmarks5: np.ndarray) -> np.ndarray:
    """[5, 2] (x, y) landmarks -> [4, 2] quad corners: top-left, bottom-left, bottom-right,
    top-right of the FFHQ crop in photo coordinates."""
    lm = np.asarray(landmarks5, np.float64)
    eye_left, eye_right, _, mouth_left, mouth_right = lm
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def crop_transform(landmarks5: np.ndarray, size: int = 256) -> np.ndarray:
    """The 2x3 matrix A: crop point (u, v, 1) -> photo point (x, y), continuous coordinates
    (corner (0, 0) of the crop is the quad's top-left corner)."""
    quad = ffhq_quad(landmarks5)
    origin = quad[0]
    ex = (quad[3] - quad[0]) / size  # one crop pixel to the right
    ey = (quad[1] - quad[0]) / size  # one crop pixel down
    return np.stack([ex, ey, origin], axis=1)  # [[ex_x, ey_x, o_x], [ex_y, ey_y, o_y]]


def invert(a: np.ndarray) -> np.ndarray:
    m = np.vstack([a, [0.0, 0.0, 1.0]])
    return np.linalg.inv(m)[:2]


def apply(a: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Applies a 2x3 transform to [N, 2] points."""
    p = np.asarray(points, np.float64)
    return p @ a[:, :2].T + a[:, 2]


def _sample(image: np.ndarray, xy: np.ndarray, mode: str) -> np.ndarray:
    """Bilinear samples of [H, W, C] `image` at continuous photo points xy [..., 2]."""
    # Pixel (i, j) covers [j, j+1) x [i, i+1); its centre is at (j + 0.5, i + 0.5).
    rows = xy[..., 1] - 0.5
    cols = xy[..., 0] - 0.5
    chans = [ndimage.map_coordinates(image[..., c], [rows, cols], order=1, mode=mode)
             for c in range(image.shape[-1])]
    return np.stack(chans, axis=-1)


def _prefilter(image: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Blurs the photo when the crop shrinks it a lot, so bilinear sampling does not alias."""
    scale = np.sqrt(abs(np.linalg.det(a[:, :2])))  # photo pixels per crop pixel
    if scale <= 1.5:
        return image
    sigma = 0.5 * (scale - 1.0)
    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="reflect")


def warp_to_crop(photo: np.ndarray, a: np.ndarray, size: int = 256) -> np.ndarray:
    """Photo [H, W, 3] float32 in [0, 1] -> aligned crop [size, size, 3]; outside the photo the
    image is mirrored (FFHQ pads by reflection too)."""
    src = _prefilter(np.asarray(photo, np.float32), a)
    v, u = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    xy = apply(a, np.stack([u.ravel(), v.ravel()], -1)).reshape(size, size, 2)
    return _sample(src, xy, mode="mirror").astype(np.float32)


def paste_back(photo: np.ndarray, crop: np.ndarray, a: np.ndarray, feather: float = 0.1,
               mask: np.ndarray | None = None) -> np.ndarray:
    """Warps the edited crop [S, S, 3] back into the photo with a feathered edge.

    Only pixels whose centre falls inside the crop change. The weight ramps from 0 at the crop
    border to 1 at `feather * S` inside it, so the resampled band blends smoothly; `mask`
    ([S, S] or [S, S, 1] in [0, 1], e.g. the soft face mask) further limits what is replaced.
    Returns a new array; `photo` is not modified.
    """
    photo = np.asarray(photo, np.float32)
    size = crop.shape[0]
    a_inv = invert(a)
    corners = apply(a, np.array([[0, 0], [0, size], [size, size], [size, 0]], np.float64))
    h, w = photo.shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int), [w, h])
    out = photo.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    uv = apply(a_inv, np.stack([xx.ravel(), yy.ravel()], -1)).reshape(y1 - y0, x1 - x0, 2)
    margin = max(feather * size, 1e-6)
    dist = np.minimum.reduce([uv[..., 0], uv[..., 1], size - uv[..., 0], size - uv[..., 1]])
    weight = np.clip(dist / margin, 0.0, 1.0)
    if mask is not None:
        m = np.asarray(mask, np.float32).reshape(size, size, 1)
        weight = weight * _sample(m, uv, mode="nearest")[..., 0]
    # Crop pixel centres sit at (u + 0.5, v + 0.5): sample the crop like a photo.
    values = _sample(np.asarray(crop, np.float32), uv, mode="nearest")
    region = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = region + weight[..., None] * (values - region)
    return out
