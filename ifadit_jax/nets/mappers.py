"""iFADIT's two small MLPs: the LatentMapper M and the identity compensation net ICL (C).

Both are official `nn.Sequential`s of Linear layers with LeakyReLU(0.2) between them
(official `models/mlp/LatentMapper.py`); the layers act on the last axis.

* M = `LatentMapper` (paper Eq. 2, official `mlp_best.pth`): per W+ row,
  Linear(1024, 512) -> LeakyReLU(0.2) -> Linear(512, 512). Its input is
  `[repeat(z, n_latent), a]` (identity first, then attributes) on the last axis:
  [B, 14, 512 + 512] -> W+ [B, 14, 512]. `latent_mapper_input(z, attr)` builds it.
* C = `ICL` (official `FusionMapper10`, `fuse_mlp_*.pth`): 512 -> 1024 -> 2048 -> 1024 -> 512,
  applied to E_ID(X_anon) before T^-1 in the recovery pass.

Parameters: params/fc{j}/{kernel [in, out], bias [out]}, fc{j} = official `model.{2j}`.
Widths are constructor fields (the converter reads them from the checkpoint shapes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ifadit_jax.errors import InputError
from ifadit_jax.nets import base

NEGATIVE_SLOPE = 0.2


def _kaiming_normal(a: float):
    """torch.nn.init.kaiming_normal_(w, a): N(0, 2 / ((1 + a^2) fan_in)), not truncated."""
    return nn.initializers.variance_scaling(2.0 / (1.0 + a * a), "fan_in", "normal")


class LeakyMLP(nn.Module):
    """Linear layers of widths `features` with LeakyReLU(negative_slope) between them.
    Official init (kaiming_normal_(a=slope) weights, zero biases)."""

    features: tuple[int, ...]
    negative_slope: float = NEGATIVE_SLOPE
    dtype: Any = None  # computation dtype (None: that of the inputs); parameters stay float32

    @nn.compact
    def __call__(self, x):
        n = len(self.features)
        for j, width in enumerate(self.features):
            x = nn.Dense(width, dtype=self.dtype, name=f"fc{j}",
                         kernel_init=_kaiming_normal(self.negative_slope),
                         bias_init=nn.initializers.zeros)(x)
            if j < n - 1:
                x = nn.leaky_relu(x, self.negative_slope)
        return x


class LatentMapper(LeakyMLP):
    """M: [..., id_dim + w_dim] -> [..., w_dim] (official widths 1024 -> 512 -> 512)."""

    features: tuple[int, ...] = (512, 512)


class ICL(LeakyMLP):
    """C (FusionMapper10): [..., 512] -> [..., 512] through 1024, 2048, 1024."""

    features: tuple[int, ...] = (1024, 2048, 1024, 512)


def latent_mapper_input(z, attr):
    """M's input as the official `get_concat_vec` builds it: z [B, id_dim] repeated over the
    W+ rows of attr [B, n_latent, w_dim], identity first -> [B, n_latent, id_dim + w_dim]."""
    z = jnp.asarray(z)
    attr = jnp.asarray(attr)
    z_rows = jnp.broadcast_to(z[:, None, :], (*attr.shape[:2], z.shape[-1]))
    return jnp.concatenate([z_rows.astype(attr.dtype), attr], axis=-1)


@base.netconfig
class MLPConfig(base.NetConfig):
    """What `ports/convert_ifadit.py mapper|icl` infers: input width, layer widths, slope."""

    OPTIONAL: ClassVar[frozenset] = frozenset({"negative_slope"})
    SCHEMA: ClassVar[dict] = {"in_features": base.Int(1, 2 * base.MAX_WIDTH),
                              "features": base.List(base.Int(), 1, 16),
                              "negative_slope": base.Float(0.0, 1.0)}
    MODULE: ClassVar[type[LeakyMLP]] = LeakyMLP

    in_features: int
    features: tuple[int, ...]
    negative_slope: float = NEGATIVE_SLOPE

    def module(self) -> LeakyMLP:
        return self.MODULE(features=self.features, negative_slope=self.negative_slope)

    def init_inputs(self) -> tuple:
        return (base.spec(1, self.in_features),)


@base.netconfig
class LatentMapperConfig(MLPConfig):
    KIND: ClassVar[str] = "latent_mapper"
    MODULE: ClassVar[type[LeakyMLP]] = LatentMapper


@base.netconfig
class ICLConfig(MLPConfig):
    KIND: ClassVar[str] = "icl"
    MODULE: ClassVar[type[LeakyMLP]] = ICL


_CONFIGS = {LatentMapper: LatentMapperConfig, ICL: ICLConfig}


def config_of(module: LeakyMLP, in_features: int) -> dict:
    return {"in_features": int(in_features), "features": [int(f) for f in module.features],
            "negative_slope": float(module.negative_slope)}


def build(cls: type[LeakyMLP], config) -> tuple[LeakyMLP, int]:
    """(module, in_features) of a `cls` (LatentMapper or ICL) config or its JSON dict."""
    config = base.parse_config(_CONFIGS[cls], config, f"{cls.__name__} config")
    return config.module(), config.in_features


def expected_variables(module: LeakyMLP, in_features: int):
    """`jax.eval_shape` of the variables of `module` for inputs of width `in_features`."""
    return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, in_features), jnp.float32))


class _LoadedMLP(base.Loaded):
    """A loaded MLP: `mlp(x)` for x [..., in_features]."""

    in_features = property(lambda self: self.config.in_features)
    out_features = property(lambda self: self.config.features[-1])

    def __call__(self, x):
        x = base.f32(x)
        if x.ndim < 2 or x.shape[-1] != self.in_features:
            raise InputError(f"{type(self).__name__} input must have shape [..., {self.in_features}], "
                             f"got {tuple(x.shape)}")
        return self._run(None, x)


class LoadedLatentMapper(_LoadedMLP):
    """M. `mapper(x)`: x [B, n_latent, id_dim + w_dim] -> W+ [B, n_latent, w_dim];
    `mapper.wplus(z, attr)`: z [B, id_dim], attr [B, n_latent, w_dim] -> W+."""

    CONFIG = LatentMapperConfig

    def wplus(self, z, attr):
        z, attr = base.f32(z), base.f32(attr)
        if z.ndim != 2 or attr.ndim != 3 or z.shape[0] != attr.shape[0] or \
                z.shape[1] + attr.shape[2] != self.in_features:
            raise InputError(f"expected z [B, id_dim] and attr [B, n_latent, w_dim] with id_dim + w_dim = "
                             f"{self.in_features}, got {tuple(z.shape)} and {tuple(attr.shape)}")
        return self(latent_mapper_input(z, attr))


class LoadedICL(_LoadedMLP):
    """C. `icl(e)`: e [B, 512] (E_ID of the anonymized image) -> [B, 512]."""

    CONFIG = ICLConfig


latent_mapper_from_weights = LoadedLatentMapper.from_weights
icl_from_weights = LoadedICL.from_weights
