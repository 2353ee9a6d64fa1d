r"""Supervised fine-tuning stage: `python -m aya_jax.main --config=configs/sft.py`.

Reads SFT records (JSONL), tokenises with the chat template, packs, trains
with the one loop (exact resume from workdir/checkpoints), and writes the
final params to workdir/params/ (and an HF directory on request).

Shared by the other training stages: `setup_model` (load or init a model on
a mesh) and `default_config` blocks.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from aya_jax import axes, checkpoint, optim, sharding
from aya_jax.data import atomic, formatting, pipeline
from aya_jax.models import config as model_config
from aya_jax.train import loop as loop_lib
from aya_jax.train import state as state_lib
from aya_jax.train import steps


def model_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init = ""             # HF dir or aya_jax params/ dir; "" = random init from `preset`
  c.preset = "tiny_llama"  # models.config preset (random init only)
  c.dtype = "float32"     # compute dtype
  c.remat = "none"        # none | full | dots
  c.vocab_chunk = 0       # >0: log-probs over vocab chunks (large vocabularies)
  c.attention_chunk = 0   # >0: flash-style attention in chunk x chunk tiles (long context)
  return c


def execution(mcfg) -> dict:
  """The ModelConfig fields a stage's model block sets on any checkpoint."""
  return dict(dtype=mcfg.dtype, remat=mcfg.remat, attention_chunk=mcfg.attention_chunk)


def distributed_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_processes = 1
  c.coordinator_address = ""
  c.process_id = 0
  return c


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "sft"
  c.seed = 0
  c.model = model_block()
  c.tokenizer = ""        # local HF tokenizer directory (with a chat template)
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
  c.optim = optim.default_optim_config()
  c.loop = loop_lib.default_loop_config()
  c.mesh = sharding.mesh_block()
  c.distributed = distributed_block()
  c.export_hf = False     # also write workdir/hf/ (transformers-loadable)
  return c


def setup_model(mcfg, vocab_size: int, mesh, rules, seed: int, **overrides):
  """(ModelConfig, params) on the mesh: loaded from mcfg.init or random."""
  if mcfg.init:
    cfg = checkpoint.peek_config(mcfg.init)
    cfg = cfg.replace(**execution(mcfg), **overrides)
    shardings = sharding.param_shardings(cfg, mesh, rules)
    loaded_cfg, params = checkpoint.load_model(mcfg.init, shardings, language_model=True)
    if loaded_cfg.vocab_size < vocab_size:
      raise ValueError(f"model {mcfg.init} has vocab {loaded_cfg.vocab_size} but the tokenizer "
                       f"has {vocab_size} tokens")
    return cfg, params
  cfg = model_config.preset(mcfg.preset, vocab_size=vocab_size, **execution(mcfg),
                            **overrides)
  return cfg, sharding.init_params_sharded(cfg, jax.random.key(seed), mesh, rules)


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


def make_trainer(config, cfg, params, loss_fn, mesh, rules, normalizer_fn=steps.loss_token_count):
  """(state, jitted step) for any loss over the model's params."""
  # optim.grad_accum micro-batches are accumulated inside the step (exact,
  # one update per step), not by optax.MultiSteps.
  ocfg = optim.optim_config_from(config.optim.to_dict())
  accum = ocfg.grad_accum
  with ocfg.unlocked():
    ocfg.grad_accum = 1
  tx = optim.make_optimizer(ocfg, params)
  st = state_lib.create_state(params, tx, jax.tree.map(lambda x: x.sharding, params))
  fn = steps.make_train_step(loss_fn, tx, normalizer_fn, accum, optim.make_schedule(ocfg))
  return st, fn


def jit_for(fn, st, example_batch, mesh):
  bsh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), example_batch)
  return steps.jit_step(fn, state_lib.state_shardings(st), bsh, mesh)


def finish(workdir, cfg, params, export_hf: bool):
  out = checkpoint.save_params(os.path.join(workdir, "params"), cfg, params)
  if export_hf:
    from aya_jax.models import hf
    hf.save(cfg, jax.device_get(params), os.path.join(workdir, "hf"))
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


def save_config(config, workdir: str, name: str = "config.json"):
  if jax.process_index() == 0:
    atomic.write_text(os.path.join(workdir, name), config.to_json_best_effort(indent=1))


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
      loss, sums = grad_free(state.params, sharding.global_batch(batch, mesh))
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
  save_config(config, workdir)
  tok = formatting.load_tokenizer(config.tokenizer)
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = axes.rules(config.mesh.rules)
  cfg, params = setup_model(config.model, len(tok), mesh, rules, config.seed,
                            pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                            eos_ids=formatting.end_of_turn_ids(tok))
  batches, stats = pipeline.make_sft_iterator(
      list(config.data.train), tok, seq_len=config.data.seq_len,
      global_batch_size=config.data.batch_size, seed=config.seed, pack=config.data.pack,
      weights=parse_weights(config.data.weights), mix_by=config.data.mix_by, num_epochs=None,
      skip_invalid=config.data.skip_invalid)
  loss_fn = steps.sft_loss_fn(cfg, config.model.vocab_chunk)
  st, fn = make_trainer(config, cfg, params, loss_fn, mesh, rules)
  step = jit_for(fn, st, _example_batch(config), mesh)
  loop_cfg = config.loop.copy_and_resolve_references()
  with loop_cfg.unlocked():
    loop_cfg.flops_per_token = cfg.train_flops_per_token(config.data.seq_len)
  eval_fn = make_eval_fn(loss_fn, config.data.eval, tok, config, mesh)
  with sharding.activation_rules(mesh, rules):
    st = loop_lib.train_loop(st, step, batches, loop_cfg, workdir, mesh, eval_fn=eval_fn,
                             run_config=config)
  logging.info("data: %s", stats.as_dict())
  return finish(workdir, cfg, st.params, config.export_hf)


def _example_batch(config):
  import numpy as np
  rows = config.data.batch_size // jax.process_count()
  z = np.zeros((rows, config.data.seq_len), np.int32)
  return {k: z for k in pipeline.KEYS}
