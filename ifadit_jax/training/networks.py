"""The networks a training run starts from, and the split into trainable and frozen parts.

Where the weights come from (`config.nets.source`):
  "files"   every network of `roles.ROLES` is read from `config.nets.dir`, a folder of converted
            files under the names the registry gives (e.g. `stylegan2.safetensors` from
            `ports/convert_stylegan2.py`, `arcface.safetensors` from `ports/convert_arcface.py`,
            `bisenet.safetensors`; a folder written by `ports/convert_ifadit.py release` has all
            of them). A trainable network whose file is absent starts fresh: E_Attr with the
            official widths and, as pSp does, its IR-SE50 body copied from E_ID
            (`psp.init_from_irse50`); M and C with their official initialization; T from
            `flow.init_sif`. A frozen network whose file is absent is an error.
  "random"  `random_nets.random_pipeline` networks with random weights at `config.nets.widths`
            ("tiny": the smallest that run, for tests; "small": the parity fixtures' widths;
            "real": the official widths), T from `flow.init_sif`. Smoke runs only: nothing is
            learned that means anything.

The loss networks (`config.loss_nets.source`): "files" reads `config.loss_nets.lpips`
(`ports/convert_lpips.py`) and `config.loss_nets.landmarks` (`ports/convert_mobilefacenet.py`);
"random" builds a random LPIPS-alex (narrow, or AlexNet's widths with nets.widths "real") and a
random MobileFaceNet made linear (all PReLU slopes 1, so its loss term is smooth). SMOKE RUNS USE RANDOM LOSS NETWORKS: their LPIPS and
landmark terms are numbers, not perceptual or landmark distances.
E_ID and the face parser E_FP of the losses are the pipeline's own networks.

Which roles exist, where their files are, how a trainable one starts fresh: the role registry
(`ifadit_jax.roles`); which leaves train: `ifadit_jax.training.freezing` (an optax label tree).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax import flow as flow_lib
from ifadit_jax import losses, pipeline, random_nets, roles, weights, weights_folder
from ifadit_jax.errors import InputError, WeightsError
from ifadit_jax.training import freezing

NET_SOURCES = ("files", "random")

RANDOM_LPIPS = {"net": "alex", "widths": [8, 16, 16, 16, 16], "version": "0.1"}
REAL_LPIPS_WIDTHS = [64, 192, 384, 256, 256]  # torchvision AlexNet, for timings at real widths
RANDOM_LANDMARKS = {"embedding_size": 136}


@dataclasses.dataclass
class Networks:
    """What a run starts from: `nets` (all pipeline networks, initial weights), `loss_nets`, and
    for every role its (kind, config, extra variables) so a weights folder can be written."""

    nets: pipeline.Nets
    loss_nets: losses.LossNets
    roles: dict[str, tuple[str, dict, dict]]


# ----------------------------------------------------------------------------- building

def _role_record(role: str, loaded) -> tuple[str, dict, dict]:
    """(kind, config, extra variables) of a loaded network, for the export."""
    config = loaded.config.to_json()
    extra = {}
    if getattr(loaded, "latent_avg", None) is not None and role == "attr_encoder":
        extra = {"consts": {"latent_avg": np.asarray(loaded.latent_avg)}}
    return roles.ROLES[role].kind, config, extra


def _fresh(role: str, conventions: pipeline.Conventions, rng, loaded: dict):
    """A newly initialized trainable network at the official widths; E_Attr with its body copied
    from E_ID's IR-SE50 when they fit, as pSp does."""
    from ifadit_jax.nets import psp

    config = random_nets.role_config(role, random_nets.REAL_CONFIGS, conventions)
    variables = random_nets.fresh_variables(role, config, rng)
    id_enc = loaded.get("id_encoder")
    if role == "attr_encoder" and id_enc is not None and id_enc.config["se"] \
            and list(id_enc.config["widths"]) == list(config["widths"]):
        variables = psp.init_from_irse50(variables, id_enc.variables)
    return random_nets.loaded(role, variables, config)


