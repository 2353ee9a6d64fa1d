r"""Offline DPO stage: `python -m aya_jax.main --config=configs/dpo.py`; the DPO family,
CoPG on scored pairs and SRPO (`dpo.loss_type`, LOSS_TYPES).

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

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from aya_jax import axes, checkpoint, losses, optim, sharding
from aya_jax.data import atomic, formatting
from aya_jax.data import pairs as pp
from aya_jax.models import lora
from aya_jax.train import common, pair_logps
from aya_jax.train import loop as loop_lib
from aya_jax.train import state as state_lib
from aya_jax.train import steps

# dpo_loss_fn's reference when it is the policy's LoRA base (adapters switched off)
ADAPTERS_OFF = "adapters-off"
LOSS_TYPES = losses.DPO_LOSS_TYPES + ("srpo",)


def dpo_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.beta = 0.1
  c.loss_type = "sigmoid"      # LOSS_TYPES: losses.DPO_LOSS_TYPES ('copg' learns from the
                               # pairs' scores) or 'srpo' (losses.srpo_loss)
  c.srpo_alpha = 0.5           # srpo: weight of the self-improvement regression
  c.revision_request = formatting.REVISION_REQUEST  # srpo: the user turn asking to revise
  c.label_smoothing = 0.0      # sigmoid (cDPO) and robust
  c.average_logps = False      # length-normalised log-ratios for every type
  c.rpo_alpha = 0.0            # > 0: + rpo_alpha * per-token NLL of chosen (srpo: also of
                               # the rejected draft revised into the chosen)
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


# ------------------------------------------------------------------- losses


def pair_losses(dcfg, pol, ref, lengths, score_margins):
  """Per-pair losses [b] and statistics of dpo.loss_type on log-probs [b, R]."""
  if dcfg.loss_type == "srpo":
    return losses.srpo_loss(pol, ref, lengths, beta=dcfg.beta, alpha=dcfg.srpo_alpha,
                            average_logps=dcfg.average_logps)
  return losses.dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], lengths[:, 0],
                         lengths[:, 1], loss_type=dcfg.loss_type, beta=dcfg.beta,
                         label_smoothing=dcfg.label_smoothing,
                         average_logps=dcfg.average_logps, score_margins=score_margins)


def chosen_rows(n_rows: int) -> tuple:
  """The rows whose answer is the chosen one, the RPO term's targets: the answer, and with
  SRPO's revision rows also the rejected draft revised into the chosen (row 2)."""
  return (0, 2) if n_rows == len(losses.SRPO_ROWS) else (0,)


def pair_normalizer(batch):
  w = batch["pair_mask"].astype(jnp.float32)
  rows = list(chosen_rows(batch["loss_mask"].shape[1]))
  mask = batch["loss_mask"][:, rows].astype(jnp.float32)
  return dict(pairs=jnp.sum(w), chosen_tokens=jnp.sum(mask * w[:, None, None]))


def dpo_loss_fn(cfg, dcfg, languages=(), vocab_chunk: int = 0, ref_params=None):
  """loss_fn(params, mb, normalizer, rng) for `steps.make_train_step`.

  With `ref_params` None the batch must carry `ref_logps` [b, 2] (cached); ADAPTERS_OFF:
  the reference is the policy's own base, its LoRA adapters switched off."""
  logps = pair_logps.pair_logps_fn(cfg, vocab_chunk)

  def loss_fn(params, mb, normalizer, rng):
    pol, n = logps(params, mb, rng)
    if ref_params is None:
      ref = mb["ref_logps"]
    elif isinstance(ref_params, str) and ref_params == ADAPTERS_OFF:
      ref = jax.lax.stop_gradient(logps(lora.without_adapters(params), mb)[0])
    else:
      ref = jax.lax.stop_gradient(logps(ref_params, mb)[0])
    per_pair, aux = pair_losses(dcfg, pol, ref, n, mb.get("score_margin"))
    w = mb["pair_mask"].astype(jnp.float32)
    loss = jnp.sum(w * per_pair) / jnp.maximum(normalizer["pairs"], 1.0)
    sums = losses.dpo_metric_sums(aux, pol[:, 0], pol[:, 1], w, normalizer["pairs"],
                                  mb["language"], tuple(languages))
    sums["dpo_loss"] = jax.lax.stop_gradient(loss)
    if dcfg.rpo_alpha:
      chosen = jnp.sum(pol[:, list(chosen_rows(pol.shape[1]))], -1)
      nll = -jnp.sum(w * chosen) / jnp.maximum(normalizer["chosen_tokens"], 1.0)
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


