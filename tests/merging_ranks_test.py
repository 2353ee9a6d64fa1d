"""mergekit's magnitude ranks (merge_ranks.py) against torch's sort, which mergekit calls:
on bf16-like values with many ties, in any memory order and in HF's layout, and down
introsort's heapsort fallback."""

import ml_dtypes
import numpy as np
import pytest
import torch

from aya_jax.merging import ranks as merge_ranks

A = np.float32


def _torch_keeps(a, lo, hi, descending):
  """What mergekit keeps: torch.argsort (not stable) of the flat C-order |d|, positions [lo, hi)."""
  idx = torch.argsort(torch.from_numpy(np.ascontiguousarray(a).reshape(-1)),
                      descending=descending).numpy()
  keep = np.zeros(a.size, bool)
  keep[idx[lo:hi]] = True
  return keep.reshape(a.shape)


@pytest.mark.parametrize("lo, hi, descending", [
    (0, 120_000, True), (0, 1, True), (0, 399_990, True),  # TIES: argsort(desc)[:k]
    (250_000, 390_000, False), (3, 123_457, False)])  # breadcrumbs: sort(asc)[lo:hi]
def test_rank_selection_equals_torch_sort(lo, hi, descending):
  # mergekit sorts |d| with torch (libstdc++ introsort on CPU: not stable); bf16 deltas tie
  # often, and which of the equal values at the cut are kept is that sort's order, neither
  # the first nor the last by position. Ours: selection, then introsort replayed at the cut.
  rng = np.random.default_rng(0)
  a = np.abs(rng.normal(size=(800, 500)).astype(ml_dtypes.bfloat16).astype(A))
  want = _torch_keeps(a, lo, hi, descending)
  assert want.sum() == hi - lo
  for view in (a, np.asfortranarray(a), np.ascontiguousarray(a.T).T):
    np.testing.assert_array_equal(merge_ranks.keep_ranks(view, lo, hi, descending), want)
  # HF layout: a 'lin' tensor (HF [out, in]) is ours transposed; ties follow HF's flat order,
  # whether ours is a copy (params/) or a view of the HF tensor (read in place)
  layout = ("lin", (500, 800))
  ours = a.T.reshape(500, 800)
  for view in (ours, np.ascontiguousarray(ours)):
    np.testing.assert_array_equal(merge_ranks.keep_ranks(view, lo, hi, descending, layout),
                                  want.T)
  # where many equal values straddle a cut, keeping the first (a stable sort) or the last of
  # them by position is not what mergekit keeps
  key = (-a if descending else a).reshape(-1)
  cut = np.sort(key)[hi - 1]
  if np.count_nonzero(key == cut) > 50 and hi < a.size:
    for tiebreak in (np.arange(a.size), -np.arange(a.size)):
      stable = np.zeros(a.size, bool)
      stable[np.lexsort((tiebreak, key))[lo:hi]] = True
      assert (stable != want.reshape(-1)).sum() > 10


def test_rank_selection_heapsort_fallback(monkeypatch):
  # an input that drives introsort's median-of-3 partitions to its depth limit (McIlroy's
  # adversary, run against the same algorithm), so the segment at the cut is heap-sorted;
  # halving the values makes ties there too. Reference: torch.sort, as mergekit calls it.
  heaps = []
  heap_order = merge_ranks._heap_order
  monkeypatch.setattr(merge_ranks, "_heap_order",
                      lambda v, i, desc: heaps.append(len(v)) or heap_order(v, i, desc))
  a = _introsort_killer(600)
  top = int(np.count_nonzero(a == a.max()))  # equal values, which the heapsort orders
  assert top > 100, top
  for lo, hi in [(0, 600 - top // 2), (600 - top + 7, 600 - 5), (0, 300)]:
    for desc, x, p, q in [(False, a, lo, hi), (True, -a, 600 - hi, 600 - lo)]:  # -a, desc:
      np.testing.assert_array_equal(  # the same comparisons, the mirrored positions
          merge_ranks.keep_ranks(x, p, q, desc), _torch_keeps(x, p, q, desc))
  assert heaps and min(heaps) > 100, heaps  # the heapsort ran, on a long segment


def _introsort_killer(n):
  """McIlroy's "killer adversary for quicksort" against libstdc++'s std::sort (ascending):
  values are frozen lazily as the sort compares them, so every pivot is nearly the
  smallest, until the depth limit hands the rest to the heapsort. Values still unfrozen then
  were only compared with frozen ones: they stay equal (n), the largest. float32.""" 
  gas, val, state = n, [n] * n, {"solid": 0, "candidate": 0}

  def less(x, y):
    if val[x] == gas and val[y] == gas:
      z = x if x == state["candidate"] else y
      val[z], state["solid"] = state["solid"], state["solid"] + 1
    if val[x] == gas:
      state["candidate"] = x
    elif val[y] == gas:
      state["candidate"] = y
    return val[x] < val[y]

  items = list(range(n))

  def partition(first, last):  # __unguarded_partition_pivot
    mid, a, c = first + (last - first) // 2, first + 1, last - 1
    if less(items[a], items[mid]):
      j = mid if less(items[mid], items[c]) else c if less(items[a], items[c]) else a
    else:
      j = a if less(items[a], items[c]) else c if less(items[mid], items[c]) else mid
    items[first], items[j] = items[j], items[first]
    lo, hi = first + 1, last
    while True:
      while less(items[lo], items[first]):
        lo += 1
      hi -= 1
      while less(items[first], items[hi]):
        hi -= 1
      if lo >= hi:
        return lo
      items[lo], items[hi] = items[hi], items[lo]
      lo += 1

  def loop(first, last, depth):
    while last - first > 16:
      if depth == 0:
        return
      depth -= 1
      cut = partition(first, last)
      loop(cut, last, depth)
      last = cut

  loop(0, n, 2 * (n.bit_length() - 1))
  return np.asarray(val, A)  # what is still gas (= n) is larger than every frozen value
