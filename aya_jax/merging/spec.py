"""What a merge is: its method, its parameters per tensor, and a spec of a whole merge.

Parameters (mergekit's `parameters`): a scalar; a list of numbers, interpolated over depth
(layer i of L at t = i / (L - 1), non-layer tensors at t = 0); or a list of
`{filter: REGEX, value: ...}`, the first whose regex `re.search`es the tensor's name
(our path like 'layers/attn/q/kernel' or, with a ModelConfig, its HF name like
'model.layers.3.self_attn.q_proj.weight'; a plain mergekit substring is such a regex)
wins. Per-model settings (weight, density, gamma) come before the shared ones.

A merge over checkpoints is a `MergeSpec`, from a mergekit-style YAML (`spec_from_yaml`)
or configs/merge.py (`spec_from_config`); methods.py computes merges, stream.py runs
them over checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
import zlib
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

# method -> (needs base, sparsification, TIES vote, shared defaults, per-model defaults);
# a per-model default of None means the parameter is required.
_GTA_SHARED = dict(normalize=False, rescale=False, **{"lambda": 1.0})
METHODS = {
    "linear": (False, None, False, dict(normalize=True), dict(weight=None)),
    "task_arithmetic": (True, None, False, _GTA_SHARED, dict(weight=None, density=1.0)),
    "ties": (True, "magnitude", True, {**_GTA_SHARED, "normalize": True},
             dict(weight=None, density=1.0)),
    "dare_linear": (True, "random", False, {**_GTA_SHARED, "rescale": True},
                    dict(weight=None, density=1.0)),
    "dare_ties": (True, "random", True, {**_GTA_SHARED, "rescale": True},
                  dict(weight=None, density=1.0)),
    "breadcrumbs": (True, "outliers", False, _GTA_SHARED,
                    dict(weight=None, density=1.0, gamma=0.01)),
    "breadcrumbs_ties": (True, "outliers", True, _GTA_SHARED,
                         dict(weight=None, density=1.0, gamma=0.01)),
    "slerp": (True, None, False, dict(t=None), {}),
    "model_stock": (True, None, False, dict(filter_wise=False), {}),
}
# mergekit parameters that change nothing here (int8_mask is a memory option)
_IGNORED = ("int8_mask",)


# ---------------------------------------------------------------------------
# Parameters that vary by tensor name and depth
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# Merge specifications (mergekit-style YAML, ml_collections)
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class MergeSpec:
  """One merge: `models` (and `base`) are paths (streaming) or ignored (pytrees)."""
  method: str
  models: list
  model_parameters: list = dataclasses.field(default_factory=list)
  base: Optional[str] = None
  parameters: dict = dataclasses.field(default_factory=dict)
  dtype: Optional[str] = None
  include: Optional[str] = None  # regex: only matching paths are merged
  seed: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown merge_method {self.method!r}; known: {sorted(METHODS)}")
    if not self.model_parameters:
      self.model_parameters = [{} for _ in self.models]
    if len(self.model_parameters) != len(self.models):
      raise ValueError(f"{len(self.model_parameters)} model_parameters for "
                       f"{len(self.models)} models")
    if METHODS[self.method][0] and self.base in self.models:
      i = self.models.index(self.base)  # mergekit lists the base among the models too
      self.models = self.models[:i] + self.models[i + 1:]
      self.model_parameters = self.model_parameters[:i] + self.model_parameters[i + 1:]


def _read_yaml(text_or_path: str):
  """(parsed YAML, where: the file or '<merge YAML text>'). One line that is an existing
  file, or that has no ':' or ends in .yml / .yaml, is a path: it must exist."""
  import yaml
  text, where = text_or_path, "<merge YAML text>"
  if "\n" not in text and (os.path.isfile(text) or ":" not in text or
                           text.rstrip().endswith((".yml", ".yaml"))):
    if not os.path.isfile(text):
      raise FileNotFoundError(f"merge YAML file {text!r} does not exist (config merge.yaml "
                              "takes a path or the YAML text itself)")
    with open(text, encoding="utf-8") as f:
      text, where = f.read(), text
  try:
    d = yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None))
                    if x) or str(e)
    raise ValueError(f"{at}: merge YAML is not valid YAML: {what}") from None
  if not isinstance(d, Mapping) or "merge_method" not in d:
    got = "a mapping without merge_method" if isinstance(d, Mapping) else type(d).__name__
    raise ValueError(f"{where}: a merge YAML is a mapping with merge_method, models, ...; "
                     f"got {got}")
  return d, where


def spec_from_yaml(text_or_path: str) -> MergeSpec:
  """A MergeSpec from mergekit YAML (merge_method, models, base_model, parameters, dtype):
  a file's path or the text; errors name the file (and line)."""
  d, where = _read_yaml(text_or_path)
  unsupported = sorted(set(d) - {"merge_method", "models", "base_model", "parameters",
                                 "dtype", "out_dtype", "tokenizer_source", "include",
                                 "seed"})
  if unsupported:
    raise ValueError(f"{where}: {unsupported} are not supported (slices, modules, "
                     "tokenizer merges); use models/base_model/parameters")
  models = [m["model"] if isinstance(m, Mapping) else m for m in d.get("models") or []]
  params = [dict((m.get("parameters") or {}) if isinstance(m, Mapping) else {})
            for m in d.get("models") or []]
  try:
    return MergeSpec(method=d["merge_method"], models=models, model_parameters=params,
                     base=d.get("base_model"), parameters=dict(d.get("parameters") or {}),
                     dtype=d.get("out_dtype") or d.get("dtype"), include=d.get("include"),
                     seed=int(d.get("seed", 0)))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def spec_from_config(c) -> MergeSpec:
  """A MergeSpec from configs/merge.py's `merge` block (or its `yaml` path)."""
  if c.get("yaml"):
    return spec_from_yaml(c.yaml)
  models = list(c.models)
  per_model = {k: v for k, v in dict(c.model_parameters).items() if v is not None}
  for k, v in per_model.items():
    if len(v) != len(models):
      raise ValueError(f"config model_parameters.{k} has {len(v)} values for "
                       f"{len(models)} models")
  params = [{k: v[i] for k, v in per_model.items()} for i in range(len(models))]
  shared = {k: v for k, v in dict(c.parameters).items() if v is not None}
  return MergeSpec(method=c.method, models=models, model_parameters=params,
                   base=c.base or None, parameters=shared, dtype=c.dtype or None,
                   include=c.include or None, seed=int(c.seed))
