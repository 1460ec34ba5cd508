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

import argparse
import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from ifadit_jax import cli, pipeline
from ifadit_jax.data import DataConfig, make_dataset
from ifadit_jax.errors import IfaditError, InputError
from ifadit_jax.training import checkpoints, freezing, networks, objective, writers
from ifadit_jax.training import step as step_lib

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
    if config.precision not in pipeline.PRECISIONS:
        problems.append(f"precision must be one of {pipeline.PRECISIONS}, got {config.precision!r}")
    if config.attr_batch_norm not in BN_MODES:
        problems.append(f"attr_batch_norm must be one of {BN_MODES}, got {config.attr_batch_norm!r}")
    if problems:
        raise InputError("config: " + "; ".join(problems))
    path = config.data.path
    if not path:
        raise InputError("no training data: set --config.data.path DIR (a folder of face "
                         "images, FFHQ* or array_record; see configs/phase1.py)")
    if not os.path.exists(path):
        raise InputError(f"--config.data.path {path}: no such file or folder")


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


def _save_config(config, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
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
    labels: dict  # freezing.labels of the carried roles: what the optimizer trains
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
        return int(step_lib.unreplicate(self.state.step))

    def batch(self):
        return step_lib.shard_batch(next(self.data_it)["image"], self.devices)


def _start_networks(config, built, latest: int | None):
    """`built` with `config.init_from`'s trained networks when this run does not resume
    (see `setup`)."""
    if latest is not None or not config.init_from:
        return built
    step0, tree = checkpoints.read_trained(config.init_from)
    nets = networks.override(built.nets, tree, f"init_from {config.init_from} (step {step0})")
    return dataclasses.replace(built, nets=nets)


def _initial_state(config, built, trainable):
    """(label tree, optimizer, host TrainState) of the roles that train."""
    tree = built.nets.weights_tree()
    labels = freezing.labels(tree, trainable)
    carried = freezing.carried(tree, labels)
    params = {role: tree[role] for role in carried}
    labels = {role: labels[role] for role in carried}
    optimizer = step_lib.make_optimizer(config, labels)
    state = step_lib.TrainState.create(params, optimizer, int(config.seed))
    return labels, optimizer, jax.tree.map(np.asarray, state)


def setup(config, workdir: str) -> Run:
    """Builds the networks, the state and the step, and restores or initializes them. Nothing
    is written (the workdir is not even created) before every input has been checked.

    Resume order: the latest checkpoint in `workdir` first (an interrupted run continues exactly
    where it stopped: params, optimizer state, statistics, rng and data position; only the
    learning rate is taken from the config); otherwise the networks of `config.init_from`
    (another run's workdir, e.g. phase I for phase II) at step 0; otherwise the networks as
    `config.nets` builds them.
    """
    _check(config)
    devices = jax.local_devices()
    loss_weights = objective.LossWeights.from_config(config.losses)
    _split_batch(int(config.data.batch_size), len(devices), jax.process_count(),
                 bool(loss_weights.div))
    trainable = freezing.check_trainable(config.trainable)
    built = networks.build(config)
    data_it = iter(make_dataset(DataConfig.from_mapping(config.data), "train"))
    # Every input is checked: the workdir may be created now. Every process opens the manager
    # before reading its latest step (orbax synchronizes the processes there).
    ckpts = checkpoints.Checkpoints(workdir, int(config.keep_checkpoints))
    latest = ckpts.latest_step()
    built = _start_networks(config, built, latest)
    labels, optimizer, state = _initial_state(config, built, trainable)
    if latest is not None:
        state = ckpts.restore(latest, state, data_it)
        state = state.replace(opt_state=step_lib.set_learning_rate(state.opt_state, config.lr))
        print(f"resumed from {ckpts.directory} at step {latest}", flush=True)
    elif jax.process_index() == 0:
        _save_config(config, workdir)
    if jax.process_index() == 0:
        print(networks.parameter_overview(built.nets, trainable), flush=True)
    obj = objective.Objective(
        weights=loss_weights, refine=bool(config.refine),
        train_attr_bn="attr_encoder" in trainable and config.attr_batch_norm == "batch",
        axis_name=step_lib.AXIS)
    return Run(config=config, workdir=workdir, devices=devices, built=built, labels=labels,
               obj=obj, optimizer=optimizer, p_step=step_lib.make_step(obj, optimizer, devices),
               state=step_lib.replicate(state, devices),
               frozen=step_lib.replicate(built.nets.without(tuple(labels)), devices),
               loss_nets=step_lib.replicate(built.loss_nets, devices),
               data_it=data_it, ckpts=ckpts, restored_step=latest)


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class _Outputs:
    """What process 0 writes while training: metrics.jsonl, TensorBoard events, sample grids."""

    workdir: str
    jsonl: Any = None
    events: Any = None

    @classmethod
    def open(cls, workdir: str, main_process: bool) -> "_Outputs":
        if not main_process:
            return cls(workdir)
        return cls(workdir, writers.JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
                   writers.EventWriter(os.path.join(workdir, "tensorboard")))

    def log(self, step: int, total: int, values: dict) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(step, values)
        self.events.scalars(step, values)
        print(f"step {step}/{total}  loss {values['loss']:.5g}  "
              f"{values['steps_per_sec']:.3g} steps/s", flush=True)

    def sample(self, step: int, samples) -> None:
        if self.jsonl is None:
            return
        first = step_lib.unreplicate(samples)
        columns = {label: first[k] for k, label in objective.SAMPLE_COLUMNS.items() if k in first}
        image = writers.grid(columns)
        os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
        writers.save_grid(os.path.join(self.workdir, "samples", f"step_{step:08d}.png"), image)
        self.events.image(step, "samples", image)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.events.close()


class _Timer:
    """Steps per second since the last log line."""

    def __init__(self):
        self.start, self.steps = time.perf_counter(), 0

    def rates(self, batch_size: int) -> dict:
        elapsed = time.perf_counter() - self.start
        out = {"steps_per_sec": self.steps / elapsed,
               "images_per_sec": self.steps * batch_size / elapsed}
        self.start, self.steps = time.perf_counter(), 0
        return out


def _stop_if_nonfinite(run: Run, last_ckpt: int | None) -> None:
    bad = int(step_lib.unreplicate(run.state.nonfinite_step))
    if bad >= 0:
        raise NonFiniteLossError(
            f"non-finite loss, gradient or update at step {bad}; stopped. The last good "
            "checkpoint is " + (f"step {last_ckpt}" if last_ckpt is not None
                                else "none (none was written)") + f" in {run.ckpts.directory}")


def _train_steps(run: Run, out: _Outputs) -> dict:
    """The loop from the step after `run.state`'s to `config.total_steps`; returns the last
    logged metrics."""
    config, total = run.config, int(run.config.total_steps)
    last: dict = {"step": run.step}
    last_ckpt, timer = run.restored_step, _Timer()
    for step in range(run.step + 1, total + 1):
        run.state, metrics, samples = run.p_step(run.state, run.frozen, run.loss_nets, run.batch())
        timer.steps += 1
        is_log = step % config.log_every == 0 or step == total
        is_ckpt = step % config.checkpoint_every == 0 or step == total
        is_sample = bool(config.sample_every) and (step % config.sample_every == 0 or step == total)
        if not (is_log or is_ckpt or is_sample):
            continue
        _stop_if_nonfinite(run, last_ckpt)
        if is_log:
            values = {k: float(v) for k, v in step_lib.unreplicate(metrics).items()}
            values.update(timer.rates(int(config.data.batch_size)))
            last = {"step": step, **values}
            out.log(step, total, values)
        if is_sample:
            out.sample(step, samples)
        if is_ckpt:
            run.ckpts.save(step, step_lib.unreplicate(run.state), run.data_it)
            last_ckpt = step
    return last


def _export(run: Run) -> None:
    """WORKDIR/weights: every network of the run with the trained ones' final weights."""
    final = step_lib.unreplicate(run.state)
    nets = run.built.nets.with_variables(final.params)
    out = os.path.join(run.workdir, "weights")
    total = int(run.config.total_steps)
    ident = networks.export_weights(nets, run.built.roles, out,
                                    f"trained:{os.path.abspath(run.workdir)}@{total}")
    print(f"wrote {out} (weights id {ident})", flush=True)


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains as `config` says, in `workdir` (see `setup` for the resume order). Returns the
    last logged metrics (with "step"). (The name follows flax's examples; the trained networks
    are evaluated by experiments/, the paper's tables, from the exported weights folder.)

    Raises NonFiniteLossError naming the step on a non-finite loss, gradient or update; no state
    from that step on is saved, so the last good checkpoint stays the latest one.
    """
    run = setup(config, workdir)
    main_process = jax.process_index() == 0
    out = _Outputs.open(workdir, main_process)
    precision = (jax.default_matmul_precision(config.matmul_precision)
                 if config.matmul_precision != "default" else contextlib.nullcontext())
    try:
        with precision:
            last = _train_steps(run, out)
        run.ckpts.wait()
        if config.export_weights and main_process:
            _export(run)
    finally:
        run.ckpts.wait()
        run.ckpts.close()
        out.close()
    return last


# ----------------------------------------------------------------------------- command line

COMMON_FIELDS = (
    ("data.path", "training images: a folder, FFHQ* (ifadit_jax.data.synthesize) or array_record"),
    ("nets.dir", "folder of converted networks (ifadit_jax.roles file names)"),
    ("loss_nets.lpips", "converted LPIPS file (ports/convert_lpips.py)"),
    ("loss_nets.landmarks", "converted MobileFaceNet file (ports/convert_mobilefacenet.py)"),
    ("init_from", "phase II: the phase I workdir whose E_Attr and M it starts from"),
    ("total_steps", "steps of this run"),
    ("lr", "Adam learning rate (4e-4)"),
    ("data.batch_size", "global batch over all devices and processes (4)"),
    ("log_every", "steps between metric lines"),
    ("checkpoint_every", "steps between checkpoints"),
    ("sample_every", "steps between labelled sample grids (0: none)"),
    ("trainable", "roles this run trains"),
    ("export_weights", "write WORKDIR/weights at the end (pipeline.load format)"),
    ("matmul_precision", "default | float32 | tensorfloat32 | bfloat16"),
    ("precision", "network compute dtype: float32 | bfloat16 (flow, ICL, losses stay float32)"),
)


def _config_words() -> dict[str, tuple[str, ...]]:
    """{config file: its words}, read from the configs/ folder beside the package."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    out = {}
    for phase in (1, 2):
        try:
            module = _load_config_module(os.path.join(folder, f"phase{phase}.py"))
            out[f"configs/phase{phase}.py"] = tuple(module.WORDS)
        except Exception:  # noqa: BLE001 - help must print even without the configs folder
            continue
    return out


def usage() -> str:
    lines = ["usage: python -m ifadit_jax.train --phase {1,2} --config FILE[:WORDS] --workdir DIR "
             "[--config.FIELD VALUE ...]",
             "",
             "Trains iFADIT (paper §3.5): phase 1 trains E_Attr and M on L_P1, phase 2 trains T "
             "and C on L_P2 (--config.init_from the phase 1 workdir). A workdir resumes from its "
             "latest checkpoint.",
             "",
             "config words (comma-separated after ':', e.g. configs/phase2.py:smoke,no_div):"]
    lines += [f"  {file}: {', '.join(words)}" for file, words in _config_words().items()]
    lines += ["", "common fields (--config.FIELD VALUE; booleans as --config.FIELD=False):"]
    lines += [f"  --config.{name:<20} {what}" for name, what in COMMON_FIELDS]
    lines += ["", "flags:",
              "  --phase {1,2}                must match the config's phase",
              "  --config FILE[:WORDS]        configs/phase1.py or configs/phase2.py",
              "  --workdir DIR                run folder (checkpoints, metrics, samples, weights)",
              "  --distributed                multi-host: call jax.distributed.initialize() (with "
              "--coordinator_address HOST:PORT --num_processes N --process_id I off managed "
              "clusters)",
              "  --device {auto,cpu,gpu}, --quiet, --verbose, --no_compile_cache, --version",
              "", "exit codes: 0 ok, 2 usage, 3 weights, 4 input, 7 non-finite loss"]
    return "\n".join(lines)


def _load_config_module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ifadit_train_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _field_names(config, prefix: str = "") -> list[str]:
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if hasattr(value, "items"):
            names += _field_names(value, f"{prefix}{key}.")
    return names


def _config_spec(argv) -> str | None:
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        spec = argv[argv.index("--config") + 1]
    return spec


def _unknown_field(argv, name: str | None) -> InputError:
    """One line naming the unknown `--config.NAME` of `argv` (`name` if the config named by
    --config does not load), with the closest field of that config."""
    import difflib

    fields = []
    spec = _config_spec(argv)
    if spec:
        path, _, arg = spec.partition(":")
        try:
            fields = _field_names(_load_config_module(path).get_config(arg or None))
        except Exception:  # noqa: BLE001 - the suggestion is a courtesy; the error stands
            pass
    given = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    given += [a[len("--noconfig."):] for a in argv if a.startswith("--noconfig.")]
    name = next((g for g in given if fields and g not in fields), name) or "?"
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f" (did you mean --config.{close[0]}?)" if close else ""
    return InputError(f"unknown config field --config.{name}{hint}")


def _define_flags():
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
    # The options every CLI shares (ifadit_jax.cli); --version is answered before parsing.
    flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"], "where JAX computes", flag_values=fv)
    flags.DEFINE_bool("quiet", False, "print only errors and warnings (metrics still go to the "
                      "workdir)", flag_values=fv)
    flags.DEFINE_bool("verbose", False, "also print the devices", flag_values=fv)
    flags.DEFINE_bool("no_compile_cache", False, "do not use the persistent compilation cache",
                      flag_values=fv)
    return fv


def _parse(argv):
    """The parsed flags; every parse problem as one InputError line."""
    from absl import flags

    fv = _define_flags()
    try:
        rest = fv(["ifadit_jax.train", *argv])[1:]
    except flags.UnrecognizedFlagError as e:
        if str(e.flagname).startswith("config."):
            raise _unknown_field(argv, e.flagname[len("config."):]) from None
        raise InputError(f"unknown flag --{e.flagname} (see --help)") from None
    except flags.Error as e:  # a config file's own error arrives as a traceback: keep its last line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InputError(" ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)) from None
    except AttributeError:  # an override of a field the config does not have
        raise _unknown_field(argv, None) from None
    if rest:  # e.g. `--config.data.shuffle False`: a boolean flag takes no separate value
        raise InputError(f"unexpected argument(s) {rest}; boolean fields are set as "
                         "--config.FIELD=False (or --noconfig.FIELD)")
    return fv


def main(argv) -> int:
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
        print(usage())
        return 0
    if "--version" in argv:
        print(f"python -m ifadit_jax.train {cli.version()}")
        return 0
    fv = _parse(argv)
    cli.setup(argparse.Namespace(**{name: fv[name].value for name in cli.COMMON_OPTIONS}))
    missing = [f"--{n}" for n in ("phase", "config", "workdir") if fv[n].value is None]
    if missing:
        raise InputError(f"missing {', '.join(missing)} (usage: python -m ifadit_jax.train "
                         "--phase 1 --config configs/phase1.py --workdir DIR; see --help)")
    config = fv.config
    if config.phase != fv.phase:
        raise InputError(f"--phase {fv.phase} but the config is for phase {config.phase}")
    if fv.distributed:
        jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                                   num_processes=fv.num_processes, process_id=fv.process_id)
    with contextlib.redirect_stdout(open(os.devnull, "w")) if fv.quiet else contextlib.nullcontext():
        train_and_evaluate(config, fv.workdir)
    return 0


if __name__ == "__main__":
    cli.run(main)
