r"""Policy-gradient training on one round's k samples per prompt: the online stage's
`online.algorithm` 'rloo', 'grpo' and 'dr_grpo' (`online.run` samples and scores; this
module trains). pi_old is the policy that sampled the round; pi_ref the FIXED reference
(`dpo.reference_init`, default the policy the online stage started from): the KL is to
that reference in every round, never to the round's own starting policy.

RLOO ("Back to Basics", Ahmadian et al. 2024):
  reward_i    = score_i - kl_coef * (log pi_old(y_i|x) - log pi_ref(y_i|x));
  advantage_i = reward_i - mean_{j != i} reward_j   (leave-one-out over k);
  loss        = clip_eps > 0: PPO-style clipped ratio per token,
                  -sum_i sum_t min(r_it A_i, clip(r_it, 1 - eps, 1 + eps) A_i),
                  r_it = pi(y_it | ...) / pi_old(y_it | ...); on the first pass
                  over the rollout r = 1 and the gradient is REINFORCE's on the
                  summed log-prob (the paper's estimator); later passes
                  (loop.num_steps x batch_size > P x k rows: the rollout
                  serves several updates) are kept near pi_old by the clip,
                  as TRL does;
                clip_eps = 0: plain REINFORCE on the summed log-prob
                  (exact only for one update per rollout);
                normalised by the number of samples in the batch.
GRPO (DeepSeekMath, Shao et al. 2024) and Dr. GRPO (Liu et al. 2025):
  advantage_i = (score_i - mean_j score_j) / (std_j score_j + 1e-4)   (GRPO)
                 score_i - mean_j score_j                              (Dr. GRPO);
  loss        = the clipped ratio per token plus kl_coef * the per-token k3 KL to
                pi_ref (in the loss, not the reward), averaged over each answer's
                tokens (GRPO) or summed and divided by online.max_new_tokens
                (Dr. GRPO), then over samples (`reward_losses.grpo_loss`; TRL's GRPOTrainer
                loss_type 'grpo' / 'dr_grpo', scale_rewards 'group' / 'none').
Every log-prob is recomputed by the training forward pass (not taken from
the sampler). Prompts that `usable` marks False (a score the scorer could not
give, or no answer at all) get zero weight.

Multi-host: every process holds every row (the sampler returns all of them);
each computes the log-probs of its share of a global batch, and the jitted
function replicates its output, so every process gets the whole vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from aya_jax import losses, reward_losses, sharding
from aya_jax.data import pipeline
from aya_jax.train import common, steps
from aya_jax.train import loop as loop_lib


class ArrayIterator:
  """Shuffled epochs over equal-length arrays -> this process's share of each
  global batch; checkpointable."""

  def __init__(self, arrays: dict, batch_size: int, seed: int):
    self.arrays, self.batch, self.seed, self.position = arrays, batch_size, seed, 0
    self.n = len(next(iter(arrays.values())))

  def __next__(self):
    g = np.arange(self.position, self.position + self.batch)
    rows = np.asarray([np.random.default_rng([self.seed, e]).permutation(self.n)[i]
                       for e, i in zip(g // self.n, g % self.n)])
    self.position += self.batch
    return {k: v[process_share(rows)] for k, v in self.arrays.items()}

  def get_state(self):
    return {"position": int(self.position)}

  def set_state(self, state):
    self.position = int(state["position"])


def process_share(rows: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch's row indices."""
  pc, pi, n = jax.process_count(), jax.process_index(), len(rows)
  return rows[pi * n // pc:(pi + 1) * n // pc]


def sample_rows(prompt_ids, completions, k, seq_len, pad_id) -> dict:
  """Pipeline rows prompt + sampled ids (loss on the sampled ids), [P*k, L]."""
  rows = []
  for i, ids in enumerate(completions):
    p = np.asarray(prompt_ids[i // k], np.int32)
    toks = np.concatenate([p, np.asarray(ids, np.int32)])[:seq_len]
    mask = np.concatenate([np.zeros(len(p), np.int32), np.ones(len(ids), np.int32)])[:seq_len]
    rows.append([pipeline.Example(id=str(i), source="", tokens=toks, loss_mask=mask,
                                  n_truncated=0)])
  return pipeline.build_batch(rows, seq_len, pad_id)


def masked_token_logps_fn(cfg, mesh, vocab_chunk: int = 0):
  """jit((params, rows) -> log-probs [B, L] of rows['targets'], zero off the
  loss mask), its output replicated so that every process can read it."""
  token_fn = steps.token_logps_fn(cfg, vocab_chunk)
  return jax.jit(lambda p, b: token_fn(p, b) * b["loss_mask"],
                 out_shardings=NamedSharding(mesh, P()))


def token_logps(fn, params, rows: dict, batch_size: int, mesh):
  """`fn` (masked_token_logps_fn) over every row [N, L], in global batches of
  `batch_size` rows; every process gets all N."""
  n = len(rows["tokens"])
  out = np.zeros(rows["tokens"].shape, np.float32)
  for s in range(0, n, batch_size):
    idx = np.arange(s, s + batch_size) % n  # the last batch wraps around
    gb = sharding.global_batch({k: v[process_share(idx)] for k, v in rows.items()}, mesh)
    out[idx] = jax.device_get(fn(params, gb))
  return out


ALGORITHMS = ("rloo", "grpo", "dr_grpo")


def loss_fn(cfg, algorithm: str = "rloo", vocab_chunk: int = 0, clip_eps: float = 0.2,
            kl_coef: float = 0.0, max_completion_length: int = 1):
  """(params, microbatch, normalizer, rng) -> (loss, aux) of `algorithm` (ALGORITHMS)."""
  token_fn = steps.token_logps_fn(cfg, vocab_chunk)

  def fn(params, mb, normalizer, rng):
    lp = token_fn(params, mb, rng)
    w = mb["sample_mask"].astype(jnp.float32)
    if algorithm != "rloo":
      loss = reward_losses.grpo_loss(lp, mb["old_logps"], mb["ref_logps"], mb["loss_mask"],
                              mb["advantage"], w, clip_eps, kl_coef, normalizer,
                              dr_grpo=algorithm == "dr_grpo",
                              max_completion_length=max_completion_length)
    elif clip_eps > 0:
      loss = reward_losses.clipped_reinforce_loss(lp, mb["old_logps"], mb["loss_mask"], mb["advantage"],
                                           w, clip_eps, normalizer)
    else:
      s = losses.sequence_logps(lp, mb["loss_mask"])[0]
      loss = reward_losses.reinforce_loss(s, mb["advantage"], w, normalizer)
    seq = jnp.sum(lp * mb["loss_mask"], -1)
    return loss, dict(n_samples=jnp.sum(w), logps=jax.lax.stop_gradient(jnp.sum(w * seq)) /
                      jnp.maximum(normalizer, 1.0))

  return fn


def advantages(algorithm: str, scores_pk: np.ndarray, policy_logps: np.ndarray,
               ref_logps: np.ndarray, kl_coef: float) -> tuple[np.ndarray, np.ndarray]:
  """(rewards [P*k], advantages [P*k]) of one round's scores [P, k] and the samples'
  summed log-probs under pi_old and pi_ref (RLOO's reward carries the KL; GRPO's not)."""
  if algorithm == "rloo":
    rewards = np.asarray(reward_losses.rloo_rewards(scores_pk.reshape(-1), policy_logps, ref_logps,
                                             kl_coef))
    adv = reward_losses.rloo_advantages(rewards.reshape(scores_pk.shape))
  else:
    rewards = scores_pk.reshape(-1).astype(np.float32)
    adv = reward_losses.grpo_advantages(scores_pk, scale=algorithm == "grpo")
  return rewards, np.asarray(adv).reshape(-1)


def train(config, d, cfg, params, ref_params, rows, scores_pk, usable, mesh, rules):
  """online.algorithm (ALGORITHMS) on one round's rows [P*k, L] with scores [P, k];
  `usable` [P]. Returns (params, report: mean_kl, mean_reward over usable prompts)."""
  oc, bs = config.online, config.data.batch_size
  if oc.algorithm not in ALGORITHMS:
    raise ValueError(f"online.algorithm={oc.algorithm!r}: policy gradient is {ALGORITHMS}")
  chunk = config.model.vocab_chunk
  fn = masked_token_logps_fn(cfg, mesh, chunk)  # one compile for the policy and the reference
  with sharding.activation_rules(mesh, rules):
    old = token_logps(fn, params, rows, bs, mesh)
    ref = token_logps(fn, ref_params, rows, bs, mesh)
  pol_s, ref_s = old.sum(-1), ref.sum(-1)
  use = np.repeat(np.asarray(usable, bool), scores_pk.shape[1])
  scores = np.where(use.reshape(scores_pk.shape), scores_pk, 0.0)  # unusable: weight 0 below
  rewards, adv = advantages(oc.algorithm, scores, pol_s, ref_s, oc.kl_coef)
  data = dict(rows, advantage=np.where(use, adv, 0.0).astype(np.float32),
              sample_mask=use.astype(np.int32), old_logps=old)
  if oc.algorithm != "rloo":
    data["ref_logps"] = ref
  fn = loss_fn(cfg, oc.algorithm, chunk, oc.clip_eps, oc.kl_coef, oc.max_new_tokens)
  st, step = common.make_trainer(config, cfg, params, fn, mesh, rules,
                              normalizer_fn=lambda b: jnp.sum(b["sample_mask"].astype(jnp.float32)))
  example = {k: v[:bs // jax.process_count()] for k, v in data.items()}
  step = common.jit_for(step, st, example, mesh)
  with sharding.activation_rules(mesh, rules):
    st = loop_lib.train_loop(st, step, ArrayIterator(data, bs, config.seed), config.loop, d, mesh,
                             run_config=config)
  n_use = max(int(use.sum()), 1)
  return st.model_params(), {"mean_kl": float(np.sum(np.where(use, pol_s - ref_s, 0.0)) / n_use),
                     "mean_reward": float(np.sum(np.where(use, rewards, 0.0)) / n_use)}
