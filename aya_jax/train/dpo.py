r"""Offline DPO stage: `python -m aya_jax.main --config=configs/dpo.py`.

Preference records -> [B, 2, L] batches (`data.preference_pipeline`) ->
the one train step (`steps.make_train_step`) with a DPO-family loss
(`losses.dpo_loss`) -> the one loop (resume, NaN guard, checkpoints) ->
workdir/params/, plus workdir/eval_metrics.json on held-out pairs.

The reference model (`config.dpo.reference`):
  cached  reference log-probs computed once per (data, reference) and kept
          on disk, `ref_cache_dir/ref_logps_<sha256>.npz` (the key hashes the
          pairs' tokens, the reference params and config, and the log-prob
          mode), so a step is one policy forward/backward over chosen +
          rejected and no reference pass; a second run, or a resumed one,
          reads the file.
  live    frozen reference params passed to the jitted step as a separate
          argument (never in the trainable state, never donated).
TR-DPO soft sync (`dpo.sync_every` > 0, live only): every sync_every
updates ref <- sync_alpha * policy + (1 - sync_alpha) * ref. The reference
then lives in the optimizer state (`RefSyncState`), so it is checkpointed
and a resumed run continues with the same reference.

Metrics use TRL's names (rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected); per language they are
written exactly (sums over the logging window / pair counts) to
workdir/metrics_language.jsonl as '<name>/<language>'.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from aya_jax import axes, checkpoint, losses, optim, sharding
from aya_jax.data import atomic, formatting
from aya_jax.data import pairs as pp
from aya_jax.models import lora
from aya_jax.train import common
from aya_jax.train import loop as loop_lib
from aya_jax.train import state as state_lib
from aya_jax.train import steps

# dpo_loss_fn's reference when it is the policy's LoRA base (adapters switched off)
ADAPTERS_OFF = "adapters-off"
MODEL_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def dpo_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.beta = 0.1
  c.loss_type = "sigmoid"      # losses.DPO_LOSS_TYPES
  c.label_smoothing = 0.0      # sigmoid (cDPO) and robust
  c.average_logps = False      # length-normalised log-ratios for every type
  c.rpo_alpha = 0.0            # > 0: + rpo_alpha * per-token NLL of chosen
  c.reference = "cached"       # cached | live
  c.reference_init = ""        # params/ or HF dir; "" = the initial policy
  c.ref_cache_dir = ""         # "" = workdir/ref_logps
  c.ref_batch_size = 0         # pairs per reference batch; 0 = data.batch_size
  c.sync_every = 0             # TR-DPO: > 0 syncs the reference (live only)
  c.sync_alpha = 0.6
  return c


def default_config() -> ml_collections.ConfigDict:
  c = common.base_config("dpo")
  c.data = ml_collections.ConfigDict()
  c.data.train = ()            # JSONL files of preference records
  c.data.eval = ()             # held-out preference records (optional)
  c.data.seq_len = 256         # prompt + answer per row
  c.data.batch_size = 16       # pairs per step (global)
  c.data.skip_invalid = False
  c.dpo = dpo_block()
  return c


# ------------------------------------------------------------------ log-probs


def pair_logps_fn(cfg, vocab_chunk: int = 0):
  """(params, batch [b, 2, L]) -> (summed log-probs [b, 2], lengths [b, 2])."""
  token_logps = steps.token_logps_fn(cfg, vocab_chunk)

  def fn(params, mb, rng=None):
    b, _, length = mb["tokens"].shape
    flat = {k: mb[k].reshape(2 * b, length) for k in MODEL_KEYS}
    s, n = losses.sequence_logps(token_logps(params, flat, rng), flat["loss_mask"])
    return s.reshape(b, 2), n.reshape(b, 2)

  return fn


def pair_normalizer(batch):
  w = batch["pair_mask"].astype(jnp.float32)
  return dict(pairs=jnp.sum(w),
              chosen_tokens=jnp.sum(batch["loss_mask"][:, 0].astype(jnp.float32) * w[:, None]))


def dpo_loss_fn(cfg, dcfg, languages=(), vocab_chunk: int = 0, ref_params=None):
  """loss_fn(params, mb, normalizer, rng) for `steps.make_train_step`.

  With `ref_params` None the batch must carry `ref_logps` [b, 2] (cached); ADAPTERS_OFF:
  the reference is the policy's own base, its LoRA adapters switched off."""
  logps = pair_logps_fn(cfg, vocab_chunk)

  def loss_fn(params, mb, normalizer, rng):
    pol, n = logps(params, mb, rng)
    if ref_params is None:
      ref = mb["ref_logps"]
    elif isinstance(ref_params, str) and ref_params == ADAPTERS_OFF:
      ref = jax.lax.stop_gradient(logps(lora.without_adapters(params), mb)[0])
    else:
      ref = jax.lax.stop_gradient(logps(ref_params, mb)[0])
    per_pair, aux = losses.dpo_loss(
        pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], n[:, 0], n[:, 1],
        loss_type=dcfg.loss_type, beta=dcfg.beta, label_smoothing=dcfg.label_smoothing,
        average_logps=dcfg.average_logps)
    w = mb["pair_mask"].astype(jnp.float32)
    loss = jnp.sum(w * per_pair) / jnp.maximum(normalizer["pairs"], 1.0)
    sums = losses.dpo_metric_sums(aux, pol[:, 0], pol[:, 1], w, normalizer["pairs"],
                                  mb["language"], tuple(languages))
    sums["dpo_loss"] = jax.lax.stop_gradient(loss)
    if dcfg.rpo_alpha:
      nll = -jnp.sum(w * pol[:, 0]) / jnp.maximum(normalizer["chosen_tokens"], 1.0)
      loss = loss + dcfg.rpo_alpha * nll
      sums["nll_loss"] = jax.lax.stop_gradient(nll)
    sums["n_pairs"] = jnp.sum(w)
    return loss, sums

  return loss_fn


