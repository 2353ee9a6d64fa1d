r"""Reward-model stage: `python -m aya_jax.main --config=configs/reward_model.py`.

A value-head backbone (initialised from any supported checkpoint: an HF
causal LM or ...ForSequenceClassification directory, an aya_jax params/
directory, or random from a preset) is trained on PreferenceRecords with the
Bradley-Terry loss (`losses.bradley_terry_loss`): the reward of (prompt,
answer) is the value at the last token of prompt + answer (`reward.encode`).

Options: `loss.margin_scale` > 0 asks for a per-pair margin of
margin_scale * (chosen_score - rejected_score) where both scores are present
(TRL's `margin` column); `loss.center_coef` adds the reward-centring term.

Batches hold pairs: tokens/positions/segment_ids [B, 2, L] (row 0 chosen,
row 1 rejected, right-padded), margin [B], lang [B] (index into the sorted
languages of the training data) and valid [B] (0 on padding pairs). Metrics
per logged step: loss, accuracy, mean_margin, and the same per language
(`accuracy/<lang>`, ...) in workdir/reward_metrics.jsonl; the one loop
writes the raw sums to metrics.jsonl. At the end, pair accuracy of the final
model on data.eval (and on the training pairs) goes to
workdir/reward_eval.json, and params to workdir/params/ (HF export: a
...ForSequenceClassification directory with export_hf).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from aya_jax import axes, checkpoint, losses, reward, sharding
from aya_jax.data import atomic, formatting, records as records_lib
from aya_jax.models.layers import KERNEL_INIT
from aya_jax.models import lora
from aya_jax.train import common
from aya_jax.train import loop as loop_lib

KEYS = ("tokens", "positions", "segment_ids")


def default_config():
  c = common.base_config("reward_model")
  c.data = ml_collections.ConfigDict()
  c.data.train = ()         # JSONL files of preference records (none: the embedded world)
  c.data.eval = ()          # held-out PreferenceRecords: pair accuracy every loop.eval_every
  c.data.seq_len = 256      # prompt + answer tokens per row
  c.data.batch_size = 16    # pairs per step (global)
  c.data.skip_invalid = False
  c.loss = ml_collections.ConfigDict()
  c.loss.center_coef = 0.0  # reward centring (0 = off)
  c.loss.margin_scale = 0.0  # margin = scale * (chosen_score - rejected_score)
  c.eval_batch_size = 32
  # embedded default data: with no data.train, verifier-labelled pairs of the
  # synthetic world (preference.verifier_labelled_pairs) and its tokenizer
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.n_per_language = 0
  c.synthetic.languages = ()   # () = all nine
  c.synthetic.kinds = ("english", "verbose")
  c.synthetic.tasks = ()       # () = all world tasks
  return c


def synthetic_data(config, workdir: str):
  """(train paths, valid paths, tokenizer dir) of the embedded default data."""
  from aya_jax.arbitrage import contrast as preference
  from aya_jax.world import tasks as synthetic
  d = os.path.join(workdir, "synthetic")
  tok_dir = config.tokenizer or os.path.join(d, "tokenizer")
  langs = tuple(config.synthetic.languages) or synthetic.LANGUAGES
  paths = {}
  for split in ("train", "valid"):
    paths[split] = os.path.join(d, f"pairs_{split}.jsonl")
    if not os.path.exists(paths[split]):
      recs = synthetic.make_split(split, config.synthetic.n_per_language, config.seed, langs,
                                  tuple(config.synthetic.tasks) or synthetic.TASKS)
      records_lib.write_jsonl(paths[split], preference.verifier_labelled_pairs(
          recs, kinds=tuple(config.synthetic.kinds), seed=config.seed))
  if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    synthetic.build_tokenizer(tok_dir)
  return (paths["train"],), (paths["valid"],), tok_dir


# ------------------------------------------------------------------ model


def setup_reward_model(mcfg, vocab_size: int, mesh, rules, seed: int, lora_block=None,
                       **overrides):
  """(cfg with value_head, params) on the mesh; a causal checkpoint gets a
  fresh value head (normal, std 0.02); an untied LM head is dropped. A `lora` block of
  rank > 0 adds adapters (they and the value head train)."""
  if not mcfg.init:
    return common.setup_model(mcfg, vocab_size, mesh, rules, seed, lora_block,
                              value_head=True, **overrides)
  peek = checkpoint.peek_config(mcfg.init)
  loaded_cfg, params = checkpoint.load_model(
      mcfg.init, sharding.param_shardings(peek, mesh, rules))
  if loaded_cfg.vocab_size < vocab_size:
    raise ValueError(f"model {mcfg.init} has vocab {loaded_cfg.vocab_size} but the tokenizer "
                     f"has {vocab_size} tokens")
  cfg = loaded_cfg.replace(value_head=True, **common.execution(mcfg), **overrides)
  shardings = sharding.param_shardings(cfg, mesh, rules)
  params = {k: v for k, v in params.items() if k in shardings}  # the LM head goes
  if "value_head" not in params:
    head = jax.jit(lambda k: KERNEL_INIT(k, (cfg.d_model, 1), jnp.float32),
                   out_shardings=shardings["value_head"]["kernel"])(jax.random.key(seed))
    params["value_head"] = {"kernel": head}
    logging.info("reward model: new value head on %s", mcfg.init)
  params = sharding.shard_tree(params, shardings)
  lcfg = lora.from_block(lora_block)
  if lcfg is None:
    return cfg, params
  cfg = cfg.replace(lora=lcfg)
  return cfg, sharding.add_adapters_sharded(cfg, params, jax.random.key(seed + 1), mesh, rules)


# ------------------------------------------------------------------- data


def encode_pairs(pairs, tokenizer, seq_len: int, languages, margin_scale: float = 0.0,
                 skip_invalid: bool = False):
  """Encoded pairs: list of (chosen tokens, rejected tokens, lang id, margin);
  and counts (truncated, skipped)."""
  lang_id = {l: i for i, l in enumerate(languages)}
  out, stats = [], dict(n_pairs=0, n_truncated=0, n_skipped=0)
  for p in pairs:
    toks = []
    for ans in (p.chosen, p.rejected):
      t, cut = reward.encode(tokenizer, p.prompt, ans, seq_len, p.id)
      stats["n_truncated"] += int(cut > 0)
      toks.append(None if cut < 0 else t)
    if toks[0] is None or toks[1] is None or np.array_equal(toks[0], toks[1]):
      msg = (f"pair {p.id!r}: chosen and rejected are the same within seq_len {seq_len}"
             if toks[0] is not None and toks[1] is not None else
             f"pair {p.id!r}: the prompt fills seq_len {seq_len}; no answer token left")
      if not skip_invalid:
        raise ValueError(msg + " (raise data.seq_len or set data.skip_invalid)")
      stats["n_skipped"] += 1
      continue
    margin = 0.0
    if margin_scale and p.chosen_score is not None and p.rejected_score is not None:
      margin = margin_scale * (p.chosen_score - p.rejected_score)
    out.append((toks[0], toks[1], lang_id[p.language], margin))
    stats["n_pairs"] += 1
  return out, stats


def pair_batch(items, n_rows: int, seq_len: int, pad_id: int) -> dict:
  """Batch dict of encoded pairs (module docstring); rows past items are padding."""
  flat = [t for it in items for t in it[:2]]
  b = reward.rows(flat, 2 * n_rows, seq_len, pad_id)
  out = {k: v.reshape(n_rows, 2, seq_len) for k, v in b.items()}
  out["margin"] = np.zeros((n_rows,), np.float32)
  out["lang"] = np.zeros((n_rows,), np.int32)
  out["valid"] = np.zeros((n_rows,), np.int32)
  for i, it in enumerate(items):
    out["lang"][i], out["margin"][i], out["valid"][i] = it[2], it[3], 1
  return out


class PairBatches:
  """Endless shuffled batches of encoded pairs (a new permutation per epoch,
  from (seed, epoch)); this process's share of each global batch. State:
  {"epoch", "index"} -> exact resume."""

  def __init__(self, items, global_batch: int, seq_len: int, pad_id: int, seed: int = 0):
    if not items:
      raise ValueError("reward model: no training pairs")
    pc, pi = jax.process_count(), jax.process_index()
    if global_batch % pc:
      raise ValueError(f"data.batch_size {global_batch} is not a multiple of {pc} processes")
    self.items, self.global_batch, self.seq_len, self.pad_id = items, global_batch, seq_len, pad_id
    self.seed, self.local = seed, slice(pi * global_batch // pc, (pi + 1) * global_batch // pc)
    self.epoch, self.index = 0, 0

  def _order(self):
    return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items))

  def __iter__(self):
    return self

  def __next__(self):
    picked = []
    while len(picked) < self.global_batch:
      order = self._order()
      take = order[self.index:self.index + self.global_batch - len(picked)]
      picked += list(take)
      self.index += len(take)
      if self.index >= len(order):
        self.epoch, self.index = self.epoch + 1, 0
    local = [self.items[i] for i in picked[self.local]]
    return pair_batch(local, len(local), self.seq_len, self.pad_id)

  def get_state(self):
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state):
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ------------------------------------------------------------------- loss


def reward_loss_fn(cfg, languages, center_coef: float = 0.0):
  """loss_fn(params, mb, normalizer, rng) -> (loss, sums) for make_train_step."""
  rewards_of = reward.reward_fn(cfg)

  def loss_fn(params, mb, normalizer, rng):
    del rng
    b, _, length = mb["tokens"].shape
    flat = {k: mb[k].reshape(2 * b, length) for k in KEYS}
    r = rewards_of(params, flat["tokens"], flat["positions"], flat["segment_ids"]).reshape(b, 2)
    valid = mb["valid"].astype(jnp.float32)
    loss, aux = losses.bradley_terry_loss(r[:, 0], r[:, 1], mb["margin"], center_coef,
                                          valid, normalizer)
    sums = {k: aux[k] for k in ("n_pairs", "n_correct", "margin_sum", "loss_sum")}
    diff = jax.lax.stop_gradient(r[:, 0] - r[:, 1])
    for i, lang in enumerate(languages):
      w = valid * (mb["lang"] == i)
      sums[f"n_pairs/{lang}"] = jnp.sum(w)
      sums[f"n_correct/{lang}"] = jnp.sum(w * (diff > 0))
      sums[f"margin_sum/{lang}"] = jnp.sum(w * diff)
    return loss, sums

  return loss_fn


def pair_count(batch):
  return jnp.sum(batch["valid"].astype(jnp.float32))


def derived_metrics(scalars: dict, languages) -> dict:
  """accuracy / mean_margin / bt_loss overall and per language from the sums."""
  out = {}
  for suffix in [""] + [f"/{l}" for l in languages]:
    n = scalars.get(f"n_pairs{suffix}", 0.0)
    if n:
      out[f"accuracy{suffix}"] = scalars[f"n_correct{suffix}"] / n
      out[f"mean_margin{suffix}"] = scalars[f"margin_sum{suffix}"] / n
  if scalars.get("n_pairs"):
    out["bt_loss"] = scalars["loss_sum"] / scalars["n_pairs"]
  return out


# ------------------------------------------------------------------ stage


def _read_pairs(paths, skip_invalid):
  out = []
  for path in paths:
    out += list(records_lib.read_jsonl(path, "preference", skip_invalid=skip_invalid))
  return out


def run(config, workdir: str, stop_after: Optional[int] = None):
  """The stage. `stop_after` (tests) stops after that many steps of this call
  with a checkpoint and `loop.Preempted`; running again resumes."""
  os.makedirs(workdir, exist_ok=True)
  train_paths, valid_paths, tok_dir = config.data.train, config.data.eval, config.tokenizer
  if not train_paths and config.synthetic.n_per_language > 0:
    train_paths, valid_paths, tok_dir = synthetic_data(config, workdir)
  if not tok_dir:
    raise ValueError("config.tokenizer: a local HF tokenizer directory is required")
  if not train_paths:
    raise ValueError("config.data.train: at least one JSONL file of PreferenceRecords is "
                     "required (or config.synthetic.n_per_language > 0)")
  tok = formatting.load_tokenizer(tok_dir)
  train = _read_pairs(train_paths, config.data.skip_invalid)
  valid = _read_pairs(valid_paths, config.data.skip_invalid) if valid_paths else []
  languages = sorted({p.language for p in train})
  items, stats = encode_pairs(train, tok, config.data.seq_len, languages,
                              config.loss.margin_scale, config.data.skip_invalid)
  logging.info("reward model data: %s languages=%s", stats, languages)
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = axes.rules(config.mesh.rules)
  cfg, params = setup_reward_model(config.model, len(tok), mesh, rules, config.seed,
                                   config.lora, pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                                   eos_ids=formatting.end_of_turn_ids(tok))
  pad_id = 0 if tok.pad_token_id is None else int(tok.pad_token_id)
  batches = PairBatches(items, config.data.batch_size, config.data.seq_len, pad_id, config.seed)
  loss_fn = reward_loss_fn(cfg, languages, config.loss.center_coef)
  st, fn = common.make_trainer(config, cfg, params, loss_fn, mesh, rules, normalizer_fn=pair_count)
  rows = config.data.batch_size // jax.process_count()
  step = common.jit_for(fn, st, pair_batch([], rows, config.data.seq_len, pad_id), mesh)
  log_path = os.path.join(workdir, "reward_metrics.jsonl")

  def on_log(step_no, scalars):
    if jax.process_index() == 0:
      with open(log_path, "a") as f:
        f.write(json.dumps(dict(step=step_no, **derived_metrics(scalars, languages))) + "\n")

  scorer = _scorer(cfg, st.model_params(), tok, config, mesh)

  def held_out_accuracy(state):  # held-out pair accuracy (loop.eval_every and at the end)
    scorer.params = state.model_params()
    acc = reward.pair_accuracy(scorer, valid)
    return {(k if lang == "all" else f"{k}/{lang}"): v for lang, r in acc.items()
            for k, v in r.items() if k != "n"}

  eval_fn = held_out_accuracy if valid else None
  loop_cfg = config.loop.copy_and_resolve_references()
  with loop_cfg.unlocked():
    loop_cfg.flops_per_token = cfg.train_flops_per_token(config.data.seq_len)
  with sharding.activation_rules(mesh, rules):
    st = loop_lib.train_loop(st, step, batches, loop_cfg, workdir, mesh, stop_after=stop_after,
                             on_log=on_log, eval_fn=eval_fn, run_config=config)
  params = st.model_params()
  out = common.finish(workdir, cfg, params, export_hf=False, base=config.model.init)
  if config.export_hf and jax.process_index() == 0:
    export_hf(cfg, params, os.path.join(workdir, "hf"))
  scorer.params = params
  evaluate(scorer, dict(valid=valid, train=train[:256]), workdir, stats)
  return out


def export_hf(cfg, params, path: str):
  """params -> a transformers ...ForSequenceClassification directory."""
  from aya_jax.models import hf
  hf.save(*lora.merge(cfg, jax.device_get(params)), path)


def _scorer(cfg, params, tok, config, mesh):
  return reward.RewardModelScorer(cfg, params, tok, batch_size=config.eval_batch_size,
                                  max_len=config.data.seq_len, mesh=mesh,
                                  rules=config.mesh.rules)


def evaluate(scorer, sets: dict, workdir: str, data_stats: Optional[dict] = None) -> dict:
  """Pair accuracy (overall, per language) of each named set -> reward_eval.json."""
  result = {name: reward.pair_accuracy(scorer, pairs) for name, pairs in sets.items() if pairs}
  result["data"] = data_stats or {}
  if jax.process_index() == 0:
    atomic.write_json(os.path.join(workdir, "reward_eval.json"), result, indent=1)
  logging.info("reward model eval: %s", {k: v.get("all") for k, v in result.items()
                                         if isinstance(v, dict) and "all" in v})
  return result
