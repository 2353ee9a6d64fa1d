"""Grouped-query attention with a KV cache and causal/padding/segment/window masks.

Masks are built from slots (the column a token occupies in the sequence or in
the cache), segment ids and positions:
  key visible  <=>  k_seg != 0  and  k_seg == q_seg  and  k_slot <= q_slot
                    and  q_pos - k_pos < window        (sliding-window layers)
Segment id 0 marks padding; packed examples have distinct segment ids, so
they never attend to each other. Slot order is time order, so left-padded
prompts and decoding over a cache use the same rule.

Two ways to compute it:
  dense    the [B, K, G, T, S] logits at once (always used with a KV cache);
  chunked  `cfg.attention_chunk` = C > 0 and no cache (training, scoring,
           prefill without a cache): blockwise over C query x C key tiles
           with an online softmax (Flash Attention, Dao et al. 2022/2023) in
           plain jnp and lax.scan, so it runs on CPU, GPU and TPU. Its
           custom VJP saves only q, k, v, the output and the per-row
           log-sum-exp, and recomputes each tile's probabilities in the
           backward pass: memory O(T C) instead of O(T^2). Tiles above the
           diagonal are skipped (lax.cond), tiles are computed in full.
A query that sees no key (segment 0, padding) gets the mean of all values in
both ways: that is what a softmax over an all-masked row gives.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from aya_jax.models.config import ModelConfig
from aya_jax.models.layers import Dense, Norm, apply_rope, softcap

NO_WINDOW = 2 ** 30
_MASKED = -1e30
_F32 = jnp.float32


def attention_mask(q_seg, k_seg, q_slot, k_slot, q_pos, k_pos, window):
  """[B, 1, 1, T, S] boolean mask (broadcasts over kv heads and groups)."""
  ok = (k_seg[:, None, :] != 0) & (q_seg[:, :, None] == k_seg[:, None, :])
  ok &= k_slot[None, None, :] <= q_slot[None, :, None]
  ok &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
  return ok[:, None, None, :, :]


def _logits(q_btkgd, k_bskd, scale, cap):
  """Scaled, soft-capped float32 logits [B, K, G, T, S] (unmasked)."""
  s = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd, preferred_element_type=_F32)
  return softcap(s * scale, cap)


def dense_attention(q_btkgd, k_bskd, v_bskd, mask, scale, cap):
  """Attention over the whole [T, S] logits at once -> [B, T, K, G, Dh]."""
  logits = jnp.where(mask, _logits(q_btkgd, k_bskd, scale, cap), _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bskd.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd)


# ------------------------------------------------------------ chunked attention


class _Tiling(NamedTuple):
  scale: float
  cap: Optional[float]
  chunk: int


def _cut(x, i, c, axis=1):
  """The i-th chunk of length c of x along `axis`."""
  return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis)


def _tile(t: _Tiling, q, k, seg, pos, window, i, j):
  """Soft-capped logits [B,K,G,C,C] (unmasked) of query chunk i against key
  chunk j, and the tile's mask (broadcastable to them)."""
  c = t.chunk
  ar = jnp.arange(c, dtype=jnp.int32)
  mask = attention_mask(_cut(seg, i, c), _cut(seg, j, c), i * c + ar, j * c + ar,
                        _cut(pos, i, c), _cut(pos, j, c), window)
  return _logits(_cut(q, i, c), _cut(k, j, c), t.scale, t.cap), mask


def _flash_forward(t: _Tiling, q, k, v, seg, pos, window):
  """(out [B,T,K,G,Dh] in q.dtype, lse [B,K,G,T] float32); lse = -inf for a
  row that sees no key (its output is 0 here)."""
  b, n_t, kh, g, dh = q.shape
  c = t.chunk
  n = n_t // c

  def query_chunk(_, i):
    def key_chunk(carry, j):
      def visit(carry):
        m, l, acc = carry
        s, mask = _tile(t, q, k, seg, pos, window, i, j)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing seen yet
        p = jnp.exp(s - m_ref[..., None])
        alpha = jnp.exp(m - m_ref)
        pv = jnp.einsum("bkgqc,bckd->bkgqd", p.astype(v.dtype), _cut(v, j, c),
                        preferred_element_type=_F32)
        return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv
      return jax.lax.cond(j <= i, visit, lambda x: x, carry), None  # causal: j > i unseen

    init = (jnp.full((b, kh, g, c), -jnp.inf, _F32), jnp.zeros((b, kh, g, c), _F32),
            jnp.zeros((b, kh, g, c, dh), _F32))
    (m, l, acc), _ = jax.lax.scan(key_chunk, init, jnp.arange(n))
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
    lse = jnp.where(l == 0.0, -jnp.inf, m + jnp.log(jnp.where(l == 0.0, 1.0, l)))
    return None, (out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse)

  _, (out, lse) = jax.lax.scan(query_chunk, None, jnp.arange(n))  # [n,B,C,K,G,D], [n,B,K,G,C]
  out = jnp.moveaxis(out, 0, 1).reshape(b, n_t, kh, g, dh)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, n_t)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(t: _Tiling, q, k, v, seg, pos, window):
  return _flash_forward(t, q, k, v, seg, pos, window)[0]


def _flash_fwd(t, q, k, v, seg, pos, window):
  out, lse = _flash_forward(t, q, k, v, seg, pos, window)
  return out, (q, k, v, seg, pos, window, out, lse)


