"""Logical axis names and the rule presets that map them to mesh axes.

Model code names every parameter and activation axis with one of LOGICAL_AXES;
a rule list maps each name to a mesh axis (or a tuple of mesh axes, or None =
replicated). The mesh axes are always ('data', 'fsdp', 'tensor'); a preset
only decides which of them shard what.
"""

from __future__ import annotations

LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv_heads", "kv", "vocab", "layers")
MESH_AXES = ("data", "fsdp", "tensor")

_BATCH = ("batch", ("data", "fsdp"))

PRESETS = {
    # pure data parallel: params replicated, batch split over every device
    "dp": (_BATCH,),
    # FSDP (ZeRO-3): params sharded over 'fsdp' on their embed (or vocab) axis
    "fsdp": (_BATCH, ("embed", "fsdp"), ("vocab", None), ("mlp", None), ("heads", None)),
    # FSDP + tensor parallel (Megatron layout: heads / mlp / vocab over 'tensor')
    "fsdp_tp": (_BATCH, ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                ("kv_heads", "tensor"), ("vocab", "tensor")),
}


def rules(preset: str) -> tuple:
  """The rule list of a preset; unnamed logical axes are replicated."""
  if preset not in PRESETS:
    raise ValueError(f"unknown sharding preset {preset!r}; known: {sorted(PRESETS)}")
  named = {name for name, _ in PRESETS[preset]}
  return tuple(PRESETS[preset]) + tuple((a, None) for a in LOGICAL_AXES if a not in named)
