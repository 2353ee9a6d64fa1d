"""Model merging: pure merges of params pytrees (merges over checkpoints: merge_stream.py).

Methods (mergekit 0.1.5 names and semantics; accumulation in fp32, fp64 for fp64 inputs):
  linear            sum_i w_i x_i / sum_i w_i (normalize=True, the default) or sum_i w_i x_i
  task_arithmetic   b + lambda * sum_i w_i d_i (/ sum_i w_i if normalize), d_i = x_i - b
  ties              d_i -> top-density-fraction by |d_i| (exactly k = max(1, int(density n))
                    kept); e_i = w_i d_i; sign s = sign(sum_i e_i) (>= 0 -> +1: a tie votes +);
                    b + lambda * sum_i [sign e_i = s] e_i / sum_i [sign e_i = s] w_i
                    (mergekit: weights are applied BEFORE the vote, and pruned or zero
                    entries never count in the divisor; normalize defaults to True)
  dare_linear       d_i -> m_i * d_i, m_i ~ Bernoulli(density), rescaled so |.|_1 is kept
                    (rescale=True, mergekit's L1 matching) or by 1/density
                    (rescale='inverse', the DARE paper); then task_arithmetic
  dare_ties         the same drop, then the TIES vote
  breadcrumbs       d_i keeps the elements whose |d| rank (ascending) is in
                    [n - int(density n) - int(gamma n), n - int(gamma n)): the smallest and
                    the gamma largest are dropped; then task_arithmetic (breadcrumbs_ties:
                    with the TIES vote)
  slerp             base x0, other x1, per tensor: c = <x0/|x0|, x1/|x1|>; |c| > 0.9995 ->
                    (1-t) x0 + t x1 (parallel fallback), else with theta = acos c:
                    sin((1-t) theta)/sin theta * x0 + sin(t theta)/sin theta * x1
  model_stock       per tensor: cos = mean over pairs of cos(d_i, d_j);
                    t = N cos / (1 + (N-1) cos) (0 when the denominator is ~0);
                    t * mean_i x_i + (1 - t) * b
Every per-tensor statistic (top-k, norms, L1 rescale, cosines) is taken over one layer's
tensor: a 'layers/...' leaf is merged slice by slice along its leading layer axis, as
mergekit merges `model.layers.{i}.*` tensors. Element order inside a tensor does not matter
to any method, so our [in, out] layout gives mergekit's numbers on [out, in] tensors.

Parameters (mergekit's `parameters`): a scalar; a list of numbers, interpolated over depth
(layer i of L at t = i / (L - 1), non-layer tensors at t = 0); or a list of
`{filter: REGEX, value: ...}`, the first whose regex `re.search`es the tensor's name
(our path like 'layers/attn/q/kernel' or, with a ModelConfig, its HF name like
'model.layers.3.self_attn.q_proj.weight'; a plain mergekit substring is such a regex)
wins. Per-model settings (weight, density, gamma) come before the shared ones.
"""

from __future__ import annotations

import functools
import re
import warnings
import zlib
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
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
      values.append(float(default if value is None else value))
    out[key] = values
  for d in out.get("density", ()):
    if not 0.0 <= d <= 1.0:
      raise ValueError(f"density {d} is outside [0, 1] for tensor {names[0]}")
  if out.get("filter_wise"):
    raise ValueError("model_stock filter_wise=True is not supported (its rows depend on the "
                     "HF layout); use filter_wise=False")
  return out


# ---------------------------------------------------------------------------
# Per-tensor kernels (numpy in, numpy out; jax in, jax out)
# ---------------------------------------------------------------------------
def _xp(*arrays):
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _acc_dtype(x):
  return np.float64 if np.dtype(x.dtype) == np.float64 else np.float32


def _keep_ranks(xp, x, lo, hi):
  """Mask of the elements of x whose |x| rank (ascending, 0-based) is in [lo, hi)."""
  w = xp.abs(x).reshape(-1)
  n = w.shape[0]
  if lo <= 0 and hi >= n:
    return xp.ones(x.shape, bool)
  if xp is np:
    kth = [k for k in (lo, hi) if 0 <= k < n]
    idx = np.argpartition(w, kth)[max(lo, 0):hi]  # O(n), no full sort
    mask = np.zeros(n, bool)
    mask[idx] = True
  else:
    idx = jnp.argsort(w)[max(lo, 0):hi]
    mask = jnp.zeros(n, bool).at[idx].set(True)
  return mask.reshape(x.shape)


def _rescale_l1(xp, d, kept):
  before, after = xp.abs(d).sum(), xp.abs(kept).sum()
  ok = (before >= 1e-7) & (after >= 1e-7)
  return xp.where(ok, kept * (before / xp.where(ok, after, 1.0)), kept)


@functools.partial(jax.jit, static_argnums=2)
def _bernoulli(key, density, shape):
  return jax.random.bernoulli(key, density, shape)


