"""Secure Identity Flow (SIF): the key-conditioned invertible map T(z, k) of iFADIT (paper §3.3).

T maps an identity embedding z [B, dim] (an L2-normalized ArcFace vector, dim = 512) to an
anonymized one under a key k [B, cond_dim] (or one [cond_dim] key for the whole batch); T^-1 with
the same key recovers z. Both directions are pure, jitted functions of a `SifParams` pytree:

    y, logdet = sif_forward(params, z, k)      # T(z, k) and log|det dT/dz| per sample [B]
    z, logdet = sif_inverse(params, y, k)      # T^-1(y, k) and log|det dT^-1/dy| [B]

They compute in float32 at HIGHEST matmul precision, never narrower whatever the dtype of the
inputs or parameters (the rest of a model may run in bfloat16; a lossy flow would break
recovery), and in float64 where an input or parameter is float64 (`jax_enable_x64`).

Two variants (`SifConfig.variant`):

* ``"sacb"`` (paper Eq. 5-8, default). Per block, with z = [z1, z2] split in halves and
  a(x) = c * sigmoid(x):
      z2' = z2 * exp(a(w([z1, k]))) + phi([z1, k])
      z1' = z1 * exp(a(rho([z2', k]))) + eta([z2', k])
  w, phi: [d1 + cond] -> d2 and rho, eta: [d2 + cond] -> d1 are MLPs with LeakyReLU(0.01)
  (hidden widths (256, 128, 128, 256): the official subnet's). No permutation between blocks.
* ``"allinone"`` (the official release: FrEIA `SequenceINN` of `AllInOneBlock`s with defaults,
  cond = k). Per block, x1 = x[:, :d1] passes through:
      a = 0.1 * subnet([x1, k]);  s = soft_clamp(a[:, :d2]);  y2 = x2 * exp(s) + a[:, d2:]
      out = ([x1, y2] * sigma + offset)[:, perm],  sigma = 0.1 * softplus_{beta=0.5}(global_scale)
  soft_clamp is 2 * tanh(a) in FrEIA 0.2 (PyPI) and 2 * tanh(a / 2) in FrEIA's GitHub master
  (`SifConfig.freia`); torch's softplus turns linear when beta * x > 20, reproduced here.

d1 = dim - dim // 2 (first part), d2 = dim // 2, as FrEIA splits.

Parameters: `SifParams.blocks` is a tuple of per-block dicts of float arrays (the only pytree
leaves, so `jax.grad` and optax apply to a `SifParams` directly); the config and the fixed
permutations of the allinone variant are static pytree data. On disk (`to_variables`):
  params/block_{i}/{w,phi,rho,eta}/fc{j}/{kernel [in, out], bias [out]}            (sacb)
  params/block_{i}/{global_scale [dim], global_offset [dim], subnet/fc{j}/{kernel, bias}}
  consts/block_{i}/{perm, perm_inv} int32 [dim]                                  (allinone)
where out[:, i] = in[:, perm[i]] (FrEIA master's index vector; FrEIA 0.2's 0/1 matrix W has
perm[i] = argmax_j W[i, j]).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets import base

VARIANTS = ("sacb", "allinone")
FREIA_VERSIONS = ("0.2", "master")
SACB_NETS = ("w", "phi", "rho", "eta")
_HIGHEST = jax.lax.Precision.HIGHEST
# FrEIA AllInOneBlock defaults: global_affine_type="SOFTPLUS", global_affine_init=1.0.
_SOFTPLUS_BETA = 0.5
_SOFTPLUS_THRESHOLD = 20.0
_GLOBAL_SCALE_INIT = 2.0 * math.log(math.exp(0.5 * 10.0 * 1.0) - 1.0)


@base.netconfig
class SifConfig(base.NetConfig):
    """Shape and math of a SIF. Defaults: the paper variant at the official sizes.

    variant: "sacb" (paper) or "allinone" (official FrEIA release).
    n_blocks: number of coupling blocks (official: 4).
    dim: size of z (512); cond_dim: size of the key k (512).
    hidden: hidden widths of every coupling MLP (official subnet: 256, 128, 128, 256).
    negative_slope: LeakyReLU slope inside the MLPs (official 0.01).
    c: sacb only, a(x) = c * sigmoid(x); the paper gives no value, 1.0 here.
    clamp: allinone only, FrEIA's affine_clamping (2.0).
    freia: allinone only, which FrEIA generation's soft clamp: "0.2" (2*tanh(a)) or
      "master" (2*tanh(a/2)).
    """

    KIND: ClassVar[str] = "sif"
    OPTIONAL: ClassVar[frozenset] = frozenset({"negative_slope", "c", "clamp", "freia"})
    SCHEMA: ClassVar[dict] = {
        "variant": base.Choice(VARIANTS), "n_blocks": base.Int(1, base.MAX_DEPTH),
        "dim": base.Int(2), "cond_dim": base.Int(0), "hidden": base.List(base.Int(), 1, 16),
        "negative_slope": base.Float(0.0, 1.0), "c": base.Float(0.0, 1e3),
        "clamp": base.Float(0.0, 1e3), "freia": base.Choice(FREIA_VERSIONS)}

    variant: str = "sacb"
    n_blocks: int = 4
    dim: int = 512
    cond_dim: int = 512
    hidden: tuple[int, ...] = (256, 128, 128, 256)
    negative_slope: float = 0.01
    c: float = 1.0
    clamp: float = 2.0
    freia: str = "0.2"

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.freia not in FREIA_VERSIONS:
            problems.append(f"freia must be one of {FREIA_VERSIONS}, got {self.freia!r}")
        if int(self.n_blocks) < 1 or int(self.dim) < 2 or int(self.cond_dim) < 0:
            problems.append(f"need n_blocks >= 1, dim >= 2, cond_dim >= 0 (got {self.n_blocks}, "
                            f"{self.dim}, {self.cond_dim})")
        if any(h < 1 for h in self.hidden):
            problems.append(f"hidden widths must be positive, got {self.hidden}")
        if problems:
            raise InputError("SIF config: " + "; ".join(problems))

    @property
    def split(self) -> tuple[int, int]:
        """(d1, d2): sizes of the first and second part, as FrEIA splits."""
        return self.dim - self.dim // 2, self.dim // 2

    from_dict = classmethod(lambda cls, d: cls.from_json(d))  # the name older callers use

    def module(self, perms: Permutations | None = None) -> SifModule:
        """The flow's module; an allinone flow needs its permutations (from its file, or
        `init_sif`'s)."""
        return SifModule(self, perms)

    def init_inputs(self) -> tuple:
        """z [1, dim] and k [1, cond_dim]: what `SifModule.apply` takes."""
        return base.spec(1, self.dim), base.spec(1, self.cond_dim)

    def variable_shapes(self) -> dict:
        # Not `eval_shape` of an init: the file layout, with the permutations as int32 consts.
        return expected_variables(self)


