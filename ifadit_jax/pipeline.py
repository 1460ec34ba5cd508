"""The iFADIT composition: anonymize (paper Eq. 9, 11) and recover (Eq. 10, 11).

    X_anon = refine(G(M([T(E_ID(X), k), E_Attr(X)])), X)
    X_rec  = refine(G(M([T^-1(C(E_ID(X_anon)), k), E_Attr(X_anon)])), X_anon)

`Nets` is a frozen bundle of the converted networks keyed by role: a pytree whose leaves are the
weights and whose static part is the modules (and the compute precision), so `anonymize(nets, images, k)` and
`recover(nets, images, k)` are pure functions that jit, vmap and differentiate (the trainer
calls them inside its own step). `Pipeline` wraps them with jitted, checked calls for scripts and
notebooks; `load(weights_dir)` reads a folder written by
`python ports/convert_ifadit.py release SRC_DIR OUT_DIR` (which file holds which network: the
role registry, `ifadit_jax.roles`). Random networks for demos, tests and benchmarks:
`ifadit_jax.random_nets`.

Precision: float32 by default; `load(..., precision="bfloat16")` (or `nets.with_precision`)
runs E_ID, E_Attr, M, G and the parser in bfloat16 on the same float32 weights, while T, C and the
key path stay float32 (README "Performance" gives its measured accuracy).

Images are NHWC float32 in [0, 1]. Outputs are not clamped (the official code does not clamp
either); clamp before saving.

Refinement (Eq. 11): the BiSeNet soft face mask of the image whose background is kept is
computed on the fly and the generated face blended onto that image. For recovery this is the
anonymized image: the official test script blends the recovered face onto the *original* image
with the original's mask, which a real recovery does not have; outside the face both carry the
same background.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import keys, roles, weights, weights_folder
from ifadit_jax import refine as refine_lib
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets.arcface import identity_crop_pool
from ifadit_jax.nets.mappers import latent_mapper_input


@dataclasses.dataclass(frozen=True)
class Conventions:
    """Where the paper and the official release differ (DESIGN §2).

    flow_variant: "sacb" (paper Eq. 5-8) or "allinone" (official FrEIA blocks).
    attr_input_range: what E_Attr's weights were trained on ((-1, 1) as pSp; (0, 1) as iFADIT's
      attr_best.pth). The encoder maps its [-1, 1] input there itself; this records it.
    key_path: "kdf" (k = f(Norm(Argon2id(secret)))) or "vector" (official k = f(u)).
    """

    name: str
    flow_variant: str
    attr_input_range: tuple[float, float]
    key_path: str


PAPER = Conventions("paper", "sacb", (-1.0, 1.0), "kdf")
OFFICIAL = Conventions("official", "allinone", (0.0, 1.0), "vector")
CONVENTIONS = {c.name: c for c in (PAPER, OFFICIAL)}


PRECISIONS = ("float32", "bfloat16")


class StaticMap(collections.abc.Mapping):
    """A read-only, hashable dict: static pytree data (jit compares and hashes it)."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[str, Any]):
        self._items = dict(items)
        self._hash = hash(tuple(self._items.items()))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, StaticMap) and self._items == other._items

    def __repr__(self) -> str:
        return f"StaticMap({self._items!r})"


class ReducedPrecision:
    """`module` computing in `dtype`: `apply` casts the variables and the floating inputs to
    `dtype` and the floating outputs back to float32 (so gradients reach float32 weights, and
    updated BatchNorm statistics stay float32). Other attributes are the module's."""

    __slots__ = ("module", "dtype")

    def __init__(self, module: Any, dtype: str = "bfloat16"):
        self.module, self.dtype = module, dtype

    def apply(self, variables, *args, **kwargs):
        low = jnp.dtype(self.dtype)
        out = self.module.apply(_cast_floats(variables, low), *_cast_floats(args, low), **kwargs)
        return _cast_floats(out, jnp.dtype(jnp.float32))

    def clone(self, **changes) -> ReducedPrecision:
        return ReducedPrecision(self.module.clone(**changes), self.dtype)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ReducedPrecision.__slots__:
            raise AttributeError(name)
        return getattr(self.module, name)

    def __hash__(self) -> int:
        return hash((self.module, self.dtype))

    def __eq__(self, other: Any) -> bool:
        return (isinstance(other, ReducedPrecision) and self.module == other.module
                and self.dtype == other.dtype)


