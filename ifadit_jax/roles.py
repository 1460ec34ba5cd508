"""The network roles of the iFADIT pipeline, one row each.

Every place that handles networks by role reads these rows: `pipeline.load` (which file, which
kind, optional or not), `pipeline.Nets` (keyed by role), the release converter (file names),
training (which roles a phase trains, fresh initialization of a trainable network, export of a
weights folder), the random/demo builders (`ifadit_jax.random_nets`) and the bfloat16 compute
mode (which roles may compute in it).

A role's network kind (`ifadit_jax.weights.network_class(kind)`) carries everything else: its
config schema (`NetConfig`: `from_json`, `module()`, `init_inputs()`, `variable_shapes()`) and
its loaded-network class. Adding a role: one row here, plus its network kind if it is new.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Role:
    """One network role.

    name: the role's key (in `pipeline.Nets`, weights trees, manifests and checkpoints).
    file: its file name in a weights folder.
    kind: its network kind (`ifadit_jax.weights.network_class(kind)`: config and loader).
    trainable_in: the training phases whose default config trains it (DESIGN §3).
    optional: a weights folder may lack it (no ICL: the ablation; no parser: no refinement).
    reduced_precision: it may compute in bfloat16 (`pipeline.Nets.precision`). Never the flow T
      or the ICL C: recovery inverts them, and a bfloat16 T^-1(T(z)) is not z.
    """

    name: str
    file: str
    kind: str
    trainable_in: tuple[int, ...] = ()
    optional: bool = False
    reduced_precision: bool = False

    def config(self, config: Any):
        """`config` (a JSON dict or already a config) as this role's `NetConfig`, validated."""
        from ifadit_jax import weights
        from ifadit_jax.nets import base

        return base.parse_config(weights.network_class(self.kind).CONFIG, config,
                                 f"{self.name} config")


ROLES: dict[str, Role] = {r.name: r for r in (
    Role("id_encoder", "arcface.safetensors", "arcface", reduced_precision=True),
    Role("attr_encoder", "psp_encoder.safetensors", "psp_encoder", trainable_in=(1,),
         reduced_precision=True),
    Role("mapper", "latent_mapper.safetensors", "latent_mapper", trainable_in=(1,),
         reduced_precision=True),
    Role("generator", "stylegan2.safetensors", "stylegan2", reduced_precision=True),
    Role("flow", "sif.safetensors", "sif", trainable_in=(2,)),
    Role("icl", "icl.safetensors", "icl", trainable_in=(2,), optional=True),
    Role("parser", "bisenet.safetensors", "bisenet", optional=True, reduced_precision=True),
)}
TRAINABLE_ROLES = tuple(r.name for r in ROLES.values() if r.trainable_in)


def trainable_in(phase: int) -> tuple[str, ...]:
    """The roles a phase trains by default (configs/phaseN.py)."""
    return tuple(r.name for r in ROLES.values() if phase in r.trainable_in)
