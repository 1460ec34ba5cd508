"""StyleGAN2 generator (mapping net f and synthesis net G) in Flax, NHWC.

One module serves both official layouts: rosinality/stylegan2-pytorch (`flavor="rosinality"`,
used by pSp and iFADIT) and NVlabs/stylegan2-ada-pytorch (`flavor="nvlabs"`). They compute the
same network and differ only in where the 1/sqrt(fan_in) weight gain sits relative to
demodulation (rosinality applies it before, NVlabs leaves it out of demodulated layers, which only
moves the 1e-8 epsilon) and in NVlabs' `conv_clamp`. Parameters are stored raw, as in the
checkpoints, and the equalized-learning-rate gains are applied at run time, so training updates
see the same parameterization as the official code.

Modulation is applied to the activations around a shared-weight convolution
(conv(x * s, W) * d == conv(x, W * s * d)): the same math as the official per-sample grouped
convolution, but it batches.

Parameter tree (collections):
  params/mapping/fc{i}/{kernel [in,out], bias}
  params/synthesis/b4/const [4,4,C]
  params/synthesis/b{res}/{conv0,conv1,torgb}/{affine/{kernel,bias}, weight [k,k,I,O], bias,
                                               noise_strength []}
  consts/mapping/w_avg [w_dim]
  consts/synthesis/b{res}/{conv0,conv1}/noise_const [res,res]

Layer order of W+ (n_latent = 2*log2(res) - 2): b4.conv1 w[0], b4.torgb w[1]; then per block
conv0 w[i], conv1 w[i+1], torgb w[i+2] for i = 1, 3, 5, ... (each ToRGB shares its index with the
next block's conv0), exactly as both official implementations index it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import InputError
from ifadit_jax.nets import as_float, base

_SQRT2 = math.sqrt(2.0)
_BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
NOISE_MODES = ("const", "random", "none")


_RESOLUTIONS = tuple(2 ** i for i in range(2, 11))  # 4 .. MAX_RESOLUTION


@base.netconfig
class Config(base.NetConfig):
    """Everything the converter infers from a checkpoint (widths are never hard-coded)."""

    KIND: ClassVar[str] = "stylegan2"
    OPTIONAL: ClassVar[frozenset] = frozenset({"flavor", "conv_clamp", "img_channels"})
    SCHEMA: ClassVar[dict] = {
        "resolution": base.Choice(_RESOLUTIONS), "z_dim": base.Int(), "w_dim": base.Int(),
        "n_mapping": base.Int(1, base.MAX_DEPTH), "lr_mul": base.Float(1e-6, 1e3),
        "channels": base.List(base.List(base.Int(), 2, 2), 1, len(_RESOLUTIONS)),
        "flavor": base.Choice(("rosinality", "nvlabs")),
        "conv_clamp": base.Float(0.0, 1e6, optional=True), "img_channels": base.Int(1, 4)}

    resolution: int = 256
    z_dim: int = 512
    w_dim: int = 512
    n_mapping: int = 8
    lr_mul: float = 0.01
    channels: tuple[tuple[int, int], ...] = ()  # ((4, 512), (8, 512), ..., (256, 128))
    flavor: str = "rosinality"
    conv_clamp: float | None = None
    img_channels: int = 3

    @property
    def n_latent(self) -> int:
        return 2 * int(math.log2(self.resolution)) - 2

    @property
    def n_noise(self) -> int:
        return 2 * int(math.log2(self.resolution)) - 3

    def check(self) -> None:
        want = [r for r in _RESOLUTIONS if r <= self.resolution]
        if [r for r, _ in self.channels] != want:
            raise base.ConfigError(f"config field 'channels' must list the resolutions {want} in "
                                   f"order, got {[r for r, _ in self.channels]}")

    def module(self) -> "Generator":
        return Generator(self)

    def init_inputs(self) -> tuple:
        return (base.spec(1, self.z_dim),)


def rosinality_channels(resolution: int, channel_multiplier: int = 2, divisor: int = 1):
    """The channel table of rosinality's Generator (config-f widths when divisor == 1)."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
             128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
             512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return tuple((r, table[r] // divisor) for r in sorted(table) if r <= resolution)


def blur_kernel(gain: float = 1.0) -> np.ndarray:
    """The [1,3,3,1] FIR filter as a normalized 4x4 kernel, times `gain`."""
    k = np.asarray(_BLUR_TAPS, np.float64)
    k = np.outer(k, k)
    return (k / k.sum() * gain).astype(np.float32)


def _interleave(even, odd, axis: int):
    """[..., n, ...] pairs -> [..., 2n, ...] with `even` at 0, 2, 4, ... along `axis`."""
    y = jnp.stack([even, odd], axis=axis + 1)
    return y.reshape(even.shape[:axis] + (2 * even.shape[axis],) + even.shape[axis + 1:])


def _shift(x, axis: int, offset: int):
    """x[m + offset] along `axis`, zero outside (offset -1 or +1)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 0) if offset < 0 else (0, 1)
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(0, x.shape[axis]) if offset < 0 else slice(1, None)
    return jnp.pad(x, pad)[tuple(idx)]


def upsample2x(x):
    """upfirdn2d(x, blur*4, up=2, pad=(2,1)) on NHWC `x`: [B,H,W,C] -> [B,2H,2W,C].

    Zero insertion followed by the separable [1,3,3,1] filter leaves two taps per output: along
    each axis, out[2m] = x[m-1]/4 + 3x[m]/4 and out[2m+1] = 3x[m]/4 + x[m+1]/4. Computed that
    way it is a few fused elementwise passes instead of a depthwise convolution over a 4x larger,
    mostly zero input (which XLA's CPU backend runs slowly).
    """
    for axis in (1, 2):
        even = 0.25 * _shift(x, axis, -1) + 0.75 * x
        odd = 0.75 * x + 0.25 * _shift(x, axis, 1)
        x = _interleave(even, odd, axis)
    return x


def _conv(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv3x3_same(x, w):
    """3x3 'same' convolution. Below 32x32 pixels it is nine shifted matmuls: XLA's CPU
    convolution leaves most of the cores' time unused on such small images (the weights dominate
    the memory traffic), while a matmul per tap streams them at full rate."""
    _, h, wd, _ = x.shape
    if h * wd >= 32 * 32:
        return _conv(x, w, ((1, 1), (1, 1)))
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = 0.0
    for i in range(3):
        for j in range(3):
            y = y + jnp.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + wd], w[i, j])
    return y


def _transposed_conv_phases(x, w):
    """conv_transpose2d(x, w, stride=2, padding=0) of NHWC `x` [B,H,W,I] with a 3x3 `w`, as its
    four output parity classes (the full output y [B,2H+1,2W+1,O] has y[2m, 2n] = ee[m, n],
    y[2m, 2n+1] = eo[m, n], y[2m+1, 2n] = oe[m, n], y[2m+1, 2n+1] = oo[m, n]):
    ee [B,H+1,W+1,O], eo [B,H+1,W,O], oe [B,H,W+1,O], oo [B,H,W,O].

    Output 2m+1 along an axis receives only x[m]*w[1]; output 2m receives x[m-1]*w[2] + x[m]*w[0].
    Four small convolutions of the low-resolution input do the 9 taps of real work per input
    pixel, where a dilated-input convolution would also multiply the inserted zeros (4x the work).
    Each takes its zero border as the convolution's own padding: padded or sliced copies of the
    input would be materialized, and at batch 4 those copies cost as much time as the arithmetic.
    """
    if w.shape[:2] != (3, 3):
        raise ValueError("the upsampling modulated conv is implemented for 3x3 kernels")
    even, odd = np.array([2, 0]), np.array([1])  # window (x[m-1], x[m]) -> taps (w[2], w[0])
    ee = _conv(x, w[even][:, even], ((1, 1), (1, 1)))
    eo = _conv(x, w[even][:, odd], ((1, 1), (0, 0)))
    oe = _conv(x, w[odd][:, even], ((0, 0), (1, 1)))
    oo = _conv(x, w[odd][:, odd], ((0, 0), (0, 0)))
    return ee, eo, oe, oo


_UP_TAPS = tuple(t / 4.0 for t in _BLUR_TAPS)  # the gain-4 blur is (gain 2 per axis) x (gain 2)


def _blur_phases(even, odd, axis: int):
    """The [1,3,3,1] blur (gain 2, padding (1,0)) along `axis` of a signal given by its parity
    classes (even: n+1 samples, odd: n), again as parity classes (n each) of the 2n outputs:
    out[2m] = t0 y[2m-1] + t1 y[2m] + t2 y[2m+1] + t3 y[2m+2], out[2m+1] likewise one further.
    Working on the classes keeps the blur a fused elementwise pass at low resolution."""
    t0, t1, t2, t3 = _UP_TAPS
    n = odd.shape[axis]
    e0 = jax.lax.slice_in_dim(even, 0, n, axis=axis)
    e1 = jax.lax.slice_in_dim(even, 1, n + 1, axis=axis)
    out_even = t0 * _shift(odd, axis, -1) + t1 * e0 + t2 * odd + t3 * e1
    out_odd = t0 * e0 + t1 * odd + t2 * e1 + t3 * _shift(odd, axis, 1)
    return out_even, out_odd


def _upsample_conv(x, w):
    """The official up-sampling modulated conv's spatial part: conv_transpose2d(stride 2) with a
    3x3 kernel, then the [1,3,3,1] blur (gain 4, padding 1): [B,H,W,I] -> [B,2H,2W,O]."""
    ee, eo, oe, oo = _transposed_conv_phases(x, w)
    col_even = _blur_phases(ee, oe, 1)  # rows first: (even rows, odd rows) of even columns
    col_odd = _blur_phases(eo, oo, 1)
    rows = [_interleave(*_blur_phases(ce, co, 2), 2) for ce, co in zip(col_even, col_odd)]
    return _interleave(rows[0], rows[1], 1)


def modulated_conv(x, weight, style, *, demodulate: bool, up: bool):
    """Modulated convolution of NHWC `x` [B,H,W,I] with `weight` [k,k,I,O] and `style` [B,I].

    Demodulation divides each output channel by the norm of its modulated weights (+1e-8).
    With `up` (3x3 kernels only), this is the official stride-2 transposed conv followed by the
    [1,3,3,1] blur (gain 4, padding 1), giving [B,2H,2W,O].
    """
    k = weight.shape[0]
    y_in = x * style[:, None, None, :].astype(x.dtype)
    w = jnp.asarray(weight, x.dtype)
    if up:
        y = _upsample_conv(y_in, w)
    elif k == 3:
        y = _conv3x3_same(y_in, w)
    else:
        y = _conv(y_in, w, ((k // 2, k // 2), (k // 2, k // 2)))
    if demodulate:
        w2 = jnp.sum(jnp.square(as_float(weight)), axis=(0, 1))  # [I, O]
        d = jax.lax.rsqrt(jnp.square(as_float(style)) @ w2 + 1e-8)  # [B, O]
        y = y * d[:, None, None, :].astype(y.dtype)
    return y


class EqualDense(nn.Module):
    """Linear layer with equalized learning rate: y = x @ (W * lr_mul / sqrt(in)) + b * lr_mul.

    W is kept unscaled, as the official parameter, so training sees the same parametrization.
    `kernel_name`: the parameter's name (pSp's EqualLinear calls it "weight").
    """

    features: int
    lr_mul: float = 1.0
    bias_init: float = 0.0
    kernel_name: str = "kernel"

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param(self.kernel_name, lambda k, s: jax.random.normal(k, s) / self.lr_mul,
                            (fan_in, self.features))
        bias = self.param("bias", nn.initializers.constant(self.bias_init), (self.features,))
        return x @ (kernel * (self.lr_mul / math.sqrt(fan_in))) + bias * self.lr_mul


def _lrelu(x, bias, clamp=None):
    """Bias, leaky ReLU 0.2 and gain sqrt(2) (the official fused_lrelu / bias_act), then clamp."""
    x = jax.nn.leaky_relu(x + bias, 0.2) * _SQRT2
    return x if clamp is None else jnp.clip(x, -clamp, clamp)


class Mapping(nn.Module):
    """f: z [B, z_dim] -> w [B, w_dim]: PixelNorm, n EqualDense + lrelu (lr_mul 0.01), then
    truncation towards `truncation_latent` (default: the stored average latent `w_avg`)."""

    w_dim: int
    n_layers: int
    lr_mul: float

    @nn.compact
    def __call__(self, z, truncation=1.0, truncation_latent=None):
        x = z * jax.lax.rsqrt(jnp.mean(jnp.square(z), axis=-1, keepdims=True) + 1e-8)
        for i in range(self.n_layers):
            x = EqualDense(self.w_dim, self.lr_mul, name=f"fc{i}")(x)
            x = jax.nn.leaky_relu(x, 0.2) * _SQRT2
        w_avg = self.variable("consts", "w_avg", lambda: jnp.zeros((self.w_dim,)))
        centre = w_avg.value if truncation_latent is None else truncation_latent
        # The official code skips truncation at psi == 1; `where` keeps that bit-exact.
        return jnp.where(truncation == 1.0, x, centre + truncation * (x - centre))


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x up), noise injection, bias + lrelu."""

    out_channels: int
    resolution: int
    up: bool
    flavor: str
    conv_clamp: float | None

    @nn.compact
    def __call__(self, x, w, noise_mode: str, noise=None):
        cin = x.shape[-1]
        style = EqualDense(cin, bias_init=1.0, name="affine")(w)
        weight = self.param("weight", nn.initializers.normal(1.0), (3, 3, cin, self.out_channels))
        if self.flavor == "rosinality":
            style = style / math.sqrt(cin * 9)
        y = modulated_conv(x, weight, style, demodulate=True, up=self.up)
        strength = self.param("noise_strength", nn.initializers.zeros, ())
        const = self.variable("consts", "noise_const", lambda: jax.random.normal(
            self.make_rng("params"), (self.resolution, self.resolution)))
        if noise is not None:
            y = y + strength * noise
        elif noise_mode == "const":
            y = y + strength * const.value[None, :, :, None]
        elif noise_mode == "random":
            y = y + strength * jax.random.normal(self.make_rng("noise"), y.shape[:3] + (1,), y.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.out_channels,))
        return _lrelu(y, bias, self.conv_clamp)