def _cast_floats(tree, dtype):
    """Every floating array leaf of `tree` as `dtype` (strings, ints, Python scalars kept)."""
    def cast(x):
        dt = getattr(x, "dtype", None)
        return x.astype(dtype) if dt is not None and jnp.issubdtype(dt, jnp.floating) else x

    return jax.tree.map(cast, tree)


@flax.struct.dataclass
class Nets:
    """The networks keyed by role (`roles.ROLES`): a pytree whose leaves are the weights and
    whose static part is the modules, the conventions and the compute precision.

    modules: {role: module} (static); the flow's is a `flow.SifModule` (config, permutations).
    variables: {role: {collection: tree}} (the leaves); the flow's {"params": {"block_i": ...}}.
    precision: "float32", or "bfloat16": the roles with `reduced_precision` (E_ID, E_Attr, M,
      G, the parser) compute in bfloat16 on float32 weights, outputs float32; T, C and the key
      path (the generator's mapping f, `mapping`) stay float32 (recovery inverts them).

    `nets[role]` is a role's variables, `nets.module(role)` the module that computes in the
    precision (`nets.modules[role]` the float32 one), `nets.apply(role, ...)` both at once.
    A role absent from `modules` is absent (an optional role left out); one in `modules` but
    not in `variables` holds no weights here (the frozen part of a training step, `without`).
    Build it with `nets_from_loaded`.
    """

    modules: StaticMap = flax.struct.field(pytree_node=False)
    variables: dict = flax.struct.field(default_factory=dict)
    conventions: Conventions = flax.struct.field(pytree_node=False, default=None)
    precision: str = flax.struct.field(pytree_node=False, default="float32")

    def __getitem__(self, role: str) -> dict:
        return self.variables[role]

    def __contains__(self, role: str) -> bool:
        return role in self.modules

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles present, in registry order."""
        return tuple(r for r in roles.ROLES if r in self.modules)

    def module(self, role: str):
        """The module of `role` in this bundle's compute precision."""
        module = self.modules[role]
        if self.precision != "float32" and roles.ROLES[role].reduced_precision:
            return ReducedPrecision(module, self.precision)
        return module

    def apply(self, role: str, *args, **kwargs):
        """`module(role).apply(nets[role], *args, **kwargs)`."""
        return self.module(role).apply(self.variables[role], *args, **kwargs)

    def with_variables(self, tree: Mapping[str, dict]) -> Nets:
        """The roles of `tree` ({role: {collection: ...}}) replaced; collections absent from a
        role's entry kept."""
        unknown = [r for r in tree if r not in self.modules]
        if unknown:
            raise KeyError(f"no network for role {unknown[0]!r}")
        new = dict(self.variables)
        for role, variables in tree.items():
            new[role] = {**self.variables.get(role, {}), **variables}
        return self.replace(variables=new)

    def with_role(self, role: str, module: Any, variables: dict) -> Nets:
        """`role` replaced (or added) with another module and its variables."""
        return self.replace(modules=StaticMap({**self.modules, role: module}),
                            variables={**self.variables, role: variables})

    def weights_tree(self, which=None) -> dict[str, dict]:
        """{role: {collection: tree}} of `which` (default: every role holding weights)."""
        return {r: self.variables[r] for r in (self.variables if which is None else which)}

    def without(self, which) -> Nets:
        """The weights of `which` left out, modules kept (a frozen bundle holds no second copy
        of what trains: `with_variables` puts them back)."""
        return self.replace(variables={r: v for r, v in self.variables.items() if r not in which})

    def drop(self, role: str) -> Nets:
        """`role` left out entirely (an optional role: no ICL, no parser)."""
        if not roles.ROLES[role].optional:
            raise ValueError(f"role {role!r} is not optional")
        return self.replace(modules=StaticMap({r: m for r, m in self.modules.items() if r != role}),
                            variables={r: v for r, v in self.variables.items() if r != role})

    def file_variables(self, role: str) -> dict:
        """`role`'s variables as numpy arrays in the on-disk layout (the flow's with its
        permutations)."""
        to_file = getattr(self.modules[role], "file_variables", None)
        variables = self.variables[role]
        return to_file(variables) if to_file else jax.tree.map(np.asarray, dict(variables))

    def with_precision(self, precision: str) -> Nets:
        """The same networks computing in `precision` (see the class docstring)."""
        return self.replace(precision=check_precision(precision))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def identity(nets: Nets, images):
    """E_ID: [B, 256, 256, 3] in [0, 1] -> unit identity vectors [B, 512] (official IDLoss path:
    x*2-1, crop, adaptive pool to 112, IR-SE50, L2 normalization)."""
    # The crop and pooling (`ArcFace.identity`) run here, on the float32 input, so that only
    # the network itself follows `nets.precision`: its pooling matrix is float32 data.
    return nets.apply("id_encoder", identity_crop_pool(images * 2.0 - 1.0))


