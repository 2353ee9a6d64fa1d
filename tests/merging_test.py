"""Merging: every method against hand-computed values (formula named in each test), mergekit
0.1.5 parity on tiny HF Llama checkpoints (fp32; bf16 bit for bit; DARE's statistics),
streaming == in memory, bounded memory, a failed merge keeps the previous one, YAML errors,
search. (Ranks against torch's sort: merge_ranks_test.py.)"""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

from aya_jax import checkpoint
from aya_jax.merging import methods as merging
from aya_jax.merging import search as merge_search
from aya_jax.merging import spec as merge_spec
from aya_jax.merging import stream as merge_stream
from aya_jax.models import hf

from conftest import hf_tiny_model

A = np.float32


def _m(method, xs, base=None, params=None, mp=None, **kw):
  return merging.merge(method, xs, base=base, parameters=params, model_parameters=mp, **kw)


# ---------------------------------------------------------------------------
# hand-computed values
# ---------------------------------------------------------------------------
def test_linear_normalised_and_not():
  x, y = {"w": A([1.0, 2.0])}, {"w": A([3.0, -2.0])}
  # sum w_i x_i / sum w_i = (1*[1,2] + 3*[3,-2]) / 4
  out = _m("linear", [x, y], mp=[{"weight": 1.0}, {"weight": 3.0}])
  np.testing.assert_allclose(out["w"], [2.5, -1.0], rtol=1e-7)
  out = _m("linear", [x, y], params={"normalize": False}, mp=[{"weight": 1.0}, {"weight": 3.0}])
  np.testing.assert_allclose(out["w"], [10.0, -4.0], rtol=1e-7)


def test_layer_gradient_and_filters():
  # 3 stacked layers: weight [0, 1] gives t = i/(L-1) = 0, .5, 1; non-layer tensors t = 0
  x = {"layers": {"a": np.zeros((3, 2), A), "b": np.zeros((3, 2), A)}, "e": np.zeros(2, A)}
  y = jax.tree.map(lambda v: v + 1, x)
  params = {"normalize": False}
  mp = [{"weight": 0.0}, {"weight": [{"filter": "layers/a", "value": [0.0, 1.0]},
                                     {"value": 0.25}]}]
  out = _m("linear", [x, y], params=params, mp=mp)
  np.testing.assert_allclose(out["layers"]["a"][:, 0], [0.0, 0.5, 1.0])
  np.testing.assert_allclose(out["layers"]["b"][:, 0], [0.25] * 3)
  np.testing.assert_allclose(out["e"], [0.25, 0.25])


def test_include_merges_a_subset():
  x = {"vision": {"w": A([1.0])}, "lm": {"w": A([1.0])}}
  y = {"vision": {"w": A([3.0])}, "lm": {"w": A([3.0])}}
  out = _m("linear", [x, y], mp=[{"weight": 1.0}] * 2, include=r"^lm/")
  assert out["lm"]["w"][0] == 2.0 and out["vision"]["w"][0] == 1.0  # copied from the first


def test_task_arithmetic():
  b, x, y = {"w": A([1.0, 1.0])}, {"w": A([2.0, 0.0])}, {"w": A([1.0, 3.0])}
  # b + lambda * sum w_i (x_i - b) = [1,1] + 0.5 * (2*[1,-1] + 1*[0,2])
  out = _m("task_arithmetic", [x, y], b, params={"lambda": 0.5},
           mp=[{"weight": 2.0}, {"weight": 1.0}])
  np.testing.assert_allclose(out["w"], [2.0, 1.0])


def test_ties_sign_election_with_ties_and_weights_before_vote():
  b = {"w": np.zeros(4, A)}
  x = {"w": A([1.0, -1.0, 2.0, 0.5])}
  y = {"w": A([-1.0, -1.0, -1.0, 0.5])}
  # density 1: no trimming. e_i = w_i d_i with w = (1, 1): sums [0, -2, 1, 1];
  # sign(0) elects + (a tie votes +), so element 0 keeps only x's +1.
  # out = sum [sign e_i = s] e_i / sum [sign e_i = s] w_i
  out = _m("ties", [x, y], b, mp=[{"weight": 1.0}, {"weight": 1.0}])
  np.testing.assert_allclose(out["w"], [1.0, -1.0, 2.0, 0.5])
  # weights before the vote (mergekit): w = (1, 3) turns element 2 to y's sign:
  # e = [1,-3], [-1,-3], [2,-3], [.5,1.5] -> s = [-,-,-,+]; element 0 -> -3/3 = -1
  out = _m("ties", [x, y], b, mp=[{"weight": 1.0}, {"weight": 3.0}])
  np.testing.assert_allclose(out["w"], [-1.0, -1.0, -1.0, 0.5])


