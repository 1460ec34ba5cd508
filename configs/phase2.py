"""Phase II of iFADIT training (paper §3.5): train T and C with L_P2; everything else frozen.

    python -m ifadit_jax.train --phase 2 --config configs/phase2.py --workdir runs/p2 \
        --config.init_from runs/p1 --config.data.path ... --config.nets.dir ... \
        --config.loss_nets.lpips ... --config.loss_nets.landmarks ...

Builds on configs/phase1.py (same data, networks and optimizer). `init_from` names the phase I
workdir: its trained E_Attr and M (latest checkpoint) replace the ones in nets.dir.

Arguments (comma-separated, combinable with `smoke`): the ablations of the paper's Table 5,
  no_div        without L_Div
  no_img        without L_Img
  no_icl        without ICL (C): recovery reads E_ID(X_anon) directly; only T trains
  single_phase  no dual-phase training: E_Attr, M, T and C train together on L_P1 + L_P2
                from the start (leave init_from empty)
e.g. `configs/phase2.py:smoke,no_div`.
"""

import importlib.util
import os

ABLATIONS = ("no_div", "no_img", "no_icl", "single_phase")
WORDS = ("smoke", *ABLATIONS)  # listed by `python -m ifadit_jax.train --help`


def _phase1():
    # Loaded by path so the configs work from any working directory.
    spec = importlib.util.spec_from_file_location(
        "ifadit_config_phase1", os.path.join(os.path.dirname(os.path.abspath(__file__)), "phase1.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    phase1 = _phase1()
    words = phase1.parse_arg(arg, WORDS)
    c = phase1.get_config(None)
    c.phase = 2
    c.total_steps = 75_000
    c.trainable = phase1.roles.trainable_in(2)  # T, C
    c.losses.p1 = 0.0
    c.losses.anon = 1.0
    c.losses.div = 1.0
    c.losses.deanon = 1.0
    c.losses.img = 1.0
    c.refine = True
    if "no_div" in words:
        c.losses.div = 0.0
    if "no_img" in words:
        c.losses.img = 0.0
    if "no_icl" in words:
        c.use_icl = False
        c.trainable = ("flow",)
    if "single_phase" in words:
        c.total_steps = 150_000
        c.trainable = ("attr_encoder", "mapper", "flow") + (("icl",) if c.use_icl else ())
        c.losses.p1 = 1.0
    if "smoke" in words:
        phase1.apply_smoke(c)
        # L_Div pairs examples (0, 1), (2, 3) on each device: batch 4 also splits over 2 devices.
        c.data.batch_size = 4
    return c
