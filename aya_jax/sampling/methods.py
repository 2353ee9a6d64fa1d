"""Sampling methods: greedy, temperature, top-k, top-p, and chains of them.

A method is a small frozen (hashable) dataclass, so it can be a static
argument of a jitted function. Every method maps logits to filtered logits
(`process`): masked tokens get -inf, the rest keep their (scaled) logits, and
the sampling distribution is `softmax(process(logits))`. `sample` draws one
token per row with an explicit key per row, so the same keys give the same
tokens whatever else is in the batch.

Filters follow the order and tie rules of transformers' logits warpers
(temperature, then top-k, then top-p; tokens tied with the k-th largest logit
are kept; top-p keeps the smallest prefix of the sorted distribution whose
mass reaches p, always at least one token). `Sampling(temperature, top_k,
top_p)` is the usual combination; `Chain((...))` composes any sequence.
A temperature of 0 (or `Greedy()` anywhere in a chain) means argmax.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Greedy:
  """argmax of the logits; the sampling distribution is a point mass."""
  greedy = True

  def process(self, logits_bv):
    return logits_bv


@dataclasses.dataclass(frozen=True)
class Temperature:
  """logits / t; t == 0 is greedy."""
  t: float = 1.0

  def __post_init__(self):
    if not self.t >= 0:
      raise ValueError(f"Temperature.t={self.t}: must be >= 0")

  @property
  def greedy(self) -> bool:
    return self.t == 0

  def process(self, logits_bv):
    if self.t in (0, 1):
      return logits_bv
    return logits_bv / jnp.asarray(self.t, logits_bv.dtype)


@dataclasses.dataclass(frozen=True)
class TopK:
  """Keeps the k largest logits (and any tied with the k-th)."""
  k: int
  greedy = False

  def __post_init__(self):
    if not (isinstance(self.k, int) and self.k >= 1):
      raise ValueError(f"TopK.k={self.k!r}: must be an int >= 1")

  def process(self, logits_bv):
    if self.k >= logits_bv.shape[-1]:
      return logits_bv
    kth = jax.lax.top_k(logits_bv, self.k)[0][..., -1:]
    return jnp.where(logits_bv < kth, NEG_INF, logits_bv)


@dataclasses.dataclass(frozen=True)
class TopP:
  """Nucleus: keeps the most likely tokens until their mass reaches p."""
  p: float
  greedy = False

  def __post_init__(self):
    if not 0 < self.p <= 1:
      raise ValueError(f"TopP.p={self.p}: must be in (0, 1]")

  def process(self, logits_bv):
    if self.p >= 1:
      return logits_bv
    sorted_bv = -jnp.sort(-logits_bv, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_bv.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < self.p, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(sorted_bv, n_keep - 1, axis=-1)
    return jnp.where(logits_bv < threshold, NEG_INF, logits_bv)


@dataclasses.dataclass(frozen=True)
class Chain:
  """Applies `methods` in order; greedy if any of them is."""
  methods: tuple

  def __post_init__(self):
    object.__setattr__(self, "methods", tuple(self.methods))
    for m in self.methods:
      if not hasattr(m, "process"):
        raise TypeError(f"Chain: {m!r} is not a sampling method")

  @property
  def greedy(self) -> bool:
    return any(m.greedy for m in self.methods)

  def process(self, logits_bv):
    for m in self.methods:
      logits_bv = m.process(logits_bv)
    return logits_bv


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature, then top-k (0 = off), then top-p (1.0 = off)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.top_k < 0:
      raise ValueError(f"Sampling.top_k={self.top_k}: must be >= 0 (0 = off)")
    self.chain  # validates every part  # pylint: disable=pointless-statement

  @property
  def chain(self) -> Chain:
    parts = [Temperature(self.temperature)]
    if self.top_k:
      parts.append(TopK(int(self.top_k)))
    if self.top_p < 1:
      parts.append(TopP(self.top_p))
    return Chain(tuple(parts))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def process(self, logits_bv):
    return self.chain.process(logits_bv)


def from_config(temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> Union[Greedy, Sampling]:
  """Greedy() for temperature 0, else Sampling(temperature, top_k, top_p)."""
  if temperature == 0:
    return Greedy()
  return Sampling(float(temperature), int(top_k), float(top_p))


def filtered_logits(method, logits_bv):
  """The logits of the sampling distribution (float32, -inf where masked)."""
  return method.process(logits_bv.astype(jnp.float32))


def sample(method, logits_bv, keys_b) -> tuple[jax.Array, jax.Array]:
  """One token per row and its log-prob under the sampling distribution.

  logits_bv [B, V]; keys_b: [B] typed PRNG keys (row b uses keys_b[b] only).
  Greedy: argmax of the raw logits, log-prob 0 (a point mass).
  Returns (tokens_b int32, logprobs_b float32).
  """
  logits_bv = logits_bv.astype(jnp.float32)
  if method.greedy:
    tokens = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return tokens, jnp.zeros(tokens.shape, jnp.float32)
  f_bv = filtered_logits(method, logits_bv)
  tokens = jax.vmap(jax.random.categorical)(keys_b, f_bv).astype(jnp.int32)
  logp_bv = jax.nn.log_softmax(f_bv, axis=-1)
  return tokens, jnp.take_along_axis(logp_bv, tokens[:, None], axis=-1)[:, 0]

