"""The networks a training run starts from, and the split into trainable and frozen parts.

Where the weights come from (`config.nets.source`):
  "files"   every network of `pipeline.ROLES` is read from `config.nets.dir`, a folder of converted
            files under the names `pipeline.ROLES` gives (e.g. `stylegan2.safetensors` from
            `ports/convert_stylegan2.py`, `arcface.safetensors` from `ports/convert_arcface.py`,
            `bisenet.safetensors`; a folder written by `ports/convert_ifadit.py release` has all
            of them). A trainable network whose file is absent starts fresh: E_Attr with the
            official widths and, as pSp does, its IR-SE50 body copied from E_ID
            (`psp.init_from_irse50`); M and C with their official initialization; T from
            `flow.init_sif`. A frozen network whose file is absent is an error.
  "random"  `pipeline.random_pipeline` networks with random weights at `config.nets.widths`
            ("tiny": the smallest that run, for tests; "small": the parity fixtures' widths;
            "real": the official widths), T from `flow.init_sif`. Smoke runs only: nothing is
            learned that means anything.

The loss networks (`config.loss_nets.source`): "files" reads `config.loss_nets.lpips`
(`ports/convert_lpips.py`) and `config.loss_nets.landmarks` (`ports/convert_mobilefacenet.py`);
"random" builds a random LPIPS-alex (narrow, or AlexNet's widths with nets.widths "real") and a
random MobileFaceNet made linear (all PReLU slopes 1, so its loss term is smooth). SMOKE RUNS USE RANDOM LOSS NETWORKS: their LPIPS and
landmark terms are numbers, not perceptual or landmark distances.
E_ID and the face parser E_FP of the losses are the pipeline's own networks.

Trainable roles: "attr_encoder" (E_Attr), "mapper" (M), "flow" (T), "icl" (C). `trainable_params`
takes their weights out of `Nets` as one dict {role: params}, the pytree the optimizer sees;
`frozen_nets` is `Nets` without them (so the replicated frozen bundle holds no second copy);
`merge` puts a params dict back. E_Attr's BatchNorm statistics travel separately
(`batch_stats`): they are state, updated by the forward pass, not by gradients.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import flow as flow_lib
from ifadit_jax import losses, pipeline, weights, weights_folder
from ifadit_jax.errors import InputError, WeightsError

TRAINABLE_ROLES = ("attr_encoder", "mapper", "flow", "icl")
NET_SOURCES = ("files", "random")

# "tiny": the smallest networks that still run end to end (tests, smoke runs): one IR-SE unit
# per stage in E_ID and E_Attr, one block per BiSeNet stage, narrow layers. Depth, not width,
# sets the compilation time on a CPU, which dominates a smoke run.
TINY_CONFIGS = {
    **pipeline.SMALL_CONFIGS,
    "id_encoder": {**pipeline.SMALL_CONFIGS["id_encoder"], "units": [1, 1, 1, 1],
                   "widths": [16, 16, 16, 16]},
    "attr_encoder": {**pipeline.SMALL_CONFIGS["attr_encoder"], "widths": [16, 16, 16, 16],
                     "style_width": 16, "units": [1, 1, 1, 1]},
    "mapper": {**pipeline.SMALL_CONFIGS["mapper"], "features": [64, 512]},
    "generator": {**pipeline.SMALL_CONFIGS["generator"],
                  "channels": [[4, 16], [8, 16], [16, 16], [32, 16], [64, 8], [128, 8], [256, 8]]},
    "icl": {**pipeline.SMALL_CONFIGS["icl"], "features": [64, 512]},
    "parser": {**pipeline.SMALL_CONFIGS["parser"], "layer_blocks": [1, 1, 1, 1]},
}
WIDTH_PRESETS = {"tiny": TINY_CONFIGS, "small": pipeline.SMALL_CONFIGS, "real": pipeline.REAL_CONFIGS}
RANDOM_LPIPS = {"net": "alex", "widths": [8, 16, 16, 16, 16], "version": "0.1"}
REAL_LPIPS_WIDTHS = [64, 192, 384, 256, 256]  # torchvision AlexNet, for timings at real widths
RANDOM_LANDMARKS = {"embedding_size": 136}
_INIT_INPUTS = {"attr_encoder": (1, 256, 256, 3), "mapper": (1, 14, 1024), "icl": (1, 512)}


@dataclasses.dataclass
class Networks:
    """What a run starts from: `nets` (all pipeline networks, initial weights), `loss_nets`, and
    for every role its (kind, config, extra variables) so a weights folder can be written."""

    nets: pipeline.Nets
    loss_nets: losses.LossNets
    roles: dict[str, tuple[str, dict, dict]]


# ----------------------------------------------------------------------------- building

def _role_record(role: str, loaded) -> tuple[str, dict, dict]:
    kind = pipeline.ROLES[role][1]
    if role == "generator":
        return kind, loaded.config.to_json(), {}
    if role == "flow":
        return kind, loaded.config.to_dict(), {}
    extra = {}
    if role == "attr_encoder" and getattr(loaded, "latent_avg", None) is not None:
        extra = {"consts": {"latent_avg": np.asarray(loaded.latent_avg)}}
    return kind, dict(loaded.config), extra


def _fresh(role: str, conventions: pipeline.Conventions, rng, loaded: dict):
    """A newly initialized trainable network (official widths)."""
    from ifadit_jax.nets import mappers, psp

    kind = pipeline.ROLES[role][1]
    if role == "flow":
        params = flow_lib.init_sif(rng, flow_lib.SifConfig(variant=conventions.flow_variant))
        return flow_lib.Flow(params, weights.Meta(kind=kind, config=params.config.to_dict()))
    config = dict(pipeline.REAL_CONFIGS[role])
    if role == "attr_encoder":
        config["input_range"] = list(conventions.attr_input_range)
        module = psp.module_from_config(config)
    else:
        module = mappers.build(mappers.LatentMapper if role == "mapper" else mappers.ICL, config)[0]
    variables = jax.jit(module.init)(rng, jnp.zeros(_INIT_INPUTS[role], jnp.float32))
    variables = jax.tree.map(np.asarray, variables)
    if role == "attr_encoder":
        id_enc = loaded["id_encoder"]
        if list(id_enc.config["widths"]) == list(config["widths"]) and id_enc.config["se"]:
            variables = psp.init_from_irse50(variables, id_enc.variables)
    return weights.loader(kind)(variables, weights.Meta(kind=kind, config=config))


def _from_files(cfg, trainable, conventions, seed: int):
    folder = cfg.dir
    if not folder or not os.path.isdir(folder):
        raise InputError(f"nets.dir must be a folder of converted weights (pipeline.ROLES file "
                         f"names), got {folder!r}")
    loaded, missing = {}, []
    rngs = dict(zip(pipeline.ROLES, jax.random.split(jax.random.key(seed), len(pipeline.ROLES))))
    files = {role: os.path.join(folder, name) for role, (name, _) in pipeline.ROLES.items()}
    for role, (name, kind) in pipeline.ROLES.items():
        if os.path.isfile(files[role]):
            loaded[role] = weights.loader(kind)(*weights.read(files[role], kind=kind))
        elif role not in trainable and role not in pipeline.OPTIONAL_ROLES:
            missing.append(f"{name} ({kind})")
    if missing:
        raise WeightsError(f"{folder}: missing {', '.join(missing)}; frozen networks must be "
                           "converted files (see README 'Training')")
    for role in trainable:  # after E_ID: a fresh E_Attr copies its body from it
        if role not in loaded:
            loaded[role] = _fresh(role, conventions, rngs[role], loaded)
    return loaded


def _random_loss_nets(seed: int, real_widths: bool = False) -> losses.LossNets:
    from ifadit_jax.nets import lpips, mobilefacenet

    widths = REAL_LPIPS_WIDTHS if real_widths else RANDOM_LPIPS["widths"]
    lp = lpips.LPIPS(net=RANDOM_LPIPS["net"], widths=tuple(widths))
    lp_vars = pipeline.random_like(jax.eval_shape(lp.init, jax.random.key(0),
                                                  jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3))),
                                   seed)
    lm = mobilefacenet.MobileFaceNet(embedding_size=RANDOM_LANDMARKS["embedding_size"])
    lm_vars = pipeline.random_like(jax.eval_shape(lm.init, jax.random.key(0),
                                                  jnp.zeros((1, 112, 112, 3))), seed + 1)
    # A random deep PReLU network is chaotic in float32: its gradient changes by ~1e-3 for a
    # 1e-6 change of its input, which drowns every comparison a test could make. The random
    # landmark net is made linear instead (PReLU slopes 1, variance-preserving N(0, 1/fan_in)
    # kernels): a smooth stand-in with the real network's structure and cost.
    lm_vars = jax.tree_util.tree_map_with_path(
        lambda path, a: (np.ones_like(a) if path[-1].key == "negative_slope" else
                         a / np.float32(np.sqrt(2.0)) if path[-1].key == "kernel" else a), lm_vars)
    return losses.LossNets(lpips_module=lp, landmark_module=lm,
                           lpips_vars=jax.tree.map(jnp.asarray, lp_vars),
                           landmark_vars=jax.tree.map(jnp.asarray, lm_vars))


def build_loss_nets(cfg, real_widths: bool = False) -> losses.LossNets:
    """The loss networks of `config.loss_nets`; random ones are narrow unless `real_widths`."""
    if cfg.source == "random":
        return _random_loss_nets(int(cfg.seed), real_widths)
    if cfg.source != "files":
        raise InputError(f"loss_nets.source must be 'files' or 'random', got {cfg.source!r}")
    for field in ("lpips", "landmarks"):
        if not getattr(cfg, field) or not os.path.isfile(getattr(cfg, field)):
            raise InputError(f"loss_nets.{field} must name a converted file, got "
                             f"{getattr(cfg, field)!r}")
    lp = weights.loader("lpips")(*weights.read(cfg.lpips, kind="lpips"))
    lm = weights.loader("mobilefacenet")(*weights.read(cfg.landmarks, kind="mobilefacenet"))
    return losses.LossNets(lpips_module=lp.module, landmark_module=lm.module,
                           lpips_vars=lp.variables, landmark_vars=lm.variables)


def build(config) -> Networks:
    """All networks of a run from `config.nets`, `config.loss_nets`, `config.trainable` and
    `config.use_icl` (see the module docstring)."""
    cfg = config.nets
    conventions = pipeline.CONVENTIONS.get(cfg.conventions)
    if conventions is None:
        raise InputError(f"nets.conventions must be one of {sorted(pipeline.CONVENTIONS)}, got "
                         f"{cfg.conventions!r}")
    trainable = check_trainable(config.trainable)
    if cfg.source == "random":
        if cfg.widths not in WIDTH_PRESETS:
            raise InputError(f"nets.widths must be one of {sorted(WIDTH_PRESETS)}, got {cfg.widths!r}")
        pipe = pipeline.random_pipeline(int(cfg.seed), conventions, configs=WIDTH_PRESETS[cfg.widths])
        # T starts as a run from scratch starts it (`flow.init_sif`), not with the demo's gain
        # (pipeline.RANDOM_FLOW_GAIN): that gain makes T's gradients ill-conditioned (a 1e-7
        # change of the images moves them by 1e-4), which would drown every comparison of runs.
        nets = pipe.nets.replace(flow=flow_lib.init_sif(
            jax.random.fold_in(jax.random.key(int(cfg.seed)), 1),
            flow_lib.SifConfig(variant=conventions.flow_variant)))
        presets = WIDTH_PRESETS[cfg.widths]
        roles = {}
        for role, (_, kind) in pipeline.ROLES.items():
            conf = (flow_lib.SifConfig(variant=conventions.flow_variant).to_dict()
                    if role == "flow" else dict(presets[role]))
            if role == "attr_encoder":  # as random_pipeline builds it
                conf["input_range"] = list(conventions.attr_input_range)
            roles[role] = (kind, conf, {})
    elif cfg.source == "files":
        loaded = _from_files(cfg, trainable, conventions, int(cfg.seed))
        nets = pipeline.nets_from_loaded(loaded, conventions)
        roles = {role: _role_record(role, net) for role, net in loaded.items()}
    else:
        raise InputError(f"nets.source must be one of {NET_SOURCES}, got {cfg.source!r}")
    if not config.use_icl:  # the ablation without ICL: recovery reads E_ID(X_anon) directly
        if "icl" in trainable:
            raise InputError("trainable lists 'icl' but use_icl is False")
        nets = nets.replace(icl_module=None, icl_vars=None)
        roles.pop("icl", None)
    elif nets.icl_module is None:
        raise WeightsError("use_icl is True but there is no ICL network (icl.safetensors)")
    if nets.parser_module is None:
        raise WeightsError("training needs the face parser (bisenet.safetensors): refinement and "
                           "the face-parser term of L_Img use it")
    real = cfg.source == "files" or cfg.widths == "real"
    return Networks(nets=nets, loss_nets=build_loss_nets(config.loss_nets, real), roles=roles)


def check_trainable(roles) -> tuple[str, ...]:
    roles = tuple(roles)
    unknown = sorted(set(roles) - set(TRAINABLE_ROLES))
    if unknown or not roles or len(set(roles)) != len(roles):
        raise InputError(f"trainable must be distinct roles among {TRAINABLE_ROLES}, got {roles}")
    return tuple(r for r in TRAINABLE_ROLES if r in roles)


# ----------------------------------------------------------------------------- split / merge

def trainable_params(nets: pipeline.Nets, roles) -> dict[str, Any]:
    """{role: params pytree} of the trainable roles (the flow as {block_i: ...})."""
    out = {}
    for role in roles:
        if role == "attr_encoder":
            out[role] = nets.attr_vars["params"]
        elif role == "mapper":
            out[role] = nets.mapper_vars["params"]
        elif role == "icl":
            out[role] = nets.icl_vars["params"]
        elif role == "flow":
            out[role] = {f"block_{i}": b for i, b in enumerate(nets.flow.blocks)}
    return out


def batch_stats(nets: pipeline.Nets, roles) -> dict[str, Any]:
    """{"attr_encoder": E_Attr's BatchNorm statistics} when E_Attr trains, else {}."""
    if "attr_encoder" in roles and "batch_stats" in nets.attr_vars:
        return {"attr_encoder": nets.attr_vars["batch_stats"]}
    return {}


def frozen_nets(nets: pipeline.Nets, roles) -> pipeline.Nets:
    """`nets` without the trainable weights (and E_Attr's statistics when it trains)."""
    changes = {}
    if "attr_encoder" in roles:
        changes["attr_vars"] = {k: v for k, v in nets.attr_vars.items()
                                if k not in ("params", "batch_stats")}
    if "mapper" in roles:
        changes["mapper_vars"] = {k: v for k, v in nets.mapper_vars.items() if k != "params"}
    if "icl" in roles:
        changes["icl_vars"] = {k: v for k, v in nets.icl_vars.items() if k != "params"}
    if "flow" in roles:
        changes["flow"] = nets.flow.replace(blocks=())
    return nets.replace(**changes)


def merge(frozen: pipeline.Nets, params: dict, stats: dict | None = None) -> pipeline.Nets:
    """Inverse of (`frozen_nets`, `trainable_params`, `batch_stats`)."""
    stats = stats or {}
    changes = {}
    if "attr_encoder" in params:
        v = {**frozen.attr_vars, "params": params["attr_encoder"]}
        if "attr_encoder" in stats:
            v["batch_stats"] = stats["attr_encoder"]
        changes["attr_vars"] = v
    if "mapper" in params:
        changes["mapper_vars"] = {**frozen.mapper_vars, "params": params["mapper"]}
    if "icl" in params:
        changes["icl_vars"] = {**frozen.icl_vars, "params": params["icl"]}
    if "flow" in params:
        blocks = params["flow"]
        changes["flow"] = frozen.flow.replace(
            blocks=tuple(blocks[f"block_{i}"] for i in range(len(blocks))))
    return frozen.replace(**changes)


def override(nets: pipeline.Nets, params: dict, stats: dict, what: str) -> pipeline.Nets:
    """`nets` with some roles' weights replaced (e.g. phase I's trained E_Attr and M in phase II),
    after checking every name and shape."""
    weights.check_tree(trainable_params(nets, params), params, what)
    weights.check_tree(batch_stats(nets, stats), stats, what)
    roles = tuple(params)
    return merge(frozen_nets(nets, roles), params, {**batch_stats(nets, roles), **stats})


# ----------------------------------------------------------------------------- export

def role_variables(nets: pipeline.Nets, role: str) -> dict:
    if role == "flow":
        return flow_lib.to_variables(nets.flow)
    attr = {"id_encoder": "id_vars", "attr_encoder": "attr_vars", "mapper": "mapper_vars",
            "generator": "generator_vars", "icl": "icl_vars", "parser": "parser_vars"}[role]
    return jax.tree.map(np.asarray, getattr(nets, attr))


def export_weights(nets: pipeline.Nets, roles: dict, out_dir: str, description: str) -> str:
    """Writes `nets` as a weights folder that `pipeline.load` reads (one file per role and
    manifest.json), atomically. Returns the weights id."""
    networks = {role: (pipeline.ROLES[role][0], {**role_variables(nets, role), **extra},
                       weights.Meta(kind=kind, config=config, source_file=description))
                for role, (kind, config, extra) in roles.items()}
    manifest = weights_folder.write(out_dir, networks, nets.conventions.name, force=True)
    return manifest["weights_id"]
