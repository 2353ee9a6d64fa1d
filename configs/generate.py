"""Stage 'generate': every prompt through every teacher -> completions JSONL.

Command:

  python -m aya_jax.main --config=configs/generate.py --workdir=runs/generate \
    --config.prompts=data/prompts.jsonl \
    --config.teachers.aya8b.model=models/aya-expanse-8b \
    --config.teachers.llama8b.model=models/llama-3.1-8b-instruct

Expected result: `runs/generate/completions.jsonl` holds one CompletionRecord
per (prompt, teacher, sample), id "<prompt id>#<teacher>#<sample>", written
after every batch; killing and rerunning the same command resumes where it
stopped and ends with the same file. `runs/generate/generate_stats.json` has
the counts (written, empty, skipped, batches).

Prompts: one JSON object per line, {"id", "language", "messages"} with the
messages ending in a user turn. Teachers are Hugging Face model directories
(config.json + safetensors) whose tokenizer (with its chat template) is in
the same directory unless `tokenizer` names another. Sampling fields a
teacher leaves unset come from `config.sampling`; temperature 0 is greedy.
`--config.only=aya8b` runs a subset of the teachers.
"""

import ml_collections

from aya_jax import sharding


def _teacher(model: str) -> ml_collections.ConfigDict:
  """A teacher; None sampling fields fall back to config.sampling. The field
  types are fixed so --config.teachers.<name>.<field>=... is type-checked."""
  ref = ml_collections.FieldReference
  return ml_collections.ConfigDict(dict(
      model=model, tokenizer="", n=ref(None, field_type=int),
      max_new_tokens=ref(None, field_type=int), temperature=ref(None, field_type=float),
      top_k=ref(None, field_type=int), top_p=ref(None, field_type=float)))


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.stage = "generate"
  config.prompts = ""  # prompts JSONL (required)
  config.output = ""  # default: <workdir>/completions.jsonl
  config.seed = 0
  config.batch_size = 16  # prompts per batch (each sampled n times)
  config.mesh = sharding.mesh_block()  # used on more than one device
  config.only = ""  # comma-separated teacher names; empty = all
  config.sampling = ml_collections.ConfigDict(dict(
      temperature=0.7, top_k=0, top_p=0.95, n=1, max_new_tokens=512))
  # teachers by name, run in sorted name order
  config.teachers = ml_collections.ConfigDict(dict(
      aya8b=_teacher("models/aya-expanse-8b"),
      llama8b=_teacher("models/llama-3.1-8b-instruct"),
  ))
  config.lock()
  return config
