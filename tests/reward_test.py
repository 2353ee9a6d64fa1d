"""Scorers: a reward model's score is its value at the last token, batch- and
mesh-invariant; a function scorer gives NaN (and the reason) for a record it fails on."""

import numpy as np
import pytest

from aya_jax import reward, sharding
from aya_jax.models import tiny
from aya_jax.world import tasks as synthetic
from aya_jax.world import verifier
from conftest import random_params


def _rm(vocab, seed=0):
  cfg = tiny("llama", vocab_size=vocab, value_head=True)
  return cfg, random_params(cfg, seed)


@pytest.mark.slow
def test_scorer_batch_invariant_and_mesh_equal(world_tok):
  tok, _ = world_tok
  cfg, params = _rm(len(tok))
  recs = synthetic.make_split("valid", 3, languages=("en", "fr", "zh"))
  comp = [dict(id=r.id, language=r.language, prompt=r.messages[:1],
               completion=r.messages[1]["content"]) for r in recs]
  scorer = reward.RewardModelScorer(cfg, params, tok, batch_size=4, max_len=64)
  together = scorer.score(comp)
  alone = np.array([scorer.score([c])[0] for c in comp])
  np.testing.assert_allclose(together, alone, atol=1e-5)
  assert np.std(together) > 1e-4  # different records, different rewards
  # SFT records and (prompt, completion) tuples score the same
  np.testing.assert_allclose(scorer.score(recs[:2]), together[:2], atol=1e-6)
  # the reward is the value at the last token of prompt + completion
  toks, _ = reward.encode(tok, comp[0]["prompt"], comp[0]["completion"], 64)
  values = reward.Transformer(cfg).apply({"params": params}, toks[None])[0]
  np.testing.assert_allclose(together[0], values[0, -1], atol=1e-5)
  mesh = sharding.make_mesh((2, 4, 1))
  sharded = reward.RewardModelScorer(cfg, params, tok, batch_size=4, max_len=64, mesh=mesh)
  np.testing.assert_allclose(sharded.score(comp), together, atol=1e-5)
  # an answer cut away by max_len scores NaN (reported by the caller)
  short = reward.RewardModelScorer(cfg, params, tok, batch_size=4, max_len=6)
  assert np.isnan(short.score(comp[:1])[0]) and short.stats.n_cut == 1


def test_function_scorer_nan_for_bad_records():
  s = verifier.verifier_scorer()
  good = dict(id="syn:en:add:1.2:t0", language="en", prompt=None, completion="three")
  bad = dict(id="not-a-world-id", language="en", prompt=None, completion="x")
  out = s.score([good, bad])
  assert out[0] == 1.0 and np.isnan(out[1]) and "not-a-world-id" in s.errors
