"""What the training stages share: their common config blocks, the model on a
mesh (loaded or initialised), the trainer (state + jitted step for any loss)
and the final params. sft, dpo, online, rloo and reward_model build on it.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from aya_jax import checkpoint, optim, sharding
from aya_jax.data import atomic
from aya_jax.models import config as model_config
from aya_jax.models import lora
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


def base_config(stage: str) -> ml_collections.ConfigDict:
  """The blocks every training stage's config has; the stage adds `data` and its own."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.model = model_block()
  c.tokenizer = ""        # local HF tokenizer directory (with a chat template)
  c.lora = lora.lora_block()  # rank > 0: low-rank adapters train, the base is frozen
  c.optim = optim.default_optim_config()
  c.loop = loop_lib.default_loop_config()
  c.mesh = sharding.mesh_block()
  c.distributed = distributed_block()
  c.export_hf = False     # also write workdir/hf/ (transformers-loadable)
  c.export_hf_dtype = "bfloat16"  # bfloat16 | float32 | float16: the hf/ weights' dtype
  return c


def set_schedule(config, steps: int, lr: float, batch_size: int, seq_len: int, *,
                 warmup_steps: int, log_every: int, checkpoint_every: int):
  """A stage config trained `steps` steps at `lr` (the schedule's total too) on batches
  of `batch_size` x `seq_len`: what a pipeline's small {steps, lr, batch_size, seq_len}
  block means for any training stage (the recipe's steps and the world bootstrap)."""
  config.data.seq_len, config.data.batch_size = seq_len, batch_size
  config.optim.lr, config.optim.total_steps = lr, steps
  config.optim.warmup_steps = warmup_steps
  config.loop.num_steps, config.loop.log_every = steps, log_every
  config.loop.checkpoint_every = checkpoint_every
  return config


def setup_model(mcfg, vocab_size: int, mesh, rules, seed: int, lora_block=None,
                **overrides):
  """(ModelConfig, params) on the mesh: loaded from mcfg.init or random; with a `lora`
  block of rank > 0, fresh adapters on that model (an adapter checkpoint given as init is
  merged into its base first: the new adapters train on top of it)."""
  cfg, params = _base_model(mcfg, vocab_size, mesh, rules, seed, **overrides)
  lcfg = lora.from_block(lora_block)
  if lcfg is None:
    return cfg, params
  if cfg.lora is not None:
    raise ValueError(f"model.init={mcfg.init} holds MoLoRA adapters, which do not merge into "
                     "a base to train new adapters on: train them on (lora.rank=0 keeps "
                     "training the adapters it has) or start from their base")
  cfg = cfg.replace(lora=lcfg)
  return cfg, sharding.add_adapters_sharded(cfg, params, jax.random.key(seed + 1), mesh, rules)


def _base_model(mcfg, vocab_size, mesh, rules, seed, **overrides):
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


def make_trainer(config, cfg, params, loss_fn, mesh, rules, normalizer_fn=steps.loss_token_count):
  """(state, jitted step) for any loss over the model's params."""
  # optim.grad_accum micro-batches are accumulated inside the step (exact,
  # one update per step), not by optax.MultiSteps.
  ocfg = optim.optim_config_from(config.optim.to_dict())
  accum = ocfg.grad_accum
  with ocfg.unlocked():
    ocfg.grad_accum = 1
  trainable, frozen = lora.split(params)
  tx = optim.make_optimizer(ocfg, trainable)
  st = state_lib.create_state(trainable, tx, jax.tree.map(lambda x: x.sharding, trainable),
                              frozen)
  fn = steps.make_train_step(loss_fn, tx, normalizer_fn, accum, optim.make_schedule(ocfg))
  return st, fn


def jit_for(fn, st, example_batch, mesh):
  bsh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), example_batch)
  return steps.jit_step(fn, state_lib.state_shardings(st), bsh, mesh)


def finish(workdir, cfg, params, export_hf: bool, base: str = "",
           export_dtype: str = "bfloat16"):
  """Writes workdir/params/ (and workdir/hf/). A LoRA model on a `base` from disk keeps
  only its adapters (and value head) there, naming the base; `export_hf` then also writes
  the PEFT adapter (workdir/peft/) beside the merged model.

  The HF export streams params/ (an adapter checkpoint read as its merged model) a tensor
  at a time on process 0, in `export_dtype`: nothing is gathered to one host, so it runs
  on any number of processes; the PEFT adapter (small) is gathered on every process and
  written by process 0."""
  path = os.path.join(workdir, "params")
  if cfg.lora is not None and base:
    out = checkpoint.save_adapters(path, cfg, params, base)
  else:
    out = checkpoint.save_params(path, cfg, params)
  if export_hf:
    from aya_jax import artifacts
    from aya_jax.models import hf, peft
    artifacts.sync(f"export {path}")  # every process's part of params/ is written
    adapters = None
    if cfg.lora is not None and base:
      adapters = {lora.KEY: jax.tree.map(_gathered, params[lora.KEY])}
    if jax.process_index() == 0:
      hf.save_from_reader(checkpoint.open_reader(path), os.path.join(workdir, "hf"),
                          dtype=_export_dtype(export_dtype))
      if adapters is not None:
        peft.save(cfg, adapters, os.path.join(workdir, "peft"), base)
    artifacts.sync(f"exported {path}")
  return out


def _gathered(x):
  """The whole of a (possibly sharded, multi-host) array on every process, as numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _export_dtype(name: str):
  import ml_dtypes
  dtypes = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}
  if name not in dtypes:
    raise ValueError(f"config.export_hf_dtype={name!r}: expected one of {sorted(dtypes)}")
  return dtypes[name]


def save_config(config, workdir: str, name: str = "config.json"):
  if jax.process_index() == 0:
    atomic.write_text(os.path.join(workdir, name), config.to_json_best_effort(indent=1))
