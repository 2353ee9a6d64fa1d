"""The one train step: exact gradient accumulation, the loss against numpy, skipped
non-finite updates, token log-probs against a log-softmax by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aya_jax.models import forward, init_params, tiny
from aya_jax.train import state as state_lib
from aya_jax.train import steps

CFG = tiny("llama", vocab_size=64, d_model=32, head_dim=8, n_heads=2, n_kv_heads=1, d_ff=64)


def _batch(b=4, length=12, seed=0):
  toks = np.random.default_rng(seed).integers(3, 64, (b, length + 1)).astype(np.int32)
  return dict(tokens=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((b, length), np.int32),
              segment_ids=np.ones((b, length), np.int32),
              positions=np.tile(np.arange(length, dtype=np.int32), (b, 1)))


def _run(batch, grad_accum=1, lr=1e-2, tx=None):
  tx = tx or optax.adamw(lr)
  st = state_lib.create_state(init_params(CFG, jax.random.key(0)), tx)
  step = jax.jit(steps.make_train_step(steps.sft_loss_fn(CFG), tx, steps.loss_token_count,
                                       grad_accum))
  return step(st, batch, jax.random.key(0))


def test_accumulation_equals_the_full_batch_with_uneven_token_counts():
  batch = _batch()
  batch["loss_mask"][:2, 5:] = 0  # the micro-batches hold different numbers of tokens
  sgd = optax.sgd(1.0)  # the update is the gradient: compare gradients, not Adam's ratios
  ref_state, ref = _run(batch, tx=sgd)
  for accum in (2, 4):
    st, m = _run(batch, accum, tx=sgd)
    np.testing.assert_allclose(float(m["loss"]), float(ref["loss"]), rtol=1e-6)
    assert int(m["n_tokens"]) == int(ref["n_tokens"]) == 4 * 12 - 2 * 7
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), st.params,
                 ref_state.params)
  with pytest.raises(ValueError, match="does not split into grad_accum=3"):
    _run(batch, 3)


def test_loss_is_the_mean_token_nll_computed_with_numpy():
  batch = _batch(seed=1)
  params = init_params(CFG, jax.random.key(0))
  logits = np.asarray(forward(CFG, params, batch["tokens"]), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  st, m = _run(batch)
  np.testing.assert_allclose(float(m["loss"]), nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["nll_sum"]), nll.sum(), rtol=1e-5)
  assert int(st.step) == 1 and int(m["nonfinite"]) == 0
  rows = dict(batch)
  np.testing.assert_allclose(jax.jit(steps.token_logps_fn(CFG))(params, rows), -nll,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(steps.token_logps_fn(CFG, vocab_chunk=16))(params, rows),
                             -nll, rtol=1e-5, atol=1e-5)


def test_a_nan_learning_rate_skips_the_update_and_says_so():
  batch = _batch()
  st, m = _run(batch, lr=float("nan"))
  assert int(m["nonfinite"]) == 1 and np.isfinite(float(m["loss"]))
  start = init_params(CFG, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, st.params, start)
  assert int(st.step) == 1  # the step counts; the params and optimizer state do not move


def test_all_finite_and_token_count_by_hand():
  assert bool(steps.all_finite({"a": jnp.ones(3), "b": jnp.zeros((2, 2))}))
  assert not bool(steps.all_finite({"a": jnp.ones(3), "b": jnp.array([0.0, jnp.inf])}))
  assert not bool(steps.all_finite([jnp.array([jnp.nan])]))
  mask = np.array([[1, 1, 0], [0, 1, 0]], np.int32)
  assert float(steps.loss_token_count({"loss_mask": mask})) == 3.0