def evaluate_pairs(cfg, params, ref_logps, pairs, languages, dcfg, **kw) -> dict:
  """TRL-named DPO metrics of `params` on pairs, overall and per language,
  plus 'logps/margin' (mean chosen - rejected summed log-prob; the
  reference's is 'ref_logps/margin')."""
  pol, n = pair_logps.compute_pair_logps(cfg, params, pairs, languages, **kw)
  per, aux = pair_losses(dcfg, pol, ref_logps, n, np.asarray([p.score_margin for p in pairs]))
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
  if dcfg.loss_type not in LOSS_TYPES:
    raise ValueError(f"dpo.loss_type={dcfg.loss_type!r}: expected one of {LOSS_TYPES}")
  if dcfg.loss_type == "copg":
    check_scored(pairs, "train")
    check_scored(eval_pairs, "eval")
  if (dcfg.loss_type == "srpo") != bool(pairs[0].revisions):
    raise ValueError(f"dpo.loss_type={dcfg.loss_type!r} with pairs "
                     f"{'with' if pairs[0].revisions else 'without'} revision rows: tokenize "
                     f"them with revision_request exactly when the loss is 'srpo'")
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
    ref_train, _, _ = pair_logps.cached_reference_logps(cfg, ref_params, pairs, languages,
                                             cache_dir=cache_dir, **kw)
  if eval_pairs:
    eval_ref, _, _ = pair_logps.cached_reference_logps(cfg, _base_if_off(ref_params, params), eval_pairs,
                                            languages, cache_dir=cache_dir, **kw)
  batches = pp.PairIterator(pairs, global_batch_size=config.data.batch_size,
                            seq_len=config.data.seq_len, pad_id=pad_id, seed=config.seed,
                            languages=languages, ref_logps=ref_train)
  example = pp.pair_batch([None] * (config.data.batch_size // jax.process_count()),
                          config.data.seq_len, pad_id, languages, ref_logps=ref_train,
                          n_rows=len(pp.rows_of(pairs[0])))
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


def check_scored(pairs, split: str):
  """CoPG learns from the scores: every pair must have chosen_score and rejected_score."""
  unscored = [p.id for p in pairs if not np.isfinite(p.score_margin)]
  if unscored:
    raise ValueError(f"dpo.loss_type='copg': {len(unscored)} {split} pair(s) without "
                     f"chosen_score / rejected_score, first {unscored[:3]} (score them, or "
                     f"drop them with data.skip_invalid)")


def _scored(pairs, split: str) -> list:
  kept = [p for p in pairs if np.isfinite(p.score_margin)]
  if len(kept) < len(pairs):
    logging.warning("dpo.loss_type='copg': skipping %d unscored %s pair(s)",
                    len(pairs) - len(kept), split)
  return kept


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
  revise = config.dpo.revision_request if config.dpo.loss_type == "srpo" else None
  pairs, stats = pp.tokenize_pairs(pp.read_pairs(list(config.data.train), skip), tok, seq_len,
                                   skip, revise)
  logging.info("train pairs: %s", stats)
  eval_pairs = []
  if config.data.eval:
    eval_pairs, _ = pp.tokenize_pairs(pp.read_pairs(list(config.data.eval), skip), tok, seq_len,
                                      skip, revise)
  if config.dpo.loss_type == "copg" and skip:  # CoPG needs the scores: drop unscored pairs
    pairs, eval_pairs = _scored(pairs, "train"), _scored(eval_pairs, "eval")
  params, _ = train_dpo(config, workdir, cfg, params, pairs, mesh, rules, ref_params=ref_params,
                        eval_pairs=eval_pairs)
  return common.finish(workdir, cfg, params, config.export_hf, base=config.model.init,
                       export_dtype=config.export_hf_dtype)
