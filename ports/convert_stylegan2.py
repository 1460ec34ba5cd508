"""Converts an official StyleGAN2 generator into ifadit-jax weights.

Usage: python ports/convert_stylegan2.py SRC OUT.safetensors [--force]
       (from Python: `convert(src) -> (variables, meta)`)

SRC may be
  * a rosinality/stylegan2-pytorch checkpoint: {g_ema, latent_avg} (convert_weight.py, iFADIT's
    550000.pt) or a training checkpoint {g, d, g_ema, g_optim, ...} (g_ema is taken);
  * a pixel2style2pixel checkpoint: its decoder.* weights and latent_avg;
  * an NVlabs stylegan2-ada-pytorch network pickle (.pkl): its G_ema.
The network config (resolution, widths, mapping depth) is read from the tensor shapes.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np

from ifadit_jax import weights
from ifadit_jax.errors import WeightsError
from ifadit_jax.nets import stylegan2
from ports import common
from ports.reader import PersistentRecord, flatten_state_dict, nvlabs_state_dict, read_checkpoint

KIND = "stylegan2"
# Fallbacks, recorded in the output's metadata when used.
NOISE_FALLBACK_SEED = 0
LATENT_AVG_FALLBACK = (4096, 0)  # (number of z, seed)


def _shape(g: dict, key: str, ndim: int, what: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in np.shape(common.require(g, key, what)))
    if len(shape) != ndim:
        raise WeightsError(f"{what}: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def _rosinality_config(g: dict, what: str) -> stylegan2.Config:
    """The config from the shapes; every size is checked against `common.LIMITS` here, before
    the noise fallback allocates from the resolution."""
    n_mapping = sum(1 for k in g if k.startswith("style.") and k.endswith(".weight"))
    if n_mapping == 0:
        raise WeightsError(f"{what}: no mapping layers 'style.N.weight' (not a StyleGAN2 generator)")
    common.check_limit(n_mapping, "depth", "mapping layers", what)
    w_dim, z_dim = _shape(g, "style.1.weight", 2, what)
    n_up = sum(1 for k in g if k.startswith("convs.") and k.endswith(".conv.weight")) // 2
    common.check_limit(4 * 2 ** min(n_up, 20), "resolution", "resolution", what)
    channels = [(4, _shape(g, "input.input", 4, what)[1])]
    for j in range(n_up):
        channels.append((2 ** (j + 3), _shape(g, f"convs.{2 * j}.conv.weight", 5, what)[1]))
    cfg = stylegan2.Config(resolution=4 * 2 ** n_up, z_dim=z_dim, w_dim=w_dim,
                           n_mapping=n_mapping, lr_mul=0.01, channels=tuple(channels),
                           flavor="rosinality", conv_clamp=None)
    common.check_config(cfg.to_json(), what)
    return cfg


def _rosinality_rules(cfg: stylegan2.Config):
    rules = []
    for i in range(cfg.n_mapping):
        rules += [(f"style.{i + 1}.weight", f"params/mapping/fc{i}/kernel", common.linear),
                  (f"style.{i + 1}.bias", f"params/mapping/fc{i}/bias", common.same)]
    rules.append(("input.input", "params/synthesis/b4/const", lambda w: np.transpose(w[0], (1, 2, 0))))

    def layer(src, dst, noise_index):
        return [
            (f"{src}.conv.weight", f"params/{dst}/weight", lambda w: common.conv(w[0])),
            (f"{src}.conv.modulation.weight", f"params/{dst}/affine/kernel", common.linear),
            (f"{src}.conv.modulation.bias", f"params/{dst}/affine/bias", common.same),
            (f"{src}.noise.weight", f"params/{dst}/noise_strength", lambda w: w.reshape(())),
            (f"{src}.activate.bias", f"params/{dst}/bias", common.same),
            (f"noises.noise_{noise_index}", f"consts/{dst}/noise_const", lambda w: w[0, 0]),
        ]

    def to_rgb(src, dst):
        return [
            (f"{src}.conv.weight", f"params/{dst}/weight", lambda w: common.conv(w[0])),
            (f"{src}.conv.modulation.weight", f"params/{dst}/affine/kernel", common.linear),
            (f"{src}.conv.modulation.bias", f"params/{dst}/affine/bias", common.same),
            (f"{src}.bias", f"params/{dst}/bias", lambda w: w.reshape(-1)),
        ]

    rules += layer("conv1", "synthesis/b4/conv1", 0) + to_rgb("to_rgb1", "synthesis/b4/torgb")
    for j, (res, _) in enumerate(cfg.channels[1:]):
        rules += layer(f"convs.{2 * j}", f"synthesis/b{res}/conv0", 2 * j + 1)
        rules += layer(f"convs.{2 * j + 1}", f"synthesis/b{res}/conv1", 2 * j + 2)
        rules += to_rgb(f"to_rgbs.{j}", f"synthesis/b{res}/torgb")
    return rules


def _check_fir(state: dict, key: str, expected: np.ndarray, what: str) -> bool:
    """The blur/upsample kernels are stored buffers; we compute them, so check they agree."""
    if key.endswith((".blur.kernel", ".upsample.kernel", "resample_filter")):
        if not np.allclose(np.asarray(state[key], np.float32), expected, atol=1e-6):
            raise WeightsError(f"{what}: {key} is not the [1,3,3,1] filter this port implements")
        return True
    return False


def _add_missing_noise(g: dict, cfg: stylegan2.Config, what: str) -> bool:
    """Older rosinality checkpoints have no `noises.noise_i` buffers. Fallback: fixed N(0,1)
    noise from a seeded generator (recorded in the metadata), so 'const' noise stays
    deterministic. Returns True if the fallback was used."""
    missing = [i for i in range(cfg.n_noise) if f"noises.noise_{i}" not in g]
    if not missing:
        return False
    if len(missing) != cfg.n_noise:
        raise WeightsError(f"{what}: only some noise buffers present (missing noises.noise_{missing[0]})")
    warnings.warn(f"{what}: no stored noise buffers; using fixed noise drawn with seed "
                  f"{NOISE_FALLBACK_SEED} for noise_mode='const'", stacklevel=2)
    rng = np.random.default_rng(NOISE_FALLBACK_SEED)
    for i in range(cfg.n_noise):
        res = 2 ** ((i + 5) // 2)
        g[f"noises.noise_{i}"] = rng.standard_normal((1, 1, res, res)).astype(np.float32)
    return True


def _latent_avg(raw, cfg: stylegan2.Config, what: str) -> np.ndarray | None:
    if raw is None:
        return None
    raw = np.asarray(raw, np.float32)
    if raw.ndim == 2:  # pSp stores it repeated per style
        if np.array_equal(raw, np.broadcast_to(raw[:1], raw.shape)):
            raw = raw[0]
        else:
            warnings.warn(f"{what}: latent_avg differs per style; using the mean over styles",
                          stacklevel=2)
            raw = raw.mean(axis=0)
    if raw.shape != (cfg.w_dim,):
        raise WeightsError(f"{what}: latent_avg has shape {raw.shape}, expected ({cfg.w_dim},)")
    return raw


def _convert_rosinality(g: dict, latent_avg, what: str):
    g = dict(g)
    cfg = _rosinality_config(g, what)
    noise_fallback = _add_missing_noise(g, cfg, what)
    fir = stylegan2.blur_kernel(4.0)
    variables = common.apply_table(g, _rosinality_rules(cfg), what,
                                   ignore=lambda k: _check_fir(g, k, fir, what))
    extra = {"noise_source": f"fallback seed {NOISE_FALLBACK_SEED}" if noise_fallback else "checkpoint"}
    return cfg, variables, _latent_avg(latent_avg, cfg, what), extra


def _field(tree: Any, key: str, typ: type, what: str):
    value = tree.get(key) if isinstance(tree, dict) else None
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise WeightsError(f"{what}: NVlabs record without a valid '{key}' (not a stylegan2-ada "
                           "generator pickle)")
    return value


def _nvlabs_checks(state: dict, synth: dict, what: str) -> list[int]:
    """Refuses what this port does not implement; -> the block resolutions."""
    if state.get("c_dim", 0):
        raise WeightsError(f"{what}: conditional generators (c_dim > 0) are not supported")
    resolutions = _field(synth, "block_resolutions", list, what)
    blocks = _field(synth, "_modules", dict, what)
    if not resolutions or len(resolutions) > 9 or not all(isinstance(r, int) for r in resolutions):
        raise WeightsError(f"{what}: synthesis.block_resolutions {resolutions[:10]} is not a list "
                           "of at most 9 resolutions")
    for res in resolutions:
        arch = _field(_field(blocks, f"b{res}", dict, what), "state", dict, what).get("architecture", "skip")
        if arch != "skip":
            raise WeightsError(f"{what}: synthesis architecture '{arch}' is not supported (only 'skip')")
    return resolutions


def _nvlabs_config(record: PersistentRecord, what: str) -> stylegan2.Config:
    state = _field(record, "state", dict, what)
    kw = state.get("_init_kwargs") or {}
    modules = _field(state, "_modules", dict, what)
    synth = _field(_field(modules, "synthesis", dict, what), "state", dict, what)
    resolutions = _nvlabs_checks(state, synth, what)
    sd = nvlabs_state_dict(record)
    channels = [(4, int(np.shape(common.require(sd, "synthesis.b4.const", what))[0]))]
    for res in resolutions[1:]:
        channels.append((res, int(np.shape(common.require(sd, f"synthesis.b{res}.conv0.weight", what))[0])))
    mapping = (kw.get("mapping_kwargs") if isinstance(kw, dict) else None) or {}
    conv_clamp = ((kw.get("synthesis_kwargs") if isinstance(kw, dict) else None) or {}).get("conv_clamp")
    n_mapping = sum(1 for k in sd if k.startswith("mapping.fc") and k.endswith(".weight"))
    cfg = stylegan2.Config(resolution=_field(state, "img_resolution", int, what),
                           z_dim=_field(state, "z_dim", int, what),
                           w_dim=_field(state, "w_dim", int, what), n_mapping=n_mapping,
                           lr_mul=float(mapping.get("lr_multiplier", 0.01)),
                           channels=tuple(channels), flavor="nvlabs",
                           conv_clamp=None if conv_clamp is None else float(conv_clamp),
                           img_channels=_field(state, "img_channels", int, what))
    common.check_config(cfg.to_json(), what)
    return cfg


def _nvlabs_rules(cfg: stylegan2.Config):
    rules = []
    for i in range(cfg.n_mapping):
        rules += [(f"mapping.fc{i}.weight", f"params/mapping/fc{i}/kernel", common.linear),
                  (f"mapping.fc{i}.bias", f"params/mapping/fc{i}/bias", common.same)]
    rules.append(("mapping.w_avg", "consts/mapping/w_avg", common.same))
    rules.append(("synthesis.b4.const", "params/synthesis/b4/const", lambda w: np.transpose(w, (1, 2, 0))))
    for res, _ in cfg.channels:
        names = ["conv1"] if res == 4 else ["conv0", "conv1"]
        for name in names:
            src, dst = f"synthesis.b{res}.{name}", f"synthesis/b{res}/{name}"
            rules += [
                (f"{src}.weight", f"params/{dst}/weight", common.conv),
                (f"{src}.affine.weight", f"params/{dst}/affine/kernel", common.linear),
                (f"{src}.affine.bias", f"params/{dst}/affine/bias", common.same),
                (f"{src}.noise_strength", f"params/{dst}/noise_strength", lambda w: w.reshape(())),
                (f"{src}.bias", f"params/{dst}/bias", common.same),
                (f"{src}.noise_const", f"consts/{dst}/noise_const", common.same),
            ]
        src, dst = f"synthesis.b{res}.torgb", f"synthesis/b{res}/torgb"
        rules += [
            (f"{src}.weight", f"params/{dst}/weight", common.conv),
            (f"{src}.affine.weight", f"params/{dst}/affine/kernel", common.linear),
            (f"{src}.affine.bias", f"params/{dst}/affine/bias", common.same),
            (f"{src}.bias", f"params/{dst}/bias", common.same),
        ]
    return rules


def _convert_nvlabs(record: PersistentRecord, what: str):
    cfg = _nvlabs_config(record, what)
    sd = nvlabs_state_dict(record)
    fir = stylegan2.blur_kernel(1.0)
    variables = common.apply_table(sd, _nvlabs_rules(cfg), what,
                                   ignore=lambda k: _check_fir(sd, k, fir, what))
    latent_avg = variables["consts"]["mapping"].pop("w_avg")
    return cfg, variables, latent_avg, {"noise_source": "checkpoint"}


def _computed_latent_avg(cfg, variables) -> np.ndarray:
    n, seed = LATENT_AVG_FALLBACK
    warnings.warn(f"checkpoint has no average latent; using the mean of f(z) over {n} z "
                  f"(seed {seed})", stacklevel=2)
    G = stylegan2.StyleGAN2(cfg, variables)
    z = jax.random.normal(jax.random.key(seed), (n, cfg.z_dim))
    return np.asarray(G.mapping(z).mean(axis=0))


def _read_any(src: str):
    """-> (cfg, variables, latent_avg or None, extra) for every supported layout."""
    ckpt = read_checkpoint(src)
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{src}: not a StyleGAN2 checkpoint")
    if isinstance(ckpt.get("G_ema"), PersistentRecord):
        return (*_convert_nvlabs(ckpt["G_ema"], src), "nvlabs-pkl")
    if isinstance(ckpt.get("g_ema"), dict):
        return (*_convert_rosinality(ckpt["g_ema"], ckpt.get("latent_avg"), src), "rosinality")
    if isinstance(ckpt.get("state_dict"), dict) and any(str(k).startswith("decoder.")
                                                         for k in ckpt["state_dict"]):
        g = {k[len("decoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
        return (*_convert_rosinality(g, ckpt.get("latent_avg"), src), "psp-decoder")
    if any(str(k).startswith("decoder.") for k in ckpt):
        # iFADIT's attr_best.pth: a bare pSp state dict.
        g = {k[len("decoder."):]: v for k, v in flatten_state_dict(ckpt).items() if k.startswith("decoder.")}
        return (*_convert_rosinality(g, None, src), "psp-decoder")
    keys = ", ".join(str(k)[:40] for k in list(ckpt)[:5])
    raise WeightsError(f"{src}: not a StyleGAN2 checkpoint (no g_ema, G_ema or decoder.*; has {keys})")


def convert(src: str) -> tuple[dict, weights.Meta]:
    """Returns (variables, meta) for an official generator file."""
    cfg, variables, latent_avg, extra, source_format = _read_any(src)
    extra["source_format"] = source_format
    variables.setdefault("consts", {}).setdefault("mapping", {})
    expected = stylegan2.variable_shapes(cfg)
    if latent_avg is None:
        variables["consts"]["mapping"]["w_avg"] = np.zeros((cfg.w_dim,), np.float32)
        weights.check_tree(expected, variables, src)  # before running the mapping net on them
        latent_avg = _computed_latent_avg(cfg, variables)
        extra["latent_avg_source"] = "computed: mean of f(z), %d z, seed %d" % LATENT_AVG_FALLBACK
    else:
        extra["latent_avg_source"] = "checkpoint"
    variables["consts"]["mapping"]["w_avg"] = np.asarray(latent_avg, np.float32)
    return common.finish(variables, expected, src=src, kind=KIND,
                         config=cfg.to_json(), **extra)


if __name__ == "__main__":
    common.converter_main(__doc__.split("\n\n")[0], convert)