# ------------------------------------------------------------ reference sync


class RefSyncState(NamedTuple):
  count: jax.Array
  ref: Any


def reference_sync(alpha: float, every: int) -> optax.GradientTransformation:
  """TR-DPO soft update, as the last link of the optimizer chain: every
  `every` updates ref <- alpha * (params + updates) + (1 - alpha) * ref."""
  def init(params):
    return RefSyncState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

  def update(updates, state, params):
    count = state.count + 1
    sync = count % every == 0
    new = optax.apply_updates(params, updates)
    ref = jax.tree.map(lambda r, p: jnp.where(sync, alpha * p + (1 - alpha) * r, r).astype(r.dtype),
                       state.ref, new)
    return updates, RefSyncState(count, ref)

  return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------- trainer


def make_dpo_step(config, cfg, params, mesh, languages, example_batch, ref_params=None):
  """(state, step(state, batch, rng)) jitted with shardings, state donated.

  `ref_params` None: cached reference log-probs in the batch. Otherwise a
  live reference; with dpo.sync_every it moves into the optimizer state."""
  dcfg, chunk = config.dpo, config.model.vocab_chunk
  sync = dcfg.sync_every > 0
  if sync and ref_params is None:
    raise ValueError("dpo.sync_every > 0 (TR-DPO) needs dpo.reference='live': cached "
                     "reference log-probs would go stale")
  if sync and lora.has_adapters(params):
    raise ValueError("dpo.sync_every > 0 (TR-DPO) moves a reference copy of the weights; with "
                     "lora.rank > 0 the reference is the base itself: use sync_every=0")
  ocfg = optim.optim_config_from(config.optim.to_dict())
  accum = ocfg.grad_accum
  with ocfg.unlocked():
    ocfg.grad_accum = 1
  trainable, frozen = lora.split(params)
  tx = optim.make_optimizer(ocfg, trainable)
  if sync:
    tx = optax.chain(tx, reference_sync(float(dcfg.sync_alpha), int(dcfg.sync_every)))
  st = state_lib.create_state(trainable, tx, jax.tree.map(lambda x: x.sharding, trainable),
                              frozen)
  if sync:  # a copy: the state is donated to every step, and the caller may still need
            # ref_params (online rounds keep the fixed reference, merges read it)
    st = st.replace(opt_state=(st.opt_state[0], st.opt_state[1]._replace(
        ref=jax.tree.map(jnp.copy, ref_params))))
  schedule = optim.make_schedule(ocfg)

  def step(state, batch, rng, ref=None):
    if sync:
      ref = state.opt_state[1].ref
    loss_fn = dpo_loss_fn(cfg, dcfg, languages, chunk, ref)
    return steps.make_train_step(loss_fn, tx, pair_normalizer, accum, schedule)(state, batch, rng)

  ssh = state_lib.state_shardings(st)
  bsh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, np.ndim(x)), example_batch)
  if ref_params is not None and not sync and not isinstance(ref_params, str):
    rsh = jax.tree.map(lambda x: x.sharding, ref_params)
    jitted = steps.jit_step(step, ssh, bsh, mesh, ref_shardings=rsh)
    return st, lambda s, b, r: jitted(s, b, r, ref_params)
  off = ref_params if isinstance(ref_params, str) else None  # ADAPTERS_OFF, or cached
  return st, steps.jit_step(lambda s, b, r: step(s, b, r, off), ssh, bsh, mesh)