def _from_files(cfg, trainable, conventions, seed: int):
    folder = cfg.dir
    if not folder or not os.path.isdir(folder):
        raise InputError(f"nets.dir must be a folder of converted weights (file names of "
                         f"ifadit_jax.roles.ROLES), got {folder!r}")
    loaded, missing = {}, []
    rngs = dict(zip(roles.ROLES, jax.random.split(jax.random.key(seed), len(roles.ROLES))))
    for role, r in roles.ROLES.items():
        file = os.path.join(folder, r.file)
        if os.path.isfile(file):
            loaded[role] = weights.load(file, kind=r.kind)
        elif role not in trainable and not r.optional:
            missing.append(f"{r.file} ({r.kind})")
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
    lp_vars = random_nets.random_like(jax.eval_shape(lp.init, jax.random.key(0),
                                                  jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3))),
                                   seed)
    lm = mobilefacenet.MobileFaceNet(embedding_size=RANDOM_LANDMARKS["embedding_size"])
    lm_vars = random_nets.random_like(jax.eval_shape(lm.init, jax.random.key(0),
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


def _random(cfg, conventions):
    """Random networks at `cfg.widths` (smoke runs) and their export records."""
    if cfg.widths not in random_nets.WIDTH_PRESETS:
        raise InputError(f"nets.widths must be one of {sorted(random_nets.WIDTH_PRESETS)}, got "
                         f"{cfg.widths!r}")
    presets = random_nets.WIDTH_PRESETS[cfg.widths]
    pipe = random_nets.random_pipeline(int(cfg.seed), conventions, configs=presets)
    # T starts as a run from scratch starts it (`flow.init_sif`), not with the demo's gain
    # (random_nets.RANDOM_FLOW_GAIN): that gain makes T's gradients ill-conditioned (a 1e-7
    # change of the images moves them by 1e-4), which would drown every comparison of runs.
    flow = flow_lib.init_sif(jax.random.fold_in(jax.random.key(int(cfg.seed)), 1),
                             flow_lib.SifConfig(variant=conventions.flow_variant))
    nets = pipe.nets.with_role("flow", *flow_lib.SifModule.split(flow))
    records = {role: (r.kind, random_nets.role_config(role, presets, conventions), {})
               for role, r in roles.ROLES.items()}
    return nets, records


def _conventions(cfg) -> pipeline.Conventions:
    conventions = pipeline.CONVENTIONS.get(cfg.conventions)
    if conventions is None:
        raise InputError(f"nets.conventions must be one of {sorted(pipeline.CONVENTIONS)}, got "
                         f"{cfg.conventions!r}")
    return conventions


def build(config) -> Networks:
    """All networks of a run from `config.nets`, `config.loss_nets`, `config.trainable`,
    `config.use_icl` and `config.precision` (see the module docstring)."""
    cfg = config.nets
    conventions = _conventions(cfg)
    trainable = freezing.check_trainable(config.trainable)
    if cfg.source == "random":
        nets, records = _random(cfg, conventions)
    elif cfg.source == "files":
        loaded = _from_files(cfg, trainable, conventions, int(cfg.seed))
        nets = pipeline.nets_from_loaded(loaded, conventions)
        records = {role: _role_record(role, net) for role, net in loaded.items()}
    else:
        raise InputError(f"nets.source must be one of {NET_SOURCES}, got {cfg.source!r}")
    if not config.use_icl:  # the ablation without ICL: recovery reads E_ID(X_anon) directly
        if "icl" in trainable:
            raise InputError("trainable lists 'icl' but use_icl is False")
        nets = nets.drop("icl")
        records.pop("icl", None)
    elif "icl" not in nets:
        raise WeightsError("use_icl is True but there is no ICL network (icl.safetensors)")
    if "parser" not in nets:
        raise WeightsError("training needs the face parser (bisenet.safetensors): refinement and "
                           "the face-parser term of L_Img use it")
    nets = nets.with_precision(config.precision)
    real = cfg.source == "files" or cfg.widths == "real"
    return Networks(nets=nets, loss_nets=build_loss_nets(config.loss_nets, real), roles=records)


def override(nets: pipeline.Nets, tree: dict, what: str) -> pipeline.Nets:
    """`nets` with some roles' variables replaced ({role: {collection: ...}}, e.g. phase I's
    trained E_Attr and M in phase II), after checking every name and shape."""
    weights.check_tree(nets.weights_tree(tuple(tree)), tree, what)
    return nets.with_variables(tree)


def parameter_overview(nets: pipeline.Nets, trainable) -> str:
    """One line per role: parameter count, trained or frozen, and the shapes of its largest
    leaves (STYLE.md: printed at the start of every run)."""
    lines = []
    for role, variables in nets.weights_tree().items():
        leaves = jax.tree.leaves(variables.get("params", {}))
        count = sum(int(np.prod(np.shape(a))) for a in leaves)
        big = sorted({tuple(np.shape(a)) for a in leaves}, key=lambda s: -int(np.prod(s)))[:3]
        state = "trained" if role in trainable else "frozen"
        lines.append(f"  {role:<13} {count:>12,} params  {state:<7} largest {big}")
    return "\n".join(["parameters per role:", *lines])


# ----------------------------------------------------------------------------- export

def export_weights(nets: pipeline.Nets, records: dict, out_dir: str, description: str) -> str:
    """Writes `nets` as a weights folder that `pipeline.load` reads (one file per role of
    `records` {role: (kind, config, extra variables)} and manifest.json), atomically. Returns
    the weights id."""
    networks = {role: (roles.ROLES[role].file, {**nets.file_variables(role), **extra},
                       weights.Meta(kind=kind, config=config, source_file=description))
                for role, (kind, config, extra) in records.items()}
    manifest = weights_folder.write(out_dir, networks, nets.conventions.name, force=True)
    return manifest["weights_id"]