def attributes(nets: Nets, images):
    """E_Attr: [B, 256, 256, 3] in [0, 1] -> W+ codes [B, n_latent, w_dim]."""
    return nets.apply("attr_encoder", images * 2.0 - 1.0)


def attributes_train(nets: Nets, images, axis_name: str | None = None):
    """E_Attr in training mode (BatchNorm on batch statistics, synchronized over the pmap axis
    `axis_name` if given): images as `attributes` -> (codes [B, n_latent, w_dim], the updated
    `batch_stats` collection)."""
    module = nets.module("attr_encoder")
    module = module if axis_name is None else module.clone(bn_axis_name=axis_name)
    codes, updated = module.apply(nets["attr_encoder"], images * 2.0 - 1.0, train=True,
                                  mutable=["batch_stats"])
    return codes, updated["batch_stats"]


def render(nets: Nets, z, attr):
    """M and G: identity [B, 512] and attributes [B, n, w] -> (images in about [0, 1], W+)."""
    wplus = nets.apply("mapper", latent_mapper_input(z, attr))
    img = nets.apply("generator", wplus, "const", method="synthesize")
    return (img + 1.0) / 2.0, wplus


def face_mask(nets: Nets, images):
    """Soft face mask [B, H, W, 1] of `images` ([0, 1]) from the BiSeNet parser."""
    if "parser" not in nets:
        raise WeightsError("refinement needs the face parser (bisenet.safetensors) in the "
                           "weights folder; pass refine=False to skip it")
    return refine_lib.face_mask_from_parser(nets.module("parser"), nets["parser"], images)


def _finish(nets, generated, background, refine: bool):
    if not refine:
        return generated, None
    mask = face_mask(nets, background)
    return refine_lib.blend(generated, background, mask), mask


def anonymize(nets: Nets, images, k, refine: bool = True):
    """X -> (X_anon, intermediates). images [B, 256, 256, 3] in [0, 1]; k [B, 512] or [512].

    intermediates: z = E_ID(X), z_anon = T(z, k), attr = E_Attr(X), wplus, generated (before
    refinement), mask (None without refinement).
    """
    z = identity(nets, images)
    z_anon, _ = nets.apply("flow", z, k, method="forward")
    attr = attributes(nets, images)
    generated, wplus = render(nets, z_anon, attr)
    out, mask = _finish(nets, generated, images, refine)
    return out, dict(z=z, z_anon=z_anon, attr=attr, wplus=wplus, generated=generated, mask=mask)


def recover(nets: Nets, anonymized, k, refine: bool = True):
    """X_anon -> (X_rec, intermediates): z = E_ID(X_anon), z_comp = C(z) (or z without ICL),
    z_rec = T^-1(z_comp, k), attr = E_Attr(X_anon), wplus, generated, mask. A wrong key still
    yields an image (of another identity) by design."""
    z = identity(nets, anonymized)
    z_comp = nets.apply("icl", z) if "icl" in nets else z
    z_rec, _ = nets.apply("flow", z_comp, k, method="inverse")
    attr = attributes(nets, anonymized)
    generated, wplus = render(nets, z_rec, attr)
    out, mask = _finish(nets, generated, anonymized, refine)
    return out, dict(z=z, z_comp=z_comp, z_rec=z_rec, attr=attr, wplus=wplus,
                     generated=generated, mask=mask)


def mapping(nets: Nets):
    """StyleGAN2's mapping net f as a function [B, 512] -> [B, 512] (the key path k = f(u):
    `keys.key_from_vector(u, mapping(nets))`). Always float32, whatever `nets.precision`: a
    key must come out the same at anonymization and recovery."""
    return functools.partial(nets.modules["generator"].apply, nets["generator"], method="map")


_anonymize_jit = jax.jit(anonymize, static_argnames=("refine",))
_recover_jit = jax.jit(recover, static_argnames=("refine",))


# One jitted function for every call: a jit made per call would trace and compile f again.
_mapping_apply = jax.jit(lambda nets, u: mapping(nets)(u))


def _mapping_jit(nets: Nets):
    return functools.partial(_mapping_apply, nets)