def test_ties_trims_by_magnitude():
  b = {"w": np.zeros(5, A)}
  x = {"w": A([5.0, -4.0, 0.1, 0.2, 3.0])}
  # density 0.4: keep k = int(0.4*5) = 2 largest |d|: 5, -4; normalize by the kept weight
  out = _m("ties", [x], b, mp=[{"weight": 0.5, "density": 0.4}])
  np.testing.assert_allclose(out["w"], [5.0, -4.0, 0.0, 0.0, 0.0])
  # equal |d| at the threshold: mergekit keeps torch.argsort(|d|, descending)[:3]; for 16
  # or fewer elements that sort (libstdc++'s) is an insertion sort, which is stable: the
  # first three of the 2s
  out = _m("ties", [{"w": A([1.0, -2.0, 2.0, 2.0, -2.0])}], b,
           mp=[{"weight": 1.0, "density": 0.6}])
  np.testing.assert_array_equal(out["w"], [0.0, -2.0, 2.0, 2.0, 0.0])


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "breadcrumbs_ties"])
def test_numpy_blocks_equal_jax_and_any_layout(method):
  # numpy: blocks on threads in the inputs' memory order; jax: one pass of whole arrays.
  # Same operations in the same order; XLA on CPU divides by multiplying with the
  # reciprocal, so normalised results may differ by 1 bf16 ulp. Transposed: the same bits.
  rng = np.random.default_rng(1)
  mk = lambda: rng.normal(size=(300, 700)).astype(ml_dtypes.bfloat16)
  b, xs = mk(), [mk() for _ in range(3)]
  known = merge_spec.METHODS[method][4]
  mp = [{k: v for k, v in dict(weight=w, density=0.4, gamma=0.01).items() if k in known}
        for w in (0.5, 0.3, -0.2)]
  p = merge_spec.resolve_parameters(method, None, mp, 3, ("x",), 0)
  key = merge_spec.tensor_key(3, "x")
  got = merging.merge_tensor(method, xs, b, p, key, dtype=ml_dtypes.bfloat16)
  ref = merging.merge_tensor(method, [jax.numpy.asarray(x) for x in xs], jax.numpy.asarray(b),
                             p, key, dtype=ml_dtypes.bfloat16)
  ulps = np.abs(got.view(np.uint16).astype(int) - np.asarray(ref).view(np.uint16))
  assert ulps.max() <= 1 and ulps.mean() < 0.01, (ulps.max(), ulps.mean())
  t = merging.merge_tensor(method, [np.ascontiguousarray(x.T).T for x in xs],
                           np.ascontiguousarray(b.T).T, p, key, dtype=ml_dtypes.bfloat16)
  assert t.flags.f_contiguous  # the inputs' memory order
  np.testing.assert_array_equal(t.view(np.uint16), got.view(np.uint16))


def test_select_is_where():
  d = A([1.5, -2.0, np.nan, -0.0, np.inf, 3.0])
  m = np.array([True, False, True, True, False, False])
  np.testing.assert_array_equal(merging._select(np, m, d).view(np.uint32),
                                np.where(m, d, A(0)).view(np.uint32))


def test_dare_density_one_is_task_arithmetic_and_rescales():
  rng = np.random.default_rng(0)
  b, x, y = ({"w": rng.normal(size=(64,)).astype(A)} for _ in range(3))
  mp = [{"weight": 0.7, "density": 1.0}, {"weight": 0.4, "density": 1.0}]
  ta = _m("task_arithmetic", [x, y], b, mp=mp)
  np.testing.assert_allclose(_m("dare_linear", [x, y], b, mp=mp)["w"], ta["w"], atol=1e-6)
  # density 0.5, one model, weight 1: kept deltas scaled so that |d|_1 is preserved (L1)
  d = x["w"] - b["w"]
  for rescale, check in [(True, lambda kept: np.abs(kept).sum() / np.abs(d).sum()),
                         ("inverse", None)]:
    out = _m("dare_linear", [x], b, params={"rescale": rescale},
             mp=[{"weight": 1.0, "density": 0.5}], seed=3)
    kept = out["w"] - b["w"]
    on = np.abs(kept) > 1e-6
    assert 10 < on.sum() < 54
    scale = kept[on] / d[on]
    np.testing.assert_allclose(scale, scale[0], rtol=1e-4)  # one factor per tensor
    if check:
      np.testing.assert_allclose(check(kept), 1.0, rtol=1e-5)
    else:
      np.testing.assert_allclose(scale[0], 2.0, rtol=1e-5)  # 1 / density


