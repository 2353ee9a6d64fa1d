"""The pipeline's blocks are the stages' own configs: `config.dpo` is the dpo
stage's `default_config()` (overridden by configs/pipeline.py and the command
line), so `--config.dpo.dpo.beta=0.2` is the `beta` that `losses.dpo_loss`
receives, under the same name as in `configs/dpo.py`.

`block(default_config(), owned, extras)` is such a block: the stage's config
without the fields the pipeline sets itself (`owned`: the tokenizer, the model
to start from, the mesh, the seed, the data files it writes, ...) and with the
pipeline's own few fields (`extras`, e.g. `sft_family.warm_start`).
`stage_config(default_config(), block, ...)` is the config a step runs: the
stage's defaults, the block over them, then the owned fields.
"""

from __future__ import annotations

import ml_collections

from aya_jax.train import common

# what the pipeline sets on every training stage it runs: from its own `seed`,
# `model` and `mesh` blocks, its inputs, and the files the steps before wrote
TRAINING_OWNED = ("stage", "seed", "tokenizer", "model", "mesh", "distributed", "export_hf",
                  "data.train", "data.eval")
# the arbitrage stage's fields the pipeline sets: the pool is its teachers, the
# prompts are the world's split or inputs.prompts, the scorer is the arbiter,
# contrast's sides are its translator (or first teacher) and the weak model
ARBITRAGE_OWNED = ("stage", "seed", "mode", "prompts", "mesh", "teachers",
                   "synthetic.languages", "synthetic.n", "synthetic.teachers", "scorer.kind",
                   "scorer.path", "scorer.tokenizer", "routing.table", "routing.default",
                   "router.path", "contrast.strong", "contrast.weak", "contrast.translator",
                   "contrast.translator_teacher", "cache")
# the eval stage's: what is judged, against what, in which languages
EVAL_OWNED = ("stage", "seed", "prompts", "languages", "tasks", "models", "baseline",
              "tokenizer")


def _split(path: str):
  *parents, leaf = path.split(".")
  return parents, leaf


def block(stage_config, owned=TRAINING_OWNED, **extras) -> ml_collections.ConfigDict:
  """`stage_config` (a stage's default_config()) without the `owned` fields
  (dotted paths), with the pipeline-only `extras` added."""
  c = ml_collections.ConfigDict(stage_config.to_dict())  # unlocked, references resolved
  for path in owned:
    parents, leaf = _split(path)
    node = c
    for p in parents:
      node = node[p]
    del node[leaf]
  for key, value in extras.items():
    c[key] = value
  return c


def training_block(stage_config, steps: int, lr: float, batch_size: int, seq_len: int,
                   owned=(), **extras) -> ml_collections.ConfigDict:
  """A training stage's block trained `steps` steps at `lr` on `batch_size` x
  `seq_len` batches: warmup a tenth of the steps (at most 20), a log line every
  fifth, a checkpoint every half; optim.total_steps follows loop.num_steps
  (`--config.sft.loop.num_steps=100` moves the decay horizon with it)."""
  return reschedule(block(stage_config, TRAINING_OWNED + tuple(owned), **extras), steps, lr,
                    batch_size, seq_len)


def reschedule(c, steps: int, lr=None, batch_size=None, seq_len=None):
  """A training block's schedule for `steps` steps (and, when given, another lr
  or batch shape), with the warmup, log and checkpoint intervals that go with it."""
  common.set_schedule(c, steps, c.optim.lr if lr is None else lr,
                      c.data.batch_size if batch_size is None else batch_size,
                      c.data.seq_len if seq_len is None else seq_len,
                      warmup_steps=min(steps // 10, 20), log_every=max(1, steps // 5),
                      checkpoint_every=max(1, steps // 2))
  if c.optim.get_ref("total_steps") is not c.loop.get_ref("num_steps"):
    c.optim.total_steps = c.loop.get_ref("num_steps")
  return c


def _overlay(target, source, where: str):
  for key, value in source.items():
    if key not in target:
      raise ValueError(f"config.{where}.{key}: not a field of the stage "
                       f"(its fields: {sorted(target)})")
    if isinstance(value, ml_collections.ConfigDict):
      _overlay(target[key], value, f"{where}.{key}")
    else:
      target[key] = value


def stage_config(defaults, block_config, name: str, extras=()) -> ml_collections.ConfigDict:
  """`defaults` (a stage's default_config()) with the pipeline block config.<name>
  over it, its `extras` left out; the caller sets the owned fields."""
  with defaults.unlocked():
    _overlay(defaults, {k: v for k, v in block_config.items() if k not in extras}, name)
  return defaults


def training_stage(defaults, block_config, name: str, config, tokenizer: str, init: str,
                   extras=()) -> ml_collections.ConfigDict:
  """A training stage's config: the block over its defaults, then what the
  pipeline owns: its seed, tokenizer, the model to start from (`init`), its
  model settings (config.model: dtype, remat, vocab_chunk, attention_chunk) and
  its mesh; the pipeline's `lora` block where the step's own has rank 0."""
  c = stage_config(defaults, block_config, name, extras)
  c.seed, c.tokenizer, c.model.init = config.seed, tokenizer, init
  c.mesh.shape = tuple(config.mesh.shape)
  c.mesh.rules = config.mesh.rules or c.mesh.rules
  shared = config.get("lora")  # the pipeline's: every step's adapters unless it has its own
  if shared is not None and shared.rank and not c.lora.rank:
    c.lora.update(shared)
  model = config.get("model")
  for key, value in (model.items() if model is not None else ()):
    if key not in c.model or key in ("init", "preset"):
      raise ValueError(f"config.model.{key}: not a setting of the {c.stage} stage's model "
                       f"block ({sorted(set(c.model) - {'init', 'preset'})})")
    c.model[key] = value
  return c
