"""The iFADIT composition: anonymize (paper Eq. 9, 11) and recover (Eq. 10, 11).

    X_anon = refine(G(M([T(E_ID(X), k), E_Attr(X)])), X)
    X_rec  = refine(G(M([T^-1(C(E_ID(X_anon)), k), E_Attr(X_anon)])), X_anon)

`Nets` is a frozen bundle of the converted networks: a pytree whose leaves are the weights and
whose static part is the Flax modules, so `anonymize(nets, images, k)` and
`recover(nets, images, k)` are pure functions that jit, vmap and differentiate (the trainer
calls them inside its own step). `Pipeline` wraps them with jitted, checked calls for scripts and
notebooks; `load(weights_dir)` reads a folder written by
`python ports/convert_ifadit.py release SRC_DIR OUT_DIR` (which file holds which network: the
role registry, `ifadit_jax.roles`). Random networks for demos, tests and benchmarks:
`ifadit_jax.random_nets`.

Images are NHWC float32 in [0, 1]. Outputs are not clamped (the official code does not clamp
either); clamp before saving.

Refinement (Eq. 11): the BiSeNet soft face mask of the image whose background is kept is
computed on the fly and the generated face blended onto that image. For recovery this is the
anonymized image: the official test script blends the recovered face onto the *original* image
with the original's mask, which a real recovery does not have; outside the face both carry the
same background.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ifadit_jax import flow as flow_lib
from ifadit_jax import keys, roles, weights, weights_folder
from ifadit_jax import refine as refine_lib
from ifadit_jax.errors import InputError, WeightsError
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


@flax.struct.dataclass
class Nets:
    """The networks, two fields per role of `roles.ROLES` (its `module_field` and `field`; the
    flow's parameters carry their static config). Leaves: weights; static: modules and
    conventions. Build it with `nets_from_loaded`; read and replace weights by role with
    `roles.weights_of` / `roles.with_weights`."""

    id_module: Any = flax.struct.field(pytree_node=False)
    attr_module: Any = flax.struct.field(pytree_node=False)
    mapper_module: Any = flax.struct.field(pytree_node=False)
    generator_module: Any = flax.struct.field(pytree_node=False)
    icl_module: Any = flax.struct.field(pytree_node=False)  # None: no ICL (ablation)
    parser_module: Any = flax.struct.field(pytree_node=False)  # None: refinement unavailable
    conventions: Conventions = flax.struct.field(pytree_node=False)
    id_vars: Any = None
    attr_vars: Any = None
    mapper_vars: Any = None
    generator_vars: Any = None
    flow: Any = None  # flow_lib.SifParams
    icl_vars: Any = None
    parser_vars: Any = None


def identity(nets: Nets, images):
    """E_ID: [B, 256, 256, 3] in [0, 1] -> unit identity vectors [B, 512] (official IDLoss path:
    x*2-1, crop, adaptive pool to 112, IR-SE50, L2 normalization)."""
    return nets.id_module.apply(nets.id_vars, images * 2.0 - 1.0, method="identity")


def attributes(nets: Nets, images):
    """E_Attr: [B, 256, 256, 3] in [0, 1] -> W+ codes [B, n_latent, w_dim]."""
    return nets.attr_module.apply(nets.attr_vars, images * 2.0 - 1.0)


def attributes_train(nets: Nets, images, axis_name: str | None = None):
    """E_Attr in training mode (BatchNorm on batch statistics, synchronized over the pmap axis
    `axis_name` if given): images as `attributes` -> (codes [B, n_latent, w_dim], the updated
    `batch_stats` collection)."""
    module = nets.attr_module if axis_name is None else nets.attr_module.clone(bn_axis_name=axis_name)
    codes, updated = module.apply(nets.attr_vars, images * 2.0 - 1.0, train=True,
                                  mutable=["batch_stats"])
    return codes, updated["batch_stats"]


def render(nets: Nets, z, attr):
    """M and G: identity [B, 512] and attributes [B, n, w] -> (images in about [0, 1], W+)."""
    wplus = nets.mapper_module.apply(nets.mapper_vars, latent_mapper_input(z, attr))
    img = nets.generator_module.apply(nets.generator_vars, wplus, "const", method="synthesize")
    return (img + 1.0) / 2.0, wplus


def face_mask(nets: Nets, images):
    """Soft face mask [B, H, W, 1] of `images` ([0, 1]) from the BiSeNet parser."""
    if nets.parser_module is None:
        raise WeightsError("refinement needs the face parser (bisenet.safetensors) in the "
                           "weights folder; pass refine=False to skip it")
    return refine_lib.face_mask_from_parser(nets.parser_module, nets.parser_vars, images)


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
    z_anon, _ = flow_lib.sif_forward(nets.flow, z, k)
    attr = attributes(nets, images)
    generated, wplus = render(nets, z_anon, attr)
    out, mask = _finish(nets, generated, images, refine)
    return out, dict(z=z, z_anon=z_anon, attr=attr, wplus=wplus, generated=generated, mask=mask)


def recover(nets: Nets, anonymized, k, refine: bool = True):
    """X_anon -> (X_rec, intermediates): z = E_ID(X_anon), z_comp = C(z) (or z without ICL),
    z_rec = T^-1(z_comp, k), attr = E_Attr(X_anon), wplus, generated, mask. A wrong key still
    yields an image (of another identity) by design."""
    z = identity(nets, anonymized)
    z_comp = z if nets.icl_module is None else nets.icl_module.apply(nets.icl_vars, z)
    z_rec, _ = flow_lib.sif_inverse(nets.flow, z_comp, k)
    attr = attributes(nets, anonymized)
    generated, wplus = render(nets, z_rec, attr)
    out, mask = _finish(nets, generated, anonymized, refine)
    return out, dict(z=z, z_comp=z_comp, z_rec=z_rec, attr=attr, wplus=wplus,
                     generated=generated, mask=mask)


def mapping(nets: Nets):
    """StyleGAN2's mapping net f as a function [B, 512] -> [B, 512] (the key path k = f(u):
    `keys.key_from_vector(u, mapping(nets))`)."""
    return functools.partial(nets.generator_module.apply, nets.generator_vars, method="map")


_anonymize_jit = jax.jit(anonymize, static_argnames=("refine",))
_recover_jit = jax.jit(recover, static_argnames=("refine",))


def _mapping_jit(nets: Nets):
    return functools.partial(jax.jit(lambda n, u: mapping(n)(u)), nets)


class Pipeline:
    """Loaded networks with jitted, checked `anonymize` and `recover` calls.

    pipe.anonymize(images, k, refine=True) -> (X_anon, intermediates)
    pipe.recover(images, k, refine=True) -> (X_rec, intermediates)
    pipe.key_from_secret(secret_bytes, kdf) -> k [512]; pipe.key_from_vector(u [B, 512]) -> k [B, 512]
    `pipe.nets` is the pytree for your own jit: `ifadit_jax.pipeline.anonymize(pipe.nets, x, k)`.
    """

    def __init__(self, nets: Nets, weights_id: str = "", manifest: dict | None = None):
        self.nets = nets
        self.weights_id = weights_id
        self.manifest = manifest or {}

    @property
    def conventions(self) -> Conventions:
        return self.nets.conventions

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


def nets_from_loaded(loaded: dict[str, Any], conventions: Conventions) -> Nets:
    """Builds `Nets` from loaded networks {role: object with .module/.variables (flow: .params)}
    (see `roles.from_loaded`), after checking them against `conventions`."""
    flow = loaded["flow"].params
    if flow.config.variant != conventions.flow_variant:
        raise WeightsError(f"the flow is the '{flow.config.variant}' variant but the "
                           f"'{conventions.name}' conventions use '{conventions.flow_variant}'")
    attr_range = tuple(float(v) for v in loaded["attr_encoder"].config["input_range"])
    if attr_range != conventions.attr_input_range:
        raise WeightsError(f"the attribute encoder was trained on inputs in {list(attr_range)} but "
                           f"the '{conventions.name}' conventions use {list(conventions.attr_input_range)}")
    return roles.from_loaded(loaded, Nets, conventions=conventions)


def load(weights_dir: str | os.PathLike) -> Pipeline:
    """Loads a weights folder (see `ports/convert_ifadit.py release`)."""
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
        variables, meta = weights.read(file, kind=r.kind)
        loaded[role] = weights.loader(r.kind)(variables, meta)
    return Pipeline(nets_from_loaded(loaded, conventions), manifest.get("weights_id", ""), manifest)
