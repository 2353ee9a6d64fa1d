"""Decoder models (Cohere, Llama, Gemma 2, Qwen 2) over plain params dicts."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from aya_jax.models import lora
from aya_jax.models.config import ModelConfig, preset, tiny
from aya_jax.models.transformer import Transformer, init_cache, output_logits, unembed_matrix


def init_params(cfg: ModelConfig, rng) -> dict:
  """Random params (a plain nested dict of arrays) on the default device."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  return nn.meta.unbox(Transformer(cfg).init(rng, tokens)["params"])


def forward(cfg: ModelConfig, params: dict, tokens, positions=None, segment_ids=None):
  """logits [B, T, V] float32 (values [B, T] for a value-head model)."""
  out, _ = Transformer(cfg).apply(lora.variables(params), jnp.asarray(tokens), positions,
                                  segment_ids)
  return out


__all__ = ["ModelConfig", "Transformer", "forward", "init_params", "init_cache", "preset",
           "tiny", "output_logits", "unembed_matrix"]
