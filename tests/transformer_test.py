"""Model behaviour that needs no peer: cache decoding, packing, remat, dtypes.

(Logits parity with transformers lives in hf_test.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax.models import Transformer, forward, init_cache, init_params, tiny
from conftest import close_to_float32

FAMILIES = ["cohere", "cohere2", "llama", "gemma2", "gemma3", "qwen2"]


def _cfg(family, **kw):
  extra = dict(qk_norm=True) if family == "cohere" else {}
  extra.update(kw)
  return tiny(family, **extra)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
  cfg = _cfg(request.param)
  params = init_params(cfg, jax.random.key(1))
  # random norm scales so norm bugs show
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if "norm" in jax.tree_util.keystr(p) else x, params)
  return cfg, params


def test_cached_decode_equals_full_forward(model):
  cfg, params = model
  rng = np.random.default_rng(0)
  b, t, prompt = 2, 14, 5
  tokens = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
  full = forward(cfg, params, tokens)
  apply = jax.jit(lambda p, x, c: Transformer(cfg).apply({"params": p}, x, cache=c))
  cache = init_cache(cfg, b, 20)
  logits, cache = apply(params, tokens[:, :prompt], cache)
  steps = [logits]
  for i in range(prompt, t):
    logits, cache = apply(params, tokens[:, i:i + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)
  assert int(cache["index"]) == t


def test_left_padded_prompt_matches_unpadded(model):
  cfg, params = model
  rng = np.random.default_rng(1)
  seq = rng.integers(3, cfg.vocab_size, (1, 9)).astype(np.int32)
  ref = forward(cfg, params, seq)
  pad = 3
  tokens = np.concatenate([np.zeros((1, pad), np.int32), seq], axis=1)
  seg = np.concatenate([np.zeros((1, pad)), np.ones((1, 9))], axis=1).astype(np.int32)
  pos = np.concatenate([np.zeros((1, pad)), np.arange(9)[None]], axis=1).astype(np.int32)
  out = forward(cfg, params, tokens, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(out[:, pad:], ref, atol=2e-5, rtol=1e-5)
  # and through the cache: prefill the padded prompt, decode one token
  m = Transformer(cfg)
  cache = init_cache(cfg, 1, 16)
  _, cache = m.apply({"params": params}, tokens[:, :-1], pos[:, :-1], seg[:, :-1], cache=cache)
  last, _ = m.apply({"params": params}, tokens[:, -1:], pos[:, -1:], seg[:, -1:], cache=cache)
  np.testing.assert_allclose(last[:, 0], ref[:, -1], atol=2e-5, rtol=1e-5)


def test_packed_segments_do_not_attend_to_each_other(model):
  cfg, params = model
  rng = np.random.default_rng(2)
  a = rng.integers(3, cfg.vocab_size, (1, 6)).astype(np.int32)
  b = rng.integers(3, cfg.vocab_size, (1, 7)).astype(np.int32)
  packed = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)
  seg = np.array([[1] * 6 + [2] * 7 + [0] * 3], np.int32)
  pos = np.array([list(range(6)) + list(range(7)) + [0] * 3], np.int32)
  out = forward(cfg, params, packed, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(out[:, :6], forward(cfg, params, a), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out[:, 6:13], forward(cfg, params, b), atol=2e-5, rtol=1e-5)


def test_sliding_window_limits_attention():
  cfg = _cfg("gemma2", sliding_windows=(4, 4))
  params = init_params(cfg, jax.random.key(3))
  rng = np.random.default_rng(3)
  x = rng.integers(3, cfg.vocab_size, (1, 12)).astype(np.int32)
  y = x.copy()
  y[0, 0] = (x[0, 0] + 1) % cfg.vocab_size
  out_x, out_y = forward(cfg, params, x), forward(cfg, params, y)
  # 2 layers of window 4: token 0 reaches at most position 2 * 3 = 6
  assert np.abs(out_x[0, 7:] - out_y[0, 7:]).max() == 0.0
  assert np.abs(out_x[0, 1:4] - out_y[0, 1:4]).max() > 1e-4


def test_remat_and_unroll_do_not_change_logits_or_grads():
  cfg = _cfg("llama")
  params = init_params(cfg, jax.random.key(4))
  tokens = np.random.default_rng(4).integers(3, cfg.vocab_size, (2, 8)).astype(np.int32)

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(forward(c, p, tokens))[..., 5])

  v0, g0 = jax.value_and_grad(loss)(params, cfg)
  for kw in [dict(remat="full"), dict(remat="dots"), dict(scan_unroll=2)]:
    v1, g1 = jax.value_and_grad(loss)(params, cfg.replace(**kw))
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_bfloat16_compute_close_to_float32():
  cfg = _cfg("cohere")
  params = init_params(cfg, jax.random.key(5))
  tokens = np.random.default_rng(5).integers(3, cfg.vocab_size, (2, 8)).astype(np.int32)
  ref = forward(cfg, params, tokens)
  out = forward(cfg.replace(dtype="bfloat16"), params, tokens)
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max()) + 1e-2
  assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_value_head_gives_one_scalar_per_token():
  cfg = _cfg("llama", value_head=True)
  params = init_params(cfg, jax.random.key(6))
  assert params["value_head"]["kernel"].shape == (cfg.d_model, 1)
  tokens = np.ones((3, 5), np.int32)
  values = forward(cfg, params, tokens)
  assert values.shape == (3, 5)
  hidden, _ = Transformer(cfg).apply({"params": params}, tokens, return_hidden=True)
  np.testing.assert_allclose(values, hidden @ params["value_head"]["kernel"][:, 0], atol=1e-5)


def _packed_batch(vocab, seed):
  """2 rows of 19 tokens: 3 packed segments + 2 padding slots, and one whole row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (2, 19)).astype(np.int32)
  seg = np.array([[1] * 6 + [2] * 4 + [3] * 7 + [0] * 2, [1] * 19], np.int32)
  pos = np.array([list(range(6)) + list(range(4)) + list(range(7)) + [0, 0],
                  list(range(19))], np.int32)
  return tokens, seg, pos


