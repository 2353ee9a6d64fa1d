r"""Supervised fine-tuning stage: `python -m aya_jax.main --config=configs/sft.py`.

Reads SFT records (JSONL), tokenises with the chat template, packs, trains
with the one loop (exact resume from workdir/checkpoints), and writes the
final params to workdir/params/ (and an HF directory on request).

What every training stage shares (config blocks, model set-up, the trainer)
is in aya_jax.train.common.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from aya_jax import axes, sharding
from aya_jax.data import formatting, pipeline
from aya_jax.train import common
from aya_jax.train import loop as loop_lib
from aya_jax.train import steps


def default_config() -> ml_collections.ConfigDict:
  c = common.base_config("sft")
  c.data = ml_collections.ConfigDict()
  c.data.train = ()       # JSONL files of SFT records ("" tokenizer + no files: the world)
  c.data.eval = ()        # held-out JSONL files: eval loss every loop.eval_every steps
  c.data.eval_batches = 4
  c.data.seq_len = 256
  c.data.batch_size = 16  # global rows per step
  c.data.pack = True
  c.data.weights = ""     # mixture, e.g. "en:2,fr:1" (by language) or by file with mix_by
  c.data.mix_by = "language"
  c.data.skip_invalid = False
  return c


def parse_weights(text: str):
  if not text:
    return None
  out = {}
  for part in text.split(","):
    if ":" not in part:
      raise ValueError(f"data.weights={text!r}: expected 'key:weight,...'")
    k, v = part.rsplit(":", 1)
    out[k.strip()] = float(v)
  return out


def embedded_data(workdir: str, n_per_language: int = 128, languages=None):
  """The embedded default: the synthetic world's tokenizer, train and valid splits."""
  from aya_jax.data import records
  from aya_jax.world import tasks as synthetic
  root = os.path.join(workdir, "embedded")
  tok_dir = os.path.join(root, "tokenizer")
  if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    synthetic.build_tokenizer(tok_dir)
  paths = {}
  for split in ("train", "valid"):
    path = os.path.join(root, f"{split}.jsonl")
    if not os.path.exists(path):
      n = n_per_language if split == "train" else max(4, n_per_language // 8)
      kw = {} if languages is None else {"languages": tuple(languages)}
      records.write_jsonl(path, synthetic.make_split(split, n, seed=0, **kw))
    paths[split] = path
  return tok_dir, paths["train"], paths["valid"]


def make_eval_fn(loss_fn, files, tok, config, mesh):
  """Mean loss per token over the first `data.eval_batches` batches of `files`."""
  if not files:
    return None
  grad_free = jax.jit(lambda p, b: loss_fn(p, b, steps.loss_token_count(b), None))

  def eval_fn(state):
    it, _ = pipeline.make_sft_iterator(
        list(files), tok, seq_len=config.data.seq_len,
        global_batch_size=config.data.batch_size, seed=0, pack=config.data.pack, num_epochs=1)
    total, n = 0.0, 0.0
    for i, batch in enumerate(it):
      if i >= config.data.eval_batches:
        break
      loss, sums = grad_free(state.model_params(), sharding.global_batch(batch, mesh))
      total += float(sums["nll_sum"])
      n += float(sums["n_tokens"])
    return {"loss": total / max(n, 1.0)}
  return eval_fn


def run(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  if not config.tokenizer and not config.data.train:
    tok_dir, train, valid = embedded_data(workdir)
    with config.unlocked():
      config.tokenizer, config.data.train, config.data.eval = tok_dir, (train,), (valid,)
  if not config.tokenizer:
    raise ValueError("config.tokenizer: a local HF tokenizer directory is required")
  if not config.data.train:
    raise ValueError("config.data.train: at least one JSONL file of SFT records is required")
  common.save_config(config, workdir)
  tok = formatting.load_tokenizer(config.tokenizer)
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = axes.rules(config.mesh.rules)
  cfg, params = common.setup_model(config.model, len(tok), mesh, rules, config.seed,
                                   config.lora, pad_id=tok.pad_token_id,
                                   bos_id=tok.bos_token_id,
                                   eos_ids=formatting.end_of_turn_ids(tok))
  batches, stats = pipeline.make_sft_iterator(
      list(config.data.train), tok, seq_len=config.data.seq_len,
      global_batch_size=config.data.batch_size, seed=config.seed, pack=config.data.pack,
      weights=parse_weights(config.data.weights), mix_by=config.data.mix_by, num_epochs=None,
      skip_invalid=config.data.skip_invalid)
  loss_fn = steps.sft_loss_fn(cfg, config.model.vocab_chunk)
  st, fn = common.make_trainer(config, cfg, params, loss_fn, mesh, rules)
  step = common.jit_for(fn, st, _example_batch(config), mesh)
  loop_cfg = config.loop.copy_and_resolve_references()
  with loop_cfg.unlocked():
    loop_cfg.flops_per_token = cfg.train_flops_per_token(config.data.seq_len)
  eval_fn = make_eval_fn(loss_fn, config.data.eval, tok, config, mesh)
  with sharding.activation_rules(mesh, rules):
    st = loop_lib.train_loop(st, step, batches, loop_cfg, workdir, mesh, eval_fn=eval_fn,
                             run_config=config)
  logging.info("data: %s", stats.as_dict())
  return common.finish(workdir, cfg, st.model_params(), config.export_hf,
                       base=config.model.init, export_dtype=config.export_hf_dtype)


def _example_batch(config):
  import numpy as np
  rows = config.data.batch_size // jax.process_count()
  z = np.zeros((rows, config.data.seq_len), np.int32)
  return {k: z for k in pipeline.KEYS}
