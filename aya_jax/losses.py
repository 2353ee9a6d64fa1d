"""Pure loss functions. Every reduction runs in float32.

Token log-probabilities come in two forms with the same value:

  token_logprobs(logits_btv, targets_bt)             from materialised logits
  chunked_token_logprobs(hidden_btd, unembed_dv, ...) from the final hidden
      states, over vocabulary chunks with a running logsumexp, so the
      [B, T, V] logits never exist at once (neither forward nor backward).

Normalisation for gradient accumulation: ``sft_loss`` sums the masked
negative log-likelihood and divides by ``normalizer``. Pass the number of
loss tokens in the whole global batch; then the losses (and gradients) of
micro-batches add up to exactly the full-batch loss, however the tokens are
spread over micro-batches. Left at None it is the micro-batch's own count.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def softcap(x: Array, cap: Optional[float]) -> Array:
  """Gemma 2 logit soft-capping: tanh(x / cap) * cap; identity for None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


def _logsumexp(x: Array) -> Array:
  """logsumexp over the last axis, in float32, shift not differentiated."""
  x = x.astype(jnp.float32)
  m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return jnp.log(jnp.sum(jnp.exp(x - m), axis=-1)) + m[..., 0]


def token_logprobs(logits_btv: Array, targets_bt: Array) -> Array:
  """log p(target) per position: log_softmax(logits)[target], in float32."""
  logits = logits_btv.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return picked - _logsumexp(logits)


def chunked_token_logprobs(hidden_btd: Array, unembed_dv: Array,
                           targets_bt: Array, chunk: int = 8192,
                           logit_scale: float = 1.0,
                           final_softcap: Optional[float] = None) -> Array:
  """token_logprobs(softcap(hidden @ unembed * logit_scale)) without the logits.

  The vocabulary is cut into chunks of ``chunk`` columns (the last one padded
  and masked); a ``lax.scan`` over chunks keeps a running max, a running sum
  of exponentials and the target's logit. The scan body is rematerialised
  (``jax.checkpoint``), so the backward pass also holds one [B, T, chunk]
  block at a time plus [B, T] carries per chunk.

  Args:
    hidden_btd: final hidden states (after the final norm).
    unembed_dv: output projection [D, V] (for tied embeddings, embedding.T).
    targets_bt: int token ids in [0, V).
    chunk: vocabulary columns per step.
    logit_scale: multiplies the logits before capping (Cohere logit_scale).
    final_softcap: Gemma 2 final_logit_softcapping, or None.
  Returns:
    float32 [B, T] log-probabilities.
  """
  d, v = unembed_dv.shape
  chunk = max(1, min(chunk, v))
  n_chunks = -(-v // chunk)
  pad = n_chunks * chunk - v
  w = jnp.pad(unembed_dv, ((0, 0), (0, pad)))
  w_ndc = w.reshape(d, n_chunks, chunk).transpose(1, 0, 2)
  starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
  targets_bt = targets_bt.astype(jnp.int32)

  @jax.checkpoint
  def body(carry, xs):
    m_bt, s_bt, picked_bt = carry
    w_dc, start = xs
    logits = jnp.einsum("btd,dc->btc", hidden_btd, w_dc,
                        preferred_element_type=jnp.float32)
    logits = softcap(logits * logit_scale, final_softcap)
    col = start + jnp.arange(chunk, dtype=jnp.int32)
    logits = jnp.where(col < v, logits, -jnp.inf)
    # the running max is only a shift: keep it out of the gradient
    m_new = jax.lax.stop_gradient(jnp.maximum(m_bt, jnp.max(logits, -1)))
    s_bt = s_bt * jnp.exp(m_bt - m_new) + jnp.sum(
        jnp.exp(logits - m_new[..., None]), axis=-1)
    local = targets_bt - start
    in_chunk = (local >= 0) & (local < chunk)
    hit = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[..., None],
                              axis=-1)[..., 0]
    picked_bt = picked_bt + jnp.where(in_chunk, hit, 0.0)
    return (m_new, s_bt, picked_bt), None

  shape = targets_bt.shape
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape, jnp.float32))
  (m_bt, s_bt, picked_bt), _ = jax.lax.scan(body, init, (w_ndc, starts))
  return picked_bt - (jnp.log(s_bt) + m_bt)


def _nonzero(normalizer) -> Array:
  """The normalizer as float32, with 0 replaced by 1 (empty batch -> 0)."""
  n = jnp.asarray(normalizer, jnp.float32)
  return jnp.where(n > 0, n, 1.0)


