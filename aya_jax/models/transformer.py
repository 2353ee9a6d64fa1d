"""The decoder: tokens -> logits (or values), with an optional KV cache.

`Transformer(cfg).apply({'params': p}, tokens, positions, segment_ids, cache)`
returns `(logits_btv, cache)`; with `cfg.value_head` it returns `(values_bt,
cache)`; with `return_hidden=True` it returns the final-norm hidden states
`[B, T, D]` instead of logits (for vocabulary-chunked log-probs).

Layers are always an `nn.scan` over one Block (params stacked on a leading
'layers' axis; `cfg.scan_unroll` unrolls), optionally rematerialised.
The cache is a dict:
  k, v          [L, B, S, K, Dh]   keys/values per layer and slot
  segment_ids   [B, S]             0 = empty slot / padding
  positions     [B, S]
  index         int32 scalar       next slot to write
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aya_jax.models import lora
from aya_jax.models.attention import NO_WINDOW, Attention
from aya_jax.models.config import ModelConfig
from aya_jax.models.layers import KERNEL_INIT, MLP, Norm, dtype_of, softcap


class Weight(nn.Module):
  """A single named parameter (embedding table, lm head, value head)."""
  shape: tuple
  axes: tuple
  pname: str
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self):
    return self.param(self.pname, nn.with_logical_partitioning(KERNEL_INIT, self.axes),
                      self.shape, self.dtype)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, xs, positions, keys):
    c = self.cfg
    window, layer_cache = xs
    norm = lambda name: Norm(c, (c.d_model,), ("embed",), name=name)
    h = norm("pre_attn_norm")(x)
    attn, new_cache = Attention(c, name="attn")(h, positions, keys, window, layer_cache)
    if c.block == "parallel":
      x = x + attn + MLP(c, name="mlp")(h)
    elif c.block == "sequential":
      x = x + attn
      x = x + MLP(c, name="mlp")(norm("pre_mlp_norm")(x))
    else:  # sandwich (Gemma 2)
      x = x + norm("post_attn_norm")(attn)
      x = x + norm("post_mlp_norm")(MLP(c, name="mlp")(norm("pre_mlp_norm")(x)))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


def _remat_policy(name):
  if name == "dots":
    return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  return None


class Transformer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    pdt = dtype_of(c.param_dtype)
    self.embedder = Weight((c.vocab_size, c.d_model), ("vocab", "embed"), "embedding", pdt,
                           name="embedder")
    block = Block
    if c.remat != "none":
      block = nn.remat(Block, policy=_remat_policy(c.remat), prevent_cse=False)
    self.layers = nn.scan(
        block, variable_axes={"params": 0, lora.KEY: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast), length=c.n_layers,
        unroll=c.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
    self.final_norm = Norm(c, (c.d_model,), ("embed",), name="final_norm")
    if c.has_lm_head:
      self.lm_head = Weight((c.d_model, c.vocab_size), ("embed", "vocab"), "kernel", pdt,
                            name="lm_head")
    if c.value_head:
      self.value_head = Weight((c.d_model, 1), ("embed", None), "kernel", pdt,
                               name="value_head")

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, return_hidden=False):
    c = self.cfg
    cdt = dtype_of(c.dtype)
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = positions.astype(jnp.int32)
    q_slot = index + jnp.arange(t, dtype=jnp.int32)
    if cache is None:
      keys = dict(q_seg=segment_ids, k_seg=segment_ids, q_slot=q_slot, k_slot=q_slot,
                  q_pos=positions, k_pos=positions, index=index)
      layer_cache = None
    else:
      k_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index))
      k_pos = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, index))
      s = k_seg.shape[1]
      keys = dict(q_seg=segment_ids, k_seg=k_seg, q_slot=q_slot,
                  k_slot=jnp.arange(s, dtype=jnp.int32), q_pos=positions, k_pos=k_pos,
                  index=index)
      layer_cache = (cache["k"], cache["v"])

    emb = self.embedder()
    x = jnp.take(emb, tokens, axis=0).astype(cdt)
    if c.embed_scale:
      x = x * jnp.asarray(np.sqrt(c.d_model), cdt)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    windows = jnp.asarray([NO_WINDOW if w is None else w
                           for w in (c.sliding_windows or (None,) * c.n_layers)], jnp.int32)
    x, new_layer_cache = self.layers(x, (windows, layer_cache), positions, keys)
    x = self.final_norm(x)

    new_cache = None
    if cache is not None:
      new_cache = dict(k=new_layer_cache[0], v=new_layer_cache[1], segment_ids=keys["k_seg"],
                       positions=keys["k_pos"], index=index + t)
    if return_hidden:
      return x, new_cache
    if c.value_head:
      w = self.value_head().astype(jnp.float32)
      return jnp.einsum("btd,do->bto", x.astype(jnp.float32), w)[..., 0], new_cache
    logits = jnp.einsum("btd,dv->btv", x, self.unembed().astype(cdt),
                        preferred_element_type=jnp.float32)
    return output_logits(c, logits), new_cache

  def unembed(self):
    if self.cfg.tie_embeddings:
      return self.embedder().T
    return self.lm_head()


def output_logits(cfg: ModelConfig, logits):
  """Applies logit_scale and the final soft-cap (float32)."""
  logits = logits.astype(jnp.float32)
  if cfg.logit_scale != 1.0:
    logits = logits * cfg.logit_scale
  return softcap(logits, cfg.final_softcap)


def unembed_matrix(cfg: ModelConfig, params):
  """[D, V] output projection of a params tree (tied or not)."""
  if cfg.tie_embeddings:
    return params["embedder"]["embedding"].T
  return params["lm_head"]["kernel"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None):
  dtype = dtype or dtype_of(cfg.dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              segment_ids=jnp.zeros((batch, max_len), jnp.int32),
              positions=jnp.zeros((batch, max_len), jnp.int32),
              index=jnp.zeros((), jnp.int32))
