"""Tests for aya_jax.reward_losses: RLOO, GRPO and Dr. GRPO against hand-computed
values, TRL 1.16's GRPOTrainer._compute_loss (its own code, run on a stand-in trainer)
and finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aya_jax import reward_losses


def test_rloo_advantages_by_hand():
  r = np.array([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]], np.float32)
  a = np.asarray(reward_losses.rloo_advantages(r))
  # 1 - mean(0, .5, .5) = 2/3; 0 - mean(1, .5, .5) = -2/3; .5 - mean(1, 0, .5) = 0
  np.testing.assert_allclose(a[0], [2 / 3, -2 / 3, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(a[1], 0.0)
  np.testing.assert_allclose(a.sum(-1), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="k >= 2"):
    reward_losses.rloo_advantages(r[:, :1])


def test_rloo_kl_term_zero_when_policy_is_reference_and_reward_by_hand():
  scores = np.array([1.0, 0.0], np.float32)
  lp = np.array([-3.0, -5.0], np.float32)
  np.testing.assert_allclose(reward_losses.rloo_rewards(scores, lp, lp, 0.5), scores)
  np.testing.assert_allclose(reward_losses.rloo_rewards(scores, lp, lp - 1.0, 0.5), scores - 0.5)
  # REINFORCE: -sum(w A logp) / n
  loss = reward_losses.reinforce_loss(jnp.asarray(lp), jnp.asarray([1.0, -1.0]), jnp.ones(2), 2.0)
  assert float(loss) == pytest.approx(-(-3.0 + 5.0) / 2)


def test_clipped_reinforce_loss_by_hand_and_its_gradient_at_the_old_policy():
  """PPO's clipped objective on per-token ratios, written out by hand; at
  pi = pi_old its gradient is REINFORCE's on the summed log-prob."""
  lp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -0.1, -4.0]])
  old = jnp.array([[-1.2, -2.0, -0.1], [-0.3, -0.6, -4.0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1]], jnp.float32)
  adv, w, eps = jnp.array([2.0, -1.0]), jnp.array([1.0, 1.0]), 0.2
  r = np.exp(np.asarray(lp) - np.asarray(old))  # [[1.2214, 1, 0.6703], [1, 1.6487, 1]]
  want = 0.0
  for i, a in enumerate([2.0, -1.0]):
    for t in range(3):
      want += float(mask[i, t]) * min(r[i, t] * a, np.clip(r[i, t], 0.8, 1.2) * a)
  got = reward_losses.clipped_reinforce_loss(lp, old, mask, adv, w, eps, 2.0)
  np.testing.assert_allclose(float(got), -want / 2.0, rtol=1e-6)
  # row 0 token 0: ratio 1.22 > 1.2 with A > 0 -> clipped, no gradient there
  g = jax.grad(lambda x: reward_losses.clipped_reinforce_loss(x, old, mask, adv, w, eps, 2.0))(lp)
  assert float(g[0, 0]) == 0.0 and float(g[0, 1]) != 0.0
  # at the old policy the gradient equals reinforce_loss's
  g_clip = jax.grad(lambda x: reward_losses.clipped_reinforce_loss(x, lp, mask, adv, w, eps, 2.0))(lp)
  g_pg = jax.grad(lambda x: reward_losses.reinforce_loss(jnp.sum(x * mask, -1), adv, w, 2.0))(lp)
  np.testing.assert_allclose(np.asarray(g_clip), np.asarray(g_pg), rtol=1e-6)


def test_grpo_advantages_by_hand():
  """GRPO: (r - mean) / (std + 1e-4), std with Bessel's correction (TRL's nanstd);
  Dr. GRPO: r - mean."""
  r = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
  std = math.sqrt(4 * 0.25 / 3)
  np.testing.assert_allclose(np.asarray(reward_losses.grpo_advantages(r)),
                             [np.array([1, -1, -1, 1]) * 0.5 / (std + 1e-4), [0.0] * 4],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(reward_losses.grpo_advantages(r, scale=False)),
                             [[0.5, -0.5, -0.5, 0.5], [0.0] * 4])
  with pytest.raises(ValueError, match="k >= 2"):
    reward_losses.grpo_advantages(jnp.ones((3, 1)))