class ToRGB(nn.Module):
    """Modulated 1x1 conv without demodulation, plus bias (and NVlabs' clamp)."""

    img_channels: int
    conv_clamp: float | None

    @nn.compact
    def __call__(self, x, w):
        cin = x.shape[-1]
        style = EqualDense(cin, bias_init=1.0, name="affine")(w) / math.sqrt(cin)
        weight = self.param("weight", nn.initializers.normal(1.0), (1, 1, cin, self.img_channels))
        bias = self.param("bias", nn.initializers.zeros, (self.img_channels,))
        y = modulated_conv(x, weight, style, demodulate=False, up=False) + bias
        return y if self.conv_clamp is None else jnp.clip(y, -self.conv_clamp, self.conv_clamp)


class Synthesis(nn.Module):
    """G: W+ [B, n_latent, w_dim] -> image [B, res, res, img_channels] (skip architecture)."""

    config: Config

    @nn.compact
    def __call__(self, ws, noise_mode: str = "const", noise: Sequence[Any] | None = None):
        cfg = self.config
        ch = dict(cfg.channels)
        noise = list(noise) if noise is not None else [None] * cfg.n_noise
        b4 = _Block4(ch[4], cfg, name="b4")
        x, img = b4(ws[:, 0], ws[:, 1], noise_mode, noise[0], batch=ws.shape[0])
        i = 1
        res = 8
        while res <= cfg.resolution:
            chunk = chunk_size(x.shape[0], res * res * ch[res] * jnp.dtype(x.dtype).itemsize,
                               cache_budget())
            if chunk < x.shape[0] and not self.is_initializing():
                x, img = self._block_in_chunks(res, chunk, x, img, ws[:, i:i + 3], noise_mode,
                                               noise[i], noise[i + 1])
            else:
                x, img = _Block(ch[res], res, cfg, name=f"b{res}")(
                    x, img, ws[:, i], ws[:, i + 1], ws[:, i + 2], noise_mode, noise[i],
                    noise[i + 1])
            i += 2
            res *= 2
        return img

    def _block_in_chunks(self, res, chunk, x, img, ws3, noise_mode, noise0, noise1):
        """Block b{res} run on `chunk` images at a time (`jax.lax.map`), see `chunk_size`.

        The same weights and the same math as one call on the whole batch: the block is applied
        as a pure function of its own variables. Per-image noise [B,H,W,1] is split with the
        batch, shared noise [1,H,W,1] broadcast to every chunk, and "random" noise drawn from one
        key per chunk."""
        name = f"b{res}"
        variables = {col: tree[name] for col, tree in self.variables.items() if name in tree}
        block = _Block(dict(self.config.channels)[res], res, self.config, parent=None)
        batch = x.shape[0]
        split = lambda a: a.reshape((batch // chunk, chunk) + a.shape[1:])
        per_image = lambda n: n is not None and n.ndim == 4 and n.shape[0] == batch > 1
        keys = (jax.random.split(self.make_rng("noise"), batch // chunk)
                if noise_mode == "random" and noise0 is None else None)
        mapped = (split(x), split(img), split(ws3), keys,
                  split(noise0) if per_image(noise0) else None,
                  split(noise1) if per_image(noise1) else None)

        def run(part):
            xc, imgc, wc, key, n0, n1 = part
            n0 = noise0 if n0 is None else n0
            n1 = noise1 if n1 is None else n1
            return block.apply(variables, xc, imgc, wc[:, 0], wc[:, 1], wc[:, 2], noise_mode,
                               n0, n1, rngs=None if key is None else {"noise": key})

        x, img = jax.lax.map(run, mapped)
        return x.reshape((batch,) + x.shape[2:]), img.reshape((batch,) + img.shape[2:])


# Why blocks run in chunks: per-image time grew from batch 4 to batch 8 because a block's batch
# activations outgrow the cache. At 256 px and real widths one image's activation is 8 MiB at
# 64 px (512 channels), 16 MiB at 128 px and 32 MiB at 256 px; the 2-core EPYC this was measured
# on has a 32 MiB L3, and the 3x3 convolution that dominates a block reads a res x res x C input
# and writes an output of the same size, so a chunk fits when its activation is half the L3.
# Measured (real widths, CPU seconds per image, one process, variants interleaved, loaded
# machine): b64 block batch 4 0.25-0.26, batch 8 0.30-0.31 (its conv1 0.19-0.22 -> 0.23-0.24),
# batch 8 in chunks of 4 / 2 / 1 0.28 / 0.26 / 0.27, batch 4 in chunks of 2 0.26 vs whole 0.28;
# at batch 4 the 128 px block 0.34-0.35 in chunks of 2 or 1 vs 0.37 whole, the 256 px block
# 0.38 in chunks of 1 vs 0.40 whole; the 32 px block (2 MiB per image) the same whole or in 4s.


def _last_level_cache_bytes(path: str = "/sys/devices/system/cpu/cpu0/cache/index3/size") -> int | None:
    """The CPU's L3 size from Linux's sysfs ("32768K"), None where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if text[-1:].upper() in "KMG" else text
    return int(digits) * scale if digits.isdigit() and int(digits) > 0 else None


CACHE_BYTES = _last_level_cache_bytes()


def cache_budget() -> int | None:
    """The bytes a block's chunk may occupy: the L3 on a CPU backend; None (the whole batch in
    one call) on an accelerator, whose kernels want the largest batch, or where the L3 is
    unknown."""
    return CACHE_BYTES if jax.default_backend() == "cpu" else None


def chunk_size(batch: int, image_bytes: int, cache_bytes: int | None) -> int:
    """Images per call for a block whose output activation is `image_bytes` per image: the
    largest divisor of `batch` whose activations, input and output, fit in `cache_bytes`
    together (at least 1); the whole batch when `cache_bytes` is None."""
    if cache_bytes is None:
        return batch
    cap = max(1, cache_bytes // max(1, 2 * image_bytes))
    return max(d for d in range(1, min(cap, batch) + 1) if batch % d == 0)


class _Block4(nn.Module):
    channels: int
    config: Config

    @nn.compact
    def __call__(self, w_conv, w_rgb, noise_mode, noise, batch):
        cfg = self.config
        const = self.param("const", nn.initializers.normal(1.0), (4, 4, self.channels))
        x = jnp.broadcast_to(const[None], (batch, 4, 4, self.channels)).astype(w_conv.dtype)
        x = SynthesisLayer(self.channels, 4, False, cfg.flavor, cfg.conv_clamp, name="conv1")(
            x, w_conv, noise_mode, noise)
        img = ToRGB(cfg.img_channels, cfg.conv_clamp, name="torgb")(x, w_rgb)
        return x, img


class _Block(nn.Module):
    channels: int
    resolution: int
    config: Config

    @nn.compact
    def __call__(self, x, img, w0, w1, w_rgb, noise_mode, noise0, noise1):
        cfg = self.config
        x = SynthesisLayer(self.channels, self.resolution, True, cfg.flavor, cfg.conv_clamp,
                           name="conv0")(x, w0, noise_mode, noise0)
        x = SynthesisLayer(self.channels, self.resolution, False, cfg.flavor, cfg.conv_clamp,
                           name="conv1")(x, w1, noise_mode, noise1)
        y = ToRGB(cfg.img_channels, cfg.conv_clamp, name="torgb")(x, w_rgb)
        return x, upsample2x(img) + y


class Generator(nn.Module):
    """Mapping and synthesis together (`map`, `synthesize`)."""

    config: Config

    def setup(self):
        cfg = self.config
        self.mapping = Mapping(cfg.w_dim, cfg.n_mapping, cfg.lr_mul)
        self.synthesis = Synthesis(cfg)

    def __call__(self, z, noise_mode: str = "const"):
        """For `init`: z [B, z_dim] -> image, through every parameter."""
        w = self.map(z)
        return self.synthesis(jnp.repeat(w[:, None], self.config.n_latent, axis=1), noise_mode)

    def map(self, z, truncation=1.0, truncation_latent=None):
        return self.mapping(z, truncation, truncation_latent)

    def synthesize(self, ws, noise_mode: str = "const", noise=None):
        return self.synthesis(ws, noise_mode, noise)


def _as_noise(noise, n_noise: int):
    """User noise list -> NHWC [B|1, H, W, 1] arrays. Accepts [H,W], [B,H,W], [B,H,W,1], [B,1,H,W]."""
    if len(noise) != n_noise:
        raise InputError(f"noise must be a list of {n_noise} arrays, got {len(noise)}")
    out = []
    for n in noise:
        n = jnp.asarray(n, jnp.float32)
        if n.ndim == 2:
            n = n[None, :, :, None]
        elif n.ndim == 3:
            n = n[..., None]
        elif n.ndim == 4 and n.shape[1] == 1 and n.shape[-1] != 1:
            n = jnp.transpose(n, (0, 2, 3, 1))
        out.append(n)
    return tuple(out)


class StyleGAN2(base.Loaded):
    """A loaded generator. Calls are jitted; the pure functions stay reachable through
    `module.apply(variables, ..., method="map" | "synthesize")` for use inside other jits.

    Attributes: `config`, `module`, `variables`, `n_latent`, `resolution`, `w_dim`, `z_dim`,
    `latent_avg` ([w_dim], the checkpoint's average latent, used when truncating).
    """

    CONFIG = Config

    def __init__(self, config: Config, variables: dict, meta=None):
        super().__init__(config, variables, meta)
        self._map = jax.jit(functools.partial(self.module.apply, method="map"))
        self._synth = jax.jit(functools.partial(self.module.apply, method="synthesize"),
                              static_argnames=("noise_mode",))

    n_latent = property(lambda self: self.config.n_latent)
    resolution = property(lambda self: self.config.resolution)
    w_dim = property(lambda self: self.config.w_dim)
    z_dim = property(lambda self: self.config.z_dim)
    latent_avg = property(lambda self: self.variables["consts"]["mapping"]["w_avg"])

    def mapping(self, z, truncation: float = 1.0, truncation_latent=None):
        """z [B, z_dim] -> w [B, w_dim]; truncation pulls w towards `truncation_latent`
        (default: the checkpoint's average latent)."""
        z = jnp.asarray(z, jnp.float32)
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise InputError(f"z must have shape [B, {self.z_dim}], got {tuple(z.shape)}")
        if truncation_latent is not None:
            truncation_latent = jnp.reshape(jnp.asarray(truncation_latent, jnp.float32), (-1,))
        return self._map(self.variables, z, jnp.float32(truncation), truncation_latent)

    def synthesis(self, ws, noise_mode: str = "const", noise=None, rng=None):
        """ws [B, n_latent, w_dim] (W+) or [B, w_dim] -> images [B, H, W, 3] (about [-1, 1]).

        noise_mode: "const" uses the stored noise buffers, "random" draws fresh noise from `rng`,
        "none" adds none; an explicit `noise` list (one array per layer) overrides it.
        """
        ws = jnp.asarray(ws, jnp.float32)
        if ws.ndim == 2:
            ws = jnp.repeat(ws[:, None], self.n_latent, axis=1)
        if ws.ndim != 3 or ws.shape[1:] != (self.n_latent, self.w_dim):
            raise InputError(f"ws must have shape [B, {self.n_latent}, {self.w_dim}] or "
                             f"[B, {self.w_dim}], got {tuple(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise InputError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        rngs = {}
        if noise is not None:
            noise = _as_noise(noise, self.config.n_noise)
        elif noise_mode == "random":
            if rng is None:
                raise InputError("noise_mode='random' needs rng")
            rngs = {"noise": rng}
        return self._synth(self.variables, ws, noise_mode=noise_mode, noise=noise, rngs=rngs)


def init_variables(config: Config, rng) -> dict:
    """Random weights in the official initialization (for tests, demos and benchmarks).

    Filled in numpy from the module's variable shapes: running `module.init` would compile the
    whole synthesis network just to draw random numbers.
    """
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    gen = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(p, "key", str(p)) for p in path]
        name, shape = names[-1], leaf.shape
        normal = lambda: gen.standard_normal(shape).astype(np.float32)  # noqa: E731
        if name == "kernel" and names[-3:-2] == ["mapping"]:
            return normal() / config.lr_mul  # EqualDense with lr_mul: N(0, 1) / lr_mul
        if name == "bias" and names[-2] == "affine":
            return np.ones(shape, np.float32)  # modulation starts at 1
        if name in ("bias", "noise_strength", "w_avg"):
            return np.zeros(shape, np.float32)
        return normal()  # kernels, conv weights, the constant input, noise buffers

    return jax.tree_util.tree_map_with_path(draw, variable_shapes(config))


def random_generator(config: Config, seed: int = 0) -> StyleGAN2:
    """A generator with random weights (labelled as such wherever it is used)."""
    return StyleGAN2(config, init_variables(config, jax.random.key(seed)))


def variable_shapes(config: Config) -> dict:
    """`jax.eval_shape` of the module's variables: what a converter must produce."""
    return config.variable_shapes()


from_weights = StyleGAN2.from_weights


def load(path) -> StyleGAN2:
    """Loads a converted generator (see ports/convert_stylegan2.py)."""
    from ifadit_jax import weights

    return from_weights(*weights.read(path, kind="stylegan2"))
