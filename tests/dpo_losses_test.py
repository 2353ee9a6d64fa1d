"""The DPO family and its metrics against hand-computed values and
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


def test_copg_by_hand_its_optimum_and_its_gradient_is_rloos():
  """CoPG (Flet-Berliac et al. 2024) on pairs: (m - beta delta)^2 written out; zero loss
  and gradient at the KL-regularised optimum beta delta = m; and over all pairs of k
  answers its gradient on each answer's log-prob is -(4 beta / k) times RLOO's
  leave-one-out advantage of the KL-regularised reward R - beta log(pi / pi_ref)
  (Command A's remark: on-policy CoPG is RLOO)."""
  import jax
  from aya_jax import reward_losses
  m = np.array([1.0, 0.5, -0.25, 0.0], np.float32)
  loss, aux = _loss(loss_type="copg", score_margins=m)
  delta = (PC - RC) - (PR - RR)
  np.testing.assert_allclose(loss, (m - BETA * delta) ** 2, rtol=1e-6)
  assert aux["margins"] == pytest.approx(BETA * delta)
  with pytest.raises(ValueError, match="score_margins"):
    _loss(loss_type="copg")
  # at the optimum: loss and gradient 0
  at = lambda pc: losses.dpo_loss(pc, PR, RC, RR, loss_type="copg", beta=BETA,
                                  score_margins=BETA * delta)[0].sum()
  assert float(at(jnp.asarray(PC))) == pytest.approx(0.0, abs=1e-9)
  np.testing.assert_allclose(np.asarray(jax.grad(at)(jnp.asarray(PC))), 0.0, atol=1e-6)
  # k = 4 answers to one prompt, every pair (higher reward as chosen), mean over pairs
  r = np.array([1.0, 0.0, 0.5, 0.25], np.float32)
  ref = np.array([-5.0, -3.0, -4.0, -6.0], np.float32)
  lp0 = jnp.asarray([-4.5, -3.5, -4.0, -5.0], jnp.float32)
  hi, lo = zip(*[(i, j) if r[i] >= r[j] else (j, i) for i in range(4) for j in range(i + 1, 4)])
  hi, lo = np.asarray(hi), np.asarray(lo)

  def pair_mean(lp):
    per, _ = losses.dpo_loss(lp[hi], lp[lo], ref[hi], ref[lo], loss_type="copg", beta=BETA,
                             score_margins=r[hi] - r[lo])
    return per.mean()

  rb = r - BETA * (np.asarray(lp0) - ref)
  by_hand = sum((rb[i] - rb[j]) ** 2 for i, j in zip(hi, lo)) / 6
  assert float(pair_mean(lp0)) == pytest.approx(by_hand, rel=1e-5)
  rloo = reward_losses.rloo_advantages(reward_losses.rloo_rewards(r, lp0, ref, BETA)[None])[0]
  np.testing.assert_allclose(np.asarray(jax.grad(pair_mean)(lp0)),
                             -(4 * BETA / 4) * np.asarray(rloo), rtol=1e-5, atol=1e-7)


def test_srpo_vanishes_at_the_papers_closed_form_optimum_and_by_hand():
  """SRPO on a 3-answer bandit: the min-max game's closed forms (Choi et al. 2024),
  pi+*(y'|y) ~ pi_ref(y'|y) exp(P(y' > y) / beta) and pi*(y) ~ pi_ref(y) / Z*(y), zero
  both regressions on every pair (whatever alpha); any other policy has a positive loss;
  values and gradient by hand."""
  import jax
  beta = 0.5
  pref = np.array([[0.5, 1, 1], [0, 0.5, 1], [0, 0, 0.5]])  # P(i > j): 0 > 1 > 2
  ref_y = np.array([0.2, 0.5, 0.3])
  ref_rev = np.random.default_rng(0).uniform(0.2, 1.0, (3, 3))  # pi_ref(y' | y) per row y
  ref_rev /= ref_rev.sum(1, keepdims=True)
  tilt = ref_rev * np.exp(pref.T / beta)  # [y, y']: pi_ref(y'|y) exp(P(y' > y) / beta)
  z = tilt.sum(1)
  rev_opt, gen_opt = tilt / z[:, None], ref_y / z / (ref_y / z).sum()

  def rows(gen, rev, w, l):
    return [np.log(gen[w]), np.log(gen[l]), np.log(rev[l, w]), np.log(rev[l, l]),
            np.log(rev[w, w])]

  pairs = [(0, 1), (0, 2), (1, 2)]
  ref = np.array([rows(ref_y, ref_rev, w, l) for w, l in pairs], np.float32)
  opt = np.array([rows(gen_opt, rev_opt, w, l) for w, l in pairs], np.float32)
  for alpha in (0.0, 0.5, 1.0):
    loss, aux = losses.srpo_loss(opt, ref, beta=beta, alpha=alpha)
    np.testing.assert_allclose(np.asarray(loss), 0.0, atol=1e-9)
  other = np.array([rows(np.array([0.3, 0.3, 0.4]), rev_opt, w, l) for w, l in pairs],
                   np.float32)
  assert float(losses.srpo_loss(other, ref, beta=beta, alpha=0.5)[0].sum()) > 1e-3
  # by hand on arbitrary log-probs, and the gradient
  pol = jnp.asarray([[-3.0, -4.0, -2.0, -5.0, -1.5]])
  refr = np.array([[-3.5, -3.5, -2.5, -4.0, -2.0]], np.float32)
  h = np.asarray(pol)[0] - refr[0]
  ri, rg = h[2] - h[3] - 1.0, h[0] - h[1] + h[2] - h[4] - 1.0
  f = lambda p: losses.srpo_loss(p, refr, beta=beta, alpha=0.25)[0].sum()
  assert float(f(pol)) == pytest.approx(0.25 * ri ** 2 + 0.75 * rg ** 2, rel=1e-6)
  want = np.array([1.5 * rg, -1.5 * rg, 0.5 * ri + 1.5 * rg, -0.5 * ri, -1.5 * rg])
  np.testing.assert_allclose(np.asarray(jax.grad(f)(pol))[0], want, rtol=1e-6)
  assert aux["margins"].shape == (3,)
  with pytest.raises(ValueError, match=r"\[B, 5\]"):
    losses.srpo_loss(pol[:, :2], refr[:, :2])
