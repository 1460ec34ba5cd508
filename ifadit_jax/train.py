"""Training (paper §3.5, DESIGN §3): `python -m ifadit_jax.train --phase 1|2 --config FILE --workdir DIR`.

    python -m ifadit_jax.train --phase 1 --config configs/phase1.py --workdir runs/p1 [--config.lr 1e-4]
    python -m ifadit_jax.train --phase 2 --config configs/phase2.py --workdir runs/p2 \
        --config.init_from runs/p1
    python -m ifadit_jax.train --phase 1 --config configs/phase1.py:smoke --workdir /tmp/smoke \
        --config.data.path FACES_DIR          # a CPU-sized run with random networks

The command line only parses flags; everything happens in `train_and_evaluate(config, workdir)`,
which tests and notebooks import. Multi-host: pass --distributed (and, off managed clusters,
--coordinator_address/--num_processes/--process_id) to call `jax.distributed.initialize()`;
`data.batch_size` is the global batch over all processes and devices.

A workdir holds: checkpoints/ (orbax; the whole state and the data iterator), metrics.jsonl,
tensorboard/ (event files), samples/step_*.png (sample grids), config.json, and at the end
weights/ (every network, `ifadit_jax.pipeline.load` format) unless export_weights is off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from ifadit_jax import cli
from ifadit_jax.data import DataConfig, make_dataset
from ifadit_jax.errors import IfaditError, InputError
from ifadit_jax.training import checkpoints, networks, objective, step as step_lib, writers

PRECISIONS = ("default", "float32", "tensorfloat32", "bfloat16")
BN_MODES = ("batch", "frozen")


class NonFiniteLossError(IfaditError):
    """Training met a non-finite loss, gradient or update; the last good checkpoint is kept."""

    exit_code = 7


def _check(config) -> None:
    problems = []
    if config.phase not in (1, 2):
        problems.append(f"phase must be 1 or 2, got {config.phase!r}")
    if int(config.total_steps) < 1:
        problems.append(f"total_steps must be positive, got {config.total_steps}")
    for name in ("log_every", "checkpoint_every"):
        if int(config[name]) < 1:
            problems.append(f"{name} must be positive, got {config[name]}")
    if int(config.sample_every) < 0:
        problems.append(f"sample_every must be >= 0 (0: no samples), got {config.sample_every}")
    if config.matmul_precision not in PRECISIONS:
        problems.append(f"matmul_precision must be one of {PRECISIONS}, got {config.matmul_precision!r}")
    if config.attr_batch_norm not in BN_MODES:
        problems.append(f"attr_batch_norm must be one of {BN_MODES}, got {config.attr_batch_norm!r}")
    if problems:
        raise InputError("config: " + "; ".join(problems))


def _split_batch(global_batch: int, n_devices: int, processes: int, div: bool) -> int:
    """Per-device batch; a clear error if the global batch does not split evenly."""
    if global_batch % (processes * n_devices):
        raise InputError(f"data.batch_size {global_batch} does not split evenly over "
                         f"{processes} process(es) x {n_devices} local device(s)")
    per_device = global_batch // (processes * n_devices)
    if div and per_device % 2:
        raise InputError(f"L_Div pairs examples (0, 1), (2, 3), ... on each device: the "
                         f"per-device batch ({per_device} = {global_batch} / {processes * n_devices}"
                         ") must be even")
    return per_device


def _first_device(tree):
    return jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data)[0], tree)


def _save_config(config, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))


@dataclasses.dataclass
class Run:
    """Everything a training loop needs, placed on the devices (`setup`)."""

    config: Any
    workdir: str
    devices: list
    built: networks.Networks  # the networks as they started (before any training)
    trainable: tuple[str, ...]
    obj: objective.Objective  # what the step minimizes
    optimizer: Any  # optax.GradientTransformation
    p_step: Any  # the pmapped train step: step_lib.make_step(obj, optimizer, devices)
    state: step_lib.TrainState  # replicated
    frozen: Any  # replicated frozen Nets
    loss_nets: Any  # replicated LossNets
    data_it: Any  # the grain iterator of the training data
    ckpts: checkpoints.Checkpoints
    restored_step: int | None  # the checkpoint this run resumed from

    @property
    def step(self) -> int:
        return int(np.asarray(self.state.step.addressable_shards[0].data)[0])

    def batch(self):
        return step_lib.shard_batch(next(self.data_it)["image"], self.devices)


def setup(config, workdir: str) -> Run:
    """Builds the networks, the state and the step, and restores or initializes them.

    Resume order: the latest checkpoint in `workdir` first (an interrupted run continues exactly
    where it stopped: params, optimizer state, statistics, rng and data position; only the
    learning rate is taken from the config); otherwise the networks of `config.init_from`
    (another run's workdir, e.g. phase I for phase II) at step 0; otherwise the networks as
    `config.nets` builds them.
    """
    _check(config)
    os.makedirs(workdir, exist_ok=True)
    devices = jax.local_devices()
    loss_weights = objective.LossWeights.from_config(config.losses)
    _split_batch(int(config.data.batch_size), len(devices), jax.process_count(),
                 bool(loss_weights.div))
    trainable = networks.check_trainable(config.trainable)
    built = networks.build(config)
    nets = built.nets
    ckpts = checkpoints.Checkpoints(workdir, int(config.keep_checkpoints))
    latest = ckpts.latest_step()
    if latest is None and config.init_from:
        step0, params, stats = checkpoints.read_trained(config.init_from)
        nets = networks.override(nets, params, stats,
                                 f"init_from {config.init_from} (step {step0})")
        built = dataclasses.replace(built, nets=nets)

    optimizer = step_lib.make_optimizer(config)
    state = step_lib.TrainState.create(networks.trainable_params(nets, trainable),
                                       networks.batch_stats(nets, trainable), optimizer,
                                       int(config.seed))
    state = jax.tree.map(np.asarray, state)
    data_it = iter(make_dataset(DataConfig.from_mapping(config.data), "train"))
    if latest is not None:
        state = ckpts.restore(latest, state, data_it)
        state = state.replace(opt_state=step_lib.set_learning_rate(state.opt_state, config.lr))
        print(f"resumed from {ckpts.directory} at step {latest}", flush=True)
    elif jax.process_index() == 0:
        _save_config(config, workdir)

    obj = objective.Objective(
        weights=loss_weights, refine=bool(config.refine),
        train_attr_bn="attr_encoder" in trainable and config.attr_batch_norm == "batch",
        axis_name=step_lib.AXIS)
    return Run(config=config, workdir=workdir, devices=devices, built=built, trainable=trainable,
               obj=obj, optimizer=optimizer, p_step=step_lib.make_step(obj, optimizer, devices),
               state=step_lib.replicate(state, devices),
               frozen=step_lib.replicate(networks.frozen_nets(nets, trainable), devices),
               loss_nets=step_lib.replicate(built.loss_nets, devices),
               data_it=data_it, ckpts=ckpts, restored_step=latest)


def _sample_grid(samples) -> np.ndarray:
    first = _first_device(samples)
    return writers.grid({k: first[k] for k in objective.SAMPLE_COLUMNS if k in first})


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains as `config` says, in `workdir` (see `setup` for the resume order). Returns the
    last logged metrics (with "step"). (The name follows flax's examples; the trained networks
    are evaluated by experiments/, the paper's tables, from the exported weights folder.)

    Raises NonFiniteLossError naming the step on a non-finite loss, gradient or update; no state
    from that step on is saved, so the last good checkpoint stays the latest one.
    """
    run = setup(config, workdir)
    main_process = jax.process_index() == 0
    total = int(config.total_steps)
    first = run.step + 1
    jsonl = writers.JsonlWriter(os.path.join(workdir, "metrics.jsonl")) if main_process else None
    events = writers.EventWriter(os.path.join(workdir, "tensorboard")) if main_process else None
    last_ckpt = run.restored_step
    last: dict = {"step": first - 1}
    precision = (jax.default_matmul_precision(config.matmul_precision)
                 if config.matmul_precision != "default" else contextlib.nullcontext())
    t_log, steps_since = time.perf_counter(), 0
    try:
        with precision:
            for step in range(first, total + 1):
                run.state, metrics, samples = run.p_step(run.state, run.frozen, run.loss_nets,
                                                         run.batch())
                steps_since += 1
                is_log = step % config.log_every == 0 or step == total
                is_ckpt = step % config.checkpoint_every == 0 or step == total
                is_sample = bool(config.sample_every) and (step % config.sample_every == 0
                                                           or step == total)
                if not (is_log or is_ckpt or is_sample):
                    continue
                bad = int(np.asarray(run.state.nonfinite_step.addressable_shards[0].data)[0])
                if bad >= 0:
                    raise NonFiniteLossError(
                        f"non-finite loss, gradient or update at step {bad}; stopped. The last "
                        "good checkpoint is " + (f"step {last_ckpt}" if last_ckpt is not None
                                                 else "none (none was written)")
                        + f" in {run.ckpts.directory}")
                if is_log:
                    values = {k: float(v) for k, v in _first_device(metrics).items()}
                    elapsed = time.perf_counter() - t_log
                    values["steps_per_sec"] = steps_since / elapsed
                    values["images_per_sec"] = steps_since * int(config.data.batch_size) / elapsed
                    t_log, steps_since = time.perf_counter(), 0
                    last = {"step": step, **values}
                    if main_process:
                        jsonl.write(step, values)
                        events.scalars(step, values)
                        print(f"step {step}/{total}  loss {values['loss']:.5g}  "
                              f"{values['steps_per_sec']:.3g} steps/s", flush=True)
                if is_sample and main_process:
                    image = _sample_grid(samples)
                    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
                    png = writers.save_grid(os.path.join(workdir, "samples", f"step_{step:08d}.png"),
                                            image)
                    events.image(step, "samples", png, *image.shape[:2])
                if is_ckpt:
                    run.ckpts.save(step, step_lib.unreplicate(run.state), run.data_it)
                    last_ckpt = step
        run.ckpts.wait()
        if config.export_weights and main_process:
            final = step_lib.unreplicate(run.state)
            nets = networks.merge(networks.frozen_nets(run.built.nets, run.trainable),
                                  final.params, final.batch_stats)
            out = os.path.join(workdir, "weights")
            ident = networks.export_weights(nets, run.built.roles, out,
                                            f"trained:{os.path.abspath(workdir)}@{total}")
            print(f"wrote {out} (weights id {ident})", flush=True)
    finally:
        run.ckpts.wait()
        run.ckpts.close()
        if main_process:
            jsonl.close()
            events.close()
    return last


# ----------------------------------------------------------------------------- command line

def main(argv) -> int:
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    flags.DEFINE_integer("phase", None, "1 or 2; must match the config's phase", flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "configs/phase1.py or configs/phase2.py "
                                    "[:smoke and, for phase 2, ablations]", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder (resumes from its checkpoints)", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed)",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes (with --distributed)",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index (with --distributed)",
                         flag_values=fv)
    try:
        rest = fv(["ifadit_jax.train", *argv])[1:]
    except flags.Error as e:  # a config file's own error arrives as a traceback: keep its last line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InputError(" ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)) from None
    except AttributeError as e:  # an override of a field the config does not have
        raise InputError(f"unknown config field {str(e).strip(chr(34))}") from None

    if rest:  # e.g. `--config.data.shuffle False`: a boolean flag takes no separate value
        raise InputError(f"unexpected argument(s) {rest}; boolean fields are set as "
                         "--config.FIELD=False (or --noconfig.FIELD)")
    missing = [f"--{n}" for n in ("phase", "config", "workdir") if fv[n].value is None]
    if missing:
        raise InputError(f"missing {', '.join(missing)} (usage: python -m ifadit_jax.train "
                         "--phase 1 --config configs/phase1.py --workdir DIR)")
    config = fv.config
    if config.phase != fv.phase:
        raise InputError(f"--phase {fv.phase} but the config is for phase {config.phase}")
    if fv.distributed:
        jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                                   num_processes=fv.num_processes, process_id=fv.process_id)
    train_and_evaluate(config, fv.workdir)
    return 0


if __name__ == "__main__":
    cli.run(main)
