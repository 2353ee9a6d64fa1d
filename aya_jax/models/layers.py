"""Norms, rotary embeddings, einsum dense layers and the gated MLP.

Every parameter carries logical axis names (see aya_jax/axes.py); norms and
softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aya_jax.models import lora
from aya_jax.models.config import ModelConfig

KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class Norm(nn.Module):
  """RMSNorm (Llama), RMSNorm with (1 + w) (Gemma) or bias-free LayerNorm (Cohere).

  `shape` is the normalised trailing shape of the scale (Cohere's qk-norm has a
  [heads, head_dim] scale but normalises over head_dim only).
  """
  cfg: ModelConfig
  shape: Sequence[int]
  axes: Sequence[str]

  @nn.compact
  def __call__(self, x):
    kind = self.cfg.norm
    init = nn.initializers.zeros if kind == "rms_plus_one" else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, tuple(self.axes)),
                       tuple(self.shape), dtype_of(self.cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    if kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.norm_eps)
    s = scale.astype(jnp.float32)
    if kind == "rms_plus_one":
      return (y * (1.0 + s)).astype(x.dtype)
    if kind == "rms":  # Llama casts before scaling
      return (s * y.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
    return (s * y).astype(x.dtype)


class Dense(nn.Module):
  """y = einsum(x, kernel) (+ bias) over named axes.

  in_shape/out_shape are the kernel's input and output dims; the kernel is
  [*in_shape, *out_shape], contracted over the trailing len(in_shape) dims of x.
  """
  cfg: ModelConfig
  in_shape: Sequence[int]
  out_shape: Sequence[int]
  in_axes: Sequence[str]
  out_axes: Sequence[str]
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    pdt = dtype_of(self.cfg.param_dtype)
    cdt = dtype_of(self.cfg.dtype)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(KERNEL_INIT, tuple(self.in_axes) + tuple(self.out_axes)),
        tuple(self.in_shape) + tuple(self.out_shape), pdt)
    n_in = len(self.in_shape)
    y = jax.lax.dot_general(
        x.astype(cdt), kernel.astype(cdt),
        ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
        preferred_element_type=jnp.float32 if cdt == jnp.float32 else None)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             tuple(self.out_axes)),
                        tuple(self.out_shape), pdt)
      y = y + bias.astype(y.dtype)
    y = lora.adapt(self, x, y, self.in_shape, self.out_shape, self.in_axes, self.out_axes, cdt)
    return y.astype(cdt)


def rope_inv_freq(cfg: ModelConfig, local: bool = False):
  """Inverse frequencies [head_dim // 2], with 'linear' or 'llama3' scaling; `local`:
  those of the sliding-window layers (cfg.rope_local_theta, unscaled)."""
  d = cfg.head_dim
  exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
  if local:
    return 1.0 / (cfg.rope_local_theta ** exponents)
  inv = 1.0 / (cfg.rope_theta ** exponents)
  scaling = cfg.rope_scaling
  if not scaling:
    return inv
  kind = scaling[0]
  if kind == "linear":
    return inv / scaling[1]
  if kind == "llama3":
    factor, low, high, old_len = scaling[1:5]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"ModelConfig.rope_scaling type {kind!r} is not supported (linear, llama3)")


def apply_rope(x_bthd, positions_bt, cfg: ModelConfig, local=None):
  """Rotary embedding; rotate_half layout, or interleaved pairs (Cohere). `local` (a
  traced bool: a sliding-window layer) picks cfg.rope_local_theta when it is set."""
  inv = rope_inv_freq(cfg)
  if cfg.rope_local_theta is not None and local is not None:
    inv = jnp.where(local, rope_inv_freq(cfg, local=True), inv)
  ang = positions_bt.astype(jnp.float32)[..., None] * inv  # [B, T, d/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  x = x_bthd.astype(jnp.float32)
  if cfg.rope_interleaved:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthd.dtype)


def activation(name: str):
  if name == "silu":
    return jax.nn.silu
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise ValueError(f"ModelConfig.activation={name!r} is not supported")


class MLP(nn.Module):
  """down(act(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    dense = lambda name, i, o, ia, oa: Dense(c, (i,), (o,), (ia,), (oa,), c.mlp_bias, name=name)
    gate = dense("gate", c.d_model, c.d_ff, "embed", "mlp")(x)
    up = dense("up", c.d_model, c.d_ff, "embed", "mlp")(x)
    h = activation(c.activation)(gate.astype(jnp.float32)).astype(up.dtype) * up
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense("down", c.d_ff, c.d_model, "mlp", "embed")(h)


def softcap(x, cap: Optional[float]):
  """Gemma 2 logit soft-capping: tanh(x / cap) * cap; identity for None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap
