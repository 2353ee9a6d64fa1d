"""Merge methods: the method table (`METHODS`) and the kernels that merge one tensor
(`merge_tensor`; a whole pytree: merging/pytree.py; over checkpoints: merging/stream.py;
parameters by tensor name and depth: merging/parameters.py).

Methods (mergekit 0.1.5 names and semantics; accumulation in fp32, fp64 for fp64 inputs):
  linear            sum_i w_i x_i / sum_i w_i (normalize=True, the default) or sum_i w_i x_i
  task_arithmetic   b + lambda * sum_i w_i d_i (/ sum_i w_i if normalize), d_i = x_i - b
  ties              d_i -> top-density-fraction by |d_i| (exactly k = max(1, int(density n))
                    kept; among equal |d| at the cut, those mergekit's torch sort puts
                    first: merge_ranks.py); e_i = w_i d_i;
                    sign s = sign(sum_i e_i) (>= 0 -> +1: a tie votes +);
                    b + lambda * sum_i [sign e_i = s] e_i / sum_i [sign e_i = s] w_i
                    (mergekit: weights are applied BEFORE the vote, and pruned or zero
                    entries never count in the divisor; normalize defaults to True)
  dare_linear       d_i -> m_i * d_i, m_i ~ Bernoulli(density) (jax's RNG: other masks
                    than mergekit's torch.bernoulli, the same statistics), rescaled by
                    |d_i|_1 / |m_i * d_i|_1 so the tensor's L1 norm is kept (rescale=True,
                    the default, as mergekit: not 1/density; no rescale when either norm
                    is < 1e-7) or by 1/density (rescale='inverse', the DARE paper);
                    then task_arithmetic
  dare_ties         the same drop, then the TIES vote
  breadcrumbs       d_i keeps the elements whose |d| rank (ascending, ties as mergekit) is in
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
mergekit merges `model.layers.{i}.*` tensors. Sums follow the C order of our layout; ties
of ranks, the flat order of the HF tensor (with a ModelConfig; else our C order), whatever
the memory layout (a HF tensor read in place or a params/ copy give the same numbers).

numpy inputs are merged in two passes: per-tensor statistics (the k-th largest |d| by
selection on a sample-narrowed band, not a sort: merge_ranks.py; jax inputs' ranks too),
then the elementwise combination in cache-sized blocks, in the inputs' memory order, on
threads; jax inputs in one jnp pass.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from aya_jax.merging.ranks import keep_ranks

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

_CHUNK = 1 << 16  # elements of one block of the elementwise pass (fits in L2 with its temps)
THREADS = max(1, min(4, os.cpu_count() or 1))  # blocks of one tensor run on this many threads
_POOLS = {}  # process id -> thread pool (a forked child makes its own)


def _pool():
  return _POOLS.get(os.getpid()) or _POOLS.setdefault(os.getpid(), ThreadPoolExecutor(THREADS))


def array_module(*arrays):
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _np_upcast(a, acc, order="K"):
  """A new array: a in acc (bf16 -> fp32 exactly by a shift: ~10x ml_dtypes' astype)."""
  if a.dtype == ml_dtypes.bfloat16 and acc == np.float32:
    u = a.view(np.uint16).astype(np.uint32, order=order)
    u <<= 16
    return u.view(np.float32)
  return a.astype(acc, order=order)


def cast(x, dtype, out=None):
  """x in dtype, in x's memory order (or written into `out`); numpy fp32 -> bf16 rounds to
  nearest even with integer ops (~10x ml_dtypes' astype); no copy when x already is dtype."""
  dtype = np.dtype(dtype)
  if x.dtype == dtype or not isinstance(x, np.ndarray) or x.dtype != np.float32 or (
      dtype != ml_dtypes.bfloat16 or x.size and np.isnan(x.max())):  # max: NaN propagates
    if out is None:
      return x if x.dtype == dtype else x.astype(dtype)
    np.copyto(out, x, casting="unsafe")
    return out
  u = x.view(np.uint32)
  r = u >> 16
  r &= 1
  r += 0x7FFF
  r += u
  r >>= 16
  if out is None:
    return r.astype(np.uint16).view(dtype)
  np.copyto(out.view(np.uint16), r, casting="unsafe")
  return out


# ---------------------------------------------------------------------------
# Elementwise passes: whole jnp arrays, or numpy blocks in memory order
# ---------------------------------------------------------------------------
def _layout(a):
  """The axis order in which `a` is C-contiguous (a transposed HF tensor: reversed), or
  None when it is not contiguous in any."""
  perm = tuple(sorted(range(a.ndim), key=lambda i: -a.strides[i] if a.shape[i] > 1 else 0))
  return perm if a.transpose(perm).flags.c_contiguous else None


def elementwise(fn, floats: Sequence, masks: Sequence = (), acc=np.float32, dtype=None,
                threads: bool = True):
  """fn(*floats upcast to acc, *masks) -> floats[0]'s shape, in `dtype` (default acc); fn
  must be elementwise. numpy: over blocks in the inputs' common memory order (C order when
  they share none), on threads; the result has that order. jax: one call on whole arrays."""
  dtype = np.dtype(dtype or acc)
  if array_module(*floats) is jnp:
    return fn(*[jnp.asarray(a).astype(acc) for a in floats], *masks).astype(dtype)
  floats = [np.asarray(a) for a in floats]
  shape, perms = floats[0].shape, {_layout(a) for a in floats}
  perm = perms.pop() if len(perms) == 1 and None not in perms else tuple(range(len(shape)))
  flat = lambda a: np.ascontiguousarray(np.asarray(a).transpose(perm)).reshape(-1)
  floats, masks = [flat(a) for a in floats], [None if m is None else flat(m) for m in masks]
  out = np.empty(floats[0].size, dtype)

  def run(lo, hi):
    for s in range(lo, hi, _CHUNK):
      e = min(hi, s + _CHUNK)
      value = fn(*[_np_upcast(a[s:e], acc) for a in floats],
                 *[None if m is None else m[s:e] for m in masks])
      cast(value, dtype, out[s:e])

  n = out.size
  parts = THREADS if threads and n >= 4 * THREADS * _CHUNK else 1
  bounds = [n * i // parts // _CHUNK * _CHUNK for i in range(parts)] + [n]
  if parts == 1:
    run(0, n)
  else:
    list(_pool().map(run, bounds[:-1], bounds[1:]))
  return out.reshape([shape[i] for i in perm]).transpose(np.argsort(perm))


# ---------------------------------------------------------------------------
# Per-tensor statistics
# ---------------------------------------------------------------------------
def _select(xp, m, d):
  """where(m, d, 0) of a float array d; numpy: with integer ops (no branch per element)."""
  if xp is jnp:
    return jnp.where(m, d, 0.0)
  bits = m.astype(np.uint32 if d.dtype == np.float32 else np.uint64)
  np.negative(bits, out=bits)
  bits &= d.view(bits.dtype)
  return bits.view(d.dtype)


@functools.partial(jax.jit, static_argnums=2)
def _bernoulli(key, density, shape):
  return jax.random.bernoulli(key, density, shape)


def _sparsify(xp, kind, x, b, density, gamma, rescale, key, acc, threads=True, layout=None):
  """(keep mask or None, scale or None) of the delta x - b: kept entries are
  where(keep, d, 0), then divided by scale (rescale='inverse') or multiplied by it (L1).
  Ranks by |d| are mergekit's (`merge_ranks`; positions in HF's layout when given)."""
  if kind is None or density >= 1.0:
    return None, None
  if kind == "random":
    if key is None:
      raise ValueError("random sparsification (DARE) needs a key or seed")
    keep = _bernoulli(key, density, tuple(np.shape(x)))
    keep = np.asarray(keep) if xp is np else keep
    if rescale == "inverse":
      return keep, density if density > 0 else None
    if not rescale:
      return keep, None
    d = elementwise(lambda x, b: x - b, [x, b], acc=acc, threads=threads)
    d = np.ascontiguousarray(d) if xp is np else d  # sums in C order, whatever the layout
    before, after = xp.abs(d).sum(), xp.abs(xp.where(keep, d, 0.0)).sum()
    ok = (before >= 1e-7) & (after >= 1e-7)
    return keep, xp.where(ok, before / xp.where(ok, after, 1.0), 1.0).astype(acc)
  a = np.asarray(elementwise(lambda x, b: abs(x - b), [x, b], acc=acc, threads=threads))
  n = a.size
  if kind == "magnitude":  # mergekit: argsort(|d|, descending)[:k]
    keep = (np.zeros(a.shape, bool) if density <= 0 else
            keep_ranks(a, 0, max(1, int(density * n)), descending=True, layout=layout))
  else:  # outliers (breadcrumbs), mergekit: sort(|d|).indices[lo:lo + target]
    target, top = int(density * n), int(gamma * n)
    lo = max(0, n - target - top)
    keep = keep_ranks(a, lo, lo + target, layout=layout)
  return (keep if xp is np else jnp.asarray(keep)), None


def _gta(xp, p, vote, inverse, b, xs, keeps, scales):
  """Generalized task arithmetic of one block: kept, scaled, weighted deltas, the TIES vote
  or a sum, normalisation, b + lambda * mixed (mergekit's operation order, fp32)."""
  w, deltas = p["weight"], []
  for x, keep, s, wi in zip(xs, keeps, scales, w):
    d = x - b
    if keep is not None:
      d = _select(xp, keep, d)
    if s is not None:
      d = d / s if inverse else d * s
    deltas.append(wi * d)
  if vote:
    positive = sum(deltas) >= 0  # sign(e_i) == the elected sign, without where's branches:
    masks = [(d > 0) & positive | (d < 0) & ~positive for d in deltas]
    mixed = sum(_select(xp, m, d) for d, m in zip(deltas, masks))
    divisor = sum(m * xp.asarray(wi, b.dtype) for wi, m in zip(w, masks))
    divisor = divisor + (divisor == 0)  # 0 -> 1, exactly
  else:
    mixed = sum(deltas[1:], deltas[0])
    divisor = sum(w) if abs(sum(w)) >= 1e-8 else 1.0
  if p["normalize"]:
    mixed = mixed / divisor
  return b + p["lambda"] * mixed


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


def _wsum(xp, ws, xs):
  """sum_i w_i x_i (the builtin sum's operation order); numpy: in place, over xs."""
  if xp is not np:
    return sum(w * x for w, x in zip(ws, xs))
  out = xs[0]
  out *= ws[0]
  for w, x in zip(ws[1:], xs[1:]):
    x *= w
    out += x
  return out


def merge_tensor(method: str, xs: Sequence, base=None, p: Optional[dict] = None, key=None,
                 name: str = "tensor", dtype=None, layout: Optional[tuple] = None):
  """One merged tensor from inputs xs (and base), with resolved parameters p
  (`parameters.resolve_parameters`); key: a jax PRNG key for DARE (already derived for this
  tensor); layout: (transform, shape) of the HF tensor (`parameters.hf_layouts`), whose
  flat order breaks ties of |d| ranks as mergekit does (default: C order of xs[0]'s shape).
  Computes in fp32 (fp64 for fp64 inputs); returns `dtype` (default: that)."""
  needs_base, sparsify, vote, _, _ = METHODS[method]
  if needs_base and base is None:
    raise ValueError(f"{method} needs a base model (tensor {name})")
  xp = array_module(base, *xs)
  acc = np.float64 if np.dtype(xs[0].dtype) == np.float64 else np.float32
  if method == "linear":
    w = p["weight"]
    if p["normalize"] and abs(sum(w)) < 1e-8:
      raise ValueError(f"linear weights {w} sum to 0 for tensor {name}; cannot normalize")
    norm = sum(w) if p["normalize"] else None

    def linear(*xs):
      out = _wsum(xp, w, xs)
      return out if norm is None else out / norm if xp is jnp else np.divide(out, norm, out=out)

    return elementwise(linear, xs, acc=acc, dtype=dtype)
  if method in ("slerp", "model_stock"):
    up = ((lambda a: _np_upcast(np.asarray(a), acc, "C")) if xp is np else
          (lambda a: jnp.asarray(a).astype(acc)))
    if method == "slerp":
      if len(xs) != 1:
        raise ValueError(f"slerp merges a base and one other model; got {len(xs)} others")
      out = _slerp(xp, up(base), up(xs[0]), float(p["t"]))
    else:
      if len(xs) < 2:
        raise ValueError(f"model_stock needs a base and 2 or more other models; got {len(xs)}")
      out = _model_stock(xp, [up(x) for x in xs], up(base))
    return cast(out, dtype or acc)
  density, gamma = p.get("density", [1.0] * len(xs)), p.get("gamma", [0.0] * len(xs))

  def stat(i, threads=True):  # numpy: the models' statistics on threads, one each
    return _sparsify(xp, sparsify, xs[i], base, density[i], gamma[i], p["rescale"],
                     None if key is None else jax.random.fold_in(key, i), acc, threads, layout)

  parallel = xp is np and len(xs) > 1 and np.size(base) >= _CHUNK and sparsify is not None
  stats = (list(_pool().map(stat, range(len(xs)), [False] * len(xs))) if parallel else
           [stat(i) for i in range(len(xs))])
  (keeps, scales), n, inverse = zip(*stats), len(xs), p["rescale"] == "inverse"
  return elementwise(lambda b, *rest: _gta(xp, p, vote, inverse, b, rest[:n], rest[n:], scales),
                     [base, *xs], keeps, acc=acc, dtype=dtype)
