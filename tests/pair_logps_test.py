"""Log-probs of preference rows: `pair_logps_fn` on [b, R, L] batches (R = 2, and 5 with
SRPO's revision rows) against each row's log-softmax summed over its answer by hand."""

import jax
import numpy as np

from aya_jax.data import pairs as pp
from aya_jax.models import Transformer, init_params
from aya_jax.models.config import tiny
from aya_jax.train import pair_logps


def _by_hand(cfg, params, rows, width=24):
  """Each (prompt, answer) row's summed answer log-prob from one causal forward of the row
  (right-padded to `width`: padding after the answer cannot change its logits)."""
  tokens = np.zeros((len(rows), width), np.int32)
  for i, (prompt, answer) in enumerate(rows):
    tokens[i, :len(prompt) + len(answer)] = np.concatenate([prompt, answer])
  logits = np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, tokens)[0],
                      np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  out = []
  for i, (prompt, answer) in enumerate(rows):
    n = len(prompt)
    out.append((sum(logp[i, n - 1 + t, answer[t]] for t in range(len(answer))), len(answer)))
  return out


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
    rows = [row for p in items for row in pp.rows_of(p)]
    for (want, count), got, got_n in zip(_by_hand(cfg, params, rows), np.ravel(s),
                                          np.ravel(n)):
      np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-4)
      assert int(got_n) == count