def _sparsify(xp, kind, d, density, gamma, rescale, key):
  if kind is None or density >= 1.0:
    return d
  n = d.size
  if kind == "magnitude":
    if density <= 0:
      return xp.zeros_like(d)
    mask = _keep_ranks(xp, d, n - max(1, int(density * n)), n)
  elif kind == "outliers":
    target, top = int(density * n), int(gamma * n)
    lo = max(0, n - target - top)
    mask = _keep_ranks(xp, d, lo, lo + target)
  else:  # random
    if key is None:
      raise ValueError("random sparsification (DARE) needs a key or seed")
    mask = _bernoulli(key, density, tuple(d.shape))
    mask = np.asarray(mask) if xp is np else mask
  kept = xp.where(mask, d, 0.0)
  if rescale == "inverse":
    return kept / density if density > 0 else kept
  if rescale:
    return _rescale_l1(xp, d, kept)
  return kept


def _slerp(xp, x0, x1, t, dot_threshold=0.9995, eps=1e-8):
  n0, n1 = xp.sqrt((x0 * x0).sum()), xp.sqrt((x1 * x1).sum())
  n0, n1 = xp.where(n0 > eps, n0, 1.0), xp.where(n1 > eps, n1, 1.0)
  dot = xp.clip(((x0 / n0) * (x1 / n1)).sum(), -1.0, 1.0)
  parallel = xp.abs(dot) > dot_threshold
  theta = xp.arccos(xp.where(parallel, 0.0, dot))
  s = xp.where(parallel, 1.0, xp.sin(theta))
  c0 = xp.where(parallel, 1 - t, xp.sin((1 - t) * theta) / s)
  c1 = xp.where(parallel, t, xp.sin(t * theta) / s)
  return c0 * x0 + c1 * x1


def _model_stock(xp, xs, base):
  ds = [x - base for x in xs]
  cos = []
  for i, a in enumerate(ds):
    for b in ds[i + 1:]:
      norm = xp.maximum(xp.sqrt((a * a).sum()) * xp.sqrt((b * b).sum()), 1e-6)
      cos.append(xp.clip((a * b).sum() / norm, -1.0, 1.0))
  cos = sum(cos) / len(cos)
  n = len(xs)
  den = 1 + (n - 1) * cos
  singular = xp.abs(den) < 1e-6
  t = xp.where(singular, 0.0, n * cos / xp.where(singular, 1.0, den))
  return t * (sum(xs) / n) + (1 - t) * base


def is_elementwise(method: str, p: dict) -> bool:
  """Whether each output element depends only on the same element of the inputs (for
  resolved parameters p): such tensors may be merged in blocks, in any memory order."""
  if method in ("slerp", "model_stock"):
    return False
  return METHODS[method][1] is None or all(d >= 1.0 for d in p.get("density", [1.0]))


def _np_upcast(a, acc, order="C"):
  if a.dtype == ml_dtypes.bfloat16 and acc == np.float32:  # exact; ~10x ml_dtypes' astype
    u = a.view(np.uint16).astype(np.uint32, order=order)
    u <<= 16
    return u.view(np.float32)
  return a.astype(acc, order=order)


def cast(x, dtype):
  """x in dtype, in x's memory order; numpy fp32 -> bf16 rounds to nearest even with integer
  ops (faster than ml_dtypes' astype); no copy when x already is dtype."""
  dtype = np.dtype(dtype)
  if x.dtype == dtype or not isinstance(x, np.ndarray) or x.dtype != np.float32 or (
      dtype != ml_dtypes.bfloat16 or np.isnan(x).any()):
    return x if x.dtype == dtype else x.astype(dtype)
  u = x.view(np.uint32)
  r = u >> 16
  r &= 1
  r += 0x7FFF
  r += u
  r >>= 16
  return r.astype(np.uint16).view(dtype)


def _wsum(xp, ws, xs):
  """sum_i w_i x_i, in place for numpy (the same operation order as the builtin sum)."""
  if xp is not np:
    return sum(w * x for w, x in zip(ws, xs))
  out = xs[0] * ws[0]
  for w, x in zip(ws[1:], xs[1:]):
    out += w * x
  return out


