r"""The 'eval' stage on the synthetic world: win rates of checkpoints under its verifier.

    python -m aya_jax.main --config=configs/eval.py --workdir=runs/eval \
      --config.models='teacher=runs/world/teachers/european/params,weak=runs/world/weak/params' \
      --config.tokenizer=runs/world/tokenizer

Every model of `models` answers the world's held-out prompts (or the world
prompts of `prompts`, a JSONL file) and is compared with the `baseline` by
`aya_jax.evaluation.compare`, the verifier judging and giving each model's
mean score. Writes prompts.jsonl (when drawn here), eval.json and eval.md.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import ml_collections
import numpy as np
from absl import logging

from aya_jax import evaluation
from aya_jax.data import atomic, records
from aya_jax.sampling import methods as methods_lib
from aya_jax.world import tasks
from aya_jax.world import verifier


def world_prompts(split: str, n_per_language: int, languages: Sequence[str],
                  task_names: Sequence[str] = tasks.TASKS,
                  seed: int = 0) -> list[records.PromptRecord]:
  """Prompts (the user turn only) of a split of the synthetic world."""
  recs = tasks.make_split(split, n_per_language, seed, tuple(languages), tuple(task_names))
  return [records.PromptRecord(r.id, r.language, tuple(r.messages[:-1])) for r in recs]


def verifier_scores(prompts: Sequence[records.PromptRecord], answers: Sequence[str],
                    judge: Optional[verifier.Verifier] = None) -> Optional[np.ndarray]:
  """Verifier score per prompt, or None when a prompt is not the world's (the
  `reference` of `evaluation.compare`)."""
  judge = judge or verifier.Verifier()
  try:
    insts = [tasks.parse_id(p.id) for p in prompts]
  except ValueError:
    return None
  return np.asarray([judge.score_answer(inst, a) for inst, a in zip(insts, answers)])


def read_world_prompts(path, languages: Sequence[str]) -> list[records.PromptRecord]:
  """The prompts of a JSONL file, every one in `languages` and one of the
  world's (the verifier judges nothing else); errors name file, line, field."""

  def parse(obj):
    prompt = records.prompt_from_json(obj)
    if prompt.language not in languages:
      raise records.RecordError(f"unknown language {prompt.language!r}; known: "
                                f"{', '.join(languages)}", field="language")
    try:
      tasks.parse_id(prompt.id)
    except ValueError:
      raise records.RecordError(f"prompt {prompt.id!r} is not one of the world's; the verifier "
                                "judges only world prompts (ids 'syn:...')", field="id") from None
    return prompt

  return records.read_parsed(path, parse, "prompts")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "eval"
  c.seed = 0
  c.prompts = ""          # JSONL of world prompts; "" = the world's held-out test split
  c.languages = ()        # known languages (and those of the world split); () = all
  c.tasks = ()            # world split tasks; () = all
  c.n_per_language = 50   # world split size
  c.models = ""           # 'name=path,name=path' (params/ or HF dirs)
  c.baseline = ""         # B of every comparison; "" = the last model
  c.tokenizer = ""        # for params/ dirs ("" = the model dir)
  c.tie_margin = 0.0
  c.n_boot = 1000
  c.temperature = 0.0
  c.top_k = 0
  c.top_p = 1.0
  c.max_new_tokens = 48
  c.batch_size = 32
  return c


def parse_models(spec: str) -> list[tuple[str, str]]:
  """'name=path,name=path' -> [(name, path)], at least two."""
  out = []
  for part in [s for s in spec.split(",") if s.strip()]:
    if "=" not in part:
      raise ValueError(f"config.models: {part!r} is not 'name=path'")
    name, path = part.split("=", 1)
    out.append((name.strip(), path.strip()))
  if len(out) < 2:
    raise ValueError(f"config.models={spec!r}: at least two 'name=path' entries needed")
  return out


def run(config, workdir: str) -> list[dict]:
  os.makedirs(workdir, exist_ok=True)
  languages = tuple(config.languages) or tasks.LANGUAGES
  model_paths = parse_models(config.models)
  if config.prompts:
    prompts = read_world_prompts(config.prompts, languages)
  else:
    prompts = world_prompts("test", config.n_per_language, languages,
                            tuple(config.tasks) or tasks.TASKS, config.seed)
    records.write_jsonl(os.path.join(workdir, "prompts.jsonl"), prompts)
  method = methods_lib.from_config(config.temperature, config.top_k, config.top_p)
  models = [evaluation.Model(name, path, config.tokenizer or None, method,
                             config.max_new_tokens, config.batch_size, config.seed)
            for name, path in model_paths]
  names = [m.name for m in models]
  base = config.baseline or names[-1]
  if base not in names:
    raise ValueError(f"config.baseline={base!r} is not one of {names}")
  baseline = models[names.index(base)]
  answers: dict = {}
  results = [evaluation.compare(m, baseline, prompts, verifier.Verifier(), config.n_boot,
                                config.seed, config.tie_margin, answers,
                                reference=verifier_scores)
             for m in models if m is not baseline]
  report = dict(prompts=config.prompts or os.path.join(workdir, "prompts.jsonl"),
                models=dict(model_paths), comparisons=results)
  atomic.write_json(os.path.join(workdir, "eval.json"), report, indent=1)
  atomic.write_text(os.path.join(workdir, "eval.md"), evaluation.markdown(results))
  for r in results:
    logging.info("eval %s vs %s: %s", r["a"], r["b"],
                 {k: round(v["win_rate"], 3) for k, v in r["per_language"].items()})
  return results
