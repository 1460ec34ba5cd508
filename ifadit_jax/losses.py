"""The training losses of iFADIT (paper §3.5; DESIGN §3) as pure, jittable functions.

Images are NHWC float32 in [0, 1]; identity embeddings are E_ID outputs [B, 512] (unit vectors);
landmarks are E_LM outputs [B, 136]. Every loss returns a scalar: the mean over the batch (and
over the pairs formed inside it), so that under data parallelism the mean over devices of the
per-device losses is the loss of the global batch (equal per-device batch sizes).

"|a - b|_1" is read as torch's `L1Loss` (the mean absolute difference), in the paper's L_VQ,
L_Sem and L_Img alike; the face-parser "L2" term is the mean squared difference (`MSELoss`).

Phase I (train E_Attr and M), X~ = G(M([E_ID(X), E_Attr(X)])):
  L_VQ  = 0.84 * (1 - SSIM(X~, X)) + 0.16 * |X~ - X|_1          (`vq_loss`; SSIM is
          `ifadit_jax.metrics.ssim`: 11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03)
  L_Sem = |E_ID(X~) - E_ID(X)|_1 + |E_LM(X~) - E_LM(X)|_1       (`semantic_loss`)
  L_P1  = 0.01 * L_VQ + L_Sem                                    (`phase1_loss`)

Phase II (train T and C), with theta = cos(E_ID(a), E_ID(b)), theta+ = max(0, theta),
theta- = 1 - theta:
  L_Anon   = theta+(X_anon, X)                                   (`anonymity_loss`)
      Eq. 15 writes X_hat, the symbol the paper later uses for the falsely recovered image.
      We read it as X_anon, the anonymized image: the loss is named for anonymity, the wrong-key
      image already has its own term in L_DeAnon, and only X_anon makes the anonymized face
      differ from the original identity, which is what Table 1 measures.
  L_Div    = theta+(X_anon_i|s, X_anon_j|s) + theta+(X_anon|s_k, X_anon|s_l)   (`diversity_loss`)
      inter-identity pairs under one key: examples (0, 1), (2, 3), ... of the batch (they must
      share the key); inter-key pairs of one face: every X_anon under its two keys.
  L_DeAnon = theta-(X_rec, X) + theta+(X_wrong, X)               (`deanonymization_loss`)
  L_Img    = sum over X' in (X_rec, X_anon, X_wrong) of
             l1 |X' - X|_1 + l2 LPIPS(X', X) + l3 |E_LM(X') - E_LM(X)|_1
             + l4 |E_FP(X') - E_FP(X)|_2^2                        (`image_loss`, `IMG_LAMBDAS`)
      with (l1, l2, l3, l4) = (10, 1, 0.1, 0.01) for X_rec and (0.01, 0.1, 0.1, 0.01) for X_anon
      and X_wrong (the paper's table); every image is compared with the original X.
  L_P2     = L_Anon + L_Div + L_DeAnon + L_Img                    (`phase2_loss`)

Feature extractors for the loss networks (pure functions of a module and its variables):
`landmarks` (E_LM, MobileFaceNet), `lpips_distance` (LPIPS), `parser_logits` (E_FP, BiSeNet).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from ifadit_jax import metrics
from ifadit_jax.errors import InputError
from ifadit_jax.nets import bisenet, mobilefacenet

VQ_ALPHA = 0.84  # weight of 1 - SSIM in L_VQ
VQ_BETA = 0.16  # weight of L1 in L_VQ
VQ_WEIGHT = 0.01  # weight of L_VQ in L_P1
IMG_TERMS = ("l1", "lpips", "landmarks", "parser")
# Per generated image: lambdas of (L1, LPIPS, landmark L1, face-parser L2), the paper's table.
IMG_LAMBDAS: dict[str, tuple[float, float, float, float]] = {
    "rec": (10.0, 1.0, 0.1, 0.01),
    "anon": (0.01, 0.1, 0.1, 0.01),
    "wrong": (0.01, 0.1, 0.1, 0.01),
}


# ----------------------------------------------------------------------------- basic terms

def mean_abs(a, b) -> jax.Array:
    """|a - b|_1 as torch's L1Loss: the mean absolute difference over everything -> scalar."""
    return jnp.mean(jnp.abs(a - b))


def theta(e1, e2) -> jax.Array:
    """Cosine similarity per pair of embeddings: [B, D] x2 -> [B]."""
    return metrics.cosine(e1, e2)


def theta_plus(e1, e2) -> jax.Array:
    """theta+ = max(0, cos) per pair: [B, D] x2 -> [B] (penalizes similar identities)."""
    return jnp.maximum(theta(e1, e2), 0.0)


def theta_minus(e1, e2) -> jax.Array:
    """theta- = 1 - cos per pair: [B, D] x2 -> [B] (penalizes dissimilar identities)."""
    return 1.0 - theta(e1, e2)


# ----------------------------------------------------------------------------- phase I

def vq_loss(x_tilde, x, alpha: float = VQ_ALPHA, beta: float = VQ_BETA) -> jax.Array:
    """L_VQ = alpha * (1 - SSIM(X~, X)) + beta * |X~ - X|_1, batch mean. [B, H, W, 3] in [0, 1]."""
    return alpha * (1.0 - jnp.mean(metrics.ssim(x_tilde, x))) + beta * mean_abs(x_tilde, x)


