"""Log-probs of preference pairs' rows ([b, R, L] batches of `data/pairs.py`): the jitted
function, over a whole set of pairs in order, and the reference's cached on disk.

The cache key hashes the pairs' tokens (`pairs.fingerprint`), the reference params
(`params_fingerprint`: config and cheap on-device reductions of every leaf) and the
log-prob mode, so a changed data set, reference or vocab chunking never reads a stale file.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from aya_jax import losses, sharding
from aya_jax.data import pairs as pp
from aya_jax.train import steps

MODEL_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def pair_logps_fn(cfg, vocab_chunk: int = 0):
  """(params, batch [b, R, L]) -> (summed log-probs [b, R], lengths [b, R])."""
  token_logps = steps.token_logps_fn(cfg, vocab_chunk)

  def fn(params, mb, rng=None):
    b, r, length = mb["tokens"].shape
    flat = {k: mb[k].reshape(r * b, length) for k in MODEL_KEYS}
    s, n = losses.sequence_logps(token_logps(params, flat, rng), flat["loss_mask"])
    return s.reshape(b, r), n.reshape(b, r)

  return fn


def params_fingerprint(cfg, params) -> str:
  """sha256 of the model config and, per leaf, path, shape, dtype and three
  on-device reductions (sum, sum |x|, sum x sin(0.1 i)): cheap for sharded
  multi-GB trees, and any change of the weights changes it."""
  stats = jax.jit(lambda t: jax.tree.map(lambda x: jnp.stack([
      jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32))),
      jnp.sum(x.astype(jnp.float32) * jnp.sin(0.1 * jnp.arange(x.size, dtype=jnp.float32)
                                              ).reshape(x.shape))]), t))(params)
  h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype};".encode())
  for s in jax.tree.leaves(jax.device_get(stats)):
    h.update(np.asarray(s, np.float32).tobytes())
  return h.hexdigest()


def compute_pair_logps(cfg, params, pairs, languages, *, seq_len, batch_size, pad_id, mesh,
                       rules, vocab_chunk=0):
  """(logps [N, R], lengths [N, R]) of every pair's rows under `params`, in order."""
  fn = jax.jit(pair_logps_fn(cfg, vocab_chunk), out_shardings=NamedSharding(mesh, P()))
  it = pp.PairIterator(pairs, global_batch_size=batch_size, seq_len=seq_len, pad_id=pad_id,
                       languages=languages, shuffle=False, num_epochs=1)
  n, r = len(pairs), len(pp.rows_of(pairs[0]))
  out_s, out_n = np.zeros((n, r), np.float32), np.zeros((n, r), np.float32)
  start = 0
  with sharding.activation_rules(mesh, rules):
    for batch in it:
      gb = sharding.global_batch({k: batch[k] for k in MODEL_KEYS}, mesh)
      s, c = jax.device_get(fn(params, gb))
      m = min(batch_size, n - start)
      out_s[start:start + m], out_n[start:start + m] = s[:m], c[:m]
      start += batch_size
  return out_s, out_n


def cached_reference_logps(cfg, ref_params, pairs, languages, *, seq_len, batch_size, pad_id,
                           mesh, rules, vocab_chunk, cache_dir):
  """Reference log-probs [N, R] from `cache_dir` or computed and stored there.

  Returns (logps, path, hit)."""
  key = hashlib.sha256("|".join([
      pp.fingerprint(pairs, seq_len), params_fingerprint(cfg, ref_params),
      f"vocab_chunk={vocab_chunk}"]).encode()).hexdigest()
  path = os.path.join(cache_dir, f"ref_logps_{key[:32]}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      logps = f["logps"]
    if logps.shape == (len(pairs), len(pp.rows_of(pairs[0]))):
      logging.info("reference log-probs: cache hit %s", path)
      return logps, path, True
    logging.warning("reference cache %s has shape %s for %d pairs: recomputing", path,
                    logps.shape, len(pairs))
  logps, lengths = compute_pair_logps(cfg, ref_params, pairs, languages, seq_len=seq_len,
                                      batch_size=batch_size, pad_id=pad_id, mesh=mesh,
                                      rules=rules, vocab_chunk=vocab_chunk)
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, logps=logps, lengths=lengths)
    os.replace(tmp, path)
  logging.info("reference log-probs: computed %d pairs -> %s", len(pairs), path)
  return logps, path, False