class Permutations:
    """The fixed channel permutations of the allinone blocks.

    Static (hashable) pytree data, so jit bakes them in as constants and gradients never meet
    integer leaves. `forward[i]` is block i's index vector, `inverse[i]` its inverse.
    """

    __slots__ = ("forward", "inverse", "_hash")

    def __init__(self, forward: Sequence[Any]):
        fwd = []
        for i, p in enumerate(forward):
            p = np.array(p, dtype=np.int64).reshape(-1)
            if not np.array_equal(np.sort(p), np.arange(p.size)):
                raise WeightsError(f"permutation of block {i} is not a permutation of 0..{p.size - 1}")
            p = p.astype(np.int32)
            p.setflags(write=False)
            fwd.append(p)
        inv = []
        for p in fwd:
            q = np.argsort(p).astype(np.int32)
            q.setflags(write=False)
            inv.append(q)
        self.forward: tuple[np.ndarray, ...] = tuple(fwd)
        self.inverse: tuple[np.ndarray, ...] = tuple(inv)
        self._hash = hash(tuple(p.tobytes() for p in self.forward))

    def __len__(self):
        return len(self.forward)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return (isinstance(other, Permutations) and self._hash == other._hash
                and len(self) == len(other)
                and all(np.array_equal(a, b) for a, b in zip(self.forward, other.forward)))

    def __repr__(self):
        return f"Permutations(n_blocks={len(self)}, dim={self.forward[0].size if self.forward else 0})"


