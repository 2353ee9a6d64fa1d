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

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from aya_jax.models.layers import softcap

Array = jax.Array


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


def nonzero(normalizer) -> Array:
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
  normalizer = nonzero(normalizer)
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
  normalizer = nonzero(normalizer)
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
    norm = nonzero(normalizer)
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


# ----------------------------------------------------------- Bradley-Terry
# (reward model; aya_jax/train/reward_model.py)


def bradley_terry_loss(r_chosen: Array, r_rejected: Array,
                       margin: Optional[Array] = None, center_coef: float = 0.0,
                       weights: Optional[Array] = None,
                       normalizer: Optional[Array] = None) -> tuple[Array, dict]:
  """Pairwise reward-model loss, summed then divided by ``normalizer``.

  Per pair i: ``-log sigmoid(rc_i - rr_i - margin_i) + center_coef *
  (rc_i + rr_i)**2``. With all weights 1 and the default normalizer this is
  the mean over pairs, i.e. TRL's RewardTrainer objective
  ``-logsigmoid(rc - rr - margin).mean() + coef * mean((rc + rr)**2)``; the
  centring term (Eisenstein et al. 2023) pins the free additive constant of
  Bradley-Terry rewards near 0 so rewards from different runs compare.

  Args:
    r_chosen, r_rejected: [N] rewards (any float dtype; reduced in fp32).
    margin: optional [N] (or scalar) required gap, e.g. a rating difference.
    center_coef: weight of the reward-centring term (0 disables it).
    weights: optional [N] 0/1 (padding pairs 0) or importance weights.
    normalizer: weighted pair count of the whole global batch (exact
      gradient accumulation); default: this batch's ``sum(weights)``.
  Returns:
    (loss, aux) with additive sums: n_pairs, n_correct (rc > rr strictly),
    margin_sum (sum of rc - rr), loss_sum (BT part only), center_sum.
  """
  rc = r_chosen.astype(jnp.float32)
  rr = r_rejected.astype(jnp.float32)
  w = jnp.ones_like(rc) if weights is None else jnp.asarray(weights, jnp.float32)
  diff = rc - rr
  shifted = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
  bt = -jax.nn.log_sigmoid(shifted)
  center = (rc + rr) ** 2
  if normalizer is None:
    normalizer = jnp.sum(w)
  per_pair = bt + center_coef * center if center_coef else bt
  loss = jnp.sum(w * per_pair) / nonzero(normalizer)
  sg = jax.lax.stop_gradient
  aux = {
      "n_pairs": sg(jnp.sum(w)),
      "n_correct": sg(jnp.sum(w * (diff > 0).astype(jnp.float32))),
      "margin_sum": sg(jnp.sum(w * diff)),
      "loss_sum": sg(jnp.sum(w * bt)),
      "center_sum": sg(jnp.sum(w * center)),
  }
  return loss, aux


# =========================================================================
# Preference optimisation: the DPO family and RLOO
# =========================================================================
#
# Conventions (TRL 1.16 `DPOTrainer._compute_loss`, the reference the tests
# re-derive): sequence log-probs are SUMS over completion tokens; the DPO
# "logit" is delta = (pi_c - ref_c) - (pi_r - ref_r); rewards are
# beta * (pi - ref) of the summed log-probs, whatever the loss type.

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "copg")
# Loss types that always use per-token averaged log-ratios (as TRL does).
_AVERAGED_TYPES = ("ipo", "sigmoid_norm")


def sequence_logps(logp_bt: Array, mask_bt: Array) -> tuple[Array, Array]:
  """(sum of log-probs over the mask, mask count) per row, float32."""
  mask = mask_bt.astype(jnp.float32)
  return jnp.sum(logp_bt.astype(jnp.float32) * mask, -1), jnp.sum(mask, -1)


