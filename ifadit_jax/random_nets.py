"""Networks with random weights, for the demo, tests, benchmarks and smoke training runs.

`random_pipeline` builds every role of `ifadit_jax.roles` at the widths of a preset
(`SMALL_CONFIGS`: the parity fixtures' widths, the built-in default; `REAL_CONFIGS`: the official
widths; `TINY_CONFIGS`: the smallest that run, for tests). `random_variables` and
`fresh_variables` are the per-role initializers training uses too (the second is the official
initialization a trainable network starts from when no file is given). Random weights anonymize
nothing in any meaningful sense: they show the machinery and its speed.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import flow as flow_lib
from ifadit_jax import pipeline, roles, weights

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
# "tiny": the smallest networks that still run end to end (tests, smoke runs): one IR-SE unit
# per stage in E_ID and E_Attr, one block per BiSeNet stage, narrow layers. Depth, not width,
# sets the compilation time on a CPU, which dominates a smoke run.
TINY_CONFIGS = {
    **SMALL_CONFIGS,
    "id_encoder": {**SMALL_CONFIGS["id_encoder"], "units": [1, 1, 1, 1],
                   "widths": [16, 16, 16, 16]},
    "attr_encoder": {**SMALL_CONFIGS["attr_encoder"], "widths": [16, 16, 16, 16],
                     "style_width": 16, "units": [1, 1, 1, 1]},
    "mapper": {**SMALL_CONFIGS["mapper"], "features": [64, 512]},
    "generator": {**SMALL_CONFIGS["generator"],
                  "channels": [[4, 16], [8, 16], [16, 16], [32, 16], [64, 8], [128, 8], [256, 8]]},
    "icl": {**SMALL_CONFIGS["icl"], "features": [64, 512]},
    "parser": {**SMALL_CONFIGS["parser"], "layer_blocks": [1, 1, 1, 1]},
}
WIDTH_PRESETS = {"tiny": TINY_CONFIGS, "small": SMALL_CONFIGS, "real": REAL_CONFIGS}


def role_config(role: str, configs: dict, conventions: pipeline.Conventions) -> dict:
    """The config of `role` in a preset, completed by the conventions (the flow's variant,
    E_Attr's input range)."""
    if role == "flow":
        return flow_lib.SifConfig(variant=conventions.flow_variant).to_json()
    config = dict(configs[role])
    if role == "attr_encoder":
        config["input_range"] = list(conventions.attr_input_range)
    return config


def random_variables(role: str, config: dict, rng, seed: int) -> dict:
    """Random variables of `role` (see `random_like`); the generator in StyleGAN2's own
    initialization, the flow in `flow.init_sif`'s."""
    from ifadit_jax.nets import stylegan2

    if role == "flow":
        return flow_lib.to_variables(flow_lib.init_sif(rng, flow_lib.SifConfig.from_json(config)))
    if role == "generator":
        return stylegan2.init_variables(stylegan2.Config.from_json(config), rng)
    return random_like(roles.ROLES[role].config(config).variable_shapes(), seed)


def fresh_variables(role: str, config: dict, rng) -> dict:
    """The official initialization of a trainable role (`module.init` on the config's
    `init_inputs`; the flow's `flow.init_sif`), as a run from scratch starts it. On-disk layout."""
    if role == "flow":
        return flow_lib.to_variables(flow_lib.init_sif(rng, flow_lib.SifConfig.from_json(config)))
    net_config = roles.ROLES[role].config(config)
    inputs = [jnp.zeros(s.shape, s.dtype) for s in net_config.init_inputs()]
    return jax.tree.map(np.asarray, jax.jit(net_config.module().init)(rng, *inputs))


def loaded(role: str, variables: dict, config: dict):
    """`variables` of `role` as its loader returns a converted file (shapes checked)."""
    kind = roles.ROLES[role].kind
    return weights.loader(kind)(variables, weights.Meta(kind=kind, config=config))


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


def random_pipeline(seed: int = 0, conventions: pipeline.Conventions = pipeline.OFFICIAL,
                    configs: dict | None = None) -> pipeline.Pipeline:
    """All networks with random weights, at the fixtures' small widths (SMALL_CONFIGS) unless
    `configs` says otherwise (e.g. REAL_CONFIGS)."""
    configs = SMALL_CONFIGS if configs is None else configs
    rngs = dict(zip(roles.ROLES, jax.random.split(jax.random.key(seed), len(roles.ROLES))))
    nets = {}
    for i, role in enumerate(roles.ROLES):
        config = role_config(role, configs, conventions)
        nets[role] = loaded(role, random_variables(role, config, rngs[role], seed + i), config)
    nets = pipeline.nets_from_loaded(nets, conventions)
    # Two gains so that the key visibly matters: FrEIA's initialization leaves a random flow
    # almost independent of the key (z moves ~1% between keys), and random E_Attr output layers
    # emit W+ codes of magnitude ~70 that drown the unit-length identity in M's input.
    nets = nets.with_variables({
        "flow": _scale_leaves(nets["flow"], RANDOM_FLOW_GAIN, "kernel"),
        "attr_encoder": _scale_leaves(nets["attr_encoder"], RANDOM_ATTR_GAIN, "weight",
                                      under="style_")})
    return pipeline.Pipeline(nets, weights_id=f"random-{seed}")


RANDOM_FLOW_GAIN = 2.5
RANDOM_ATTR_GAIN = 0.01


def _scale_leaves(tree, gain: float, leaf_name: str, under: str | None = None):
    """Multiplies the leaves called `leaf_name` (below a node whose name starts with `under`)."""
    def scale(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        hit = names[-1] == leaf_name and (under is None or any(n.startswith(under) for n in names))
        return leaf * np.float32(gain) if hit else leaf

    return jax.tree_util.tree_map_with_path(scale, tree)
