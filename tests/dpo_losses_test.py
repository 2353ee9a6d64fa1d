"""The DPO family, its metrics and RLOO against hand-computed values and
against TRL 1.16's formulas (trl/trainer/dpo_trainer.py, DPOTrainer.
_compute_loss, the `for loss_type ...` block; re-derived here in torch)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax import losses

BETA = 0.1
# a handful of pairs: policy chosen/rejected, reference chosen/rejected, lengths
PC = np.array([-10.0, -4.0, -20.0, -7.5], np.float32)
PR = np.array([-12.0, -3.0, -25.0, -7.5], np.float32)
RC = np.array([-11.0, -4.5, -21.0, -8.0], np.float32)
RR = np.array([-11.0, -4.0, -22.0, -10.0], np.float32)
NC = np.array([5, 2, 10, 3], np.float32)
NR = np.array([6, 2, 8, 4], np.float32)


def _loss(**kw):
  loss, aux = losses.dpo_loss(PC, PR, RC, RR, NC, NR, beta=BETA, **kw)
  return np.asarray(loss), {k: np.asarray(v) for k, v in aux.items()}


def _logsig(x):
  return -np.log1p(np.exp(-x))


def test_sigmoid_by_hand():
  # pair 0: delta = (-10 + 11) - (-12 + 11) = 2 -> -log sigmoid(0.2)
  loss, aux = _loss(loss_type="sigmoid")
  assert loss[0] == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)
  delta = (PC - RC) - (PR - RR)  # [2, -0.5, 4, -2.0]
  np.testing.assert_allclose(delta, [2.0, -0.5, 4.0, -2.0])
  np.testing.assert_allclose(loss, -_logsig(BETA * delta), rtol=1e-6)
  np.testing.assert_allclose(aux["chosen_rewards"], BETA * (PC - RC), rtol=1e-6)
  np.testing.assert_allclose(aux["rejected_rewards"], BETA * (PR - RR), rtol=1e-6)
  np.testing.assert_allclose(aux["margins"], BETA * delta, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(aux["accuracies"], [1, 0, 1, 0])


def test_label_smoothing_cdpo_by_hand():
  loss, _ = _loss(loss_type="sigmoid", label_smoothing=0.1)
  d = 0.2  # pair 0
  assert loss[0] == pytest.approx(0.9 * math.log(1 + math.exp(-d)) + 0.1 * math.log(1 + math.exp(d)),
                                  rel=1e-6)


def test_ipo_hinge_robust_norm_by_hand():
  # per-token averaged log-ratios for pair 0: chosen 1/5, rejected -1/6
  d0 = 1 / 5 - (-1 / 6)
  assert _loss(loss_type="ipo")[0][0] == pytest.approx((d0 - 1 / (2 * BETA)) ** 2, rel=1e-5)
  assert _loss(loss_type="sigmoid_norm")[0][0] == pytest.approx(
      math.log(1 + math.exp(-BETA * d0)), rel=1e-5)
  np.testing.assert_allclose(_loss(loss_type="hinge")[0], [0.8, 1.05, 0.6, 1.2], rtol=1e-5)
  eps, d = 0.2, 0.2
  want = (0.8 * math.log(1 + math.exp(-d)) - 0.2 * math.log(1 + math.exp(d))) / 0.6
  assert _loss(loss_type="robust", label_smoothing=eps)[0][0] == pytest.approx(want, rel=1e-5)


def test_first_step_loss_is_ln2_when_policy_equals_reference():
  loss, aux = losses.dpo_loss(PC, PR, PC, PR, NC, NR, beta=BETA)
  np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
  np.testing.assert_array_equal(aux["accuracies"], 0)


def _trl(loss_type, eps=0.0):
  """TRL 1.16's per-sequence losses (reverse-KL scores = log-ratios), in torch."""
  import torch
  import torch.nn.functional as F
  t = lambda x: torch.tensor(x, dtype=torch.float64)
  cs, rs = t(PC) - t(RC), t(PR) - t(RR)
  delta = cs - rs
  if loss_type == "sigmoid":
    return -F.logsigmoid(BETA * delta)
  if loss_type == "hinge":
    return torch.relu(1 - BETA * delta)
  if loss_type in ("ipo", "sigmoid_norm"):
    d = cs / t(NC).clamp(min=1.0) - rs / t(NR).clamp(min=1.0)
    return (d - 1 / (2 * BETA)) ** 2 if loss_type == "ipo" else -F.logsigmoid(BETA * d)
  if loss_type == "robust":
    clean = -(1 - eps) * F.logsigmoid(BETA * delta)
    flipped = -eps * F.logsigmoid(-BETA * delta)
    return (clean - flipped) / (1 - 2 * eps)
  raise ValueError(loss_type)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                           ("sigmoid_norm", 0.0), ("robust", 0.0),
                                           ("robust", 0.3)])
