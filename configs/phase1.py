"""Phase I of iFADIT training (paper §3.5): train E_Attr and M with L_P1; E_ID and G frozen.

    python -m ifadit_jax.train --phase 1 --config configs/phase1.py --workdir runs/p1 \
        --config.data.path FFHQ_STAR_DIR --config.nets.dir WEIGHTS_DIR \
        --config.loss_nets.lpips lpips_alex.safetensors \
        --config.loss_nets.landmarks mobilefacenet.safetensors

`configs/phase1.py:smoke` shrinks everything for a CPU: random tiny networks (RANDOM loss
networks too: the losses are numbers, nothing meaningful is learned), batch 2, 3 steps, a
checkpoint, a log line and a sample grid at every step; give it any folder of face images with
`--config.data.path DIR`. Arguments are comma-separated words (`:smoke`, and for phase II the
ablations, see configs/phase2.py). The config is locked after parsing: `--config.lr 1e-4` sets an
existing field, a misspelt one is an error.
"""

import ml_collections
from ml_collections import config_dict

from ifadit_jax import roles

WORDS = ("smoke",)


def parse_arg(arg, allowed=WORDS):
    words = tuple(w for w in (arg or "").replace("+", ",").split(",") if w)
    unknown = sorted(set(words) - set(allowed))
    if unknown:
        raise ValueError(f"unknown config argument(s) {unknown}; known: {list(allowed)}")
    return set(words)


def get_config(arg=None):
    words = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.phase = 1
    c.seed = 0  # the run's RNG (training keys); data order has its own data.seed
    # The paper trains "about 150k iterations in all"; this split between the phases is ours.
    c.total_steps = 75_000
    # Adam(b1=0, b2=0.999), lr 4e-4, batch 4 (paper §4.1).
    c.lr = 4e-4
    c.b1 = 0.0
    c.b2 = 0.999
    c.eps = 1e-8
    c.grad_clip = 0.0  # global-norm clipping; 0: off (the paper does not clip)

    # What trains and on what loss: freezing is data (DESIGN §3).
    c.trainable = roles.trainable_in(1)  # E_Attr, M (the role registry's phase I rows)
    c.losses = ml_collections.ConfigDict(dict(p1=1.0, anon=0.0, div=0.0, deanon=0.0, img=0.0))
    c.refine = False  # refinement (Eq. 11) in the phase II passes
    c.attr_batch_norm = "batch"  # E_Attr BatchNorm while it trains: "batch" (pSp) | "frozen"
    c.use_icl = True  # False: the ablation without ICL
    c.init_from = ""  # a previous run's workdir whose trained networks this run starts from

    c.data = ml_collections.ConfigDict(dict(
        source="ffhq_star", path="", batch_size=4, image_size=256, seed=0, shuffle=True,
        num_epochs=config_dict.placeholder(int), drop_remainder=True, split_seed=0,
        val_fraction=0.1, num_threads=8, prefetch_buffer_size=64))
    # Frozen (and initial) networks: see ifadit_jax/training/networks.py.
    c.nets = ml_collections.ConfigDict(dict(source="files", dir="", widths="real", seed=0,
                                            conventions="paper"))
    c.loss_nets = ml_collections.ConfigDict(dict(source="files", lpips="", landmarks="", seed=0))

    c.log_every = 100
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.sample_every = 2_000
    c.export_weights = True  # write WORKDIR/weights (pipeline.load format) at the end
    # "default" | "float32" | "tensorfloat32" | "bfloat16": matmul/conv precision of the step;
    # the flow always runs in float32 at HIGHEST precision.
    c.matmul_precision = "default"
    # "float32" | "bfloat16": the compute dtype of E_ID, E_Attr, M, G and the parser
    # (pipeline.Nets.precision). Weights, optimizer state, the flow, ICL and the losses stay float32.
    c.precision = "float32"

    if "smoke" in words:
        apply_smoke(c)
    return c


def apply_smoke(c):
    c.total_steps = 3
    c.data.source = "folder"
    c.data.batch_size = 2
    c.data.val_fraction = 0.0
    c.data.num_threads = 1
    c.data.prefetch_buffer_size = 2
    c.nets.source = "random"
    c.nets.widths = "tiny"
    c.loss_nets.source = "random"
    c.log_every = 1
    c.checkpoint_every = 1
    c.keep_checkpoints = 2
    c.sample_every = 1
    c.export_weights = False
