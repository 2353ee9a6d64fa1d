"""A round's data by hand: best/worst pairs, the report line (means, win rate vs the
previous round, lengths), the scores of empty answers and unscorable prompts, and the
prompts a capped round draws."""

import numpy as np
import pytest

from aya_jax import reward_losses
from aya_jax.data import records
from aya_jax.train import rounds


def test_best_worst_pairs_and_report_by_hand():
  prompts = [records.PromptRecord("a", "en", ({"role": "user", "content": "q"},)),
             records.PromptRecord("b", "fr", ({"role": "user", "content": "q"},))]
  texts = ["x", "y", "z", "u", "v", "w"]
  scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3]], np.float32)
  pairs = rounds.best_worst_pairs(prompts, texts, scores, 0.0, "t")
  assert len(pairs) == 1 and pairs[0].chosen == "y" and pairs[0].rejected == "x"  # b: a tie
  rep = rounds.round_report(prompts, scores, np.array([2, 4, 6, 1, 1, 1]),
                            np.array([1, 1, 0, 1, 1, 1], bool), np.zeros_like(scores) + 0.3)
  assert rep["mean_length"] == pytest.approx(15 / 6)
  assert rep["frac_no_stop"] == pytest.approx(1 / 6)
  assert rep["win_rate_vs_prev/fr"] == 0.5 and rep["win_rate_vs_prev/en"] == pytest.approx(2 / 3)


def test_group_scores_empty_answers_and_unscorable_prompts_by_hand():
  nan = float("nan")
  raw = np.array([[0.9, -2.0, 0.5],     # empty answer 1: scores the group's lowest, 0.5
                  [-3.0, -1.0, -2.0],   # a reward model's negative scale: empty gets -3, not 0
                  [0.2, nan, 0.1],      # the scorer failed on a real answer: unusable
                  [0.0, 0.0, 0.0]], np.float32)  # every answer empty: no score at all
  empty = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)
  scores, usable = rounds.group_scores(raw, empty)
  np.testing.assert_allclose(scores[0], [0.9, 0.5, 0.5])
  np.testing.assert_allclose(scores[1], [-2.0, -1.0, -2.0])
  assert usable.tolist() == [True, True, False, False]
  scores, usable = rounds.group_scores(raw, empty, empty_score=-5.0)  # a configured penalty
  np.testing.assert_allclose(scores[0], [0.9, -5.0, 0.5])
  np.testing.assert_allclose(scores[3], [-5.0, -5.0, -5.0])
  assert usable.tolist() == [True, True, False, True]
  # RLOO: an empty answer never gets a positive advantage
  adv = np.asarray(reward_losses.rloo_advantages(rounds.group_scores(raw, empty)[0][:2]))
  assert adv[0, 1] <= 0 and adv[1, 0] <= 0


def test_pairs_and_report_skip_unscorable_prompts():
  """A NaN score must not reach max/min (order-dependent) nor the means."""
  prompts = [records.PromptRecord(p, "en", ({"role": "user", "content": "q"},)) for p in "ab"]
  texts = ["x", "y", "z", "u", "v", "w"]
  scores = np.array([[0.1, 0.9, 0.5], [0.3, float("nan"), 0.7]], np.float32)
  usable = np.array([True, False])
  pairs = rounds.best_worst_pairs(prompts, texts, scores, 0.0, "t", usable)
  assert [p.id for p in pairs] == ["a#t"]
  rep = rounds.round_report(prompts, scores, np.ones(6), np.ones(6, bool), None, usable,
                            np.zeros(6, bool))
  assert rep["mean_score"] == pytest.approx(0.5) and rep["n_dropped_prompts"] == 1


def test_round_prompts_draws_per_language_with_the_seed():
  prompts = [records.PromptRecord(f"{l}{i}", l, ({"role": "user", "content": "q"},))
             for i in range(5) for l in ("en", "fr", "de")]
  a, again, other = (rounds.round_prompts(prompts, 2, s) for s in (7, 7, 8))
  assert a == again and a != other
  assert sorted(p.language for p in a) == ["de", "de", "en", "en", "fr", "fr"]
  assert [p.id for p in a] == [p.id for p in prompts if p in a]  # in their order
  assert rounds.round_prompts(prompts, 9, 7) == prompts
  assert rounds.round_prompts(prompts, 0, 7) == prompts
