"""online.merge: after each online iteration the policy may become a merge of named
models ('policy', 'previous', 'initial' or a checkpoint directory), with any merge method.
"""

from __future__ import annotations

import json

import jax
import ml_collections

from aya_jax import checkpoint
from aya_jax.merging import pytree


def merge_block() -> ml_collections.ConfigDict:
  """online.merge: after each iteration the policy becomes a merge (see `merge_policy`)."""
  c = ml_collections.ConfigDict()
  c.method = ""              # '' = off; a merging.methods.METHODS name: linear, slerp, ties, ...
  c.models = ("policy", "previous")  # policy | previous | initial | a params/ or HF dir
  c.weights = (0.5, 0.5)     # one per model; () for methods without weights (slerp)
  c.base = ""                # the base of task_arithmetic, ties, slerp, ...: a name as above
  c.parameters = ""          # JSON of the method's shared parameters, e.g. '{"t": 0.3}'
  return c


MERGE_NAMES = ("policy", "previous", "initial")


def merge_names(mc) -> tuple:
  """The models (and base) a merge step reads; () when merging is off."""
  return (tuple(mc.models) + ((mc.base,) if mc.base else ())) if mc.method else ()


def load_merge_inputs(mc, shardings) -> dict:
  """{path: params} of the checkpoint directories among online.merge's models and base."""
  out = {}
  for name in merge_names(mc):
    if name in MERGE_NAMES or name in out:
      continue
    if not checkpoint.is_model_dir(name):
      raise ValueError(f"online.merge: {name!r} is not one of {MERGE_NAMES} nor a params/ or "
                       "HF directory")
    out[name] = checkpoint.load_model(name, shardings)[1]
  return out


def merge_policy(mc, named: dict, cfg, shardings=None, seed=0):
  """`pytree.merge(mc.method, ...)` of the models online.merge names, looked up
  in `named` ({'policy', 'previous', 'initial', or a path: params})."""
  missing = [n for n in merge_names(mc) if named.get(n) is None]
  if missing:
    raise ValueError(f"online.merge: no params for {missing}")
  weights = tuple(mc.weights)
  if weights and len(weights) != len(mc.models):
    raise ValueError(f"online.merge.weights {weights} needs one weight per model in "
                     f"online.merge.models {tuple(mc.models)}")
  merged = pytree.merge(
      mc.method, [named[n] for n in mc.models], base=named[mc.base] if mc.base else None,
      parameters=json.loads(mc.parameters) if mc.parameters else None,
      model_parameters=[{"weight": float(w)} for w in weights] if weights else None,
      seed=seed, cfg=cfg)
  return merged if shardings is None else jax.device_put(merged, shardings)


def merge_description(mc) -> str:
  ws = tuple(mc.weights) or ("",) * len(mc.models)
  parts = ", ".join(f"{n} {w}".strip() for n, w in zip(mc.models, ws))
  return f"{mc.method}({parts}{', base ' + mc.base if mc.base else ''})"
