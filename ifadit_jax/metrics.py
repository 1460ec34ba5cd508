"""Evaluation metrics of the paper's Tables 1-4 (DESIGN section 5), as plain functions.

Images are NHWC float arrays in [0, 1] (`data_range` 1); per-image metrics return one value per
image, [B]. The image metrics are pure JAX (jitted, differentiable: `ssim` also serves the
training loss L_VQ); the Frechet distance and its statistics are float64 numpy/scipy, as in
pytorch-fid.

- `mse`, `psnr`: per image over (H, W, C); PSNR = 10 log10(data_range^2 / MSE) (scikit-image's
  `peak_signal_noise_ratio`, one image at a time: the PSNR of a batch is not the mean PSNR).
- `ssim`: scikit-image `structural_similarity(data_range=1, channel_axis=-1, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False)`, which equals pytorch-msssim's `ssim` (11-tap Gaussian,
  sigma 1.5, valid filtering, K1 = 0.01, K2 = 0.03): skimage's 5-pixel border crop removes exactly
  its reflect-padded border. Not skimage's defaults (7x7 uniform window, sample covariance).
- `cosine`, `l1`: between identity embeddings (ArcFace / AdaFace), per pair.
- `kffa`: our reading of the paper's KFFA (not defined in any source we found, see DESIGN
  section 5): the mean pairwise angle, in degrees, between the embeddings of one face anonymized
  under K different keys (the paper's values, 20-75, fit degrees).
- `frechet_distance`, `FIDStatistics`: FID as pytorch-fid computes it from pool3 features of
  `ifadit_jax.nets.inception` (`calculate_frechet_distance`, `np.cov` statistics).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import IfaditError, InputError
from ifadit_jax.files import atomic_path
from ifadit_jax.nets import as_float

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pair(x, y, what: str) -> tuple[jax.Array, jax.Array]:
    x, y = jnp.asarray(x), jnp.asarray(y)
    dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)  # float64 kept under x64
    x, y = x.astype(dtype), y.astype(dtype)
    if x.shape != y.shape or x.ndim != 4:
        raise InputError(f"{what} expects two [B, H, W, C] image batches of the same shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


@jax.jit
def _mse(x, y):
    return jnp.mean(jnp.square(x - y), axis=(1, 2, 3))


def mse(x, y) -> jax.Array:
    """Mean squared error per image: [B, H, W, C] x2 -> [B]."""
    return _mse(*_pair(x, y, "mse"))


def psnr(x, y, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image: [B, H, W, C] x2 -> [B] (inf where x == y)."""
    return 10.0 * jnp.log10(data_range ** 2 / mse(x, y))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps exp(-c^2 / (2 sigma^2)), c = -(size//2)..size//2 (float64)."""
    c = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(c ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x, taps):
    """Separable valid (unpadded) filtering of [B, H, W, C] along H and W: shifted, weighted sums
    (exact float32 products, no reduced-precision convolution on accelerators)."""
    n = len(taps)
    h, w = x.shape[1] - n + 1, x.shape[2] - n + 1
    x = sum(float(t) * x[:, k:k + h] for k, t in enumerate(taps))
    return sum(float(t) * x[:, :, k:k + w] for k, t in enumerate(taps))


@jax.jit
def _ssim_map(x, y, data_range):
    taps = gaussian_window()
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    # (Co)variances are shift invariant: centring each channel first avoids most of the float32
    # cancellation in E[x^2] - E[x]^2 (about 3e-6 on SSIM otherwise). The five local moments are
    # filtered as one stacked array (several times faster on CPU than five filter calls).
    x_mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    y_mean = jnp.mean(y, axis=(1, 2), keepdims=True)
    xc, yc = x - x_mean, y - y_mean
    moments = jnp.concatenate([xc, yc, xc * xc, yc * yc, xc * yc], axis=-1)
    m_xc, m_yc, e_xx, e_yy, e_xy = jnp.split(_filter_valid(moments, taps), 5, axis=-1)
    mu_x, mu_y = m_xc + x_mean, m_yc + y_mean
    var_x = e_xx - m_xc * m_xc
    var_y = e_yy - m_yc * m_yc
    cov = e_xy - m_xc * m_yc
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return luminance * (2 * cov + c2) / (var_x + var_y + c2)


def ssim_map(x, y, data_range: float = 1.0) -> jax.Array:
    """SSIM map over the valid 11x11 windows: [B, H, W, C] x2 -> [B, H-10, W-10, C]."""
    x, y = _pair(x, y, "ssim")
    if min(x.shape[1], x.shape[2]) < SSIM_WINDOW:
        raise InputError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {x.shape[1]}x{x.shape[2]}")
    return _ssim_map(x, y, float(data_range))


def ssim(x, y, data_range: float = 1.0) -> jax.Array:
    """Structural similarity per image (mean of the map over space, then channels): [B]."""
    return jnp.mean(ssim_map(x, y, data_range), axis=(1, 2, 3))


def cosine(e1, e2) -> jax.Array:
    """Cosine similarity per pair of embeddings: [B, D] x2 -> [B] (inputs need not be unit)."""
    e1, e2 = as_float(e1), as_float(e2)
    return jnp.sum(e1 * e2, -1) / (jnp.linalg.norm(e1, axis=-1) * jnp.linalg.norm(e2, axis=-1))


def l1(e1, e2) -> jax.Array:
    """Mean absolute difference per pair of embeddings (torch `L1Loss` per pair): [B, D] -> [B]."""
    return jnp.mean(jnp.abs(as_float(e1) - as_float(e2)), -1)


@jax.jit
def _kffa(e):
    e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    # angle = 2 atan2(|a - b|, |a + b|) for unit a, b: accurate also near 0 and 180 degrees,
    # where arccos of the dot product loses half the digits.
    diff = jnp.linalg.norm(e[..., :, None, :] - e[..., None, :, :], axis=-1)
    summ = jnp.linalg.norm(e[..., :, None, :] + e[..., None, :, :], axis=-1)
    angles = jnp.degrees(2 * jnp.arctan2(diff, summ))
    k = e.shape[-2]
    upper = np.triu(np.ones((k, k), bool), 1)
    return jnp.sum(jnp.where(upper, angles, 0), axis=(-2, -1)) / upper.sum()


def kffa(embeddings) -> jax.Array:
    """KFFA (our reading, see the module docstring): mean pairwise angle in degrees.

    embeddings: [K, D] (or [..., K, D]) identity embeddings of ONE face anonymized under K >= 2
    keys -> scalar (or [...]) in [0, 180]; larger means the keys give more different identities.
    """
    e = jnp.asarray(embeddings, jnp.float32)
    if e.ndim < 2 or e.shape[-2] < 2:
        raise InputError(f"kffa expects [K, D] embeddings of one face under K >= 2 keys, "
                         f"got {tuple(e.shape)}")
    return _kffa(e)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """pytorch-fid's `calculate_frechet_distance`, in float64:

    ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 sigma2)),
    sqrtm by scipy's Schur method; if that is not finite, eps is added to both diagonals; a
    complex result is accepted when its diagonal's imaginary part is below 1e-3 (real part kept).
    """
    from scipy import linalg

    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise InputError(f"frechet_distance: statistics of different sizes: means {mu1.shape} and "
                         f"{mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a singular product: regularise as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise IfaditError(f"frechet_distance: sqrtm(sigma1 sigma2) has an imaginary component "
                              f"of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class FIDStatistics:
    """Streaming mean and covariance of feature vectors, in float64.

    stats = FIDStatistics(); for batch in ...: stats.update(inception(batch))
    mu, sigma = stats.mean, stats.cov   # = np.mean(all, 0), np.cov(all, rowvar=False)
    Batches are merged with Chan et al.'s pairwise update (centred sums per batch), so the result
    does not depend on the batching and does not suffer from E[xx^T] - mu mu^T cancellation.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._mean = None
        self._m2 = None  # sum of outer products of deviations from the running mean

    def update(self, features) -> "FIDStatistics":
        """features: [N, D] (any array; copied to float64 on the host). Returns self."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or (self.dim is not None and f.shape[1] != self.dim):
            raise InputError(f"FIDStatistics.update expects [N, {self.dim or 'D'}] features, "
                             f"got {tuple(f.shape)}")
        if f.shape[0] == 0:
            return self
        if self.dim is None:
            self.dim = f.shape[1]
        n_b = f.shape[0]
        mean_b = f.mean(axis=0)
        dev = f - mean_b
        m2_b = dev.T @ dev
        if self.count == 0:
            self._mean, self._m2 = mean_b, m2_b
        else:
            n = self.count + n_b
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (n_b / n)
            self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.count += n_b
        return self

    @property
    def mean(self) -> np.ndarray:
        """[D] float64."""
        if self.count == 0:
            raise InputError("FIDStatistics: no features were added")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """[D, D] float64 sample covariance (N - 1 denominator, as np.cov)."""
        if self.count < 2:
            raise InputError(f"FIDStatistics: a covariance needs at least 2 feature vectors, "
                             f"have {self.count}")
        return self._m2 / (self.count - 1)

    def frechet_distance(self, other: "FIDStatistics") -> float:
        """FID between these statistics and another set's."""
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def save(self, path: str | os.PathLike) -> None:
        """Writes pytorch-fid's statistics file format (`.npz` with `mu`, `sigma`)."""
        save_statistics(path, self.mean, self.cov)


def save_statistics(path: str | os.PathLike, mu, sigma) -> None:
    """Writes `mu`, `sigma` as an `.npz` file in pytorch-fid's format (atomically)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads (mu, sigma) from a pytorch-fid `.npz` statistics file (e.g. precomputed FFHQ stats)."""
    try:
        with np.load(path, allow_pickle=False) as d:
            return np.asarray(d["mu"], np.float64), np.asarray(d["sigma"], np.float64)
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"{path}: not a FID statistics file with 'mu' and 'sigma' ({e})") from None
