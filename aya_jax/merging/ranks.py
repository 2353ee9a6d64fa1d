"""Which elements of a tensor a magnitude rank keeps, as mergekit 0.1.5 decides it.

mergekit keeps `torch.argsort(|d|.reshape(-1), descending=True)[:k]` (TIES) and
`torch.sort(|d|.reshape(-1)).indices[lo:hi]` (breadcrumbs), without `stable=True`. On CPU,
torch 2.13 sorts a float row with libstdc++'s `std::sort` (introsort: median-of-3 Hoare
partitions down to segments of 16, a heapsort below depth 2 floor(log2 n), then one
insertion sort), comparing values only: equal values (frequent for bf16 deltas) come out
in an order that is neither the first nor the last by position, but a deterministic
function of the whole tensor. So the elements strictly before the value at the cut are
kept and the ones strictly after it dropped (found by selection, no sort); when the cut
falls inside a run of equal values, those are resolved by replaying introsort's
partitions on the segment that holds the cut (vectorised, a few passes of the tensor).
(torch on CUDA sorts otherwise; mergekit on CPU is the reference here.)

Positions are those of the flattened HF tensor (`layout` = (transform, per-layer shape)
from models/hf.py), which mergekit sees; without a layout, the C order of the array.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

_THRESHOLD = 16  # libstdc++ _S_threshold: introsort leaves segments this short unsorted


def kth(flat, r: int):
  """(v, below, equal): the r-th smallest (0-based) of a flat numpy array and how many
  elements are < v and == v. Selects within a band that a strided sample brackets (a few
  passes, no sort of the tensor); the whole array when the band misses."""
  n = flat.size
  if n > 1 << 16:
    sample = np.sort(flat[::n // (1 << 14)])
    m, q = sample.size, r / n
    pos, margin = q * m, 6 * math.sqrt(m * q * (1 - q)) + 2
    i0, i1 = int(pos - margin), int(pos + margin) + 1
    lo = sample[i0] if i0 >= 0 else -np.inf
    hi = sample[i1] if i1 < m else np.inf
    below = np.count_nonzero(flat < lo)
    band = flat[(flat >= lo) & (flat <= hi)]
    if 0 <= r - below < band.size:
      v = np.partition(band, r - below)[r - below]
      return v, below + np.count_nonzero(band < v), np.count_nonzero(band == v)
  v = np.partition(flat, r)[r]
  return v, np.count_nonzero(flat < v), np.count_nonzero(flat == v)


def _heap_order(vals, ids, desc):
  """std::make_heap then std::sort_heap of (vals, ids) as libstdc++ does them (introsort's
  fallback when its depth runs out); returns ids in the final order."""
  before = (lambda x, y: x > y) if desc else (lambda x, y: x < y)
  vals, ids = list(vals), list(ids)

  def push(hole, top, value):
    parent = (hole - 1) // 2
    while hole > top and before(vals[parent], value[0]):
      vals[hole], ids[hole] = vals[parent], ids[parent]
      hole, parent = parent, (parent - 1) // 2
    vals[hole], ids[hole] = value

  def adjust(hole, n, value):
    top = child = hole
    while child < (n - 1) // 2:
      child = 2 * (child + 1)
      if before(vals[child], vals[child - 1]):
        child -= 1
      vals[hole], ids[hole] = vals[child], ids[child]
      hole = child
    if n % 2 == 0 and child == (n - 2) // 2:
      child = 2 * (child + 1)
      vals[hole], ids[hole] = vals[child - 1], ids[child - 1]
      hole = child - 1
    push(hole, top, value)

  n = len(vals)
  for parent in range((n - 2) // 2, -1, -1):  # make_heap
    adjust(parent, n, (vals[parent], ids[parent]))
  for last in range(n - 1, 0, -1):  # sort_heap: pop_heap(first, last, last)
    value = (vals[last], ids[last])
    vals[last], ids[last] = vals[0], ids[0]
    adjust(0, last, value)
  return np.asarray(ids, np.int64)


def _median_to_first(seg, strictly):
  """libstdc++ __move_median_to_first(first, first + 1, mid, last - 1): where the pivot is."""
  a, b, c = 1, seg.size // 2, seg.size - 1
  before = lambda i, j: strictly(seg[i], seg[j])
  if before(a, b):
    return b if before(b, c) else c if before(a, c) else a
  return a if before(a, c) else c if before(b, c) else b


def _partition(seg, le, ge):
  """libstdc++ __unguarded_partition(first + 1, last, pivot = first), the pivot at seg[0]:
  (cut, left, right), where left[i] and right[i] swapped. The left scan stops at the i-th
  element not before the pivot, the right scan at the i-th not after it (counted from the
  right; the pivot itself is the last); they swap while left[i] < right[i]."""
  left = np.flatnonzero(le(seg, seg[0]))[1:]  # seg[0], the pivot, is not scanned
  right = np.flatnonzero(ge(seg, seg[0]))[::-1]
  lo, hi = 0, min(left.size, right.size)
  while lo < hi:  # the first i with left[i] >= right[i] (the scans cross once)
    mid = (lo + hi) // 2
    lo, hi = (mid + 1, hi) if left[mid] < right[mid] else (lo, mid)
  cut = min(left[lo] if lo < left.size else seg.size, right[lo - 1] if lo else seg.size)
  return int(cut), left[:lo], right[:lo]


def ties_before(flat, p: int, v, desc: bool) -> np.ndarray:
  """Indices into `flat` of the elements equal to v that std::sort(flat) (by value, `>` when
  desc else `<`) puts at positions < p. Replays introsort's partitions, but only of the
  segment holding position p; the ties' positions are followed through the swaps."""
  le, ge = (np.less_equal, np.greater_equal) if desc else (np.greater_equal, np.less_equal)
  strictly = np.greater if desc else np.less
  ids = np.flatnonzero(flat == v)  # the ties, by index into flat, and their positions
  pos, kept = ids.copy(), []
  seg, start, depth = flat.copy(), 0, 2 * (flat.size.bit_length() - 1)
  while seg.size > _THRESHOLD and ids.size:
    if depth == 0:  # heapsort of the segment: its final order
      rank = np.empty(seg.size, np.int64)
      rank[_heap_order(seg, np.arange(seg.size), desc)] = np.arange(seg.size)
      kept.append(ids[rank[pos] < p - start])
      return np.concatenate(kept)
    depth -= 1
    j = _median_to_first(seg, strictly)
    seg[0], seg[j] = seg[j], seg[0]
    pos = np.where(pos == 0, j, np.where(pos == j, 0, pos))
    cut, li, ri = _partition(seg, le, ge)
    if li.size:  # the ties among the swapped: li ascending, ri descending
      rr = ri[::-1]
      at_l = np.minimum(np.searchsorted(li, pos), li.size - 1)
      at_r = np.minimum(np.searchsorted(rr, pos), li.size - 1)
      pos = np.where(li[at_l] == pos, ri[at_l],
                     np.where(rr[at_r] == pos, li[li.size - 1 - at_r], pos))
    # continue in the part that holds position p (only it needs its swaps); the other part
    # is decided: before p or not
    if p - start == cut:
      kept.append(ids[pos < cut])
      break
    if p - start < cut:
      seg[li] = seg[ri]
      seg, inside = seg[:cut], pos < cut
    else:
      kept.append(ids[pos < cut])
      seg[ri] = seg[li]
      seg, start, inside = seg[cut:], start + cut, pos >= cut
      pos = pos - cut
    ids, pos = ids[inside], pos[inside]
  else:
    if ids.size:  # the final insertion sort is stable: ties keep their current order
      take = p - start - np.count_nonzero(strictly(seg, v))
      kept.append(ids[np.argsort(pos, kind="stable")][:max(0, take)])
  return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def _hf_order(layout):
  """(to, back): a's view in HF's layout, and its inverse (identity without a layout)."""
  if layout is None:
    return (lambda a: a), (lambda h: h)
  from aya_jax.models import hf
  transform, shape = layout
  return (lambda a: hf.to_hf(transform, a, shape)), (lambda h: hf.to_ours(transform, h, shape))


