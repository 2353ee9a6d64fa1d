"""Grouped-query attention with a KV cache and causal/padding/segment/window masks.

Masks are built from slots (the column a token occupies in the sequence or in
the cache), segment ids and positions:
  key visible  <=>  k_seg != 0  and  k_seg == q_seg  and  k_slot <= q_slot
                    and  q_pos - k_pos < window        (sliding-window layers)
Segment id 0 marks padding; packed examples have distinct segment ids, so
they never attend to each other. Slot order is time order, so left-padded
prompts and decoding over a cache use the same rule.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aya_jax.models.config import ModelConfig
from aya_jax.models.layers import Dense, Norm, apply_rope, softcap

NO_WINDOW = 2 ** 30
_MASKED = -1e30


def attention_mask(q_seg, k_seg, q_slot, k_slot, q_pos, k_pos, window):
  """[B, 1, 1, T, S] boolean mask (broadcasts over kv heads and groups)."""
  ok = (k_seg[:, None, :] != 0) & (q_seg[:, :, None] == k_seg[:, None, :])
  ok &= k_slot[None, None, :] <= q_slot[None, :, None]
  ok &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
  return ok[:, None, None, :, :]


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, keys, window, layer_cache):
    """x [B,T,D]; positions [B,T]; keys: dict(q_seg, k_seg, q_slot, k_slot, q_pos,
    k_pos, index); layer_cache: None or (k [B,S,K,Dh], v [B,S,K,Dh]).
    Returns (out [B,T,D], new layer_cache or None)."""
    c = self.cfg
    h, k, dh, d = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    q = Dense(c, (d,), (h, dh), ("embed",), ("heads", "kv"), c.qkv_bias, name="q")(x)
    kk = Dense(c, (d,), (k, dh), ("embed",), ("kv_heads", "kv"), c.qkv_bias, name="k")(x)
    v = Dense(c, (d,), (k, dh), ("embed",), ("kv_heads", "kv"), c.qkv_bias, name="v")(x)
    if c.qk_norm:
      q = Norm(c, (h, dh), ("heads", "kv"), name="q_norm")(q)
      kk = Norm(c, (k, dh), ("kv_heads", "kv"), name="k_norm")(kk)
    q = apply_rope(q, positions, c)
    kk = apply_rope(kk, positions, c)

    new_cache = None
    if layer_cache is not None:
      ck, cv = layer_cache
      idx = keys["index"]
      ck = jax.lax.dynamic_update_slice(ck, kk.astype(ck.dtype), (0, idx, 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, idx, 0, 0))
      new_cache = (ck, cv)
      kk, v = ck.astype(q.dtype), cv.astype(q.dtype)

    b, t = q.shape[:2]
    g = h // k
    qg = q.reshape(b, t, k, g, dh)
    scale = c.query_scale if c.query_scale is not None else dh ** -0.5
    logits = jnp.einsum("btkgd,bskd->bkgts", qg.astype(jnp.float32), kk.astype(jnp.float32))
    logits = softcap(logits * scale, c.attn_softcap)
    mask = attention_mask(keys["q_seg"], keys["k_seg"], keys["q_slot"], keys["k_slot"],
                          keys["q_pos"], keys["k_pos"], window)
    logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = Dense(c, (h, dh), (d,), ("heads", "kv"), ("embed",), c.o_bias, name="o")(out)
    return out, new_cache