def test_dare_masks_do_not_depend_on_order_or_other_tensors():
  rng = np.random.default_rng(1)
  make = lambda: {"layers": {"a": rng.normal(size=(3, 40)).astype(A)},
                  "e": rng.normal(size=(50,)).astype(A)}
  b, x, y = make(), make(), make()
  mp = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}]
  full = _m("dare_ties", [x, y], b, mp=mp, seed=7)
  # another insertion order, and merging one path alone, give the same tensors
  rev = lambda t: {"e": t["e"], "layers": t["layers"]}
  again = _m("dare_ties", [rev(x), rev(y)], rev(b), mp=mp, seed=7)
  only_e = _m("dare_ties", [x, y], b, mp=mp, seed=7, include="^e$")
  np.testing.assert_array_equal(full["e"], again["e"])
  np.testing.assert_array_equal(full["layers"]["a"], again["layers"]["a"])
  np.testing.assert_array_equal(full["e"], only_e["e"])
  assert not np.array_equal(full["e"], _m("dare_ties", [x, y], b, mp=mp, seed=8)["e"])


def test_slerp_endpoints_midpoint_and_parallel_fallback():
  e1, e2 = {"w": A([1.0, 0.0])}, {"w": A([0.0, 1.0])}
  for t, want in [(0.0, [1, 0]), (1.0, [0, 1]), (0.5, [0.5 ** 0.5, 0.5 ** 0.5])]:
    # sin((1-t) theta)/sin theta x0 + sin(t theta)/sin theta x1, theta = pi/2
    np.testing.assert_allclose(_m("slerp", [e2], e1, params={"t": t})["w"], want, atol=1e-6)
  # parallel vectors (cos > 0.9995): linear interpolation (1-t) x0 + t x1
  out = _m("slerp", [{"w": A([2.0, 4.0])}], {"w": A([1.0, 2.0])}, params={"t": 0.25})
  np.testing.assert_allclose(out["w"], [1.25, 2.5], rtol=1e-6)
  out = _m("slerp", [{"w": A([-1.0, -2.0])}], {"w": A([1.0, 2.0])}, params={"t": 0.5})
  np.testing.assert_allclose(out["w"], [0.0, 0.0], atol=1e-7)  # antiparallel: lerp too


