"""Pure losses on scalar rewards of sampled answers: RLOO, GRPO and Dr. GRPO.
Every reduction runs in float32; a `normalizer` is the sample (or prompt) count of the
whole global batch, so micro-batches add up to the full batch's loss (as in losses.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aya_jax.losses import nonzero

Array = jax.Array


def rloo_advantages(rewards_pk: Array) -> Array:
  """REINFORCE leave-one-out advantages for [P, k] rewards (k >= 2).

  A_i = r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean_j r_j)
  ("Back to Basics", Ahmadian et al. 2024, eq. 5).
  """
  r = jnp.asarray(rewards_pk, jnp.float32)
  k = r.shape[-1]
  if k < 2:
    raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
  others = (jnp.sum(r, -1, keepdims=True) - r) / (k - 1)
  return r - others


def sequence_kl(policy_logps: Array, ref_logps: Array) -> Array:
  """Per-sequence KL estimate log pi(y|x) - log pi_ref(y|x) (summed log-probs)."""
  return jnp.asarray(policy_logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32)


def rloo_rewards(scores: Array, policy_logps: Array, ref_logps: Array,
                 kl_coef: float) -> Array:
  """Score minus kl_coef * sequence KL (no gradient: rewards are data)."""
  kl = sequence_kl(policy_logps, ref_logps)
  return jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32) - kl_coef * kl)


def reinforce_loss(seq_logps: Array, advantages: Array, weights: Array,
                   normalizer) -> Array:
  """-sum(w * A * log pi(y|x)) / normalizer (normalizer: samples in the batch)."""
  a = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
  w = jnp.asarray(weights, jnp.float32)
  return -jnp.sum(w * a * seq_logps.astype(jnp.float32)) / nonzero(normalizer)


def clipped_reinforce_loss(token_logps: Array, old_token_logps: Array, mask: Array,
                           advantages: Array, weights: Array, clip_eps: float,
                           normalizer) -> Array:
  """REINFORCE with PPO's clipped per-token ratio, for a rollout that serves
  several updates:

    -sum_i w_i sum_t m_it min(r_it A_i, clip(r_it, 1 - eps, 1 + eps) A_i) / normalizer,
    r_it = exp(log pi(y_it) - log pi_old(y_it)).

  At pi = pi_old (r = 1) its gradient equals `reinforce_loss`'s on the summed
  log-prob, A_i * grad sum_t log pi(y_it); a token whose ratio left the clip
  range in the advantage's direction gets no gradient.
  """
  a = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]
  ratio = jnp.exp(token_logps.astype(jnp.float32) -
                  jax.lax.stop_gradient(jnp.asarray(old_token_logps, jnp.float32)))
  per_token = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
  per_seq = jnp.sum(per_token * jnp.asarray(mask, jnp.float32), -1)
  return -jnp.sum(jnp.asarray(weights, jnp.float32) * per_seq) / nonzero(normalizer)


def grpo_advantages(rewards_pk: Array, scale: bool = True, eps: float = 1e-4) -> Array:
  """Group-relative advantages for [P, k] rewards (k >= 2 samples of each prompt).

  GRPO (DeepSeekMath, Shao et al. 2024, section 4.1.2):
    A_i = (r_i - mean_j r_j) / (std_j r_j + eps), std with Bessel's correction;
  Dr. GRPO ("Understanding R1-Zero-Like Training", Liu et al. 2025) drops the std
  (scale=False): A_i = r_i - mean_j r_j, no bias toward groups of equal rewards.
  """
  r = jnp.asarray(rewards_pk, jnp.float32)
  k = r.shape[-1]
  if k < 2:
    raise ValueError(f"GRPO needs k >= 2 samples per prompt, got {k}")
  centred = r - jnp.mean(r, -1, keepdims=True)
  if not scale:
    return centred
  std = jnp.sqrt(jnp.sum(centred ** 2, -1, keepdims=True) / (k - 1))
  return centred / (std + eps)


def k3_kl(token_logps: Array, ref_token_logps: Array) -> Array:
  """Per-token KL(pi || pi_ref) estimate exp(q - p) - (q - p) - 1 with p, q the policy's
  and reference's log-probs of the sampled token (Schulman's k3; GRPO eq. 4): >= 0, and
  unbiased for samples of pi."""
  d = jnp.asarray(ref_token_logps, jnp.float32) - token_logps.astype(jnp.float32)
  return jnp.exp(d) - d - 1.0


def grpo_loss(token_logps: Array, old_token_logps: Array, ref_token_logps: Array,
              mask: Array, advantages: Array, weights: Array, clip_eps: float,
              beta: float, normalizer, dr_grpo: bool = False,
              max_completion_length: int = 1) -> Array:
  """GRPO's objective (DeepSeekMath eq. 3), negated, per token t of sample i:

    l_it = -min(r_it A_i, clip(r_it, 1 - eps, 1 + eps) A_i) + beta * KL_k3(pi || pi_ref)_it,
    r_it = exp(log pi(y_it) - log pi_old(y_it));

  GRPO averages l over each sample's tokens, then over samples:
    sum_i w_i (sum_t m_it l_it / |y_i|) / normalizer.
  Dr. GRPO (dr_grpo=True) divides the token sum by a constant instead of |y_i|, so a long
  wrong answer is not penalised less per token than a short one:
    sum_i w_i sum_t m_it l_it / (normalizer * max_completion_length).
  `normalizer`: the samples in the whole batch (microbatches included); the reductions
  equal TRL's GRPOTrainer loss_type 'grpo' and 'dr_grpo'.
  """
  a = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]
  lp = token_logps.astype(jnp.float32)
  ratio = jnp.exp(lp - jax.lax.stop_gradient(jnp.asarray(old_token_logps, jnp.float32)))
  per_token = -jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
  if beta:
    per_token = per_token + beta * k3_kl(lp, jax.lax.stop_gradient(ref_token_logps))
  m = jnp.asarray(mask, jnp.float32)
  per_seq = jnp.sum(per_token * m, -1)
  if dr_grpo:
    per_seq = per_seq / max_completion_length
  else:
    per_seq = per_seq / jnp.maximum(jnp.sum(m, -1), 1.0)
  return jnp.sum(jnp.asarray(weights, jnp.float32) * per_seq) / nonzero(normalizer)