class Pipeline:
    """Loaded networks with jitted, checked `anonymize` and `recover` calls.

    pipe.anonymize(images, k, refine=True) -> (X_anon, intermediates)
    pipe.recover(images, k, refine=True) -> (X_rec, intermediates)
    pipe.key_from_secret(secret_bytes, kdf) -> k [512]; pipe.key_from_vector(u [B, 512]) -> k [B, 512]
    `pipe.nets` is the pytree for your own jit: `ifadit_jax.pipeline.anonymize(pipe.nets, x, k)`.
    `pipe.precision` is its compute precision (`Nets.precision`; `load(..., precision=)`).
    """

    def __init__(self, nets: Nets, weights_id: str = "", manifest: dict | None = None):
        self.nets = nets
        self.weights_id = weights_id
        self.manifest = manifest or {}

    @property
    def conventions(self) -> Conventions:
        return self.nets.conventions

    @property
    def precision(self) -> str:
        return self.nets.precision

    def _check(self, images, k):
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[1:] != (256, 256, 3):
            raise InputError(f"images must have shape [B, 256, 256, 3] (RGB in [0, 1]), "
                             f"got {tuple(images.shape)}")
        k = jnp.asarray(k, jnp.float32)
        if k.shape[-1] != 512 or k.ndim not in (1, 2) or (k.ndim == 2 and k.shape[0] not in (1, images.shape[0])):
            raise InputError(f"key must have shape [512], [1, 512] or [B, 512], got {tuple(k.shape)}")
        return images, k

    def anonymize(self, images, k, refine: bool = True):
        return _anonymize_jit(self.nets, *self._check(images, k), refine=refine)

    def recover(self, images, k, refine: bool = True):
        return _recover_jit(self.nets, *self._check(images, k), refine=refine)

    def key_from_vector(self, u):
        return keys.key_from_vector(jnp.asarray(u, jnp.float32), _mapping_jit(self.nets))

    def key_from_secret(self, secret: bytes, kdf=None):
        f = _mapping_jit(self.nets)
        return keys.derive_key(secret, f, kdf) if kdf is not None else keys.derive_key(secret, f)


def nets_from_loaded(loaded: dict[str, Any], conventions: Conventions,
                     precision: str = "float32") -> Nets:
    """Builds `Nets` from loaded networks {role: object with .module and .variables} (absent
    optional roles left out), after checking them against `conventions`."""
    for name, r in roles.ROLES.items():
        if name not in loaded and not r.optional:
            raise KeyError(f"missing network for role {name!r}")
    flow_config = loaded["flow"].config
    if flow_config.variant != conventions.flow_variant:
        raise WeightsError(f"the flow is the '{flow_config.variant}' variant but the "
                           f"'{conventions.name}' conventions use '{conventions.flow_variant}'")
    attr_range = tuple(float(v) for v in loaded["attr_encoder"].config["input_range"])
    if attr_range != conventions.attr_input_range:
        raise WeightsError(f"the attribute encoder was trained on inputs in {list(attr_range)} but "
                           f"the '{conventions.name}' conventions use {list(conventions.attr_input_range)}")
    present = [r for r in roles.ROLES if loaded.get(r) is not None]
    return Nets(modules=StaticMap({r: loaded[r].module for r in present}),
                variables={r: loaded[r].variables for r in present}, conventions=conventions,
                precision=check_precision(precision))


def load(weights_dir: str | os.PathLike, precision: str = "float32") -> Pipeline:
    """Loads a weights folder (see `ports/convert_ifadit.py release`). `precision`: "float32",
    or "bfloat16" compute for E_ID, E_Attr, M, G and the parser (`Nets`); the weights stay
    float32 either way."""
    check_precision(precision)
    weights_dir = os.fspath(weights_dir)
    manifest = weights_folder.read_manifest(weights_dir)
    path = os.path.join(weights_dir, weights_folder.MANIFEST)
    conventions = CONVENTIONS.get(manifest.get("conventions", ""))
    if conventions is None:
        raise WeightsError(f"{path}: unknown conventions {manifest.get('conventions')!r}")
    loaded = {}
    for role, r in roles.ROLES.items():
        file = os.path.join(weights_dir, r.file)
        if not os.path.isfile(file):
            if r.optional:
                continue
            raise WeightsError(f"{weights_dir}: incomplete weights folder, {r.file} ({r.kind}) is "
                               "missing (python ports/convert_ifadit.py release SRC_DIR OUT_DIR "
                               "writes all of them)")
        loaded[role] = weights.load(file, kind=r.kind)
    return Pipeline(nets_from_loaded(loaded, conventions, precision),
                    manifest.get("weights_id", ""), manifest)
