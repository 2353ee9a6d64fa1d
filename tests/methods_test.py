"""Sampling methods: top-k, top-p and temperature against hand-computed values and
transformers' logits warpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax.sampling import methods as M


def _warped(warper, logits):
  """transformers' logits warper applied to numpy logits (the reference)."""
  import torch
  out = warper(None, torch.tensor(logits)).numpy()
  return np.where(np.isinf(out), -np.inf, out)


def test_top_k_masks_exactly_the_k_best_and_ties():
  logits = np.array([[1.0, 3.0, 2.0, 3.0, -1.0, 0.5]], np.float32)
  out = np.asarray(M.TopK(2).process(jnp.asarray(logits)))
  np.testing.assert_array_equal(np.isfinite(out), [[0, 1, 0, 1, 0, 0]])
  out = np.asarray(M.TopK(3).process(jnp.asarray(logits)))  # 2.0 is the 3rd
  np.testing.assert_array_equal(np.isfinite(out), [[0, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(out[np.isfinite(out)], logits[np.isfinite(out)])


def test_top_p_masks_the_hand_computed_nucleus():
  probs = np.array([[0.05, 0.5, 0.15, 0.2, 0.1]])
  logits = np.log(probs).astype(np.float32)
  keep = lambda p: np.isfinite(np.asarray(M.TopP(p).process(jnp.asarray(logits))))[0]
  # sorted: 0.5, 0.2, 0.15, 0.1, 0.05; mass before each: 0, .5, .7, .85, .95
  np.testing.assert_array_equal(keep(0.3), [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(keep(0.6), [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(keep(0.8), [0, 1, 1, 1, 0])
  np.testing.assert_array_equal(keep(0.9), [0, 1, 1, 1, 1])
  np.testing.assert_array_equal(keep(1.0), [1, 1, 1, 1, 1])


def test_filters_equal_transformers_warpers():
  from transformers.generation import logits_process as lp
  logits = np.random.default_rng(0).normal(size=(4, 97)).astype(np.float32) * 3
  cases = [(M.Temperature(0.7), lp.TemperatureLogitsWarper(0.7)),
           (M.TopK(7), lp.TopKLogitsWarper(7)),
           (M.TopP(0.8), lp.TopPLogitsWarper(0.8))]
  for ours, ref in cases:
    np.testing.assert_allclose(np.asarray(ours.process(jnp.asarray(logits))),
                               _warped(ref, logits), rtol=1e-6)
  chain = M.Sampling(temperature=0.7, top_k=20, top_p=0.9)
  ref = logits
  for _, warper in cases[:1] + [(None, lp.TopKLogitsWarper(20)),
                                (None, lp.TopPLogitsWarper(0.9))]:
    ref = _warped(warper, ref)
  np.testing.assert_allclose(np.asarray(chain.process(jnp.asarray(logits))), ref, rtol=1e-6)
  assert M.Chain((M.Temperature(0.7), M.TopK(20), M.TopP(0.9))) == chain.chain


def test_temperature_sampling_matches_softmax_chi_square():
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5]])
  t, draws = 0.7, 20000
  keys = jax.random.split(jax.random.key(42), draws)
  tokens, lp = jax.vmap(lambda k: M.sample(M.Temperature(t), logits, k[None]))(keys)
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=8)
  expected = np.asarray(jax.nn.softmax(logits[0] / t)) * draws
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 24.32, (chi2, counts, expected)  # scipy.stats.chi2.ppf(0.999, df=7)
  want = np.asarray(jax.nn.log_softmax(logits[0] / t))[np.asarray(tokens).ravel()]
  np.testing.assert_allclose(np.asarray(lp).ravel(), want, rtol=1e-5)


def test_method_validation_and_from_config():
  for bad in (lambda: M.TopK(0), lambda: M.TopP(0.0), lambda: M.TopP(1.5),
              lambda: M.Temperature(-1.0), lambda: M.Sampling(top_k=-1)):
    with pytest.raises(ValueError):
      bad()
  assert M.from_config(0.0, 50, 0.9) == M.Greedy()
  assert M.from_config(0.7, 50, 0.9) == M.Sampling(0.7, 50, 0.9)
  assert M.Temperature(0).greedy and M.Chain((M.TopK(3), M.Greedy())).greedy
  hash(M.Sampling(0.7, 50, 0.9))  # static jit argument
