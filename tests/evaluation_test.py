"""Win rates under a judge: outcomes, bootstrap interval, models answering prompts."""

import hashlib
import math

import jax
import numpy as np
import pytest

from aya_jax import evaluation, sharding
from aya_jax.sampling import methods
from aya_jax.world import evaluate as world_evaluate
from aya_jax.world import tasks as synthetic
from aya_jax.world import verifier

LANGS = ("en", "fr", "ru")


def _prompts(n=12, split="test"):
  return world_evaluate.world_prompts(split, n, LANGS)


class Oracle:
  """Answers with the gold answer; with `p_right` < 1, right on a fixed subset."""

  def __init__(self, name="oracle", p_right=1.0):
    self.name, self.p_right = name, p_right

  def answer(self, prompts):
    out = []
    for p in prompts:
      u = hashlib.sha256((p.id + "#oracle").encode()).digest()[0] / 256  # not the split hash
      inst = synthetic.parse_id(p.id)
      out.append(inst.answer() if u < self.p_right else "banana")
    return out


class Wrong:
  name = "wrong"

  def answer(self, prompts):
    out = []
    for p in prompts:  # a wrong answer of the right kind, in the right language
      inst = synthetic.parse_id(p.id)
      other = [q for q in _prompts(12, "valid") if q.language == inst.answer_language]
      wrong = next(a for a in (synthetic.parse_id(q.id).answer() for q in other)
                   if verifier.Verifier().score_answer(inst, a) == 0)
      out.append(wrong)
    return out


class Empty:
  name = "empty"

  def answer(self, prompts):
    return ["" for _ in prompts]


def _percentile_mc_sd(s, q, n_boot):
  """Monte-Carlo sd of the q-quantile of n_boot resampled means whose distribution is about
  normal with sd s: sqrt(q (1 - q) / B) / density at the quantile."""
  from scipy import stats
  return math.sqrt(q * (1 - q) / n_boot) * s / stats.norm.pdf(stats.norm.ppf(q))


def test_bootstrap_interval_of_a_proportion_is_binomial():
  # 0/1 outcomes: a resample's mean is exactly Binomial(n, k/n) / n, so the percentile
  # interval is that law's 2.5% and 97.5% quantiles. n=37, k=19: its CDF passes 0.025 and
  # 0.975 mid-step (>= 0.009 from either side), and the empirical CDF of B=100k resamples
  # is off by sd sqrt(q (1-q) / B) < 0.0005: the interval is the lattice value, exactly.
  from scipy import stats
  n, k, n_boot = 37, 19, 100_000
  law = stats.binom(n, k / n)
  lo_k, hi_k = law.ppf(0.025), law.ppf(0.975)
  margin = min(0.025 - law.cdf(lo_k - 1), law.cdf(lo_k) - 0.025,
               0.975 - law.cdf(hi_k - 1), law.cdf(hi_k) - 0.975)
  assert margin > 15 * math.sqrt(0.025 * 0.975 / n_boot)
  x = np.array([1.0] * k + [0.0] * (n - k))
  np.random.default_rng(3).shuffle(x)
  assert evaluation.bootstrap_ci(x, n_boot=n_boot, seed=1) == (lo_k / n, hi_k / n)
  assert evaluation.bootstrap_ci(np.full(9, 0.5)) == (0.5, 0.5)


def test_paired_bootstrap_matches_scipy():
  # the report's verdicts: the paired bootstrap of the per-prompt difference of two stages
  # (recipe_report._paired) against scipy.stats.bootstrap(paired=True, percentile). Both
  # are Monte Carlo with B = 100k: each end is off by < 6 x the sd of the difference of two
  # independent percentile estimates. Unpaired, the interval would be twice as wide.
  from scipy import stats
  from aya_jax.recipe import report as recipe_report
  rng = np.random.default_rng(0)
  a = rng.normal(0.6, 0.2, 80)
  b = a - 0.05 + rng.normal(0.0, 0.08, 80)  # the same prompts: strongly correlated
  n_boot = 100_000
  got = recipe_report._paired({"x": {"outcome": a.tolist()}, "y": {"outcome": b.tolist()}},
                              "x", "y", "win_rate", {"n_boot": n_boot, "seed": 0})
  mean = lambda u, v, axis=-1: np.mean(u - v, axis=axis)
  ref = stats.bootstrap((a, b), mean, paired=True, vectorized=True, method="percentile",
                        n_resamples=n_boot, confidence_level=0.95, rng=np.random.default_rng(1))
  s = np.std(a - b) / math.sqrt(a.size)
  tol = 6 * math.sqrt(2) * _percentile_mc_sd(s, 0.025, n_boot)
  assert got["diff"] == pytest.approx(np.mean(a - b), abs=1e-12)
  np.testing.assert_allclose(got["diff_ci"], [ref.confidence_interval.low,
                                              ref.confidence_interval.high], atol=tol, rtol=0)
  unpaired = stats.bootstrap((a, b), mean, paired=False, vectorized=True, method="percentile",
                             n_resamples=20_000, rng=np.random.default_rng(2)).confidence_interval
  assert (got["diff_ci"][1] - got["diff_ci"][0]) < 0.5 * (unpaired.high - unpaired.low)
  assert got["beyond_noise"] is True