def semantic_loss(id_tilde, id_x, lm_tilde, lm_x) -> jax.Array:
    """L_Sem = |E_ID(X~) - E_ID(X)|_1 + |E_LM(X~) - E_LM(X)|_1 from the embeddings [B, 512]
    and landmarks [B, 136]."""
    return mean_abs(id_tilde, id_x) + mean_abs(lm_tilde, lm_x)


def phase1_loss(vq, sem) -> jax.Array:
    """L_P1 = 0.01 * L_VQ + L_Sem."""
    return VQ_WEIGHT * vq + sem


# ----------------------------------------------------------------------------- phase II

def anonymity_loss(id_anon, id_x) -> jax.Array:
    """L_Anon = theta+(E_ID(X_anon), E_ID(X)), batch mean (Eq. 15, read as X_anon; see the
    module docstring)."""
    return jnp.mean(theta_plus(id_anon, id_x))


def diversity_pairs(id_anon) -> jax.Array:
    """theta+ of the inter-identity pairs (0, 1), (2, 3), ... of a batch anonymized under one
    key per pair: [B, 512] with B even -> [B / 2]."""
    if id_anon.shape[0] % 2:
        raise InputError(f"L_Div pairs examples (0, 1), (2, 3), ...: the batch must be even, got "
                         f"{id_anon.shape[0]}")
    return theta_plus(id_anon[0::2], id_anon[1::2])


def diversity_loss(id_anon, id_anon_other_key) -> jax.Array:
    """L_Div = mean theta+(X_anon_i|s, X_anon_j|s) + mean theta+(X_anon|s_k, X_anon|s_l).

    id_anon: E_ID of the batch anonymized with keys s_k, where examples 2m and 2m+1 share their
    key; id_anon_other_key: E_ID of the same faces anonymized with other keys s_l. [B, 512].
    """
    return jnp.mean(diversity_pairs(id_anon)) + jnp.mean(theta_plus(id_anon, id_anon_other_key))


def deanonymization_loss(id_rec, id_wrong, id_x) -> jax.Array:
    """L_DeAnon = theta-(X_rec, X) + theta+(X_wrong, X), batch means. [B, 512] each."""
    return jnp.mean(theta_minus(id_rec, id_x)) + jnp.mean(theta_plus(id_wrong, id_x))


def image_loss(terms: Mapping[str, jax.Array], lambdas) -> jax.Array:
    """One image's L_Img: sum of lambdas[i] * terms[IMG_TERMS[i]] (the four distances to X)."""
    return sum(float(lam) * terms[name] for name, lam in zip(IMG_TERMS, lambdas))


def phase2_loss(anon, div, deanon, img) -> jax.Array:
    """L_P2 = L_Anon + L_Div + L_DeAnon + L_Img."""
    return anon + div + deanon + img


# ----------------------------------------------------------------------------- loss networks

def landmarks(module, variables, images) -> jax.Array:
    """E_LM: [B, H, W, 3] RGB in [0, 1] -> [B, 136] (MobileFaceNet on the 112x112 BGR crop)."""
    return module.apply(variables, mobilefacenet.preprocess(images, (0.0, 1.0)))


def lpips_distance(module, variables, a, b) -> jax.Array:
    """LPIPS(a, b) per pair for RGB images in [0, 1] -> [B]."""
    return module.apply(variables, 2.0 * a - 1.0, 2.0 * b - 1.0)


def parser_logits(module, variables, images) -> jax.Array:
    """E_FP: [B, H, W, 3] RGB in [0, 1] -> the parser's main logits at its own output
    resolution ([B, 64, 64, n_classes] for the 512x512 input the parser was trained at). The
    parser's final bilinear upsampling to 512 is linear and adds no information, so the L2 term
    is taken before it (8x fewer values to compare)."""
    x = bisenet.preprocess(images)
    return module.apply(variables, x, upsample=False)[0]


@flax.struct.dataclass
class LossNets:
    """Networks used only by the losses: LPIPS and E_LM (E_ID and the face parser E_FP come from
    the pipeline's `Nets`). Leaves: weights; static: modules."""

    lpips_module: Any = flax.struct.field(pytree_node=False)
    landmark_module: Any = flax.struct.field(pytree_node=False)
    lpips_vars: Any = None
    landmark_vars: Any = None


def image_distances(loss_nets: LossNets, parser_module, parser_vars, generated, reference,
                    lm_reference=None, parse_reference=None) -> dict[str, jax.Array]:
    """The four L_Img distances per example, each [N]: {"l1", "lpips", "landmarks", "parser"}
    between `generated` and `reference` ([N, H, W, 3] in [0, 1]). `lm_reference` /
    `parse_reference`: E_LM and E_FP of the references when already computed."""
    if lm_reference is None:
        lm_reference = landmarks(loss_nets.landmark_module, loss_nets.landmark_vars, reference)
    if parse_reference is None:
        parse_reference = parser_logits(parser_module, parser_vars, reference)
    lm = landmarks(loss_nets.landmark_module, loss_nets.landmark_vars, generated)
    parse = parser_logits(parser_module, parser_vars, generated)
    per_example = lambda d: jnp.mean(d.reshape(d.shape[0], -1), axis=1)  # noqa: E731
    return {
        "l1": per_example(jnp.abs(generated - reference)),
        "lpips": lpips_distance(loss_nets.lpips_module, loss_nets.lpips_vars, generated, reference),
        "landmarks": per_example(jnp.abs(lm - lm_reference)),
        "parser": per_example(jnp.square(parse - parse_reference)),
    }