def merge_tensor(method: str, xs: Sequence, base=None, p: Optional[dict] = None, key=None,
                 name: str = "tensor"):
  """One merged tensor from inputs xs (and base), with resolved parameters p
  (`resolve_parameters`); key: a jax PRNG key for DARE (already derived for this tensor).
  Computes in fp32 (fp64 for fp64 inputs) and returns that dtype."""
  needs_base, sparsify, vote, _, _ = METHODS[method]
  if needs_base and base is None:
    raise ValueError(f"{method} needs a base model (tensor {name})")
  xp = _xp(base, *xs)
  acc = _acc_dtype(xs[0])
  # reductions (L1, norms) need C order to sum in one order whatever the inputs' strides;
  # elementwise merges keep the inputs' order (a transposed view stays one, uncopied)
  order = "K" if is_elementwise(method, p) else "C"
  up = ((lambda a: _np_upcast(np.asarray(a), acc, order)) if xp is np else
        (lambda a: jnp.asarray(a).astype(acc)))
  xs = [up(x) for x in xs]
  base = None if base is None else up(base)
  if method == "linear":
    w = p["weight"]
    out = _wsum(xp, w, xs)
    if p["normalize"]:
      if abs(sum(w)) < 1e-8:
        raise ValueError(f"linear weights {w} sum to 0 for tensor {name}; cannot normalize")
      out = out / sum(w)
    return out
  if method == "slerp":
    if len(xs) != 1:
      raise ValueError(f"slerp merges a base and one other model; got {len(xs)} others")
    return _slerp(xp, base, xs[0], float(p["t"]))
  if method == "model_stock":
    if len(xs) < 2:
      raise ValueError(f"model_stock needs a base and at least 2 other models; got {len(xs)}")
    return _model_stock(xp, xs, base)
  w = p["weight"]
  density, gamma = p.get("density", [1.0] * len(xs)), p.get("gamma", [0.0] * len(xs))
  deltas = []
  for i, x in enumerate(xs):
    k = None if key is None else jax.random.fold_in(key, i)
    deltas.append(w[i] * _sparsify(xp, sparsify, x - base, density[i], gamma[i],
                                   p["rescale"], k))
  if vote:
    majority = xp.where(sum(deltas) >= 0, 1.0, -1.0)
    masks = [xp.sign(d) == majority for d in deltas]
    mixed = sum(xp.where(m, d, 0.0) for d, m in zip(deltas, masks))
    divisor = sum(xp.where(m, wi, 0.0) for wi, m in zip(w, masks))
    divisor = xp.where(divisor == 0, 1.0, divisor)
  else:
    mixed = _wsum(xp, [1.0] * len(deltas), deltas) if len(deltas) > 1 else deltas[0]
    divisor = sum(w) if abs(sum(w)) >= 1e-8 else 1.0
  if p["normalize"]:
    mixed = mixed / divisor
  return base + p["lambda"] * mixed


def tensor_key(seed, path: str, layer: Optional[int] = None):
  """The DARE key of one tensor: derived from (seed, tensor path, layer), so masks do not
  depend on the order in which tensors are processed or on streaming vs in memory."""
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
  return key if layer is None else jax.random.fold_in(key, layer + 1)


# ---------------------------------------------------------------------------
# Pytrees
# ---------------------------------------------------------------------------
def _flat(tree) -> dict:
  return {"/".join(str(getattr(k, "key", k)) for k in kp): v
          for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def hf_names(cfg) -> dict:
  """params path -> HF tensor name pattern ('{i}' = layer) for a ModelConfig."""
  from aya_jax.models import hf
  return {"/".join(leaf): name for leaf, name, *_ in hf._entries(cfg)}


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


def merge(method: str, models: Sequence, base=None, parameters: Optional[Mapping] = None,
          model_parameters: Optional[Sequence[Mapping]] = None, *, include: Optional[str] = None,
          seed=0, cfg=None, dtype=None):
  """Merged params pytree of `models` (and `base`); see the module docstring.

  include: regex; paths it does not match are copied from base (or the first model).
  seed: int or jax key for DARE. cfg: ModelConfig, for HF names in parameter filters.
  dtype: output dtype (default: the inputs' dtype). Accumulation is fp32.
  """
  trees = ([base] if base is not None else []) + list(models)
  flats = [_flat(t) for t in trees]
  labels = (["base"] if base is not None else []) + [f"model {i}" for i in range(len(models))]
  check_inputs([{k: np.shape(v) for k, v in f.items()} for f in flats], labels,
               [{k: v.dtype for k, v in f.items()} for f in flats], dtype is not None)
  model_parameters = list(model_parameters or [{} for _ in models])
  warn_weights(method, model_parameters, dict(parameters or {}))
  hf_table = hf_names(cfg) if cfg is not None else None
  xflats, bflat = flats[-len(models):], flats[0] if base is not None else None
  out = {}
  for path, ref in flats[0].items():
    out_dtype = dtype or ref.dtype
    if include is not None and not re.search(include, path):
      out[path] = ref
      continue
    xs = [f[path] for f in xflats]
    b = None if bflat is None else bflat[path]
    layers = [None] if not path.startswith("layers/") else range(np.shape(ref)[0])

    def one(layer):
      sl = (lambda a: a) if layer is None else (lambda a: a[layer])
      names, p, key = tensor_parameters(method, parameters, model_parameters, len(models),
                                        path, layer, len(layers), hf_table, seed)
      return cast(merge_tensor(method, [sl(x) for x in xs], None if b is None else sl(b), p,
                               key, name=names[-1]), out_dtype)

    parts = [one(layer) for layer in layers]
    out[path] = parts[0] if layers == [None] else _xp(*parts).stack(parts)
  leaves = [out[p] for p in flats[0]]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(trees[0]), leaves)
