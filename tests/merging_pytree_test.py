"""Pytree merges: a subset by regex, every tensor's checks name its path."""

import numpy as np
import pytest

from aya_jax.merging import pytree

A = np.float32


def _m(method, xs, base=None, params=None, mp=None, **kw):
  return pytree.merge(method, xs, base=base, parameters=params, model_parameters=mp, **kw)


def test_include_merges_a_subset():
  x = {"vision": {"w": A([1.0])}, "lm": {"w": A([1.0])}}
  y = {"vision": {"w": A([3.0])}, "lm": {"w": A([3.0])}}
  out = _m("linear", [x, y], mp=[{"weight": 1.0}] * 2, include=r"^lm/")
  assert out["lm"]["w"][0] == 2.0 and out["vision"]["w"][0] == 1.0  # copied from the first


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
