"""The teacher pool: every prompt through every teacher, written as completions.

A teacher is (name, model, tokenizer, sampling method, n samples,
max_new_tokens). The model is a Hugging Face directory (config.json +
safetensors) or, in memory, a `(ModelConfig, params)` pair; the tokenizer
directory carries the chat template (default: the model directory).

`TeacherPool.answer(prompts, out_path)` loads one teacher at a time, renders
each prompt with that teacher's chat template, samples `n` completions per
prompt with `aya_jax.sampling.generate` and appends CompletionRecords to
`out_path` after every batch (flushed). Completion ids are
`records.completion_id(prompt id, teacher, sample)` = "<prompt id>#<teacher>#<j>".

Resuming: on start, the ids already in `out_path` (and in the sidecar
`<out_path>.empty`, which lists samples that decoded to empty text and so
have no record) are done and are not generated again; a half-written last
line is dropped. Batches are fixed by the whole prompt list (sorted by
token length) and each prompt's key comes from (seed, teacher, prompt id),
so a run killed between batches and resumed writes the same file as one
uninterrupted run.

Prompts JSONL, one per line: {"id", "language", "messages": [...]} where the
messages end with a user turn (same message rules as aya_jax.data.records).
"""

from __future__ import annotations

import dataclasses
import gc
import os
from typing import Any, Iterable, Optional, Sequence, Union

import jax
from absl import logging

from aya_jax import console
from aya_jax import sharding as sharding_lib
from aya_jax.data import atomic, formatting, records
from aya_jax.sampling import methods as methods_lib
from aya_jax.sampling import sampler

EMPTY_SUFFIX = ".empty"


# ----------------------------------------------------------------- teachers


@dataclasses.dataclass(frozen=True)
class Teacher:
  """One teacher. model: an HF directory, an aya_jax params/ dir or an in-memory
  (cfg, params)."""
  name: str
  model: Union[str, tuple]
  tokenizer: Optional[str] = None
  method: Any = methods_lib.Greedy()
  n: int = 1
  max_new_tokens: int = 256

  def __post_init__(self):
    if not self.name or records.SEP in self.name:
      raise ValueError(f"teacher name {self.name!r}: must be non-empty without {records.SEP!r}")
    if not (isinstance(self.n, int) and self.n >= 1):
      raise ValueError(f"teacher {self.name}: n={self.n!r} must be an int >= 1")
    if self.tokenizer is None and not isinstance(self.model, (str, os.PathLike)):
      raise ValueError(f"teacher {self.name}: an in-memory model needs a tokenizer directory")


# ------------------------------------------------------------------- output


def done_ids(out_path) -> set:
  """Completion ids already in `out_path` or its `.empty` sidecar."""
  out_path = os.fspath(out_path)
  done = set()
  if os.path.exists(out_path):
    records.drop_partial_line(out_path)
    with open(out_path, encoding="utf-8") as f:
      has_lines = any(line.strip() for line in f)
    if has_lines:  # iter_jsonl rejects an empty file
      done.update(r.id for r in records.iter_jsonl(out_path, "completion"))
  empty = out_path + EMPTY_SUFFIX
  if os.path.exists(empty):
    records.drop_partial_line(empty)
    with open(empty, encoding="utf-8") as f:
      done.update(line.strip() for line in f if line.strip())
  return done


# --------------------------------------------------------------------- pool


