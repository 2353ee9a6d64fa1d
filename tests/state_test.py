"""Train state: the optimizer state is sharded like the params it mirrors (ZeRO), the
rest replicated."""

import jax
import numpy as np
import optax

from aya_jax import axes, sharding
from aya_jax.models import tiny
from aya_jax.train import state as state_lib

CFG = tiny("llama", vocab_size=64, d_model=32, head_dim=8, n_heads=2, n_kv_heads=1, d_ff=64)


def test_adam_moments_take_their_params_shardings_and_counters_are_replicated():
  mesh = sharding.make_mesh((1, 8, 1))
  rules = axes.rules("fsdp")
  params = sharding.init_params_sharded(CFG, jax.random.key(0), mesh, rules)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  ref = tx.init(jax.device_get(params))  # before: create_state donates the params
  st = state_lib.create_state(params, tx, param_sh)
  adam = st.opt_state[1][0]
  for moments in (adam.mu, adam.nu):
    got = jax.tree.map(lambda x: x.sharding, moments)
    assert jax.tree.all(jax.tree.map(lambda a, b: a == b, got, param_sh))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(adam.mu))
  assert adam.count.sharding.is_fully_replicated and st.step.sharding.is_fully_replicated
  assert state_lib.state_shardings(st).params == param_sh
  # the values are those of tx.init on one device
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               st.opt_state, ref)


def test_without_shardings_the_state_is_built_in_place():
  params = {"w": np.ones((3, 2), np.float32)}
  st = state_lib.create_state(params, optax.sgd(0.1, momentum=0.9))
  assert int(st.step) == 0
  np.testing.assert_array_equal(st.opt_state[0].trace["w"], np.zeros((3, 2)))
