"""Sharded init and forward/step on 8 fake CPU devices equal one device."""

import jax
import numpy as np
import optax
import pytest

from aya_jax import axes, sharding
from aya_jax.models import forward, init_params, tiny
from aya_jax.train import state as state_lib
from aya_jax.train import steps


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("preset,shape", [("dp", (8, 1, 1)), ("fsdp", (2, 4, 1)),
                                          ("fsdp_tp", (2, 2, 2))])
def test_sharded_forward_equals_single_device(preset, shape):
  cfg = tiny("cohere", qk_norm=True, n_heads=4, n_kv_heads=2, vocab_size=96)
  rules = axes.rules(preset)
  mesh = sharding.make_mesh(shape)
  rng = jax.random.key(0)
  p_sharded = sharding.init_params_sharded(cfg, rng, mesh, rules)
  p_single = init_params(cfg, rng)
  # same values as the unsharded init, placed over the mesh
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), p_sharded, p_single)
  if preset != "dp":
    emb = p_sharded["embedder"]["embedding"]
    assert len(emb.sharding.device_set) == 8
    assert emb.addressable_shards[0].data.size < emb.size  # really split
  tokens = np.random.default_rng(0).integers(3, 96, (8, 12)).astype(np.int32)
  ref = forward(cfg, p_single, tokens)
  batch = sharding.global_batch({"tokens": tokens}, mesh)
  with sharding.activation_rules(mesh, rules):
    out = jax.jit(lambda p, t: forward(cfg, p, t))(p_sharded, batch["tokens"])
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_indivisible_axes_are_replicated():
  cfg = tiny("llama")  # 1 kv head, vocab 97: do not divide by 2
  mesh = sharding.make_mesh((2, 2, 2))
  sh = sharding.param_shardings(cfg, mesh, axes.rules("fsdp_tp"))
  assert sh["layers"]["attn"]["k"]["kernel"].spec[2] is None  # kv_heads=1 not over tensor
  assert sh["lm_head"]["kernel"].spec[1] is None  # vocab 97
  assert sh["layers"]["attn"]["q"]["kernel"].spec[1] == "fsdp"  # embed 48 over fsdp


def test_mesh_errors():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh((3, 2, 1))
  with pytest.raises(ValueError, match="unknown sharding preset"):
    axes.rules("zero9")


def test_sft_step_same_on_one_and_eight_devices():
  cfg = tiny("llama", n_heads=4, n_kv_heads=2, vocab_size=96)
  tx = optax.adamw(1e-2)
  rng = np.random.default_rng(1)
  batch = {
      "tokens": rng.integers(3, 96, (8, 10)).astype(np.int32),
      "targets": rng.integers(3, 96, (8, 10)).astype(np.int32),
      "loss_mask": (rng.random((8, 10)) > 0.3).astype(np.int32),
      "segment_ids": np.ones((8, 10), np.int32),
      "positions": np.tile(np.arange(10, dtype=np.int32), (8, 1)),
  }
  step = steps.make_train_step(steps.sft_loss_fn(cfg), tx, steps.loss_token_count, grad_accum=2)
  results = []
  for shape in [(1, 1, 1), (2, 2, 2)]:
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = sharding.make_mesh(shape, devices)
    rules = axes.rules("fsdp_tp")
    params = sharding.init_params_sharded(cfg, jax.random.key(2), mesh, rules)
    st = state_lib.create_state(params, tx, jax.tree.map(lambda x: x.sharding, params))
    sh = state_lib.state_shardings(st)
    gb = sharding.global_batch(batch, mesh)
    fn = steps.jit_step(step, sh, jax.tree.map(lambda x: x.sharding, gb), mesh)
    with sharding.activation_rules(mesh, rules):
      for i in range(2):
        st, m = fn(st, gb, jax.random.key(i))
    results.append((jax.device_get(st.params), float(m["loss"])))
  (p1, l1), (p8, l8) = results
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), p1, p8)


def test_optimizer_state_is_sharded_like_the_params():
  from aya_jax import optim
  cfg = tiny("llama", n_heads=4, n_kv_heads=2, vocab_size=96)
  mesh = sharding.make_mesh((1, 8, 1))
  params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, axes.rules("fsdp"))
  ocfg = optim.default_optim_config()
  ocfg.weight_decay, ocfg.freeze = 0.1, ("layers/mlp/.*",)
  for tx in (optax.adamw(1e-3), optim.make_optimizer(ocfg, params)):
    params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, axes.rules("fsdp"))
    st = state_lib.create_state(params, tx, jax.tree.map(lambda x: x.sharding, params))
    params = st.params  # create_state donates its input
    emb_spec = params["embedder"]["embedding"].sharding.spec
    mirrored = [x for x in jax.tree.leaves(st.opt_state)
                if getattr(x, "shape", None) == params["embedder"]["embedding"].shape]
    assert mirrored and all(x.sharding.spec == emb_spec for x in mirrored)
    per_device = sum(s.data.nbytes for x in jax.tree.leaves(st.opt_state)
                     for s in x.addressable_shards if s.device == jax.devices()[0])
    total = sum(x.nbytes for x in jax.tree.leaves(st.opt_state))
    assert per_device < total / 4  # really split, not replicated