@flax.struct.dataclass
class SifParams:
    """A SIF's parameters: `blocks` (tuple of per-block dicts of float arrays; the pytree
    leaves) plus static `config` and, for allinone, `perms`."""

    blocks: tuple
    config: SifConfig = flax.struct.field(pytree_node=False)
    perms: Permutations | None = flax.struct.field(pytree_node=False, default=None)


# ----------------------------------------------------------------------------------------------
# The math


def _mlp(layers: dict, x: jax.Array, k: jax.Array, slope: float) -> jax.Array:
    """MLP on [x, k]. The first layer is split into x @ W[:n_x] + k @ W[n_x:], so that one key
    ([cond_dim], also under vmap over keys) is projected once, not once per sample."""
    n = len(layers)
    n_x = x.shape[-1]
    for j in range(n):
        p = layers[f"fc{j}"]
        if j == 0:
            w = p["kernel"]
            x = (jnp.dot(x, w[:n_x], precision=_HIGHEST) + jnp.dot(k, w[n_x:], precision=_HIGHEST)
                 + p["bias"])
        else:
            x = jnp.dot(x, p["kernel"], precision=_HIGHEST) + p["bias"]
        if j < n - 1:
            x = jax.nn.leaky_relu(x, slope)
    return x


def _softplus_torch(x: jax.Array, beta: float, threshold: float) -> jax.Array:
    """torch.nn.Softplus(beta, threshold): linear where beta * x > threshold."""
    bx = beta * x
    soft = jnp.log1p(jnp.exp(jnp.minimum(bx, threshold))) / beta
    return jnp.where(bx > threshold, x, soft)


def global_scale(block: dict) -> jax.Array:
    """allinone: sigma = 0.1 * softplus_{beta=0.5}(global_scale), [dim]."""
    return 0.1 * _softplus_torch(block["global_scale"], _SOFTPLUS_BETA, _SOFTPLUS_THRESHOLD)


def _soft_clamp(a: jax.Array, cfg: SifConfig) -> jax.Array:
    if cfg.freia == "0.2":
        return cfg.clamp * jnp.tanh(a)
    return cfg.clamp * jnp.tanh(a / cfg.clamp)


def _sacb_block(bp: dict, x: jax.Array, k: jax.Array, cfg: SifConfig, inverse: bool):
    d1 = cfg.split[0]
    slope = cfg.negative_slope

    def scale(net, h):
        return cfg.c * jax.nn.sigmoid(_mlp(bp[net], h, k, slope))

    a, b = x[:, :d1], x[:, d1:]
    if not inverse:  # Eq. 5, 6
        s2 = scale("w", a)
        b = b * jnp.exp(s2) + _mlp(bp["phi"], a, k, slope)
        s1 = scale("rho", b)
        a = a * jnp.exp(s1) + _mlp(bp["eta"], b, k, slope)
        logdet = jnp.sum(s1, axis=1) + jnp.sum(s2, axis=1)
    else:  # Eq. 7, 8
        s1 = scale("rho", b)
        a = (a - _mlp(bp["eta"], b, k, slope)) * jnp.exp(-s1)
        s2 = scale("w", a)
        b = (b - _mlp(bp["phi"], a, k, slope)) * jnp.exp(-s2)
        logdet = -(jnp.sum(s1, axis=1) + jnp.sum(s2, axis=1))
    return jnp.concatenate([a, b], axis=1), logdet


def _allinone_block(bp: dict, perm: np.ndarray, perm_inv: np.ndarray, x: jax.Array,
                    k: jax.Array, cfg: SifConfig, inverse: bool):
    d1, d2 = cfg.split
    sigma = global_scale(bp)
    offset = bp["global_offset"]
    log_sigma = jnp.sum(jnp.log(sigma))
    if inverse:
        # FrEIA divides by sigma (not a multiplication by 1/sigma): kept for parity.
        x = (x[:, perm_inv] - offset) / sigma
    x1, x2 = x[:, :d1], x[:, d1:]
    a = _mlp(bp["subnet"], x1, k, cfg.negative_slope) * 0.1
    s, t = _soft_clamp(a[:, :d2], cfg), a[:, d2:]
    if not inverse:
        y2 = x2 * jnp.exp(s) + t
        y = jnp.concatenate([x1, y2], axis=1) * sigma + offset
        return y[:, perm], jnp.sum(s, axis=1) + log_sigma
    x2 = (x2 - t) * jnp.exp(-s)
    return jnp.concatenate([x1, x2], axis=1), -(jnp.sum(s, axis=1) + log_sigma)


