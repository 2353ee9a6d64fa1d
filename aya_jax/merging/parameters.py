"""A merge's parameters per tensor (mergekit's `parameters`), resolved by name and depth.

A setting is a scalar; a list of numbers, interpolated over depth (layer i of L at
t = i / (L - 1), non-layer tensors at t = 0); or a list of `{filter: REGEX, value: ...}`,
the first whose regex `re.search`es the tensor's name (our path like
'layers/attn/q/kernel' or, with a ModelConfig, its HF name like
'model.layers.3.self_attn.q_proj.weight'; a plain mergekit substring is such a regex)
wins. Per-model settings (weight, density, gamma) come before the shared ones. Also the
checks of a merge's shape and inputs, and each tensor's DARE key.
"""

from __future__ import annotations

import re
import warnings
import zlib
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from aya_jax.merging.methods import METHODS

# mergekit parameters that change nothing here (int8_mask is a memory option)
_IGNORED = ("int8_mask",)


def _is_scalar(v):
  return isinstance(v, (bool, int, float, str, np.number))


def resolve_setting(setting, names: Sequence[str], t: float = 0.0):
  """Value of one mergekit-style setting for a tensor with `names` at depth t in [0, 1]."""
  if setting is None or _is_scalar(setting):
    return setting
  if isinstance(setting, Mapping):
    setting = [setting]
  setting = list(setting)
  if not setting:
    return None
  if all(_is_scalar(v) for v in setting):
    if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
               for v in setting):
      return setting[int(t * (len(setting) - 1))]
    x = t * (len(setting) - 1)
    i0 = int(x)
    i1 = min(len(setting) - 1, i0 + 1)
    return (1 - (x - i0)) * float(setting[i0]) + (x - i0) * float(setting[i1])
  for cond in setting:
    if not isinstance(cond, Mapping) or "value" not in cond:
      raise ValueError(f"parameter setting {setting!r}: expected numbers or "
                       "{filter, value} entries")
    f = cond.get("filter")
    if f in (None, "*") or any(re.search(f, n) for n in names):
      return resolve_setting(cond["value"], names, t)
  return None


def resolve_parameters(method: str, parameters: Optional[Mapping], model_parameters,
                       n_models: int, names: Sequence[str], t: float) -> dict:
  """Shared values and per-model lists of one tensor: {'normalize': .., 'weight': [..]}."""
  if method not in METHODS:
    raise ValueError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
  _, _, _, shared_defaults, model_defaults = METHODS[method]
  parameters = dict(parameters or {})
  model_parameters = list(model_parameters or [{}] * n_models)
  if len(model_parameters) != n_models:
    raise ValueError(f"{len(model_parameters)} model_parameters for {n_models} models")
  known = set(shared_defaults) | set(model_defaults) | set(_IGNORED)
  for where, d in [("parameters", parameters)] + [
      (f"model {i} parameters", m or {}) for i, m in enumerate(model_parameters)]:
    bad = sorted(set(d) - known)
    if bad:
      raise ValueError(f"{where}: {bad} are not parameters of {method}; known: {sorted(known)}")
  out = {}
  for key, default in shared_defaults.items():
    value = resolve_setting(parameters.get(key), names, t)
    if value is None and default is None:
      raise ValueError(f"{method} needs parameter {key!r} (tensor {names[0]})")
    out[key] = default if value is None else value
  for key, default in model_defaults.items():
    values = []
    for i, m in enumerate(model_parameters):
      value = resolve_setting((m or {}).get(key), names, t)
      if value is None:
        value = resolve_setting(parameters.get(key), names, t)
      if value is None and default is None:
        raise ValueError(f"{method} needs parameter {key!r} for model {i} (tensor {names[0]})")
      value = default if value is None else value
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{method}: parameter {key!r} of model {i} is {value!r}, not a number "
                         f"(tensor {names[0]})")
      values.append(float(value))
    out[key] = values
  if method == "linear" and out["normalize"] and abs(sum(out["weight"])) < 1e-8:
    raise ValueError(f"linear weights {out['weight']} sum to 0 for tensor {names[-1]}; cannot "
                     "normalize (set normalize: false, or other weights)")
  for d in out.get("density", ()):
    if not 0.0 <= d <= 1.0:
      raise ValueError(f"density {d} is outside [0, 1] for tensor {names[0]}")
  if out.get("filter_wise"):
    raise ValueError("model_stock filter_wise=True is not supported (its rows depend on the "
                     "HF layout); use filter_wise=False")
  return out