def masked_mean_nll(logp_bt: Array, mask_bt: Array,
                    normalizer: Optional[Array] = None) -> tuple[Array, Array]:
  """(sum of -logp over mask) / normalizer, and that sum. fp32.

  ``normalizer`` defaults to the mask's count; a zero count gives loss 0.
  """
  mask = mask_bt.astype(jnp.float32)
  nll_sum = -jnp.sum(logp_bt.astype(jnp.float32) * mask)
  if normalizer is None:
    normalizer = jnp.sum(mask)
  normalizer = _nonzero(normalizer)
  return nll_sum / normalizer, nll_sum


def z_loss(logits_btv: Array, mask_bt: Array, coefficient: float,
           normalizer: Optional[Array] = None) -> Array:
  """coefficient * mean over masked tokens of logsumexp(logits)**2.

  The auxiliary "z-loss" (PaLM, ST-MoE) keeps the softmax normaliser near
  1 (log Z near 0), which stabilises bf16 training and keeps logits from
  drifting. ``normalizer`` works as in ``sft_loss`` (divide by the global
  count for exact gradient accumulation). Typical coefficient: 1e-4.
  """
  mask = mask_bt.astype(jnp.float32)
  lse = _logsumexp(logits_btv)
  if normalizer is None:
    normalizer = jnp.sum(mask)
  normalizer = _nonzero(normalizer)
  return coefficient * jnp.sum(mask * lse**2) / normalizer


def sft_loss(logits_btv: Array, targets_bt: Array, mask_bt: Array,
             normalizer: Optional[Array] = None,
             z_loss_coef: float = 0.0) -> tuple[Array, dict]:
  """Masked next-token cross-entropy, summed then divided by ``normalizer``.

  Args:
    logits_btv: logits (any float dtype; reduced in float32).
    targets_bt: target ids, already shifted (targets[t] is predicted from
      position t).
    mask_bt: 1 where the token counts (assistant tokens), 0 elsewhere.
    normalizer: loss tokens in the whole global batch (see module doc);
      default mask.sum() of this batch.
    z_loss_coef: weight of the optional ``z_loss`` term (0 disables it).
  Returns:
    (loss, aux). aux: n_tokens (mask sum), nll_sum, n_correct, accuracy
    (argmax == target over masked tokens of this batch), z_loss. The sums
    add up across micro-batches; accuracy = sum n_correct / sum n_tokens.
  """
  logits = logits_btv.astype(jnp.float32)
  mask = mask_bt.astype(jnp.float32)
  lse_bt = _logsumexp(logits)
  picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  if normalizer is None:
    normalizer = jnp.sum(mask)
  loss, nll_sum = masked_mean_nll(picked - lse_bt, mask, normalizer)
  zl = jnp.zeros((), jnp.float32)
  if z_loss_coef:
    norm = _nonzero(normalizer)
    zl = z_loss_coef * jnp.sum(mask * lse_bt**2) / norm
    loss = loss + zl
  n_tokens = jnp.sum(mask)
  correct = (jnp.argmax(logits, axis=-1) == targets_bt).astype(jnp.float32)
  n_correct = jax.lax.stop_gradient(jnp.sum(correct * mask))
  aux = {
      "n_tokens": n_tokens,
      "nll_sum": jax.lax.stop_gradient(nll_sum),
      "n_correct": n_correct,
      "accuracy": n_correct / jnp.maximum(n_tokens, 1.0),
      "z_loss": jax.lax.stop_gradient(zl),
  }
  return loss, aux


def chunked_sft_loss(hidden_btd: Array, unembed_dv: Array, targets_bt: Array,
                     mask_bt: Array, normalizer: Optional[Array] = None,
                     chunk: int = 8192, logit_scale: float = 1.0,
                     final_softcap: Optional[float] = None
                     ) -> tuple[Array, dict]:
  """``sft_loss`` from hidden states via ``chunked_token_logprobs``.

  For large vocabularies. No accuracy or z-loss (they need full logits).
  aux: n_tokens, nll_sum.
  """
  logp = chunked_token_logprobs(hidden_btd, unembed_dv, targets_bt, chunk,
                                logit_scale, final_softcap)
  loss, nll_sum = masked_mean_nll(logp, mask_bt, normalizer)
  n_tokens = jnp.sum(mask_bt.astype(jnp.float32))
  return loss, {"n_tokens": n_tokens, "nll_sum": jax.lax.stop_gradient(nll_sum)}