def _prepare(params: SifParams, x, k):
    cfg = params.config
    x, k = jnp.asarray(x), jnp.asarray(k)  # k [cond_dim] or [B, cond_dim]: broadcasts in _mlp
    dtype = jnp.result_type(jnp.float32, x, k, *jax.tree.leaves(params.blocks))
    blocks = jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), params.blocks)
    return cfg, x.astype(dtype), k.astype(dtype), blocks


def sif_block(params: SifParams, i: int, x, k, inverse: bool = False):
    """Block i alone (not jitted): x [B, dim], k [B, cond_dim] or [cond_dim] ->
    (y [B, dim], log|det| [B]); `inverse` applies the block's inverse."""
    cfg, x, k, blocks = _prepare(params, x, k)
    if cfg.variant == "sacb":
        return _sacb_block(blocks[i], x, k, cfg, inverse)
    return _allinone_block(blocks[i], params.perms.forward[i], params.perms.inverse[i], x, k,
                           cfg, inverse)


def _run(params: SifParams, x, k, inverse: bool):
    cfg, x, k, blocks = _prepare(params, x, k)
    logdet = jnp.zeros((x.shape[0],), x.dtype)
    order = reversed(range(cfg.n_blocks)) if inverse else range(cfg.n_blocks)
    for i in order:
        if cfg.variant == "sacb":
            x, j = _sacb_block(blocks[i], x, k, cfg, inverse)
        else:
            x, j = _allinone_block(blocks[i], params.perms.forward[i], params.perms.inverse[i],
                                   x, k, cfg, inverse)
        logdet = logdet + j
    return x, logdet


@jax.jit
def sif_forward(params: SifParams, z, k):
    """T(z, k). z [B, dim], k [B, cond_dim] or one key [cond_dim] (or [1, cond_dim]) for the
    batch -> (y [B, dim], log|det dy/dz| [B]), float32 (float64 for float64 inputs)."""
    return _run(params, z, k, inverse=False)


@jax.jit
def sif_inverse(params: SifParams, y, k):
    """T^-1(y, k), shapes as `sif_forward` -> (z [B, dim] float32, log|det dz/dy| [B])."""
    return _run(params, y, k, inverse=True)


# ----------------------------------------------------------------------------------------------
# Initialization and the on-disk layout


def _mlp_widths(cfg: SifConfig, n_in: int, n_out: int) -> list[tuple[int, int]]:
    widths = [n_in, *cfg.hidden, n_out]
    return list(zip(widths[:-1], widths[1:]))


def _nets(cfg: SifConfig) -> dict[str, tuple[int, int]]:
    """Coupling MLPs of one block: name -> (inputs, outputs)."""
    d1, d2 = cfg.split
    if cfg.variant == "sacb":
        return {"w": (d1 + cfg.cond_dim, d2), "phi": (d1 + cfg.cond_dim, d2),
                "rho": (d2 + cfg.cond_dim, d1), "eta": (d2 + cfg.cond_dim, d1)}
    return {"subnet": (d1 + cfg.cond_dim, 2 * d2)}