def check_method(method: str, n_models: int, has_base: bool):
  """The errors of a merge's shape (method, number of models, base), raised up front."""
  if method not in METHODS:
    raise ValueError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
  if n_models == 0:
    raise ValueError(f"{method}: no models to merge")
  if METHODS[method][0] and not has_base:
    raise ValueError(f"{method} needs a base model (mergekit base_model; config merge.base)")
  if method == "slerp" and n_models != 1:
    raise ValueError(f"slerp merges a base and one other model; got {n_models} others")
  if method == "model_stock" and n_models < 2:
    raise ValueError(f"model_stock needs a base and 2 or more other models; got {n_models}")


def tensor_key(seed, path: str, layer: Optional[int] = None):
  """The DARE key of one tensor: derived from (seed, tensor path, layer), so masks do not
  depend on the order in which tensors are processed or on streaming vs in memory."""
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
  return key if layer is None else jax.random.fold_in(key, layer + 1)


def hf_names(cfg) -> dict:
  """params path -> HF tensor name pattern ('{i}' = layer) for a ModelConfig."""
  from aya_jax.models import hf
  return {"/".join(leaf): name for leaf, name, *_ in hf.entries(cfg)}


def hf_layouts(cfg) -> dict:
  """params path -> (HF transform, per-layer shape) for a ModelConfig: where each element
  sits in the flattened HF tensor (mergekit breaks ties of |d| ranks by that position)."""
  from aya_jax.models import hf
  return {"/".join(leaf): (transform, shape) for leaf, _, transform, shape, _ in hf.entries(cfg)}


def tensor_parameters(method: str, parameters, model_parameters, n_models: int, path: str,
                      layer: Optional[int], n_layers: int, hf_table: Optional[dict], seed=0):
  """(names, resolved parameters, DARE key or None) of one tensor, or layer slice, whose
  names are its path and, with hf_table (`hf_names`), its HF name; depth is mergekit's
  gradient position t = i / (L - 1) in layers, 0 outside them."""
  names = (path,) + ((hf_table[path].format(i=layer),) if hf_table and path in hf_table
                     else ())
  t = 0.0 if layer is None else layer / (n_layers - 1) if n_layers > 1 else 1.0
  p = resolve_parameters(method, parameters, model_parameters, n_models, names, t)
  return names, p, tensor_key(seed, path, layer) if METHODS[method][1] == "random" else None


def check_inputs(shapes: Sequence[dict], labels: Sequence[str], dtypes: Sequence[dict],
                 allow_dtype_mix: bool = False):
  """Same paths, shapes and (unless allowed) dtypes in every input; errors name the path."""
  ref = shapes[0]
  for label, s, dt in zip(labels[1:], shapes[1:], dtypes[1:]):
    missing, extra = sorted(set(ref) - set(s)), sorted(set(s) - set(ref))
    if missing or extra:
      raise ValueError(f"{label} has a different params tree than {labels[0]}: missing "
                       f"{missing[:5]}, extra {extra[:5]}")
    for path in ref:
      if tuple(s[path]) != tuple(ref[path]):
        what = ("vocab size differs: " if path in ("embedder/embedding", "lm_head/kernel")
                else "")
        raise ValueError(f"{what}params {path} has shape {tuple(s[path])} in {label} but "
                         f"{tuple(ref[path])} in {labels[0]}")
      if not allow_dtype_mix and np.dtype(dt[path]) != np.dtype(dtypes[0][path]):
        raise ValueError(f"params {path} is {np.dtype(dt[path])} in {label} but "
                         f"{np.dtype(dtypes[0][path])} in {labels[0]}; pass dtype= to "
                         "cast every input")
  for path, dt in dtypes[0].items():
    if not np.issubdtype(np.dtype(dt), np.floating) and np.dtype(dt).name != "bfloat16":
      raise ValueError(f"params {path} is {np.dtype(dt)}: only float tensors can be merged")


def warn_weights(method, model_parameters, parameters):
  """mergekit accepts negative weights (task negation) without a word; we warn once."""
  ws = [m.get("weight", parameters.get("weight")) for m in model_parameters]
  flat = [v for w in ws for v in (w if isinstance(w, (list, tuple)) else [w])
          if isinstance(v, (int, float))]
  if any(v < 0 for v in flat):
    warnings.warn(f"{method}: negative weights {ws} (kept, as mergekit does: they subtract)")