def test_breadcrumbs_drops_smallest_and_largest():
  b = {"w": np.zeros(10, A)}
  x = {"w": np.arange(1, 11, dtype=A)}
  # n=10, density .5, gamma .1: keep |d| ranks [10-5-1, 10-1) = [4, 9): values 5..9
  out = _m("breadcrumbs", [x], b, mp=[{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
  np.testing.assert_allclose(out["w"], [0, 0, 0, 0, 5, 6, 7, 8, 9, 0])


def test_model_stock():
  b = {"w": A([1.0, 1.0])}
  # orthogonal offsets: cos = 0 -> t = 0 -> the base
  out = _m("model_stock", [{"w": A([2.0, 1.0])}, {"w": A([1.0, 2.0])}], b)
  np.testing.assert_allclose(out["w"], [1.0, 1.0])
  # offsets at 60 degrees: cos = .5, N = 2 -> t = 2*.5/(1+.5) = 2/3; t*mean + (1-t)*b
  x, y = {"w": A([2.0, 1.0])}, {"w": A([1.5, 1.0 + 0.75 ** 0.5])}
  out = _m("model_stock", [x, y], b)
  mean = (x["w"] + y["w"]) / 2
  np.testing.assert_allclose(out["w"], 2 / 3 * mean + 1 / 3 * b["w"], rtol=1e-6)


def test_errors_name_the_tensor_path():
  x = {"layers": {"a": np.zeros((2, 3), A)}, "e": np.zeros(4, A)}
  with pytest.raises(ValueError, match="layers/a has shape"):
    _m("linear", [x, {"layers": {"a": np.zeros((2, 4), A)}, "e": np.zeros(4, A)}],
       mp=[{"weight": 1.0}] * 2)
  with pytest.raises(ValueError, match="missing.*'e'"):
    _m("linear", [x, {"layers": {"a": np.zeros((2, 3), A)}}], mp=[{"weight": 1.0}] * 2)
  with pytest.raises(ValueError, match="vocab size differs: params embedder/embedding"):
    _m("linear", [{"embedder": {"embedding": np.zeros((5, 2), A)}},
                  {"embedder": {"embedding": np.zeros((6, 2), A)}}], mp=[{"weight": 1.0}] * 2)
  with pytest.raises(ValueError, match="params e is float16"):
    _m("linear", [x, {"layers": x["layers"], "e": np.zeros(4, np.float16)}],
       mp=[{"weight": 1.0}] * 2)
  with pytest.raises(ValueError, match="sum to 0 for tensor e;"):
    _m("linear", [x, x], mp=[{"weight": 1.0}, {"weight": -1.0}])
  with pytest.raises(ValueError, match="needs parameter 'weight' for model 1"):
    _m("linear", [x, x], mp=[{"weight": 1.0}, {}])
  with pytest.raises(ValueError, match="density 1.5 is outside"):
    _m("ties", [x], x, mp=[{"weight": 1.0, "density": 1.5}])
  with pytest.warns(UserWarning, match="negative weights"):
    _m("task_arithmetic", [x, x], x, mp=[{"weight": 1.0}, {"weight": -0.5}])


# ---------------------------------------------------------------------------
# checkpoints on disk: tiny HF Llama models
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("merge_llama")
  dirs = []
  for seed in range(3):
    dirs.append(str(root / f"m{seed}"))
    hf_tiny_model("llama", seed + 10).save_pretrained(dirs[-1])
  return dirs


def _load(path):
  return merging._flat(checkpoint.load_model(path)[1])


MERGEKIT_CASES = {
    "linear": ("", [dict(weight=0.3), dict(weight=[0.7, 0.2])], {}),
    "task_arithmetic": ("base", [dict(weight=0.3), dict(weight=-0.2)], {"lambda": 0.9}),
    "ties": ("base", [dict(weight=0.6, density=0.5), dict(weight=0.5, density=[0.3, 0.9])], {}),
    "dare_ties": ("base", [dict(weight=0.6, density=1.0), dict(weight=0.5, density=1.0)], {}),
    "dare_linear": ("base", [dict(weight=0.6, density=1.0), dict(weight=0.5, density=1.0)], {}),
    "breadcrumbs": ("base", [dict(weight=0.6, density=0.7, gamma=0.05),
                             dict(weight=0.5, density=0.8, gamma=0.02)], {}),
    "slerp": ("base", [{}], {"t": [{"filter": "self_attn", "value": [0.1, 0.9]},
                                   {"value": 0.4}]}),
    "model_stock": ("base", [{}, {}], {}),
}


def _mergekit_and_ours(d, tmp_path):
  """The merge `d` (a mergekit config dict) by mergekit 0.1.5 and by merge_stream (from the
  same YAML); both outputs loaded as flat params."""
  import yaml
  from mergekit.config import MergeConfiguration
  from mergekit.merge import MergeOptions, run_merge
  run_merge(MergeConfiguration.model_validate(d), str(tmp_path / "mk"),
            MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
  merge_stream.merge_from_spec(merge_spec.spec_from_yaml(yaml.safe_dump(d)),
                               str(tmp_path / "ours"))
  ref, ours = _load(str(tmp_path / "mk")), _load(str(tmp_path / "ours"))
  assert set(ref) == set(ours)
  return ref, ours


def _mergekit_config(method, base, mps, params, dirs, **extra):
  d = dict(merge_method=method, parameters=params,
           models=[dict(model=m, parameters=p) for m, p in zip(dirs[1:1 + len(mps)], mps)],
           **extra)
  if base:
    d["base_model"] = dirs[0]
    d["models"].insert(0, dict(model=dirs[0]))  # mergekit style: base listed too
  return d


@pytest.mark.parametrize("method", sorted(MERGEKIT_CASES))
def test_matches_mergekit(method, llama_dirs, tmp_path):
  d = _mergekit_config(method, *MERGEKIT_CASES[method], llama_dirs, dtype="float32")
  ref, ours = _mergekit_and_ours(d, tmp_path)
  diff = max(float(np.abs(ref[k] - ours[k]).max()) for k in ref)
  assert diff < 1e-6, (method, diff)


@pytest.fixture(scope="module")
def coarse_bf16_dirs(tmp_path_factory):
  """Tiny HF Llama checkpoints in bf16 whose values are multiples of 1/32: |d| ties a lot."""
  import torch
  root = tmp_path_factory.mktemp("merge_bf16")
  dirs = []
  for seed in range(4):
    model = hf_tiny_model("llama", seed + 20)
    with torch.no_grad():
      for _, t in model.named_parameters():
        t.copy_(torch.round(t * 32) / 32)
    dirs.append(str(root / f"m{seed}"))
    model.to(torch.bfloat16).save_pretrained(dirs[-1])
  return dirs


@pytest.mark.parametrize("method, mps", [
    ("ties", [dict(weight=0.6, density=0.5), dict(weight=0.5, density=[0.3, 0.9]),
              dict(weight=0.3, density=0.7)]),
    ("breadcrumbs", [dict(weight=0.6, density=0.7, gamma=0.05),
                     dict(weight=0.5, density=0.4, gamma=0.1)]),
    ("breadcrumbs_ties", [dict(weight=0.6, density=0.6, gamma=0.02),
                          dict(weight=0.5, density=0.8, gamma=0.1),
                          dict(weight=0.4, density=0.5, gamma=0.05)])])
def test_matches_mergekit_bf16_exactly(method, mps, coarse_bf16_dirs, tmp_path):
  # bf16 checkpoints with coarse values: many equal |d| at each TIES / breadcrumbs cut,
  # where mergekit's sort decides which are kept. mergekit computes in fp32 (dtype) and
  # writes bf16 (out_dtype), as we do: every output bit must be the same.
  d = _mergekit_config(method, "base", mps, {}, coarse_bf16_dirs, dtype="float32",
                       out_dtype="bfloat16")
  ref, ours = _mergekit_and_ours(d, tmp_path)
  assert {ours[k].dtype for k in ours} == {np.dtype(ml_dtypes.bfloat16)}  # (hf.load: mergekit's
  bits = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).view(np.uint16)  # bf16 in fp32)
  differ = {k: int(np.count_nonzero(bits(ref[k]) != bits(ours[k]))) for k in ref}
  assert sum(differ.values()) == 0, {k: v for k, v in differ.items() if v}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_drop_matches_mergekit_statistics(method, density, llama_dirs, tmp_path):
  # DARE's masks come from different RNGs (torch.bernoulli vs jax), so compare what they
  # must share: one model, weight 1, out - base = scale * mask * d. Kept fraction: over the
  # ~50k elements its sd is sqrt(p (1 - p) / n) < 0.0023, so 1% is > 4 sd (torch seeded:
  # no flakes). Scale: mergekit matches each tensor's L1 norm, |out - b|_1 = |x - b|_1
  # (not 1/p: |m d|_1 / p misses it by ~0.5% on a 4608-element tensor at p = 0.3).
  import torch
  torch.manual_seed(0)
  d = _mergekit_config(method, "base", [dict(weight=1.0, density=density)], {}, llama_dirs,
                       dtype="float32")
  ref, ours = _mergekit_and_ours(d, tmp_path)
  b, x = _load(llama_dirs[0]), _load(llama_dirs[1])
  delta = {k: np.asarray(x[k], np.float64) - np.asarray(b[k], np.float64) for k in b}
  kept = {}
  for name, out in (("mergekit", ref), ("ours", ours)):
    moved = {k: np.asarray(out[k], np.float64) - np.asarray(b[k], np.float64) for k in b}
    kept[name] = (sum(np.count_nonzero(np.abs(m) > 1e-9) for m in moved.values()) /
                  sum(m.size for m in moved.values()))
    for k in b:  # the L1 norm of every tensor (per layer for stacked ones) is the delta's
      for i in range(moved[k].shape[0] if k.startswith("layers/") else 1):
        sl = (lambda a: a[i]) if k.startswith("layers/") else (lambda a: a)
        np.testing.assert_allclose(np.abs(sl(moved[k])).sum(), np.abs(sl(delta[k])).sum(),
                                   rtol=2e-5, err_msg=f"{name} {k} {i}")
  assert abs(kept["mergekit"] - density) < 0.01 and abs(kept["ours"] - density) < 0.01, kept
  assert abs(kept["mergekit"] - kept["ours"]) < 0.01, kept


@pytest.mark.parametrize("method", ["dare_ties", "task_arithmetic"])
@pytest.mark.parametrize("as_params", [False, True])
def test_streaming_equals_in_memory(llama_dirs, tmp_path, as_params, method, monkeypatch):
  # tiny blocks and chunks: elementwise merges (task_arithmetic) of the embedding, lm_head
  # and MLP kernels run in blocks of HF rows, aligned to the params/ inputs' chunks
  monkeypatch.setattr(merge_stream, "_BLOCK", 500)
  monkeypatch.setattr(checkpoint, "PARAMS_CHUNK_BYTES", 4096)
  inputs = llama_dirs
  cfg, trees = zip(*[hf.load(p) for p in llama_dirs])
  if as_params:  # aya_jax params/ checkpoints (Orbax), as SFT writes them
    inputs = [checkpoint.save_params(str(tmp_path / f"p{i}"), c, t)
              for i, (c, t) in enumerate(zip(cfg, trees))]
    assert checkpoint.open_reader(inputs[0]).chunk("embedder/embedding", 0) < 97
  mp = [{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 0.7}]
  params = {"lambda": [1.0, 0.8]}
  if method == "task_arithmetic":
    mp = [{"weight": 0.6}, {"weight": -0.5}]
    assert merge_stream._blocks((97, 48), False, "copy", [], "") == (0, 10)
  want = merging._flat(_m(method, trees[1:], trees[0], params, mp, seed=5, cfg=cfg[0],
                          dtype="bfloat16"))
  merge_stream.merge_checkpoints(inputs[1:], method, params, str(tmp_path / "out"),
                                 base=inputs[0], out_hf=str(tmp_path / "hf"),
                                 model_params=mp, seed=5, dtype="bfloat16")
  for out in ("out", "hf"):
    got = _load(str(tmp_path / out))
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_fast_bf16_cast_equals_ml_dtypes():
  x = np.random.default_rng(0).normal(size=(64, 33)).astype(A) * 1e3
  x[0, :5] = [np.inf, -np.inf, 3.4e38, -0.0, 1.00390625]  # overflow; a tie rounds to even
  for a in (x, x.T, x[:, ::2]):
    got = merging.cast(a, "bfloat16")
    np.testing.assert_array_equal(got.view(np.uint16),
                                  a.astype(ml_dtypes.bfloat16).view(np.uint16))
  assert merging.cast(x.T, "bfloat16").flags.f_contiguous  # memory order kept
  x[1, 1] = np.nan
  assert np.isnan(merging.cast(x, "bfloat16")[1, 1].astype(A))


def test_merged_hf_dir_loads_in_transformers(llama_dirs, tmp_path):
  import torch
  import transformers
  merge_stream.merge_checkpoints(llama_dirs[1:], "ties", None, str(tmp_path / "out"),
                                 base=llama_dirs[0], out_hf=str(tmp_path / "hf"),
                                 model_params=[{"weight": 1.0, "density": 0.5}] * 2,
                                 dtype="bfloat16")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
  assert model.model.embed_tokens.weight.dtype == torch.bfloat16
  ours = _load(str(tmp_path / "out"))
  q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(q, ours["layers/attn/q/kernel"][1].astype(A).reshape(48, -1).T)
  with torch.no_grad():
    out = model(torch.tensor([[1, 5, 7]])).logits
  assert out.shape == (1, 3, 97) and torch.isfinite(out).all()


def test_checkpoint_errors_name_the_path(llama_dirs, tmp_path):
  cfg, tree = hf.load(llama_dirs[0])
  other = checkpoint.save_params(str(tmp_path / "v"), cfg.replace(vocab_size=101), dict(
      tree, embedder={"embedding": np.zeros((101, 48), A)}, lm_head={"kernel": np.zeros(
          (48, 101), A)}))
  with pytest.raises(ValueError, match="vocab sizes differ.*embedder/embedding"):
    merge_stream.merge_checkpoints([llama_dirs[1], other], "linear", None,
                                   str(tmp_path / "o"), model_params=[{"weight": 1.0}] * 2)
  bf = checkpoint.save_params(str(tmp_path / "bf"), cfg,
                              jax.tree.map(lambda x: x.astype("bfloat16"), tree))
  with pytest.raises(ValueError, match="params .* is bfloat16 in .* pass dtype="):
    merge_stream.merge_checkpoints([llama_dirs[1], bf], "linear", None, str(tmp_path / "o"),
                                   model_params=[{"weight": 1.0}] * 2)


def test_yaml_and_config_stage(llama_dirs, tmp_path):
  yml = tmp_path / "m.yml"
  yml.write_text(textwrap.dedent(f"""\
      merge_method: task_arithmetic
      base_model: {llama_dirs[0]}
      models:
        - model: {llama_dirs[0]}
        - model: {llama_dirs[1]}
          parameters: {{weight: 0.5}}
      parameters: {{normalize: false}}
      dtype: float32
      """))
  spec = merge_spec.spec_from_yaml(str(yml))
  assert spec.models == [llama_dirs[1]] and spec.base == llama_dirs[0]
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import merge as merge_config
  config = merge_config.get_config()
  config.merge.yaml = str(yml)
  merge_stream.run(config, str(tmp_path / "w"))
  got, b, x = _load(str(tmp_path / "w/params")), _load(llama_dirs[0]), _load(llama_dirs[1])
  np.testing.assert_allclose(got["layers/mlp/up/kernel"],
                             b["layers/mlp/up/kernel"] + 0.5 * (x["layers/mlp/up/kernel"] -
                                                                b["layers/mlp/up/kernel"]),
                             atol=1e-6)
  config = merge_config.get_config()
  config.merge.models = tuple(llama_dirs[1:])
  config.merge.model_parameters.weight = (0.25, 0.75)
  spec = merge_spec.spec_from_config(config.merge)
  assert spec.model_parameters == [{"weight": 0.25}, {"weight": 0.75}]


def test_yaml_errors_name_the_file_and_line(tmp_path):
  yml = tmp_path / "bad.yml"
  yml.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 0.5\n"
                 "base_model: b\n")  # the flow mapping on line 4 is never closed
  with pytest.raises(ValueError, match=rf"^{re.escape(str(yml))}:5:\d+: merge YAML is not "
                     "valid YAML: while parsing a flow mapping"):
    merge_spec.spec_from_yaml(str(yml))
  yml.write_text("merge_method: nope\nmodels: [a]\n")
  with pytest.raises(ValueError, match=rf"^{re.escape(str(yml))}: unknown merge_method 'nope'"):
    merge_spec.spec_from_yaml(str(yml))
  with pytest.raises(ValueError, match=r"^<merge YAML text>:2:7: merge YAML is not valid"):
    merge_spec.spec_from_yaml("merge_method: [linear\nmodels: a\n")
  # a path that does not exist is named, not parsed as YAML text (which gave a string)
  config = _merge_config([], [])
  for missing in ("/nonexistent.yml", str(tmp_path / "merges/ties"), "ties.yaml"):
    config.merge.yaml = missing
    with pytest.raises(FileNotFoundError, match=f"merge YAML file '{re.escape(missing)}' does "
                       "not exist"):
      merge_stream.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def _files(root):
  """relative path -> bytes of every file under root."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), root)] = f.read()
  return out


def _merge_config(models, weights, method="linear", out_hf=False):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import merge as merge_config
  config = merge_config.get_config()
  config.merge.method, config.merge.models = method, tuple(models)
  config.merge.model_parameters.weight = tuple(weights)
  config.merge.out_hf = out_hf
  return config


@pytest.mark.parametrize("out_hf", [False, True])
def test_failed_merge_keeps_the_previous_one(llama_dirs, tmp_path, out_hf):
  # a good merge, then one whose weights cannot be normalised (they sum to 0), into the
  # same workdir: the error names the problem, and params/ (and hf/) and merge_spec.json
  # are byte for byte the good merge's; nothing half-written is left beside them
  work = str(tmp_path / "w")
  merge_stream.run(_merge_config(llama_dirs[1:], (0.25, 0.75), out_hf=out_hf), work)
  before = _files(work)
  assert "merge_spec.json" in before and "params/model_config.json" in before
  assert json.loads(before["merge_spec.json"])["model_parameters"][0] == {"weight": 0.25}
  with pytest.raises(ValueError, match=r"linear weights \[1.0, -1.0\] sum to 0 for tensor"):
    merge_stream.run(_merge_config(llama_dirs[1:], (1.0, -1.0), out_hf=out_hf), work)
  assert _files(work) == before
  assert sorted(os.listdir(tmp_path)) == ["w"] and sorted(os.listdir(work)) == sorted(
      ["merge_spec.json", "params"] + (["hf"] if out_hf else []))
  # a merge that fails while writing (here: a tensor's merge raises) is rolled back too
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(merging, "merge_tensor", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
      merge_stream.run(_merge_config(llama_dirs[1:], (0.5, 0.5), out_hf=out_hf), work)
  assert _files(work) == before and sorted(os.listdir(tmp_path)) == ["w"]
  # and a good one replaces it
  merge_stream.run(_merge_config(llama_dirs[1:], (0.5, 0.5), out_hf=out_hf), work)
  assert json.loads(_files(work)["merge_spec.json"])["model_parameters"][0] == {"weight": 0.5}
  assert sorted(os.listdir(work)) == sorted(["merge_spec.json", "params"] +
                                            (["hf"] if out_hf else []))


_RSS_SCRIPT = """
import resource, sys
import numpy as np
from aya_jax.merging import stream as merge_stream
from aya_jax.models import config, hf
mode, n_layers, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "make":
  cfg = config.tiny("llama", d_model=512, n_heads=8, n_kv_heads=8, head_dim=64, d_ff=2048,
                    n_layers=n_layers)
  rng = np.random.default_rng(0)
  for i in range(4):
    p = {}
    for leaf, name, transform, shape, is_layer in hf.entries(cfg):
      node = p
      for k in leaf[:-1]:
        node = node.setdefault(k, {})
      node[leaf[-1]] = rng.normal(size=((n_layers,) if is_layer else ()) + shape).astype("f4")
    hf.save(cfg, p, f"{root}/m{i}")
else:
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  merge_stream.merge_checkpoints([f"{root}/m{i}" for i in (1, 2, 3)], "ties", None,
                                 f"{root}/out", base=f"{root}/m0", out_hf=f"{root}/hf",
                                 model_params=[{"weight": 1.0, "density": 0.5}] * 3)
  print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_depth(tmp_path):
  # peak RSS of a ties merge of 3 models + base (writing params/ and HF), above the
  # process's peak after imports, for 2 and 8 layers (16 MiB per layer per model)
  grow = {}
  for n_layers in (2, 8):
    root = str(tmp_path / f"L{n_layers}")
    for mode in ("make", "merge"):
      res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode, str(n_layers), root],
                           capture_output=True, text=True, check=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
    grow[n_layers] = int(res.stdout.split()[-1])
  layer_bytes = 4 * (4 * 512 * 512 + 3 * 512 * 2048)
  # 8 layers: 4 x 128 MiB of inputs and 128 MiB out; the merge holds a few layer slices
  assert grow[8] < 16 * layer_bytes, grow
  assert grow[8] - grow[2] < 3 * layer_bytes, grow


# ---------------------------------------------------------------------------
# weight search
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["differential_evolution", "random"])
def test_search_recovers_known_mixture(optimizer, tmp_path):
  rng = np.random.default_rng(0)
  models = [{"w": rng.normal(size=(40,)).astype(A)} for _ in range(3)]
  target = 0.7 * models[0]["w"] + 0.3 * models[1]["w"]  # model 2 gets no weight
  score = lambda p: -float(np.sum((np.asarray(p["w"]) - target) ** 2))
  res = merge_search.search_weights(models, score, budget=240, optimizer=optimizer, seed=1,
                                    log_path=str(tmp_path / "log.jsonl"))
  tol = 0.05 if optimizer == "differential_evolution" else 0.1
  np.testing.assert_allclose(res.weights, [0.7, 0.3, 0.0], atol=tol)
  assert res.nonzero == [0, 1]
  assert len(res.history) <= 240
  lines = (tmp_path / "log.jsonl").read_text().splitlines()
  assert len(lines) == len(res.history) and json.loads(lines[0])["score"] <= res.score
  assert res.score == max(h["score"] for h in res.history)


def test_search_densities_for_ties():
  b = {"w": np.zeros(20, A)}
  rng = np.random.default_rng(2)
  x = {"w": rng.normal(size=(20,)).astype(A)}
  y = {"w": rng.normal(size=(20,)).astype(A)}
  # the objective wants x's delta untrimmed: density -> 1 for model 0
  score = lambda p: -float(np.sum((np.asarray(p["w"]) - x["w"]) ** 2))
  res = merge_search.search_weights([x, y], score, method="ties", base=b, budget=120,
                                    search_density=True, seed=0)
  assert res.weights[0] > 0.9 and res.densities[0] > 0.9 and res.score > -0.5