# one GRPO batch: 3 samples, 4 completion tokens, ratios inside and outside the clip range
G_LP = np.array([[-1.0, -2.0, -0.5, -3.0], [-0.3, -0.1, -4.0, -1.0], [-2.0, -0.7, -0.2, -0.9]])
G_OLD = np.array([[-1.2, -2.0, -0.1, -3.0], [-0.3, -0.6, -4.0, -1.1], [-2.0, -0.7, -0.5, -0.2]])
G_REF = np.array([[-1.1, -1.5, -0.4, -2.0], [-0.5, -0.2, -3.0, -1.0], [-1.0, -0.9, -0.3, -0.9]])
G_MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
G_ADV = np.array([1.5, -0.7, 0.3])


class _FakeGRPOTrainer:
  """Just what TRL's GRPOTrainer._compute_loss reads besides the model's log-probs, so
  that its own code computes the loss of G_LP (one process, no accumulation)."""

  def __init__(self, loss_type, beta, eps, max_len, lp):
    import collections
    import types
    self.loss_type, self.beta, self.epsilon_low, self.epsilon_high = loss_type, beta, eps, eps
    self.max_completion_length, self._lp = max_len, lp
    self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
    self.importance_sampling_level, self.use_vllm, self.aux_loss_enabled = "token", False, False
    self._entropy_bonus_enabled, self.current_gradient_accumulation_steps = False, 1
    self.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None)
    self.model = types.SimpleNamespace(training=True)
    self.accelerator = types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x,
                                             gather_for_metrics=lambda x: x)
    self._metrics = collections.defaultdict(lambda: collections.defaultdict(list))

  def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kw):
    return self._lp, torch.zeros_like(self._lp), None


def _trl_grpo(loss_type, beta, eps, max_len):
  from trl.trainer import grpo_trainer
  t = lambda x: torch.tensor(x, dtype=torch.float64)
  lp = t(G_LP).requires_grad_(True)
  fake = _FakeGRPOTrainer(loss_type, beta, eps, max_len, lp)
  inputs = dict(prompt_ids=torch.zeros((3, 2), dtype=torch.long),
                prompt_mask=torch.ones((3, 2), dtype=torch.long),
                completion_ids=torch.zeros((3, 4), dtype=torch.long),
                completion_mask=t(G_MASK), advantages=t(G_ADV),
                old_per_token_logps=t(G_OLD), ref_per_token_logps=t(G_REF))
  loss = grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)
  loss.backward()
  return float(loss.detach()), lp.grad.numpy()


@pytest.mark.parametrize("dr_grpo", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trls_grpo_trainer_and_finite_differences(dr_grpo, beta):
  """Our GRPO / Dr. GRPO loss and its gradient equal TRL 1.16's GRPOTrainer._compute_loss
  (its own code, on the same log-probs, advantages, old and reference log-probs); the
  gradient also matches central finite differences of our loss in float64."""
  eps, max_len = 0.2, 6
  f = lambda x: reward_losses.grpo_loss(x, G_OLD, G_REF, G_MASK, G_ADV, np.ones(3), eps, beta, 3.0,
                                 dr_grpo=dr_grpo, max_completion_length=max_len)
  want, want_grad = _trl_grpo("dr_grpo" if dr_grpo else "grpo", beta, eps, max_len)
  lp = jnp.asarray(G_LP, jnp.float32)
  assert abs(float(f(lp)) - want) < 1e-6
  np.testing.assert_allclose(np.asarray(jax.grad(f)(lp)), want_grad, atol=1e-6)
  # central differences (the loss reduces in float32: h = 1e-2, error O(h^2)), at tokens
  # inside the clip range, clipped (no gradient), masked (none) and with the KL term
  g = np.asarray(jax.grad(f)(lp))
  h = 1e-2
  for i, t in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 3), (2, 1), (2, 2)]:
    d = np.zeros_like(G_LP)
    d[i, t] = h
    fd = (float(f(lp + d)) - float(f(lp - d))) / (2 * h)
    assert abs(g[i, t] - fd) < 2e-4, (i, t, g[i, t], fd)
  assert g[0, 0] == 0.0 if not beta else g[0, 0] != 0.0  # clipped: only the KL's gradient
  assert g[0, 3] == 0.0 and g[2, 2] == 0.0  # masked