def init_sif(rng: jax.Array, config: SifConfig = SifConfig()) -> SifParams:
    """Fresh parameters for training from scratch. (Not jittable itself: the permutations
    become static data.)

    MLPs: PyTorch's default Linear init. allinone: FrEIA's init (global scale such that
    sigma = 1, zero offset, a random hard permutation per block).
    """
    shapes = expected_variables(config)
    leaves, treedef = jax.tree.flatten(shapes["params"])
    # One draw for all parameters (many small random ops are slow to dispatch or compile),
    # then PyTorch's default nn.Linear init: U(+-1/sqrt(fan_in)) for weights and biases.
    r_params, r_perms = jax.random.split(rng)
    sizes = [int(np.prod(s.shape)) for s in leaves]
    u = np.asarray(jax.random.uniform(r_params, (sum(sizes),), jnp.float32, -1.0, 1.0))
    values, start = [], 0
    for s, n in zip(leaves, sizes):
        values.append(u[start:start + n].reshape(s.shape))
        start += n
    tree = jax.tree.unflatten(treedef, values)
    blocks = []
    for i in range(config.n_blocks):
        block = tree[f"block_{i}"]
        for net in _nets(config):
            for layer in block[net].values():
                bound = np.float32(1.0 / math.sqrt(layer["kernel"].shape[0]))
                layer["kernel"] = jnp.asarray(layer["kernel"] * bound)
                layer["bias"] = jnp.asarray(layer["bias"] * bound)
        if config.variant == "allinone":
            block["global_scale"] = jnp.full((config.dim,), _GLOBAL_SCALE_INIT, jnp.float32)
            block["global_offset"] = jnp.zeros((config.dim,), jnp.float32)
        blocks.append(block)
    perms = None
    if config.variant == "allinone":
        perms = Permutations([np.asarray(jax.random.permutation(r, config.dim))
                              for r in jax.random.split(r_perms, config.n_blocks)])
    return SifParams(blocks=tuple(blocks), config=config, perms=perms)


def expected_variables(config: SifConfig) -> dict:
    """Shapes and dtypes of `to_variables` for `config` (jax.ShapeDtypeStruct leaves)."""
    f32, i32 = jnp.float32, jnp.int32
    params, consts = {}, {}
    for i in range(config.n_blocks):
        block = {name: {f"fc{j}": {"kernel": jax.ShapeDtypeStruct((a, b), f32),
                                   "bias": jax.ShapeDtypeStruct((b,), f32)}
                        for j, (a, b) in enumerate(_mlp_widths(config, *io))}
                 for name, io in _nets(config).items()}
        if config.variant == "allinone":
            block["global_scale"] = jax.ShapeDtypeStruct((config.dim,), f32)
            block["global_offset"] = jax.ShapeDtypeStruct((config.dim,), f32)
            consts[f"block_{i}"] = {"perm": jax.ShapeDtypeStruct((config.dim,), i32),
                                    "perm_inv": jax.ShapeDtypeStruct((config.dim,), i32)}
        params[f"block_{i}"] = block
    return {"params": params, "consts": consts} if consts else {"params": params}


def to_variables(params: SifParams) -> dict:
    """The on-disk layout {params: ..., consts: ...} of numpy arrays (see module docstring)."""
    out = {"params": {f"block_{i}": jax.tree.map(lambda a: np.asarray(a, np.float32), b)
                      for i, b in enumerate(params.blocks)}}
    if params.perms is not None:
        out["consts"] = {f"block_{i}": {"perm": np.array(p), "perm_inv": np.array(q)}
                         for i, (p, q) in enumerate(zip(params.perms.forward, params.perms.inverse))}
    return out


def from_variables(variables: dict, config: SifConfig, what: str = "SIF weights") -> SifParams:
    """Inverse of `to_variables`; checks every shape against `config`."""
    from ifadit_jax import weights

    weights.check_tree(expected_variables(config), variables, what)
    blocks = tuple(jax.tree.map(lambda a: jax.device_put(np.asarray(a, np.float32)),
                                variables["params"][f"block_{i}"]) for i in range(config.n_blocks))
    perms = None
    if config.variant == "allinone":
        consts = variables["consts"]
        perms = Permutations([consts[f"block_{i}"]["perm"] for i in range(config.n_blocks)])
        for i in range(config.n_blocks):
            if not np.array_equal(np.asarray(consts[f"block_{i}"]["perm_inv"]), perms.inverse[i]):
                raise WeightsError(f"{what}: perm_inv of block {i} is not the inverse of perm")
    return SifParams(blocks=blocks, config=config, perms=perms)


# ----------------------------------------------------------------------------------------------
# Loaded flow