class TeacherPool:
  """Named teachers answering prompt files; see the module docstring."""

  def __init__(self, teachers: Sequence[Teacher], batch_size: int = 8, seed: int = 0,
               mesh=None, rules: str = "fsdp"):
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
      raise ValueError(f"teacher pool: duplicate teacher names in {names}")
    if batch_size < 1:
      raise ValueError(f"teacher pool: batch_size={batch_size} must be >= 1")
    self.teachers = {t.name: t for t in teachers}
    self.batch_size, self.seed = batch_size, seed
    self.mesh, self.rules = mesh, rules

  def select(self, names: Optional[Iterable[str]]) -> list[Teacher]:
    if names is None:
      return list(self.teachers.values())
    out = []
    for name in names:
      if name not in self.teachers:
        raise ValueError(f"unknown teacher {name!r}; the pool has {sorted(self.teachers)}")
      out.append(self.teachers[name])
    return out

  def answer(self, prompts, out_path, teachers: Optional[Iterable[str]] = None,
             max_batches: Optional[int] = None) -> dict:
    """Appends every (prompt, teacher, sample) not yet in `out_path` to it.

    `max_batches` stops after that many generated batches (time-boxed runs,
    tests); the next call resumes. Returns counts: written, empty, skipped
    (already done), batches, and finished (False when stopped early).
    """
    prompts = records.as_prompts(prompts)
    out_path = os.fspath(out_path)
    selected = self.select(teachers)
    done = done_ids(out_path)
    stats = dict(written=0, empty=0, skipped=0, batches=0, finished=True)
    writer = jax.process_index() == 0
    for teacher in selected:
      todo = [(i, j) for i, p in enumerate(prompts) for j in range(teacher.n)
              if records.completion_id(p.id, teacher.name, j) not in done]
      stats["skipped"] += len(prompts) * teacher.n - len(todo)
      if not todo:
        logging.info("teacher %s: all %d prompts done", teacher.name, len(prompts))
        continue
      if max_batches is not None and stats["batches"] >= max_batches:
        stats["finished"] = False
        return stats
      loaded = sampler.load_for_sampling(teacher.model, teacher.tokenizer, self.mesh,
                                           self.rules, name=f"teacher {teacher.name}")
      tokens = _tokenize(teacher, loaded, prompts)
      order = sorted(range(len(prompts)), key=lambda i: len(tokens[i]))  # stable
      progress = console.Progress(len(todo), f"teacher {teacher.name}", unit="sample")
      for start in range(0, len(order), self.batch_size):
        batch = order[start:start + self.batch_size]
        need = [i for i in batch if any(records.completion_id(prompts[i].id, teacher.name, j) not in done
                                        for j in range(teacher.n))]
        if not need:
          continue
        if max_batches is not None and stats["batches"] >= max_batches:
          stats["finished"] = False
          progress.close()
          return stats
        recs, empty = self._generate(teacher, loaded, [prompts[i] for i in need],
                                     [tokens[i] for i in need], done)
        if writer:
          if empty:
            with open(out_path + EMPTY_SUFFIX, "a", encoding="utf-8") as f:
              f.write("".join(e + "\n" for e in empty))
          if recs:
            records.write_jsonl(out_path, recs, append=True)
        done.update(r.id for r in recs)
        done.update(empty)
        stats["written"] += len(recs)
        stats["empty"] += len(empty)
        stats["batches"] += 1
        progress.update(len(recs) + len(empty))
        logging.info("teacher %s: batch %d/%d, %d written, %d empty", teacher.name,
                     start // self.batch_size + 1, -(-len(order) // self.batch_size), len(recs),
                     len(empty))
      progress.close()
      del loaded
      gc.collect()
    return stats

  def _generate(self, teacher, loaded, batch, tokens, done):
    res = sampler.generate(
        loaded.cfg, loaded.params, tokens,
        sampler.prompt_keys(self.seed, [p.id for p in batch], salt=teacher.name),
        teacher.method, teacher.max_new_tokens, loaded.stop_ids, teacher.n, loaded.pad_id,
        self.mesh, self.rules)
    texts = res.texts(loaded.tokenizer, loaded.stop_ids)
    recs, empty = [], []
    for row, text in enumerate(texts):
      p, j = batch[row // teacher.n], row % teacher.n
      cid = records.completion_id(p.id, teacher.name, j)
      if cid in done:
        continue
      if not text.strip():
        empty.append(cid)
        continue
      recs.append(records.CompletionRecord(id=cid, language=p.language, prompt=p.messages,
                                           completion=text, teacher=teacher.name))
    return recs, empty


def _tokenize(teacher: Teacher, loaded: sampler.SamplingModel, prompts: list) -> list:
  """Prompt token ids under the teacher's chat template; checks their length."""
  limit = loaded.cfg.max_seq_len - teacher.max_new_tokens
  out = []
  for p in prompts:
    toks = formatting.tokenize_prompt(loaded.tokenizer, p.messages)
    if len(toks) > limit:
      raise ValueError(
          f"prompt {p.id!r}: {len(toks)} tokens with teacher {teacher.name}'s template; "
          f"with max_new_tokens={teacher.max_new_tokens} it exceeds the model's "
          f"max_seq_len={loaded.cfg.max_seq_len}")
    out.append(toks)
  return out


# -------------------------------------------------------------------- stage


def teachers_from_config(config) -> list[Teacher]:
  """config.teachers: {name: {model, tokenizer, n, max_new_tokens, temperature,
  top_k, top_p}}; missing sampling fields come from config.sampling."""
  out = []
  default = config.sampling
  for name, t in config.teachers.items():
    get = lambda key: t.get(key) if t.get(key) is not None else default.get(key)
    method = methods_lib.from_config(get("temperature"), get("top_k"), get("top_p"))
    out.append(Teacher(name=name, model=t.model, tokenizer=t.get("tokenizer") or None,
                       method=method, n=int(get("n")), max_new_tokens=int(get("max_new_tokens"))))
  return out


def run(config, workdir: str) -> dict:
  """The 'generate' stage: config.prompts through config.teachers ->
  config.output (default workdir/completions.jsonl)."""
  if not config.prompts:
    raise ValueError("generate: config.prompts (a prompts JSONL file) is not set")
  teachers = teachers_from_config(config)
  mesh = None
  if jax.device_count() > 1:
    mesh = sharding_lib.make_mesh(tuple(config.mesh.shape))
  out = config.output or os.path.join(workdir, "completions.jsonl")
  pool = TeacherPool(teachers, batch_size=config.batch_size, seed=config.seed, mesh=mesh,
                     rules=config.mesh.rules)
  only = [s for s in config.only.split(",") if s] if config.get("only") else None
  stats = pool.answer(config.prompts, out, teachers=only)
  logging.info("generate: %s -> %s", stats, out)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    atomic.write_json(os.path.join(workdir, "generate_stats.json"), dict(stats, output=out),
                       indent=1)
  return stats
