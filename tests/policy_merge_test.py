"""online.merge by hand: linear, task arithmetic with a base, SLERP's parallel case, and
the errors for unknown names and missing weights."""

import jax
import numpy as np
import pytest

from aya_jax.train import policy_merge


def _assert_trees_equal(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol),
               a, b)


def test_merge_policy_by_hand(tmp_path):
  """merge_policy reads 'policy', 'previous', 'initial' and checkpoint paths, with a base."""
  tree = lambda v: {"a": np.full((3, 2), v, np.float32), "b": {"c": np.full(5, 2 * v, np.float32)}}
  named = {"policy": tree(1.0), "previous": tree(3.0), "initial": tree(0.5), "/ckpt": tree(7.0)}
  mc = policy_merge.merge_block()
  mc.method, mc.models, mc.weights = "linear", ("policy", "previous", "/ckpt"), (1.0, 2.0, 1.0)
  out = policy_merge.merge_policy(mc, named, cfg=None)
  _assert_trees_equal(out, tree((1.0 + 6.0 + 7.0) / 4.0), 1e-6)
  mc.method, mc.models, mc.weights, mc.base = "task_arithmetic", ("policy",), (0.5,), "initial"
  _assert_trees_equal(policy_merge.merge_policy(mc, named, cfg=None), tree(0.5 + 0.5 * 0.5), 1e-6)
  mc.method, mc.models, mc.weights, mc.base, mc.parameters = ("slerp", ("previous",), (),
                                                              "policy", '{"t": 0.25}')
  _assert_trees_equal(policy_merge.merge_policy(mc, named, cfg=None), tree(1.5), 1e-6)  # parallel
  assert policy_merge.merge_description(mc) == "slerp(previous, base policy)"
  mc.method, mc.models, mc.weights, mc.base, mc.parameters = ("linear", ("policy", "x"), (1, 1),
                                                              "", "")
  with pytest.raises(ValueError, match="no params for"):
    policy_merge.merge_policy(mc, named, cfg=None)
  with pytest.raises(ValueError, match="not one of"):
    policy_merge.load_merge_inputs(mc, None)
  mc.models = ("policy",)
  with pytest.raises(ValueError, match="one weight per model"):
    policy_merge.merge_policy(mc, named, cfg=None)
  mc.method = ""
  assert policy_merge.merge_names(mc) == ()