def dpo_loss(chosen_logps: Array, rejected_logps: Array,
             ref_chosen_logps: Array, ref_rejected_logps: Array,
             chosen_lengths: Optional[Array] = None,
             rejected_lengths: Optional[Array] = None, *,
             loss_type: str = "sigmoid", beta: float = 0.1,
             label_smoothing: float = 0.0,
             average_logps: bool = False,
             score_margins: Optional[Array] = None) -> tuple[Array, dict]:
  """Per-pair DPO-family losses [B] and per-pair statistics.

  All log-probs are [B] sums over completion tokens; lengths are the token
  counts (needed by ipo, sigmoid_norm and `average_logps`). With
  s = log-ratios (divided by the length for ipo, sigmoid_norm or
  `average_logps`, "Averaging log-likelihoods in direct alignment") and
  delta = s_chosen - s_rejected, eps = label_smoothing:

    sigmoid       -(1-eps) logsig(beta delta) - eps logsig(-beta delta)
                  (eps > 0: conservative DPO, cDPO)
    ipo           (delta - 1/(2 beta))^2                   (IPO eq. 17)
    hinge         relu(1 - beta delta)                     (SLiC)
    robust        [-(1-eps) logsig(beta delta) + eps logsig(-beta delta)]
                  / (1 - 2 eps)                            (rDPO)
    sigmoid_norm  -logsig(beta delta) on per-token averages
    copg          (m - beta delta)^2, m = score_margins = R(y_c) - R(y_r): CoPG,
                  "Contrastive Policy Gradient" (Flet-Berliac et al. 2024), on a pair
                  of answers with their scalar rewards, = (R_b(y_c) - R_b(y_r))^2 with
                  R_b(y) = R(y) - beta log(pi(y)/pi_ref(y)). Its gradient,
                  -2 beta (R_b(y_c) - R_b(y_r)) grad(log pi(y_c) - log pi(y_r)), is the
                  paper's off-policy policy gradient with the other answer as baseline
                  (no importance weights); its minimum, beta delta = m, is the
                  KL-regularised optimum's log-ratio (pi* ~ pi_ref exp(R / beta)). IPO is
                  the case m = 1/2 (up to the factor beta^2). With k answers to a prompt,
                  its mean over all their pairs is 2/k times Command A's (Cohere 2025)
                  k-sample CoPG loss, 1/(k-1) sum_{i<j} (R_b(y_i) - R_b(y_j))^2.

  Returns (loss_b, aux) with aux: chosen_rewards, rejected_rewards
  (beta * summed log-ratio, no gradient), margins, accuracies (1.0 where
  chosen reward > rejected reward).
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"dpo loss_type={loss_type!r}; expected one of {DPO_LOSS_TYPES}")
  if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
  if label_smoothing and loss_type not in ("sigmoid", "robust"):
    raise ValueError(f"label_smoothing={label_smoothing} has no effect on loss_type="
                     f"{loss_type!r} (only sigmoid and robust use it)")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen_ratio = f32(chosen_logps) - f32(ref_chosen_logps)
  rejected_ratio = f32(rejected_logps) - f32(ref_rejected_logps)
  if loss_type == "copg" and score_margins is None:
    raise ValueError("dpo loss_type='copg' needs score_margins (chosen_score - rejected_score)")
  if loss_type in _AVERAGED_TYPES or average_logps:
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError(f"dpo loss_type={loss_type!r} / average_logps needs the lengths")
    sc = chosen_ratio / jnp.maximum(f32(chosen_lengths), 1.0)
    sr = rejected_ratio / jnp.maximum(f32(rejected_lengths), 1.0)
  else:
    sc, sr = chosen_ratio, rejected_ratio
  delta = sc - sr
  eps = label_smoothing
  if loss_type in ("sigmoid", "sigmoid_norm"):
    loss = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
    if eps:
      loss = loss - eps * jax.nn.log_sigmoid(-beta * delta)
  elif loss_type == "ipo":
    loss = (delta - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == "copg":
    loss = (f32(score_margins) - beta * delta) ** 2
  elif loss_type == "hinge":
    loss = jax.nn.relu(1.0 - beta * delta)
  else:  # robust
    loss = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
            + eps * jax.nn.log_sigmoid(-beta * delta)) / (1.0 - 2.0 * eps)
  chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
  aux = dict(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
             margins=chosen_rewards - rejected_rewards,
             accuracies=(chosen_rewards > rejected_rewards).astype(jnp.float32))
  return loss, aux


SRPO_ROWS = ("chosen", "rejected", "rejected->chosen", "rejected->rejected", "chosen->chosen")


def srpo_loss(policy_logps: Array, ref_logps: Array, lengths: Optional[Array] = None, *,
              beta: float = 0.1, alpha: float = 0.5,
              average_logps: bool = False) -> tuple[Array, dict]:
  """SRPO, "Self-Improving Robust Preference Optimization" (Choi et al. 2024): per-pair
  losses [B] of one model that both answers (pi(y|x)) and revises a draft (pi(y'|y, x),
  the prompt `formatting.revision_messages`), and per-pair statistics (`dpo_loss`'s).

  Inputs are [B, 5] summed log-probs of the rows SRPO_ROWS: y_w and y_l answered, then
  y_l revised into y_w, y_l into itself, y_w into itself; h = log pi - log pi_ref of each
  (divided by its length with `average_logps`). The min-max game
  min_pi max_pi+ E[P(y2 > y1) - beta KL(pi+ || pi_ref | y1) + beta KL(pi || pi_ref)] has the
  closed forms pi+*(y2|y1) ~ pi_ref(y2|y1) exp(P(y2 > y1) / beta) and
  pi*(y) ~ pi_ref(y) / Z*(y), Z*(y) = sum_y' pi_ref(y'|y) exp(P(y' > y) / beta). With the
  pair's preference P(y_w > y_l) = 1 and P(y > y) = 1/2 they give two regressions that
  vanish at the optimum, both with IPO's target 1/(2 beta):

    self-improvement  r_i = h(y_w|y_l) - h(y_l|y_l) - 1/(2 beta)
    robust generation r_g = h(y_w) - h(y_l) + h(y_w|y_l) - h(y_w|y_w) - 1/(2 beta)
    loss = alpha r_i^2 + (1 - alpha) r_g^2

  (r_g: beta log(pi*/pi_ref)(y) = beta h+*(y'|y) - P(y' > y) + const for any y', taken at
  y' = y_w for y = y_l and y = y_w.) alpha = 1 trains the reviser alone; without the
  revision terms r_g is IPO's residual.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pol, ref = f32(policy_logps), f32(ref_logps)
  if pol.shape[-1] != len(SRPO_ROWS) or ref.shape != pol.shape:
    raise ValueError(f"srpo_loss needs [B, {len(SRPO_ROWS)}] log-probs {SRPO_ROWS}; got "
                     f"policy {pol.shape}, reference {ref.shape}")
  h = pol - ref
  if average_logps:
    if lengths is None:
      raise ValueError("srpo_loss with average_logps needs the lengths")
    h = h / jnp.maximum(f32(lengths), 1.0)
  target = 1.0 / (2.0 * beta)
  improve = h[:, 2] - h[:, 3] - target
  robust = h[:, 0] - h[:, 1] + h[:, 2] - h[:, 4] - target
  loss = alpha * improve ** 2 + (1.0 - alpha) * robust ** 2
  chosen_rewards = jax.lax.stop_gradient(beta * (pol[:, 0] - ref[:, 0]))
  rejected_rewards = jax.lax.stop_gradient(beta * (pol[:, 1] - ref[:, 1]))
  aux = dict(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
             margins=chosen_rewards - rejected_rewards,
             accuracies=(chosen_rewards > rejected_rewards).astype(jnp.float32),
             revision_margins=jax.lax.stop_gradient(beta * (h[:, 2] - h[:, 3])))
  return loss, aux


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies", "logps/chosen", "logps/rejected")


def dpo_metric_sums(aux: dict, chosen_logps: Array, rejected_logps: Array,
                    weights_b: Array, normalizer, language_b: Optional[Array] = None,
                    languages: Sequence[str] = ()) -> dict:
  """TRL-named metrics as additive sums (micro-batches add to batch means).

  Global metrics are sum(w * x) / normalizer (the pair count of the whole
  batch). Per language l: '<name>@<l>' holds the unnormalised sum over
  that language's pairs and 'pairs@<l>' their count; the exact mean over
  any window is sum / count (`per_language_means`).
  """
  w = weights_b.astype(jnp.float32)
  values = dict(zip(DPO_METRICS, (
      aux["chosen_rewards"], aux["rejected_rewards"], aux["margins"],
      aux["accuracies"], jax.lax.stop_gradient(chosen_logps),
      jax.lax.stop_gradient(rejected_logps))))
  norm = nonzero(normalizer)
  out = {k: jnp.sum(w * v.astype(jnp.float32)) / norm for k, v in values.items()}
  if languages:
    onehot = jax.nn.one_hot(language_b, len(languages), dtype=jnp.float32) * w[:, None]
    for i, lang in enumerate(languages):
      out[f"pairs@{lang}"] = jnp.sum(onehot[:, i])
      for k, v in values.items():
        out[f"{k}@{lang}"] = jnp.sum(onehot[:, i] * v.astype(jnp.float32))
  return out


def per_language_means(sums: dict) -> dict:
  """{'<name>/<lang>': sum/count} from `dpo_metric_sums` keys (any window)."""
  out = {}
  for key, value in sums.items():
    if "@" not in key or key.startswith("pairs@"):
      continue
    name, lang = key.rsplit("@", 1)
    count = sums.get(f"pairs@{lang}", 0.0)
    if count:
      out[f"{name}/{lang}"] = float(value) / float(count)
  return out
