"""Merge methods on pytrees: every method against hand-computed values (the formula named
in each test). Over checkpoints and against mergekit: merging_stream_test.py; ranks
against torch's sort: merging_ranks_test.py."""


import jax
import ml_dtypes
import numpy as np
import pytest

from aya_jax.merging import methods as merging
from aya_jax.merging import parameters, pytree


A = np.float32


def _m(method, xs, base=None, params=None, mp=None, **kw):
  return pytree.merge(method, xs, base=base, parameters=params, model_parameters=mp, **kw)


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
  known = merging.METHODS[method][4]
  mp = [{k: v for k, v in dict(weight=w, density=0.4, gamma=0.01).items() if k in known}
        for w in (0.5, 0.3, -0.2)]
  p = parameters.resolve_parameters(method, None, mp, 3, ("x",), 0)
  key = parameters.tensor_key(3, "x")
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
