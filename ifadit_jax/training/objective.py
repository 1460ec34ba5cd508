"""The objective of one training step: pipeline passes plus the losses of `ifadit_jax.losses`.

    loss = p1 * L_P1 + anon * L_Anon + div * L_Div + deanon * L_DeAnon + img * L_Img

with the weights of `LossWeights` (config `losses`). Phase I is p1 = 1 and the rest 0; phase II
p1 = 0 and the rest 1 (L_P2 is their sum); the ablations zero one weight (no L_Div, no L_Img)
or set all of them (single phase). A zero weight skips its networks' passes entirely.

Phase I pass:  X~ = G(M([E_ID(X), E_Attr(X)])), without refinement (the reconstruction must
  learn the whole image; refinement would copy the background from X). E_Attr runs in training
  mode (BatchNorm on the batch statistics, synchronized across devices) while it trains.
Phase II passes, with keys k1, k2 for every example:
  X_anon = anonymize(X, k1), X_rec = recover(X_anon, k1), X_wrong = recover(X_anon, k2),
  and for L_Div X_anon2 = anonymize(X, k2). Refinement (Eq. 11) as configured (on by default:
  it is part of X_anon in Eq. 9). Gradients flow end to end: through X_anon into the recovery
  passes, through the frozen networks into T and C.

Keys. Training keys are random: k = f(u) with StyleGAN2's mapping f (`keys.key_from_vector`
with `pipeline.mapping`). For the paper's key path (conventions.key_path "kdf") u is
Norm(b) = b / 127.5 - 1 (`keys.norm`) of 512 uniformly random bytes b, which is exactly the distribution of
Norm(KDF(s)) for random secrets s (Argon2id output is indistinguishable from random bytes; the
memory-hard KDF itself has no place in a training loop). For the official key path ("vector")
u ~ U[0.5, 1)^512 as the official code draws it. Each example's (u1, u2) comes from
fold_in(step_rng, j) with j its key group: the example's position in the global batch (device
index x per-device batch + position), divided by 2 when L_Div is on so that examples 2m and 2m+1
share their keys (the inter-identity pairs of L_Div). The keys of an example therefore do not
depend on how the global batch is split over devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ifadit_jax import keys as keys_lib
from ifadit_jax import losses, pipeline
from ifadit_jax.errors import InputError


# Sample grid columns, in this order where present, with the label drawn above each: X, X~
# (phase I), X_anon, X_anon under the second key, X_rec, X_wrong.
SAMPLE_COLUMNS = {"x": "input", "x_tilde": "reconstructed", "anon": "anonymized",
                  "anon2": "anonymized (key 2)", "rec": "recovered", "wrong": "wrong key"}


@dataclasses.dataclass(frozen=True)
class LossWeights:
    p1: float = 0.0
    anon: float = 0.0
    div: float = 0.0
    deanon: float = 0.0
    img: float = 0.0

    @property
    def phase2(self) -> bool:
        return any(w != 0 for w in (self.anon, self.div, self.deanon, self.img))

    @classmethod
    def from_config(cls, c) -> "LossWeights":
        d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"unknown loss weights {unknown}")
        w = cls(**{k: float(v) for k, v in d.items()})
        if not (w.p1 or w.phase2):
            raise InputError("every loss weight is zero")
        return w


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static settings of the objective (hashable: part of the compiled step)."""

    weights: LossWeights
    refine: bool = True
    train_attr_bn: bool = False  # E_Attr's BatchNorm on batch statistics (phase I branch)
    axis_name: str | None = "batch"

    @property
    def key_group(self) -> int:
        return 2 if self.weights.div else 1


def random_key_vectors(rng, n: int, key_path: str, dim: int = 512) -> jax.Array:
    """n random key seeds u [n, dim] for the key path "kdf" (Norm of random bytes) or "vector"
    (the official U[0.5, 1))."""
    if key_path == "kdf":
        return keys_lib.norm(jax.random.randint(rng, (n, dim), 0, 256).astype(jnp.float32))
    return keys_lib.official_key_seed(rng, n, dim)


def draw_keys(nets: pipeline.Nets, rng, first_example, n: int, group: int, dtype=jnp.float32):
    """Keys (k1, k2), each [n, 512], for the examples first_example .. first_example + n - 1 of
    the global batch; examples in one group of `group` consecutive positions share them. f runs
    in `dtype` (the images', so float64 in a float64 computation; the seeds are exact in both)."""
    groups = (first_example + jnp.arange(n)) // group
    u = jax.vmap(lambda j: random_key_vectors(jax.random.fold_in(rng, j), 2,
                                              nets.conventions.key_path))(groups)  # [n, 2, 512]
    k = keys_lib.key_from_vector(u.reshape(2 * n, -1).astype(dtype), pipeline.mapping(nets))
    k = k.reshape(n, 2, -1)
    k = jax.lax.stop_gradient(k)
    return k[:, 0], k[:, 1]


