"""Layers against their formulas written out in numpy: the three norms, rotary embedding
(both layouts, linear and Llama 3 scaling), soft-capping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax.models import layers, tiny


def _norm(cfg, x, scale):
  return layers.Norm(cfg, (x.shape[-1],), ("embed",)).apply(
      {"params": {"scale": scale}}, jnp.asarray(x))


@pytest.mark.parametrize("family, norm", [("llama", "rms"), ("gemma2", "rms_plus_one"),
                                          ("cohere", "layernorm")])
def test_norms_by_formula(family, norm):
  cfg = tiny(family)
  assert cfg.norm == norm
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 48)).astype(np.float32)
  w = rng.normal(size=(48,)).astype(np.float32)
  xc = x - x.mean(-1, keepdims=True) if norm == "layernorm" else x
  y = xc / np.sqrt((xc ** 2).mean(-1, keepdims=True) + cfg.norm_eps)
  want = y * (1 + w) if norm == "rms_plus_one" else y * w
  np.testing.assert_allclose(_norm(cfg, x, w), want, rtol=1e-5, atol=1e-5)


def _llama3_inv_freq(theta, d, factor, low, high, old_len):
  """Meta's published Llama 3.1 frequency rule, one frequency at a time."""
  out = []
  for i in range(0, d, 2):
    f = 1.0 / theta ** (i / d)
    wavelen = 2 * math.pi / f
    if wavelen < old_len / high:
      out.append(f)
    elif wavelen > old_len / low:
      out.append(f / factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.asarray(out)


def test_rope_frequencies_plain_linear_and_llama3():
  d, theta = 64, 500000.0
  plain = 1.0 / theta ** (np.arange(0, d, 2) / d)
  cfg = tiny("llama", head_dim=d, rope_theta=theta)
  np.testing.assert_allclose(layers.rope_inv_freq(cfg), plain, rtol=1e-6)
  linear = cfg.replace(rope_scaling=("linear", 4.0))
  np.testing.assert_allclose(layers.rope_inv_freq(linear), plain / 4, rtol=1e-6)
  llama3 = cfg.replace(rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192))
  want = _llama3_inv_freq(theta, d, 8.0, 1.0, 4.0, 8192)
  assert (want != plain).any() and (want == plain).any()  # scaled and kept frequencies
  np.testing.assert_allclose(layers.rope_inv_freq(llama3), want, rtol=1e-5)
  with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
    layers.rope_inv_freq(cfg.replace(rope_scaling=("yarn", 2.0)))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_rotates_each_pair_by_position_times_frequency(interleaved):
  cfg = tiny("llama", head_dim=8, rope_interleaved=interleaved)
  x = np.random.default_rng(1).normal(size=(1, 3, 2, 8)).astype(np.float32)
  pos = np.array([[0, 1, 5]], np.int32)
  got = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg))
  inv = 1.0 / cfg.rope_theta ** (np.arange(0, 8, 2) / 8)
  pairs = [(2 * i, 2 * i + 1) for i in range(4)] if interleaved else [(i, i + 4) for i in range(4)]
  for t in range(3):
    for i, (a, b) in enumerate(pairs):
      c, s = math.cos(pos[0, t] * inv[i]), math.sin(pos[0, t] * inv[i])
      np.testing.assert_allclose(got[0, t, :, a], x[0, t, :, a] * c - x[0, t, :, b] * s,
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got[0, t, :, b], x[0, t, :, b] * c + x[0, t, :, a] * s,
                                 rtol=1e-5, atol=1e-6)


def test_softcap_and_activations_by_formula():
  x = jnp.asarray([-100.0, -1.0, 0.0, 2.0, 100.0])
  np.testing.assert_allclose(layers.softcap(x, 30.0), 30 * np.tanh(np.asarray(x) / 30),
                             rtol=1e-6)
  assert layers.softcap(x, None) is x
  xs = np.asarray(x)
  np.testing.assert_allclose(layers.activation("silu")(x), xs / (1 + np.exp(-xs)), rtol=1e-6)
  gelu_tanh = 0.5 * xs * (1 + np.tanh(math.sqrt(2 / math.pi) * (xs + 0.044715 * xs ** 3)))
  np.testing.assert_allclose(layers.activation("gelu_tanh")(x), gelu_tanh, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="activation='relu2'"):
    layers.activation("relu2")
  assert jax.numpy.dtype(layers.dtype_of("bfloat16")) == jnp.bfloat16