def _logits_and_grads(cfg, params, tokens, seg, pos):
  @jax.jit
  def run(p):
    def loss(p):
      logits = forward(cfg, p, tokens, positions=pos, segment_ids=seg)
      w = jnp.sin(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
      return jnp.sum(logits * w), logits  # every position, padding included
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
    return logits, grads
  return run(params)


def test_chunked_attention_equals_dense(model):
  """Logits and every param's gradient, for a chunk that does not divide T = 19
  (5: one padding query) and one that does (1-token tiles)."""
  cfg, params = model
  if cfg.family == "gemma2":  # a window shorter than the segments, a soft-cap that bites
    cfg = cfg.replace(sliding_windows=(3, None), attn_softcap=0.5)
  if cfg.family == "gemma3":  # a window shorter than the segments, two RoPE bases
    cfg = cfg.replace(sliding_windows=(3, None), rope_local_theta=100.0)
  if cfg.family == "cohere2":  # a window shorter than the segments; no RoPE in layer 2
    cfg = cfg.replace(sliding_windows=(3, None))
  tokens, seg, pos = _packed_batch(cfg.vocab_size, 7)
  ref = _logits_and_grads(cfg, params, tokens, seg, pos)
  for chunk in (5, 1):
    out = _logits_and_grads(cfg.replace(attention_chunk=chunk), params, tokens, seg, pos)
    jax.tree.map(close_to_float32, out, ref)


def test_cache_decode_ignores_attention_chunk():
  """With a KV cache attention is dense whatever attention_chunk says; decoding
  matches the chunked full forward."""
  cfg = _cfg("gemma2", attention_chunk=4)
  params = init_params(cfg, jax.random.key(9))
  tokens = np.random.default_rng(9).integers(3, cfg.vocab_size, (2, 11)).astype(np.int32)
  full = forward(cfg, params, tokens)
  apply = jax.jit(lambda x, c: Transformer(cfg).apply({"params": params}, x, cache=c))
  logits, cache = apply(tokens[:, :7], init_cache(cfg, 2, 16))
  steps = [logits]
  for i in range(7, 11):
    logits, cache = apply(tokens[:, i:i + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)