def test_matches_trl_formulas(loss_type, eps):
  np.testing.assert_allclose(_loss(loss_type=loss_type, label_smoothing=eps)[0],
                             _trl(loss_type, eps).numpy(), rtol=1e-5, atol=1e-7)


def test_trl_is_the_installed_version_when_present():
  import trl
  import inspect
  from trl.trainer import dpo_trainer
  src = inspect.getsource(dpo_trainer.DPOTrainer._compute_loss)
  # the formulas re-derived above, as TRL writes them
  assert "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)" in src
  assert "torch.relu(1 - self.beta * delta_score)" in src
  assert "(ipo_delta - 1 / (2 * self.beta)) ** 2" in src
  assert "(clean_loss_term - flipped_loss_term) / (1 - 2 * self.label_smoothing)" in src
  assert trl.__version__.startswith("1.16")


def test_every_option_changes_the_loss():
  base = _loss(loss_type="sigmoid")[0]
  variants = {
      "label_smoothing": _loss(loss_type="sigmoid", label_smoothing=0.1)[0],
      "average_logps": _loss(loss_type="sigmoid", average_logps=True)[0],
      "beta": np.asarray(losses.dpo_loss(PC, PR, RC, RR, NC, NR, beta=0.5)[0]),
      **{t: _loss(loss_type=t)[0] for t in ("ipo", "hinge", "sigmoid_norm")},
      "robust": _loss(loss_type="robust", label_smoothing=0.2)[0],
  }  # rpo_alpha acts in the step: tests/dpo_test.py
  for name, v in variants.items():
    assert not np.allclose(v, base), name
  # robust at eps 0 is sigmoid by definition; eps moves it away from cDPO too
  np.testing.assert_allclose(_loss(loss_type="robust")[0], base, rtol=1e-6)
  assert not np.allclose(variants["robust"], variants["label_smoothing"])
  assert not np.allclose(_loss(loss_type="hinge", average_logps=True)[0],
                         _loss(loss_type="hinge")[0])
  # lengths are used exactly when a type averages
  other = losses.dpo_loss(PC, PR, RC, RR, NC + 1, NR, beta=BETA, loss_type="ipo")[0]
  assert not np.allclose(other, _loss(loss_type="ipo")[0])


def test_bad_options_fail_loudly():
  with pytest.raises(ValueError, match="loss_type"):
    _loss(loss_type="sigmoidd")
  with pytest.raises(ValueError, match="label_smoothing"):
    _loss(loss_type="hinge", label_smoothing=0.1)  # would be silently ignored
  with pytest.raises(ValueError, match="robust"):
    _loss(loss_type="robust", label_smoothing=0.5)


def test_metric_sums_trl_names_and_per_language():
  _, aux = _loss(loss_type="sigmoid")
  w = jnp.asarray([1.0, 1.0, 1.0, 0.0])  # last pair is padding
  lang = jnp.asarray([0, 1, 0, 1])
  sums = losses.dpo_metric_sums(aux, jnp.asarray(PC), jnp.asarray(PR), w, 3.0, lang, ("en", "fr"))
  for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected"):
    assert name in sums
  assert float(sums["rewards/accuracies"]) == pytest.approx(2 / 3)
  assert float(sums["logps/chosen"]) == pytest.approx((-10 - 4 - 20) / 3)
  means = losses.per_language_means({k: float(v) for k, v in sums.items()})
  assert means["rewards/accuracies/en"] == 1.0 and means["rewards/accuracies/fr"] == 0.0
  assert means["logps/rejected/en"] == pytest.approx((-12 - 25) / 2)
  assert float(sums["pairs@fr"]) == 1.0


def test_rloo_advantages_by_hand():
  r = np.array([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]], np.float32)
  a = np.asarray(losses.rloo_advantages(r))
  # 1 - mean(0, .5, .5) = 2/3; 0 - mean(1, .5, .5) = -2/3; .5 - mean(1, 0, .5) = 0
  np.testing.assert_allclose(a[0], [2 / 3, -2 / 3, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(a[1], 0.0)
  np.testing.assert_allclose(a.sum(-1), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="k >= 2"):
    losses.rloo_advantages(r[:, :1])


def test_rloo_kl_term_zero_when_policy_is_reference_and_reward_by_hand():
  scores = np.array([1.0, 0.0], np.float32)
  lp = np.array([-3.0, -5.0], np.float32)
  np.testing.assert_allclose(losses.rloo_rewards(scores, lp, lp, 0.5), scores)
  np.testing.assert_allclose(losses.rloo_rewards(scores, lp, lp - 1.0, 0.5), scores - 0.5)
  # REINFORCE: -sum(w A logp) / n
  loss = losses.reinforce_loss(jnp.asarray(lp), jnp.asarray([1.0, -1.0]), jnp.ones(2), 2.0)
  assert float(loss) == pytest.approx(-(-3.0 + 5.0) / 2)