def _before(a, mem, p: int, desc: bool, layout):
  """Mask of the elements at positions < p of the sort (see the module docstring)."""
  n = a.size
  if p <= 0:
    return np.zeros(a.shape, bool)
  if p >= n:
    return np.ones(a.shape, bool)
  v, below, equal = kth(mem, n - p if desc else p - 1)  # the value at position p - 1
  strict = a > v if desc else a < v
  take = p - ((n - below - equal) if desc else below)
  if take == equal:
    return strict | (a == v)
  to_hf, back = _hf_order(layout)
  h = to_hf(a)
  flat = h.reshape(-1)  # a copy unless a is laid out as HF's tensor
  ties = np.zeros(n, bool)
  ties[ties_before(flat, p, v, desc)] = True
  return strict | back(ties.reshape(h.shape))


def keep_ranks(a, lo: int, hi: int, descending: bool = False,
               layout: Optional[tuple] = None) -> np.ndarray:
  """Mask of the elements of a (numpy, no NaN) at positions [lo, hi) of mergekit's sort:
  `torch.sort(a.reshape(-1), descending)` on CPU, a in HF's layout when `layout` is
  given (see the module docstring). Any memory order; the result has a's shape."""
  a = np.asarray(a)
  n = a.size
  lo, hi = max(lo, 0), min(hi, n)
  if lo >= hi:
    return np.zeros(a.shape, bool)
  mem = np.ravel(a, order="K")  # memory order, a view when a is contiguous in some order
  keep = _before(a, mem, hi, descending, layout)
  if lo > 0:
    keep &= ~_before(a, mem, lo, descending, layout)
  return keep
