"""Resampling ops that must match torch's `F.interpolate` exactly (shared by the ports)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _align_corners_taps(in_size: int, out_size: int):
    """torch `upsample_bilinear2d(align_corners=True)` taps for one axis (float32 like torch)."""
    if out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(0.0)
    src = np.arange(out_size, dtype=np.float32) * scale
    i0 = src.astype(np.int64)  # truncation; src >= 0
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    lam0 = (np.float32(1) - lam1).astype(np.float32)
    return i0, i1, lam0, lam1


def bilinear_align_corners(x: jax.Array, size: tuple[int, int],
                                    rows: np.ndarray | None = None,
                                    cols: np.ndarray | None = None) -> jax.Array:
    """`F.interpolate(x, size, mode='bilinear', align_corners=True)` on NHWC `x`.

    Computed separably, width first, which is the same arithmetic as torch's
    `h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11)`.
    rows / cols: optional integer arrays of output positions (of the full `size` output) to
    compute; the result is then `full[:, rows][:, :, cols]` without building the full map.
    """
    h_in, w_in = x.shape[1], x.shape[2]
    h0, h1, lh0, lh1 = _align_corners_taps(h_in, size[0])
    w0, w1, lw0, lw1 = _align_corners_taps(w_in, size[1])
    if rows is not None:
        rows = np.asarray(rows)
        h0, h1, lh0, lh1 = h0[rows], h1[rows], lh0[rows], lh1[rows]
    if cols is not None:
        cols = np.asarray(cols)
        w0, w1, lw0, lw1 = w0[cols], w1[cols], lw0[cols], lw1[cols]
    # The taps in x's dtype: float32 taps would silently promote a bfloat16 network to float32.
    lw0, lw1 = jnp.asarray(lw0, x.dtype)[:, None], jnp.asarray(lw1, x.dtype)[:, None]
    t = lw0 * x[:, :, w0, :] + lw1 * x[:, :, w1, :]
    lh0, lh1 = jnp.asarray(lh0, x.dtype)[:, None, None], jnp.asarray(lh1, x.dtype)[:, None, None]
    return lh0 * t[:, h0] + lh1 * t[:, h1]