def compute(obj: Objective, nets: pipeline.Nets, loss_nets: losses.LossNets, x, rng,
            first_example):
    """One device's objective on its images x [b, 256, 256, 3] in [0, 1].

    Returns (loss, terms {name: scalar}, the collections the forward pass updated
    {role: {collection: ...}} (E_Attr's BatchNorm statistics while it trains, else {}), samples
    {name: images [b, 256, 256, 3]} for the sample grids).
    """
    w = obj.weights
    terms, samples, updated = {}, {"x": x}, {}
    loss = jnp.zeros((), jnp.float32)
    lm_x = (losses.landmarks(loss_nets.landmark_module, loss_nets.landmark_vars, x)
            if w.p1 or w.img else None)
    if w.p1:
        p1_terms, updated, samples["x_tilde"] = phase1_terms(obj, nets, loss_nets, x, lm_x)
        terms.update(p1_terms)
        loss = loss + w.p1 * p1_terms["p1"]
    if w.phase2:
        images = phase2_passes(obj, nets, x, rng, first_example)
        samples.update({k: images[k] for k in ("anon", "anon2", "rec", "wrong") if k in images})
        p2_terms = identity_terms(w, nets, images)
        if w.img:
            p2_terms.update(image_terms(nets, loss_nets, images, lm_x))
        for name in ("anon", "div", "deanon", "img"):
            if name in p2_terms:
                loss = loss + getattr(w, name) * p2_terms[name]
        terms.update(p2_terms)
        terms["p2"] = losses.phase2_loss(*(terms.get(k, jnp.zeros((), jnp.float32))
                                           for k in ("anon", "div", "deanon", "img")))
    terms["loss"] = loss
    return loss, terms, updated, samples


def phase1_terms(obj: Objective, nets: pipeline.Nets, loss_nets: losses.LossNets, x, lm_x):
    """L_P1 on X~ = G(M([E_ID(X), E_Attr(X)])) (no refinement) -> (terms, updated collections,
    X~)."""
    z = pipeline.identity(nets, x)
    updated = {}
    if obj.train_attr_bn:
        attr, stats = pipeline.attributes_train(nets, x, obj.axis_name)
        updated = {"attr_encoder": {"batch_stats": stats}}
    else:
        attr = pipeline.attributes(nets, x)
    x_tilde, _ = pipeline.render(nets, z, attr)
    lm_tilde = losses.landmarks(loss_nets.landmark_module, loss_nets.landmark_vars, x_tilde)
    vq = losses.vq_loss(x_tilde, x)
    sem = losses.semantic_loss(pipeline.identity(nets, x_tilde), z, lm_tilde, lm_x)
    return {"p1/vq": vq, "p1/sem": sem, "p1": losses.phase1_loss(vq, sem)}, updated, x_tilde


def phase2_passes(obj: Objective, nets: pipeline.Nets, x, rng, first_example) -> dict:
    """The phase II images and identities: X, X_anon (k1), X_anon2 (k2, with L_Div), X_rec (k1),
    X_wrong (k2) and E_ID of X ("id_x"), X_anon ("id_anon"), and of X_rec, X_wrong, X_anon2
    ("id_rec", "id_wrong", "id_anon2") where a loss reads them."""
    w, b = obj.weights, x.shape[0]
    k1, k2 = draw_keys(nets, rng, first_example, b, obj.key_group, x.dtype)
    # Passes that share networks run as one batch: one network instance in the compiled step
    # (much faster to compile) and larger batches on accelerators.
    if w.div:  # X_anon under k1 and, for L_Div, under k2
        anon_all, anon_out = pipeline.anonymize(nets, jnp.concatenate([x, x]),
                                                jnp.concatenate([k1, k2]), obj.refine)
    else:
        anon_all, anon_out = pipeline.anonymize(nets, x, k1, obj.refine)
    out = {"x": x, "anon": anon_all[:b], "id_x": anon_out["z"][:b]}
    if w.div:
        out["anon2"] = anon_all[b:]
    # X_rec (right key) and X_wrong (wrong key) from the same X_anon.
    rec_all, rec_out = pipeline.recover(nets, jnp.concatenate([out["anon"], out["anon"]]),
                                        jnp.concatenate([k1, k2]), obj.refine)
    out.update(rec=rec_all[:b], wrong=rec_all[b:], id_anon=rec_out["z"][:b])
    if w.div or w.deanon:
        names = ("rec", "wrong", "anon2") if w.div else ("rec", "wrong")
        ids = pipeline.identity(nets, jnp.concatenate([out[n] for n in names]))
        out.update({f"id_{n}": ids[i * b:(i + 1) * b] for i, n in enumerate(names)})
    return out


def identity_terms(w: LossWeights, nets: pipeline.Nets, p: dict) -> dict:
    """L_Anon, L_Div (with its two parts) and L_DeAnon where their weights are non-zero."""
    terms = {}
    if w.anon:
        terms["anon"] = losses.anonymity_loss(p["id_anon"], p["id_x"])
    if w.div:
        terms["div/pairs"] = jnp.mean(losses.diversity_pairs(p["id_anon"]))
        terms["div/keys"] = jnp.mean(losses.theta_plus(p["id_anon"], p["id_anon2"]))
        terms["div"] = losses.diversity_loss(p["id_anon"], p["id_anon2"])
    if w.deanon:
        terms["deanon"] = losses.deanonymization_loss(p["id_rec"], p["id_wrong"], p["id_x"])
    return terms


def image_terms(nets: pipeline.Nets, loss_nets: losses.LossNets, p: dict, lm_x) -> dict:
    """L_Img over X_rec, X_anon and X_wrong (one batched pass), each with its lambdas."""
    names, x, b = ("rec", "anon", "wrong"), p["x"], p["x"].shape[0]
    parse_x = losses.parser_logits(nets.module("parser"), nets["parser"], x)
    n = len(names)
    dist = losses.image_distances(loss_nets, nets.module("parser"), nets["parser"],
                                  jnp.concatenate([p[k] for k in names]),
                                  jnp.concatenate([x] * n), jnp.concatenate([lm_x] * n),
                                  jnp.concatenate([parse_x] * n))
    terms, img = {}, jnp.zeros((), jnp.float32)
    for i, name in enumerate(names):
        t = {k: jnp.mean(v[i * b:(i + 1) * b]) for k, v in dist.items()}
        one = losses.image_loss(t, losses.IMG_LAMBDAS[name])
        terms.update({f"img/{name}/{k}": v for k, v in t.items()})
        terms[f"img/{name}"] = one
        img = img + one
    terms["img"] = img
    return terms
