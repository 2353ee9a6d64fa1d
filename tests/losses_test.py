"""Tests for aya_jax.losses.

References: torch.nn.functional.log_softmax / cross_entropy (CPU, float64)
for values; the unchunked jnp computation for the chunked one; jax.grad of
the full-batch loss for the gradient-accumulation property.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aya_jax import losses
from aya_jax.models import layers

B, T, D, V = 3, 5, 48, 97


def _rand(seed, *shape, scale=1.0):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return x * scale


def _targets(seed, b=B, t=T, v=V):
  rng = np.random.default_rng(seed)
  return rng.integers(0, v, size=(b, t)).astype(np.int32)


def _mask(seed, b=B, t=T):
  m = (np.random.default_rng(seed).random((b, t)) < 0.6).astype(np.float32)
  m[0, 0] = 1.0  # at least one loss token
  return m


def _torch_logprobs(logits, targets):
  lp = F.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=-1)
  return torch.gather(lp, -1, torch.tensor(targets, dtype=torch.long)[..., None]
                      )[..., 0].numpy()


def _torch_ce(logits, targets, mask):
  """Reference: torch cross_entropy, mean over unmasked (ignore_index)."""
  t = torch.tensor(targets, dtype=torch.long).clone()
  t[torch.tensor(mask) == 0] = -100
  x = torch.tensor(logits, dtype=torch.float64).reshape(-1, V)
  return F.cross_entropy(x, t.reshape(-1), ignore_index=-100).item()


def test_token_logprobs_matches_torch_log_softmax():
  logits, targets = _rand(0, B, T, V, scale=3.0), _targets(1)
  got = losses.token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
  assert got.dtype == jnp.float32 and got.shape == (B, T)
  np.testing.assert_allclose(got, _torch_logprobs(logits, targets), atol=1e-5)


def test_token_logprobs_stable_for_huge_logits():
  logits = _rand(2, B, T, V) + 1e4  # naive exp overflows
  targets = _targets(3)
  got = losses.token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, _torch_logprobs(logits, targets), atol=2e-3)


def test_sft_loss_matches_torch_cross_entropy_and_accuracy():
  logits, targets, mask = _rand(4, B, T, V, scale=2.0), _targets(5), _mask(6)
  loss, aux = losses.sft_loss(jnp.asarray(logits), jnp.asarray(targets),
                              jnp.asarray(mask))
  np.testing.assert_allclose(loss, _torch_ce(logits, targets, mask), rtol=1e-5)
  assert float(aux["n_tokens"]) == mask.sum()
  np.testing.assert_allclose(aux["nll_sum"], loss * mask.sum(), rtol=1e-5)
  want_acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
  np.testing.assert_allclose(aux["accuracy"], want_acc, rtol=1e-6)


def test_sft_loss_ignores_masked_positions_and_empty_mask_is_zero():
  logits, targets, mask = _rand(7, B, T, V), _targets(8), _mask(9)
  noisy = np.where(mask[..., None] == 0, _rand(10, B, T, V, scale=50.0), logits)
  l1, _ = losses.sft_loss(jnp.asarray(logits), jnp.asarray(targets), mask)
  l2, _ = losses.sft_loss(jnp.asarray(noisy), jnp.asarray(targets), mask)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  l0, aux0 = losses.sft_loss(jnp.asarray(logits), jnp.asarray(targets),
                             np.zeros((B, T), np.float32))
  assert float(l0) == 0.0 and float(aux0["n_tokens"]) == 0.0


def test_gradient_accumulation_equals_full_batch():
  """Two micro-batches, each / global token count, sum to the full batch."""
  b = 4
  x, w = _rand(11, b, T, D), _rand(12, D, V, scale=0.3)
  targets, mask = _targets(13, b=b), _mask(14, b=b)
  mask[2:] *= 0.0
  mask[2, :2] = 1.0  # micro-batches with very different token counts
  n_global = mask.sum()

  def loss_fn(w, x, t, m, norm=None):
    return losses.sft_loss(jnp.einsum("btd,dv->btv", x, w), t, m, norm)[0]

  vg = jax.jit(jax.value_and_grad(loss_fn))
  full, g_full = vg(w, x, targets, mask)
  parts = [vg(w, x[s], targets[s], mask[s], n_global)
           for s in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(parts[0][0] + parts[1][0], full, rtol=1e-6)
  np.testing.assert_allclose(parts[0][1] + parts[1][1], g_full, atol=1e-7)
  # ... whereas averaging per-micro-batch means would be wrong here
  naive = 0.5 * sum(vg(w, x[s], targets[s], mask[s])[0]
                    for s in (slice(0, 2), slice(2, 4)))
  assert abs(float(naive) - float(full)) > 1e-3


@pytest.mark.parametrize("chunk,scale,cap", [(16, 1.0, None), (32, 0.5, 3.0),
                                             (97, 1.0, None), (500, 2.0, 5.0)])
def test_chunked_matches_unchunked_values_and_grads(chunk, scale, cap):
  h, w, targets = _rand(15, B, T, D), _rand(16, D, V, scale=0.4), _targets(17)

  def full(h, w):
    logits = layers.softcap(jnp.einsum("btd,dv->btv", h, w) * scale, cap)
    return losses.token_logprobs(logits, targets)

  def chunked(h, w):
    return losses.chunked_token_logprobs(h, w, targets, chunk=chunk,
                                         logit_scale=scale, final_softcap=cap)

  np.testing.assert_allclose(jax.jit(chunked)(h, w), full(h, w), atol=1e-5)
  cot = _rand(18, B, T)  # a generic cotangent, not just ones
  obj = lambda f: lambda h, w: jnp.sum(f(h, w) * cot)
  gh, gw = jax.jit(jax.grad(obj(chunked), argnums=(0, 1)))(h, w)
  rh, rw = jax.jit(jax.grad(obj(full), argnums=(0, 1)))(h, w)
  np.testing.assert_allclose(gh, rh, atol=1e-5)
  np.testing.assert_allclose(gw, rw, atol=1e-5)


def test_softcap_reference_gemma2():
  x = np.array([-100.0, -1.0, 0.0, 2.0, 100.0], np.float32)
  np.testing.assert_allclose(layers.softcap(x, 30.0), 30.0 * np.tanh(x / 30.0),
                             rtol=1e-6)
  assert np.all(np.abs(layers.softcap(x, 30.0)) < 30.0)


def _all_shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield tuple(getattr(v.aval, "shape", ()))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_shapes(sub)


def test_chunked_never_materialises_full_logits():
  chunk = 16
  h, w, targets = _rand(19, B, T, D), _rand(20, D, V), _targets(21)
  f = lambda h, w: jnp.sum(losses.chunked_token_logprobs(h, w, targets,
                                                         chunk=chunk))
  shapes = set(_all_shapes(jax.make_jaxpr(jax.grad(f, (0, 1)))(h, w).jaxpr))
  n = -(-V // chunk)
  assert (B, T, chunk) in shapes  # sanity: the per-chunk block exists
  bad = [s for s in shapes if s[-3:] in ((B, T, V), (B, T, n * chunk))
         or s == (n, B, T, chunk)]
  assert not bad, bad


def test_bf16_logits_are_reduced_in_fp32():
  logits32 = _rand(22, B, T, V, scale=4.0) + 20.0
  targets, mask = _targets(23), _mask(24)
  logits16 = jnp.asarray(logits32, jnp.bfloat16)
  loss, _ = losses.sft_loss(logits16, jnp.asarray(targets), mask)
  assert loss.dtype == jnp.float32
  # reference: torch fp64 on exactly the bf16 values
  ref = _torch_ce(np.asarray(logits16.astype(jnp.float32)), targets, mask)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  # and close to the fp32-logit loss (only input rounding differs)
  ref32 = _torch_ce(logits32, targets, mask)
  np.testing.assert_allclose(loss, ref32, rtol=2e-2)
  lp = losses.token_logprobs(logits16, jnp.asarray(targets))
  assert lp.dtype == jnp.float32


def test_z_loss_value_and_in_sft_loss():
  logits, targets, mask = _rand(25, B, T, V, scale=2.0), _targets(26), _mask(27)
  lse = torch.logsumexp(torch.tensor(logits, dtype=torch.float64), -1).numpy()
  want = 1e-2 * (lse**2 * mask).sum() / mask.sum()
  got = losses.z_loss(jnp.asarray(logits), mask, 1e-2)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  base, _ = losses.sft_loss(jnp.asarray(logits), targets, mask)
  with_z, aux = losses.sft_loss(jnp.asarray(logits), targets, mask,
                                z_loss_coef=1e-2)
  np.testing.assert_allclose(with_z - base, want, rtol=1e-4)
  np.testing.assert_allclose(aux["z_loss"], want, rtol=1e-5)


def test_chunked_sft_loss_matches_sft_loss():
  h, w = _rand(28, B, T, D), _rand(29, D, V, scale=0.3)
  targets, mask = _targets(30), _mask(31)
  want, _ = losses.sft_loss(jnp.einsum("btd,dv->btv", h, w), targets, mask, 7.0)
  got, aux = losses.chunked_sft_loss(h, w, targets, mask, 7.0, chunk=20)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(aux["n_tokens"]) == mask.sum()


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_chunked_same_numbers_sharded_on_8_devices():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  b = 8
  h, w = _rand(32, b, T, D), _rand(33, D, V, scale=0.3)
  targets, mask = _targets(34, b=b), _mask(35, b=b)
  f = jax.jit(jax.value_and_grad(
      lambda h, w: losses.chunked_sft_loss(h, w, targets, mask, chunk=24)[0],
      argnums=(0, 1)))
  want, (wgh, wgw) = f(h, w)
  hs = jax.device_put(h, NamedSharding(mesh, P("data", None, "fsdp")))
  ws = jax.device_put(w, NamedSharding(mesh, P("fsdp", None)))
  got, (gh, gw) = f(hs, ws)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(gh, wgh, atol=1e-6)
  np.testing.assert_allclose(gw, wgw, atol=1e-6)