def _flash_bwd(t, res, d_out):
  """Per tile: p = exp(s - lse), dv += p^T dO, dp = dO v^T, ds = p (dp - rowsum(dO o)),
  through the soft-cap (d tanh = 1 - tanh^2), dq += ds k, dk += ds^T q."""
  q, k, v, seg, pos, window, out, lse = res
  c = t.chunk
  n = q.shape[1] // c
  delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(_F32), out.astype(_F32))
  lse_ref = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows that see nothing: p = 0 anyway

  def key_chunk(dq, j):
    k_j, v_j = _cut(k, j, c), _cut(v, j, c)

    def query_chunk(carry, i):
      def visit(carry):
        dk_j, dv_j, dq = carry
        s, mask = _tile(t, q, k, seg, pos, window, i, j)
        p = jnp.where(mask, jnp.exp(s - _cut(lse_ref, i, c, 3)[..., None]), 0.0)
        do_i = _cut(d_out, i, c)
        dv_j = dv_j + jnp.einsum("bkgqc,bqkgd->bckd", p.astype(do_i.dtype), do_i,
                                 preferred_element_type=_F32)
        dp = jnp.einsum("bqkgd,bckd->bkgqc", do_i, v_j, preferred_element_type=_F32)
        ds = p * (dp - _cut(delta, i, c, 3)[..., None])
        if t.cap is not None:
          ds = ds * (1.0 - jnp.square(s / t.cap))
        ds = (ds * t.scale).astype(q.dtype)
        dq_i = jnp.einsum("bkgqc,bckd->bqkgd", ds, k_j, preferred_element_type=_F32)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, _cut(dq, i, c) + dq_i, i * c, 1)
        dk_j = dk_j + jnp.einsum("bkgqc,bqkgd->bckd", ds, _cut(q, i, c),
                                 preferred_element_type=_F32)
        return dk_j, dv_j, dq
      return jax.lax.cond(i >= j, visit, lambda x: x, carry), None  # causal: i < j unseen

    zeros = jnp.zeros(k_j.shape, _F32)
    (dk_j, dv_j, dq), _ = jax.lax.scan(query_chunk, (zeros, zeros, dq), jnp.arange(n))
    return dq, (dk_j, dv_j)

  dq, (dk, dv) = jax.lax.scan(key_chunk, jnp.zeros(q.shape, _F32), jnp.arange(n))
  dk, dv = (jnp.moveaxis(x, 0, 1).reshape(k.shape) for x in (dk, dv))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q_btkgd, k_btkd, v_btkd, seg, pos, window, scale, cap, chunk):
  """Self-attention without a cache (slots = 0..T-1 for queries and keys), in
  chunk x chunk tiles; equals `dense_attention` over `attention_mask`.

  T need not be a multiple of `chunk`: the sequence is padded with segment 0
  (masked keys, discarded queries); a chunk longer than T is cut to T."""
  n_t = q_btkgd.shape[1]
  c = min(int(chunk), n_t)
  pad = -n_t % c
  padded = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            for x in (q_btkgd, k_btkd, v_btkd, seg, pos)]
  out = _flash(_Tiling(float(scale), cap, c), *padded, window)[:, :n_t]
  # rows that see no key: the mean of all values, as the dense softmax gives
  mean_v = jnp.mean(v_btkd.astype(_F32), axis=1).astype(out.dtype)[:, None, :, None, :]
  return jnp.where((seg != 0)[:, :, None, None, None], out, mean_v)


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
    if c.qk_norm and c.qk_norm_shared:  # Gemma 3: one [Dh] weight for every head
      q = Norm(c, (dh,), ("kv",), name="q_norm")(q)
      kk = Norm(c, (dh,), ("kv",), name="k_norm")(kk)
    elif c.qk_norm:  # Cohere: a weight per head
      q = Norm(c, (h, dh), ("heads", "kv"), name="q_norm")(q)
      kk = Norm(c, (k, dh), ("kv_heads", "kv"), name="k_norm")(kk)
    local = window < NO_WINDOW  # a sliding-window layer (Gemma 3: its own RoPE base)
    if c.rope_on_full_layers:
      q = apply_rope(q, positions, c, local)
      kk = apply_rope(kk, positions, c, local)
    else:  # Cohere 2: no positional encoding in the full-attention layers
      q = jnp.where(local, apply_rope(q, positions, c, local), q)
      kk = jnp.where(local, apply_rope(kk, positions, c, local), kk)

    new_cache = None
    if layer_cache is not None:
      ck, cv = layer_cache
      idx = keys["index"]
      ck = jax.lax.dynamic_update_slice(ck, kk.astype(ck.dtype), (0, idx, 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, idx, 0, 0))
      new_cache = (ck, cv)
      kk, v = ck.astype(q.dtype), cv.astype(q.dtype)

    b, t = q.shape[:2]
    qg = q.reshape(b, t, k, h // k, dh)
    scale = c.query_scale if c.query_scale is not None else dh ** -0.5
    if layer_cache is None and c.attention_chunk:
      # no cache: queries and keys are the same tokens (keys' q_* == k_*)
      out = chunked_attention(qg, kk, v, keys["q_seg"], keys["q_pos"], window, scale,
                              c.attn_softcap, c.attention_chunk)
    else:
      mask = attention_mask(keys["q_seg"], keys["k_seg"], keys["q_slot"], keys["k_slot"],
                            keys["q_pos"], keys["k_pos"], window)
      out = dense_attention(qg, kk, v, mask, scale, c.attn_softcap)
    out = nn.with_logical_constraint(out.reshape(b, t, h, dh), ("batch", "length", "heads", "kv"))
    out = Dense(c, (h, dh), (d,), ("heads", "kv"), ("embed",), c.o_bias, name="o")(out)
    return out, new_cache