class SifModule:
    """The flow as a network role's module (`pipeline.Nets`): the static part, config and
    permutations, with a Flax-like `apply`; its variables are {"params": {"block_i": ...}}, the
    blocks (the only leaves: what training differentiates).

    module.apply(variables, x, k, method="forward" | "inverse") -> (y [B, dim], log|det| [B])
    """

    __slots__ = ("config", "perms")

    def __init__(self, config: SifConfig, perms: Permutations | None = None):
        if (config.variant == "allinone") != (perms is not None):
            raise WeightsError(f"a '{config.variant}' flow "
                               + ("needs" if perms is None else "has no") + " permutations")
        self.config, self.perms = config, perms

    @classmethod
    def split(cls, params: SifParams) -> tuple[SifModule, dict]:
        """(module, variables) of a `SifParams` (e.g. from `init_sif`)."""
        return cls(params.config, params.perms), {
            "params": {f"block_{i}": b for i, b in enumerate(params.blocks)}}

    def params(self, variables: dict) -> SifParams:
        """The `SifParams` the pure functions take, from this module's variables."""
        blocks = variables["params"]
        return SifParams(blocks=tuple(blocks[f"block_{i}"] for i in range(self.config.n_blocks)),
                         config=self.config, perms=self.perms)

    def apply(self, variables: dict, x, k, method: str = "forward"):
        """`sif_forward` ("forward") or `sif_inverse` ("inverse") of x under keys k."""
        fn = {"forward": sif_forward, "inverse": sif_inverse}[method]
        return fn(self.params(variables), x, k)

    def file_variables(self, variables: dict) -> dict:
        """The on-disk layout (`to_variables`: with the permutations as int32 consts)."""
        return to_variables(self.params(variables))

    def __hash__(self):
        return hash((self.config, self.perms))

    def __eq__(self, other):
        return (isinstance(other, SifModule) and self.config == other.config
                and self.perms == other.perms)

    def __repr__(self):
        return f"SifModule({self.config!r})"


class Flow(base.Loaded):
    """A loaded SIF. `forward(z, k)` and `inverse(y, k)` are jitted and return
    (output [B, dim] float32, log|det| [B] float32), like the official `G_net(x, c=[k], rev=...)`.

    z, y: [B, dim] identity vectors; k: [B, cond_dim] keys or one [cond_dim] key for the batch.
    Validated on load like every network (`base.Loaded`); `module` is a `SifModule` (the
    permutations read from the file), `variables` the blocks ({"params": ...}) and `params` the
    `SifParams` of the pure functions: inside other jitted code call
    `sif_forward(flow.params, z, k)`.
    """

    CONFIG = SifConfig

    def _setup(self, variables: dict) -> tuple[SifModule, dict]:
        return SifModule.split(from_variables(variables, self.config, self.what))

    @property
    def params(self) -> SifParams:
        return self.module.params(self.variables)

    def _check(self, x, k):
        x, k = jnp.asarray(x), jnp.asarray(k)
        cfg = self.config
        if x.ndim != 2 or x.shape[1] != cfg.dim:
            raise InputError(f"identity vectors must have shape [B, {cfg.dim}], got {tuple(x.shape)}")
        if not (k.shape == (cfg.cond_dim,) or (k.ndim == 2 and k.shape[1] == cfg.cond_dim
                                                and k.shape[0] in (1, x.shape[0]))):
            raise InputError(f"keys must have shape [{cfg.cond_dim}], [1, {cfg.cond_dim}] or "
                             f"[{x.shape[0]}, {cfg.cond_dim}], got {tuple(k.shape)}")
        return x, k

    def forward(self, z, k):
        """T(z, k) -> (y, logdet)."""
        return sif_forward(self.params, *self._check(z, k))

    def inverse(self, y, k):
        """T^-1(y, k) -> (z, logdet)."""
        return sif_inverse(self.params, *self._check(y, k))

    __call__ = forward


from_weights = Flow.from_weights


def load(path: str | os.PathLike) -> Flow:
    """Loads a converted SIF (see `python ports/convert_ifadit.py inn`)."""
    from ifadit_jax import weights

    variables, meta = weights.read(path, kind="sif")
    return from_weights(variables, meta)
