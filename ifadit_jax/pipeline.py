"""The iFADIT composition: anonymize (paper Eq. 9, 11) and recover (Eq. 10, 11).

    X_anon = refine(G(M([T(E_ID(X), k), E_Attr(X)])), X)
    X_rec  = refine(G(M([T^-1(C(E_ID(X_anon)), k), E_Attr(X_anon)])), X_anon)

`Nets` is a frozen bundle of the converted networks: a pytree whose leaves are the weights and
whose static part is the Flax modules, so `anonymize(nets, images, k)` and
`recover(nets, images, k)` are pure functions that jit, vmap and differentiate (the trainer
calls them inside its own step). `Pipeline` wraps them with jitted, checked calls for scripts and
notebooks; `load(weights_dir)` reads a folder written by
`python ports/convert_ifadit.py release SRC_DIR OUT_DIR`.

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
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import flow as flow_lib
from ifadit_jax import refine as refine_lib
from ifadit_jax import weights, weights_folder
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.nets.mappers import latent_mapper_input

# role -> (file name in a weights folder, network kind)
ROLES = {
    "id_encoder": ("arcface.safetensors", "arcface"),
    "attr_encoder": ("psp_encoder.safetensors", "psp_encoder"),
    "mapper": ("latent_mapper.safetensors", "latent_mapper"),
    "generator": ("stylegan2.safetensors", "stylegan2"),
    "flow": ("sif.safetensors", "sif"),
    "icl": ("icl.safetensors", "icl"),
    "parser": ("bisenet.safetensors", "bisenet"),
}
OPTIONAL_ROLES = ("icl", "parser")  # ablation without ICL; no refinement without a parser


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
    """The frozen networks. Leaves: weights; static: modules and conventions."""

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


def key_from_vector(nets: Nets, u):
    """The official key path k = f(u) (u [B, 512] or [512], e.g. uniform in [0.5, 1))."""
    return nets.generator_module.apply(nets.generator_vars, jnp.atleast_2d(u), method="map")


_anonymize_jit = jax.jit(anonymize, static_argnames=("refine",))
_recover_jit = jax.jit(recover, static_argnames=("refine",))


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
        return jax.jit(key_from_vector)(self.nets, jnp.asarray(u, jnp.float32))

    def key_from_secret(self, secret: bytes, kdf=None):
        from ifadit_jax import keys

        mapping = functools.partial(key_from_vector, self.nets)
        return keys.derive_key(secret, mapping, kdf) if kdf is not None else keys.derive_key(secret, mapping)


def nets_from_loaded(loaded: dict[str, Any], conventions: Conventions) -> Nets:
    """Builds `Nets` from loaded networks {role: object with .module/.variables (flow: .params)}."""
    def mv(role):
        net = loaded.get(role)
        return (None, None) if net is None else (net.module, net.variables)

    id_m, id_v = mv("id_encoder")
    at_m, at_v = mv("attr_encoder")
    mp_m, mp_v = mv("mapper")
    g_m, g_v = mv("generator")
    icl_m, icl_v = mv("icl")
    p_m, p_v = mv("parser")
    flow = loaded["flow"].params
    if flow.config.variant != conventions.flow_variant:
        raise WeightsError(f"the flow is the '{flow.config.variant}' variant but the "
                           f"'{conventions.name}' conventions use '{conventions.flow_variant}'")
    attr_range = tuple(float(v) for v in loaded["attr_encoder"].config["input_range"])
    if attr_range != conventions.attr_input_range:
        raise WeightsError(f"the attribute encoder was trained on inputs in {list(attr_range)} but "
                           f"the '{conventions.name}' conventions use {list(conventions.attr_input_range)}")
    return Nets(id_module=id_m, attr_module=at_m, mapper_module=mp_m, generator_module=g_m,
                icl_module=icl_m, parser_module=p_m, conventions=conventions, id_vars=id_v,
                attr_vars=at_v, mapper_vars=mp_v, generator_vars=g_v, flow=flow, icl_vars=icl_v,
                parser_vars=p_v)


def load(weights_dir: str | os.PathLike) -> Pipeline:
    """Loads a weights folder (see `ports/convert_ifadit.py release`)."""
    weights_dir = os.fspath(weights_dir)
    manifest = weights_folder.read_manifest(weights_dir)
    path = os.path.join(weights_dir, weights_folder.MANIFEST)
    conventions = CONVENTIONS.get(manifest.get("conventions", ""))
    if conventions is None:
        raise WeightsError(f"{path}: unknown conventions {manifest.get('conventions')!r}")
    loaded = {}
    for role, (name, kind) in ROLES.items():
        file = os.path.join(weights_dir, name)
        if not os.path.isfile(file):
            if role in OPTIONAL_ROLES:
                continue
            raise WeightsError(f"{weights_dir}: incomplete weights folder, {name} ({kind}) is "
                               "missing (python ports/convert_ifadit.py release SRC_DIR OUT_DIR "
                               "writes all of them)")
        variables, meta = weights.read(file, kind=kind)
        loaded[role] = weights.loader(kind)(variables, meta)
    return Pipeline(nets_from_loaded(loaded, conventions), manifest.get("weights_id", ""), manifest)


# The built-in default: every network at the parity fixtures' widths with RANDOM weights. It
# exercises the whole machinery (and the demo) without any download; it anonymizes nothing in
# any meaningful sense.
SMALL_CONFIGS = {
    "id_encoder": {"bn1d_affine": True, "emb_dim": 512, "in_channels": 3, "input_size": 112,
                   "se": True, "units": [3, 4, 14, 3], "widths": [16, 20, 24, 18]},
    "attr_encoder": {"in_channels": 3, "input_range": [0.0, 1.0], "n_styles": 14, "se": True,
                     "start_from_latent_avg": False, "style_width": 16, "units": [3, 4, 14, 3],
                     "w_dim": 512, "widths": [16, 20, 24, 20]},
    "mapper": {"features": [256, 512], "in_features": 1024, "negative_slope": 0.2},
    "generator": {"channels": [[4, 32], [8, 32], [16, 32], [32, 32], [64, 32], [128, 16], [256, 8]],
                  "conv_clamp": None, "flavor": "rosinality", "img_channels": 3, "lr_mul": 0.01,
                  "n_mapping": 8, "resolution": 256, "w_dim": 512, "z_dim": 512},
    "icl": {"features": [192, 256, 160, 512], "in_features": 512, "negative_slope": 0.2},
    "parser": {"context_width": 16, "fusion_attention_width": 8, "fusion_width": 32,
               "head_widths": [32, 8, 8], "layer_blocks": [2, 2, 2, 2],
               "layer_widths": [8, 16, 32, 64], "n_classes": 19, "stem_width": 8},
}
# The official full widths (config-f generator, IR-SE50 at 64/128/256/512, BiSeNet on ResNet18),
# for benchmarks with random weights.
REAL_CONFIGS = {
    **SMALL_CONFIGS,
    "id_encoder": {**SMALL_CONFIGS["id_encoder"], "widths": [64, 128, 256, 512]},
    "attr_encoder": {**SMALL_CONFIGS["attr_encoder"], "widths": [64, 128, 256, 512], "style_width": 512},
    "mapper": {**SMALL_CONFIGS["mapper"], "features": [512, 512]},
    "generator": {**SMALL_CONFIGS["generator"],
                  "channels": [[4, 512], [8, 512], [16, 512], [32, 512], [64, 512], [128, 256], [256, 128]]},
    "icl": {**SMALL_CONFIGS["icl"], "features": [1024, 2048, 1024, 512]},
    "parser": {"context_width": 128, "fusion_attention_width": 64, "fusion_width": 256,
               "head_widths": [256, 64, 64], "layer_blocks": [2, 2, 2, 2],
               "layer_widths": [64, 128, 256, 512], "n_classes": 19, "stem_width": 64},
}
_INIT_INPUTS = {"id_encoder": (1, 112, 112, 3), "attr_encoder": (1, 256, 256, 3),
                "mapper": (1, 14, 1024), "icl": (1, 512), "parser": (1, 512, 512, 3)}


def random_like(shapes, seed: int) -> dict:
    """Random weights for the variable shapes `shapes` (e.g. `jax.eval_shape(module.init, ...)`):
    He-normal conv/dense kernels (non-negative in LPIPS's lin0..lin4 layers, as trained ones are:
    a distance), zero biases, identity BatchNorm, PReLU slopes 0.25, N(0, 1) for equalized-lr
    weights. Filled in numpy: `module.init` would compile each network's forward pass just to
    draw random numbers."""
    gen = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [str(getattr(p, "key", p)) for p in path]
        name, shape = names[-1], leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            w = (gen.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
            return np.abs(w) if any(re.fullmatch(r"lin\d", n) for n in names) else w
        if name in ("bias", "mean"):
            return np.zeros(shape, np.float32)
        if name in ("scale", "var"):
            return np.ones(shape, np.float32)
        if name in ("negative_slope", "slope"):
            return np.full(shape, 0.25, np.float32)
        return gen.standard_normal(shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_pipeline(seed: int = 0, conventions: Conventions = OFFICIAL,
                    configs: dict | None = None) -> Pipeline:
    """All networks with random weights, at the fixtures' small widths (SMALL_CONFIGS) unless
    `configs` says otherwise (e.g. REAL_CONFIGS)."""
    configs = SMALL_CONFIGS if configs is None else configs
    from ifadit_jax.nets import arcface, bisenet, mappers, psp, stylegan2

    builders = {"id_encoder": arcface.module_from_config, "attr_encoder": psp.module_from_config,
                "mapper": lambda c: mappers.build(mappers.LatentMapper, c)[0],
                "icl": lambda c: mappers.build(mappers.ICL, c)[0],
                "parser": bisenet.module_from_config}
    rngs = dict(zip(ROLES, jax.random.split(jax.random.key(seed), len(ROLES))))
    loaded = {}
    for role, (_, kind) in ROLES.items():
        if role == "flow":
            cfg = flow_lib.SifConfig(variant=conventions.flow_variant)
            params = flow_lib.init_sif(rngs[role], cfg)
            variables, config = flow_lib.to_variables(params), cfg.to_dict()
        elif role == "generator":
            config = configs[role]
            variables = stylegan2.init_variables(stylegan2.Config.from_json(config), rngs[role])
        else:
            config = configs[role]
            if role == "attr_encoder":
                config = {**config, "input_range": list(conventions.attr_input_range)}
            module = builders[role](config)
            shapes = jax.eval_shape(module.init, rngs[role], jnp.zeros(_INIT_INPUTS[role]))
            variables = random_like(shapes, seed + len(loaded))
        loaded[role] = weights.loader(kind)(variables, weights.Meta(kind=kind, config=config))
    nets = nets_from_loaded(loaded, conventions)
    # Two gains so that the key visibly matters: FrEIA's initialization leaves a random flow
    # almost independent of the key (z moves ~1% between keys), and random E_Attr output layers
    # emit W+ codes of magnitude ~70 that drown the unit-length identity in M's input.
    nets = nets.replace(
        flow=_scale_leaves(nets.flow, RANDOM_FLOW_GAIN, "kernel"),
        attr_vars=_scale_leaves(nets.attr_vars, RANDOM_ATTR_GAIN, "weight", under="style_"))
    return Pipeline(nets, weights_id=f"random-{seed}")


RANDOM_FLOW_GAIN = 2.5
RANDOM_ATTR_GAIN = 0.01


def _scale_leaves(tree, gain: float, leaf_name: str, under: str | None = None):
    """Multiplies the leaves called `leaf_name` (below a node whose name starts with `under`)."""
    def scale(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        hit = names[-1] == leaf_name and (under is None or any(n.startswith(under) for n in names))
        return leaf * np.float32(gain) if hit else leaf

    return jax.tree_util.tree_map_with_path(scale, tree)
