"""Log-probs of preference rows: `pair_logps_fn` on [b, R, L] batches (R = 2, and 5 with
SRPO's revision rows) against each row's log-softmax summed over its answer by hand."""

import jax
import numpy as np

from aya_jax.data import pairs as pp
from aya_jax.models import Transformer, init_params
from aya_jax.models.config import tiny
from aya_jax.train import pair_logps


def _by_hand(cfg, params, prompt, answer):
  tokens = np.concatenate([prompt, answer])[None]
  logits = np.asarray(Transformer(cfg).apply({"params": params}, tokens)[0][0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  n = len(prompt)
  return sum(logp[n - 1 + t, answer[t]] for t in range(len(answer))), len(answer)


def test_rows_summed_log_probs_match_the_model_by_hand():
  cfg = tiny("llama")
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  seq = lambda n: rng.integers(3, cfg.vocab_size, n).astype(np.int32)
  revisions = tuple((seq(9), seq(m)) for m in (4, 5, 4))
  pairs = [pp.Pair(seq(6), seq(4), seq(5), "en", "a", 1.0, revisions),
           pp.Pair(seq(3), seq(2), seq(7), "en", "b", 0.5, revisions[::-1])]
  fn = jax.jit(pair_logps.pair_logps_fn(cfg))
  for items in (pairs, [p._replace(revisions=()) for p in pairs]):
    batch = pp.pair_batch(items, 24, 0, ("en",))
    s, n = fn(params, {k: batch[k] for k in pair_logps.MODEL_KEYS})
    r = len(pp.rows_of(items[0]))
    assert s.shape == n.shape == (2, r)
    for i, p in enumerate(items):
      for j, (prompt, answer) in enumerate(pp.rows_of(p)):
        want, count = _by_hand(cfg, params, prompt, answer)
        np.testing.assert_allclose(float(s[i, j]), want, rtol=1e-5, atol=1e-4)
        assert int(n[i, j]) == count