# ----------------------------------------------------- reference log-probs


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
  """(logps [N, 2], lengths [N, 2]) of every pair under `params`, in order."""
  fn = jax.jit(pair_logps_fn(cfg, vocab_chunk), out_shardings=NamedSharding(mesh, P()))
  it = pp.PairIterator(pairs, global_batch_size=batch_size, seq_len=seq_len, pad_id=pad_id,
                       languages=languages, shuffle=False, num_epochs=1)
  n = len(pairs)
  out_s, out_n = np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)
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
  """Reference log-probs [N, 2] from `cache_dir` or computed and stored there.

  Returns (logps, path, hit)."""
  key = hashlib.sha256("|".join([
      pp.fingerprint(pairs, seq_len), params_fingerprint(cfg, ref_params),
      f"vocab_chunk={vocab_chunk}"]).encode()).hexdigest()
  path = os.path.join(cache_dir, f"ref_logps_{key[:32]}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      logps = f["logps"]
    if logps.shape == (len(pairs), 2):
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


def evaluate_pairs(cfg, params, ref_logps, pairs, languages, dcfg, **kw) -> dict:
  """TRL-named DPO metrics of `params` on pairs, overall and per language,
  plus 'logps/margin' (mean chosen - rejected summed log-prob; the
  reference's is 'ref_logps/margin')."""
  pol, n = compute_pair_logps(cfg, params, pairs, languages, **kw)
  per, aux = losses.dpo_loss(pol[:, 0], pol[:, 1], ref_logps[:, 0], ref_logps[:, 1], n[:, 0],
                             n[:, 1], loss_type=dcfg.loss_type, beta=dcfg.beta,
                             label_smoothing=dcfg.label_smoothing,
                             average_logps=dcfg.average_logps)
  lang = np.asarray([languages.index(p.language) for p in pairs])
  sums = jax.device_get(losses.dpo_metric_sums(aux, jnp.asarray(pol[:, 0]),
                                               jnp.asarray(pol[:, 1]), jnp.ones(len(pairs)),
                                               len(pairs), jnp.asarray(lang), languages))
  out = {k: float(v) for k, v in sums.items() if "@" not in k}
  out.update(losses.per_language_means(sums))
  out["loss"] = float(np.mean(per))
  out["logps/margin"] = float(np.mean(pol[:, 0] - pol[:, 1]))
  out["ref_logps/margin"] = float(np.mean(ref_logps[:, 0] - ref_logps[:, 1]))
  out["n_pairs"] = len(pairs)
  return out


# ----------------------------------------------------------------- training


def _write_language_metrics(workdir):
  path = os.path.join(workdir, "metrics_language.jsonl")

  def on_log(step, scalars):
    if jax.process_index() != 0:
      return
    means = losses.per_language_means(scalars)
    if means:
      with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": int(step), **means}) + "\n")

  return on_log


def train_dpo(config, workdir, cfg, params, pairs, mesh, rules, *, ref_params=None,
              eval_pairs=(), languages=None, stop_after=None):
  """DPO of `params` on tokenised pairs in `workdir` (resumable); returns
  (final params, eval metrics or None). `ref_params` None: the initial
  policy is the reference. Used by `run` and by online DPO."""
  dcfg = config.dpo
  languages = tuple(languages or pp.languages_of(list(pairs) + list(eval_pairs)))
  pad_id = cfg.pad_id if cfg.pad_id is not None else 0
  kw = dict(seq_len=config.data.seq_len, pad_id=pad_id, mesh=mesh, rules=rules,
            batch_size=dcfg.ref_batch_size or config.data.batch_size,
            vocab_chunk=config.model.vocab_chunk)
  cache_dir = dcfg.ref_cache_dir or os.path.join(workdir, "ref_logps")
  if dcfg.reference not in ("cached", "live"):
    raise ValueError(f"dpo.reference={dcfg.reference!r}: expected 'cached' or 'live'")
  adapters = lora.has_adapters(params)
  if ref_params is None and adapters:  # LoRA: the initial policy, sharing the base
    if lora.adapters_are_fresh(params):  # it is the base: adapters off, nothing copied
      ref_params = lora.without_adapters(params) if dcfg.reference == "cached" else ADAPTERS_OFF
    else:  # trained adapters (an online round): a copy of them on the same base
      ref_params = lora.copy_trained(params)
  if ref_params is None:  # the initial policy; params are donated to the state later
    ref_params = params if dcfg.reference == "cached" else jax.tree.map(jnp.copy, params)
  ref_train = eval_ref = None
  if dcfg.reference == "cached":
    ref_train, _, _ = cached_reference_logps(cfg, ref_params, pairs, languages,
                                             cache_dir=cache_dir, **kw)
  if eval_pairs:
    eval_ref, _, _ = cached_reference_logps(cfg, _base_if_off(ref_params, params), eval_pairs,
                                            languages, cache_dir=cache_dir, **kw)
  batches = pp.PairIterator(pairs, global_batch_size=config.data.batch_size,
                            seq_len=config.data.seq_len, pad_id=pad_id, seed=config.seed,
                            languages=languages, ref_logps=ref_train)
  example = pp.pair_batch([None] * (config.data.batch_size // jax.process_count()),
                          config.data.seq_len, pad_id, languages, ref_logps=ref_train)
  example.pop("index")
  st, step = make_dpo_step(config, cfg, params, mesh, languages, example,
                           None if dcfg.reference == "cached" else ref_params)
  if dcfg.reference == "cached":
    del ref_params
  batches = _DropIndex(batches)
  with sharding.activation_rules(mesh, rules):
    st = loop_lib.train_loop(st, step, batches, config.loop, workdir, mesh,
                             stop_after=stop_after, on_log=_write_language_metrics(workdir),
                             run_config=config)
  metrics = None
  if eval_pairs:
    kw.pop("batch_size")
    metrics = evaluate_pairs(cfg, st.model_params(), eval_ref, list(eval_pairs), languages,
                             dcfg, batch_size=dcfg.ref_batch_size or config.data.batch_size,
                             **kw)
    if jax.process_index() == 0:
      atomic.write_json(os.path.join(workdir, "eval_metrics.json"), metrics, indent=1)
    logging.info("eval: %s", metrics)
  return st.model_params(), metrics


def _base_if_off(ref_params, params):
  """The reference's params: the LoRA base itself when the adapters are switched off."""
  if isinstance(ref_params, str) and ref_params == ADAPTERS_OFF:
    return lora.without_adapters(params)
  return ref_params


class _DropIndex:
  """The pair iterator without its host-only 'index' field."""

  def __init__(self, it):
    self.it = it

  def __next__(self):
    batch = next(self.it)
    batch.pop("index")
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def run(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  if not config.tokenizer:
    raise ValueError("config.tokenizer: a local HF tokenizer directory is required")
  if not config.data.train:
    raise ValueError("config.data.train: at least one JSONL file of preference records")
  tok = formatting.load_tokenizer(config.tokenizer)
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = axes.rules(config.mesh.rules)
  cfg, params = common.setup_model(config.model, len(tok), mesh, rules, config.seed,
                                   config.lora, pad_id=tok.pad_token_id,
                                   bos_id=tok.bos_token_id,
                                   eos_ids=formatting.end_of_turn_ids(tok))
  ref_params = None
  if config.dpo.reference_init:
    _, ref_params = checkpoint.load_model(
        config.dpo.reference_init, sharding.param_shardings(cfg, mesh, rules),
        language_model=True)
  seq_len, skip = config.data.seq_len, config.data.skip_invalid
  pairs, stats = pp.tokenize_pairs(pp.read_pairs(list(config.data.train), skip), tok, seq_len,
                                   skip)
  logging.info("train pairs: %s", stats)
  eval_pairs = []
  if config.data.eval:
    eval_pairs, _ = pp.tokenize_pairs(pp.read_pairs(list(config.data.eval), skip), tok, seq_len,
                                      skip)
  params, _ = train_dpo(config, workdir, cfg, params, pairs, mesh, rules, ref_params=ref_params,
                        eval_pairs=eval_pairs)
  return common.finish(workdir, cfg, params, config.export_hf, base=config.model.init)