def test_against_itself_is_half_and_against_wrong_is_one():
  ps = _prompts()
  half = evaluation.compare(Oracle("a", 0.6), Oracle("a2", 0.6), ps, verifier.Verifier())
  assert "verifier_a" not in half["per_language"]["all"]  # no reference: no score columns
  for lang, row in half["per_language"].items():
    assert row["win_rate"] == 0.5 and row["ci"][0] <= 0.5 <= row["ci"][1], lang
    assert row["ties"] == row["n"]
  r = evaluation.compare(Oracle(), Wrong(), ps, verifier.Verifier(),
                         reference=world_evaluate.verifier_scores)
  assert set(r["per_language"]) == set(LANGS) | {"all"}
  for lang, row in r["per_language"].items():
    assert row["win_rate"] == 1.0 and row["ci"] == [1.0, 1.0], lang
    assert row["verifier_a"] == 1.0 and row["verifier_b"] == 0.0
  # a partly right model: win rate = share right, interval around it
  r = evaluation.compare(Oracle("half", 0.5), Wrong(), ps,
                         verifier.Verifier())["per_language"]["all"]
  assert 0.2 < r["win_rate"] < 0.8 and r["ci"][0] < r["win_rate"] < r["ci"][1]
  assert r["wins"] + r["ties"] == r["n"] and r["losses"] == 0


def test_ties_and_empty_answers():
  ps = _prompts(4)
  out = evaluation.outcomes(verifier.Verifier(), ps, Empty().answer(ps), Wrong().answer(ps))
  np.testing.assert_array_equal(out, 0.0)   # empty loses to any answer
  out = evaluation.outcomes(verifier.Verifier(), ps, Empty().answer(ps), Empty().answer(ps))
  np.testing.assert_array_equal(out, 0.5)
  out = evaluation.outcomes(verifier.Verifier(), ps, Wrong().answer(ps), Wrong().answer(ps))
  np.testing.assert_array_equal(out, 0.5)   # both wrong: a tie (both score 0)


class FirstBiasedJudge:
  """Pairwise: prefers the better verifier score; on a tie, the first answer."""

  def compare(self, first, second):
    v = verifier.Verifier()
    a, b = v.score(first), v.score(second)
    return np.where(a > b, 1.0, np.where(b > a, 0.0, 1.0))


class RandomBiasedJudge:
  """Pairwise: always prefers whatever is shown first."""

  def compare(self, first, second):
    return np.ones(len(first))


def test_pairwise_judge_both_orders_cancel_position_bias():
  ps = _prompts(6)
  r = evaluation.compare(Oracle("x", 0.5), Oracle("y", 0.5), ps, judge=RandomBiasedJudge())
  assert r["pairwise"] and r["per_language"]["all"]["win_rate"] == 0.5
  r = evaluation.compare(Oracle("x", 0.5), Oracle("y", 0.5), ps, judge=FirstBiasedJudge())
  assert r["per_language"]["all"]["win_rate"] == 0.5  # ties stay ties despite the bias
  r = evaluation.compare(Oracle(), Wrong(), ps, judge=FirstBiasedJudge())
  assert r["per_language"]["all"]["win_rate"] == 1.0


@pytest.mark.slow
def test_model_same_seed_same_answers(world_models):
  ps = _prompts(2)
  m = evaluation.Model("a", world_models["a"], world_models["tok"],
                       method=methods.Sampling(temperature=1.0), max_new_tokens=8)
  again = evaluation.Model("a_again", model=(world_models["cfg"], world_models["params"]),
                           tokenizer=world_models["tok"], method=methods.Sampling(1.0),
                           max_new_tokens=8, batch_size=3)  # other batching, same keys
  ans = {"a": m.answer(ps), "a_again": again.answer(ps)}
  assert ans["a"] == ans["a_again"] and len(set(ans["a"])) > 1
  r = evaluation.compare(m, again, ps, verifier.Verifier(), answers=ans)
  assert r["per_language"]["all"]["win_rate"] == 0.5
  # sharded over the 8 fake devices (how the pipeline evaluates 8B models): the same answers
  mesh = sharding.make_mesh((2, 4, 1))
  sharded = evaluation.Model("a_mesh", world_models["a"], world_models["tok"],
                             method=methods.Sampling(temperature=1.0), max_new_tokens=8,
                             mesh=mesh)
  leaves = jax.tree.leaves(sharded.params)
  assert all(len(x.sharding.device_set) == 8 for x in leaves)
  assert any(not x.sharding.is_fully_replicated for x in leaves)
  assert sharded.answer(ps) == ans["a"]
