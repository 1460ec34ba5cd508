"""The IR-SE ResNet body shared by E_ID (ArcFace IR-SE50) and E_Attr (the pSp encoder), in Flax.

This is `models/encoders/helpers.py` + the input layer of `model_irse.Backbone` and
`psp_encoders.GradualStyleEncoder` in eladrich/pixel2style2pixel (TreB1eN's InsightFace layout):

  input layer: conv3x3 (stride 1, pad 1, no bias) -> BatchNorm -> PReLU(C)
  body: `get_blocks(50)` = 4 stages of (3, 4, 14, 3) units; the first unit of every stage has
    stride 2. Unit `bottleneck_IR_SE(in, depth, stride)`:
      res      = BN -> conv3x3 (stride 1) -> PReLU -> conv3x3 (**stride here**) -> BN -> SE
      shortcut = MaxPool2d(1, stride) (plain subsampling) if in == depth,
                 else conv1x1 (stride, no bias) -> BN
      out = res + shortcut
    SE (reduction 16): global mean -> 1x1 conv (no bias) -> ReLU -> 1x1 conv (no bias) -> sigmoid,
    multiplied onto its input. `bottleneck_IR` (se=False) is the same unit without SE.

All 3x3 convs pad by one pixel on every side, as torch does: Flax's "SAME" would pad stride-2
convs asymmetrically. BatchNorm eps is torch's default 1e-5. Inference (`train=False`, the default)
uses the running statistics from the `batch_stats` collection. With `train=True` BatchNorm uses
batch statistics and updates `batch_stats` (apply with `mutable=["batch_stats"]`) with torch's
momentum 0.1 (Flax 0.9); unlike torch, Flax keeps the biased batch variance as running variance.

Parameter tree (the same in both networks, so weights move between them by subtree):
  params/body/input_conv/kernel [3,3,in,C0], params/body/input_bn/{scale,bias},
  batch_stats/body/input_bn/{mean,var}, params/body/input_prelu/negative_slope [C0],
  params/body/unit_{i}/{bn1,conv1,prelu,conv2,bn2,se_fc1,se_fc2,shortcut_conv,shortcut_bn}/...
where official `body.{i}.res_layer.{0,1,2,3,4,5.fc1,5.fc2}` and `body.{i}.shortcut_layer.{0,1}`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

BN_EPS = 1e-5  # torch BatchNorm default
BN_MOMENTUM = 0.9  # torch momentum 0.1
SE_REDUCTION = 16

# Units per stage of `get_blocks(num_layers)`; stage input/output widths come from the checkpoint.
STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}


def batch_norm(train: bool, name: str, affine: bool = True,
               axis_name: str | None = None) -> nn.BatchNorm:
    """torch BatchNorm (eps 1e-5); running statistics unless `train`. `axis_name`: under pmap,
    batch statistics are averaged over that axis (synchronized BatchNorm)."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                        use_scale=affine, use_bias=affine, axis_name=axis_name, name=name)


def conv(features: int, kernel: int, stride: int, name: str, bias: bool = False) -> nn.Conv:
    """torch Conv2d with symmetric zero padding kernel // 2."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((p, p), (p, p)),
                   use_bias=bias, name=name)


class PReLU(nn.Module):
    """torch.nn.PReLU(C): one learned slope per channel (last axis) for negative inputs."""

    @nn.compact
    def __call__(self, x):
        slope = self.param("negative_slope", nn.initializers.constant(0.25), (x.shape[-1],))
        return jnp.where(x >= 0, x, slope * x)


class IRUnit(nn.Module):
    """Official `bottleneck_IR_SE(in, depth, stride)` (or `bottleneck_IR` when `se=False`); NHWC.
    `mid_bn`: a BatchNorm ("bn_mid") between conv1 and the PReLU, which makes it AdaFace's
    `BasicBlockIR` (with `se=False`)."""

    depth: int
    stride: int
    se: bool = True
    bn_axis_name: str | None = None
    mid_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: batch_norm(train, name, axis_name=self.bn_axis_name)  # noqa: E731
        if x.shape[-1] == self.depth:
            shortcut = x[:, ::self.stride, ::self.stride]  # MaxPool2d(kernel 1, stride)
        else:
            shortcut = conv(self.depth, 1, self.stride, "shortcut_conv")(x)
            shortcut = bn("shortcut_bn")(shortcut)
        r = bn("bn1")(x)
        r = conv(self.depth, 3, 1, "conv1")(r)
        if self.mid_bn:
            r = bn("bn_mid")(r)
        r = PReLU(name="prelu")(r)
        r = conv(self.depth, 3, self.stride, "conv2")(r)
        r = bn("bn2")(r)
        if self.se:  # official SEModule(depth, 16): channel gates from the global mean
            g = jnp.mean(r, axis=(1, 2), keepdims=True)
            g = nn.relu(conv(self.depth // SE_REDUCTION, 1, 1, "se_fc1")(g))
            r = r * nn.sigmoid(conv(self.depth, 1, 1, "se_fc2")(g))
        return r + shortcut


class IRBody(nn.Module):
    """Input layer + `get_blocks(num_layers)` units. NHWC in, every unit's output out.

    widths: output width of each of the 4 stages (official 64, 128, 256, 512); the input layer
      has widths[0] channels (official: 64, the first stage's input).
    units: units per stage, `STAGE_UNITS[num_layers]`.
    mid_bn: AdaFace's units (see `IRUnit`).
    """

    widths: Sequence[int]
    units: Sequence[int] = STAGE_UNITS[50]
    se: bool = True
    bn_axis_name: str | None = None  # synchronized BatchNorm over this pmap axis in training
    mid_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False) -> list:
        """x: [B, H, W, in_channels] -> list of the outputs of all units, in order
        ([B, H/2, W/2, widths[0]] for unit 0, ..., [B, H/16, W/16, widths[3]] for the last)."""
        x = conv(self.widths[0], 3, 1, "input_conv")(x)
        x = batch_norm(train, "input_bn", axis_name=self.bn_axis_name)(x)
        x = PReLU(name="input_prelu")(x)
        outputs = []
        for depth, n in zip(self.widths, self.units):
            for j in range(n):
                x = IRUnit(depth, 2 if j == 0 else 1, self.se, self.bn_axis_name, self.mid_bn,
                           name=f"unit_{len(outputs)}")(x, train)
                outputs.append(x)
        return outputs
