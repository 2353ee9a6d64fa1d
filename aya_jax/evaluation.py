r"""Per-language win rates under a judge, m-ArenaHard style; the 'eval' stage.

    python -m aya_jax.main --config=configs/eval.py --workdir=runs/eval \
      --config.models='teacher=runs/world/teachers/european/params,weak=runs/world/weak/params' \
      --config.tokenizer=runs/world/tokenizer

Two models (`Model`: an aya_jax params/ dir or an HF dir, or anything with
`name` and `answer(prompts) -> list[str]`) answer every prompt with the same
sampling settings and the same per-prompt keys (`prompt_keys`: from the seed
and the prompt id only). A judge compares the two answers of each prompt:

  * pointwise (a Scorer: `score(list_of_CompletionRecord) -> np.ndarray`,
    the verifier or a reward model): A wins when its score beats B's by more
    than `tie_margin`, ties count half; an empty answer loses to any
    non-empty one (two empty answers tie) and is never sent to the judge;
  * pairwise (has `compare(records_first, records_second) -> np.ndarray`,
    each entry P(first is better) in [0, 1]): position bias is handled the
    Arena-Hard way, every pair is judged in both orders and the prompt's
    outcome is the mean of the two games.

Per language: win rate (mean outcome), a 95% percentile bootstrap interval
over prompts (`bootstrap_ci`, fixed resampling seed), wins / ties / losses,
and each model's mean verifier score when the prompts are the world's;
`per_prompt` keeps the outcome (and A's verifier score) of every prompt, so
two models compared with the same B can be compared with each other, paired.

Prompts: any local JSONL with a `language` on every line (the m-ArenaHard
layout): `id` or `question_id`, and the conversation as `messages`, a
`prompt` string or Arena-Hard `turns` ([{"content"}]). Errors name the file,
line and field (unknown language, missing field, duplicate id).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from aya_jax.arbitrage import teachers
from aya_jax.data import atomic, formatting, records
from aya_jax.sampling import methods as methods_lib
from aya_jax.sampling import sampler
from aya_jax.world import tasks as synthetic


@dataclasses.dataclass(frozen=True)
class Prompt:
  id: str
  language: str
  messages: tuple


# ------------------------------------------------------------------ prompts


def _parse_prompt(obj: Any, languages: Optional[Sequence[str]]) -> Prompt:
  if not isinstance(obj, dict):
    raise records.RecordError(f"expected a JSON object, got {type(obj).__name__}")
  if "language" not in obj:
    raise records.RecordError("missing", field="language")
  lang = obj["language"]
  if not isinstance(lang, str) or (languages is not None and lang not in languages):
    raise records.RecordError(f"unknown language {lang!r}; known: {', '.join(languages)}",
                              field="language")
  pid = obj.get("id", obj.get("question_id"))
  if pid is None:
    raise records.RecordError("missing (or 'question_id')", field="id")
  if isinstance(pid, int) and not isinstance(pid, bool):
    pid = str(pid)
  records._check_str(pid, "id")  # pylint: disable=protected-access
  if "messages" in obj:
    messages = records._prompt(obj["messages"], "messages")  # pylint: disable=protected-access
  elif "prompt" in obj:
    messages = ({"role": "user", "content": records._check_str(obj["prompt"], "prompt")},)  # pylint: disable=protected-access
  elif "turns" in obj:
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
      raise records.RecordError("expected a list of {'content': ...}", field="turns")
    messages = ({"role": "user", "content": records._check_str(  # pylint: disable=protected-access
        turns[0].get("content"), "turns[0].content")},)
  else:
    raise records.RecordError("missing (or 'prompt' / 'turns')", field="messages")
  return Prompt(pid, lang, tuple(messages))


def read_prompts(path, languages: Optional[Sequence[str]] = None,
                 only: Optional[Sequence[str]] = None) -> list[Prompt]:
  """Prompts of a JSONL file; `languages` known (default: the world's). With `only`, any
  language is accepted and the prompts in other languages than `only` are dropped (every line is
  still checked: errors name file and line)."""
  if only is not None:
    parsed = records.read_parsed(path, lambda obj: _parse_prompt(obj, None), "prompts")
    return [p for p in parsed if p.language in set(only)]
  languages = tuple(languages or synthetic.LANGUAGES)
  return records.read_parsed(path, lambda obj: _parse_prompt(obj, languages), "prompts")


def write_prompts(path, prompts: Sequence[Prompt]):
  """The prompts as JSONL, written atomically (a later run reads them back)."""
  atomic.write_text(path, "".join(
      json.dumps(dict(id=p.id, language=p.language, messages=list(p.messages)),
                 ensure_ascii=False) + "\n" for p in prompts))


def world_prompts(split: str, n_per_language: int, languages: Sequence[str],
                  tasks: Sequence[str] = synthetic.TASKS, seed: int = 0) -> list[Prompt]:
  """Prompts (the user turn only) of a split of the synthetic world."""
  recs = synthetic.make_split(split, n_per_language, seed, tuple(languages), tuple(tasks))
  return [Prompt(r.id, r.language, tuple(r.messages[:-1])) for r in recs]


# ------------------------------------------------------------------- models


def prompt_keys(seed: int, prompt_ids: Sequence[str]):
  """[B] keys from (seed, prompt id) alone: both models get the same ones."""
  words = np.asarray([np.frombuffer(hashlib.sha256(pid.encode()).digest()[:8], np.uint32)
                      for pid in prompt_ids])
  base = jax.random.key(seed)
  fold = lambda w: jax.random.fold_in(jax.random.fold_in(base, w[0]), w[1])  # noqa: E731
  return jax.vmap(fold)(jnp.asarray(words, jnp.uint32))


class Model:
  """A checkpoint answering prompts: `answer(prompts) -> list[str]`."""

  def __init__(self, name: str, path=None, tokenizer=None, method=methods_lib.Greedy(),
               max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0,
               model: Optional[tuple] = None, mesh=None, rules: str = "fsdp"):
    """path: params/ or HF dir; or `model=(cfg, params)` in memory.
    tokenizer: a directory (default: `path` when it holds tokenizer files).
    mesh: params sharded over it (`rules` rules) and sampled on it; None: one device.
    Loaded as a teacher is (the same checks: tokenizer vs vocabulary, stop ids)."""
    self.name, self.path = name, path
    self.method, self.max_new_tokens = method, max_new_tokens
    self.batch_size, self.seed = batch_size, seed
    self.mesh, self.rules = mesh, rules
    if tokenizer is None and path is None:
      raise ValueError(f"model {name}: no tokenizer directory")
    loaded = teachers.load_teacher(
        teachers.Teacher(name, model if model is not None else os.fspath(path),
                         tokenizer=os.fspath(tokenizer) if tokenizer is not None else None),
        mesh, rules)
    self.tokenizer, self.cfg, self.params = loaded.tokenizer, loaded.cfg, loaded.params
    self.stop, self.pad = loaded.stop_ids, loaded.pad_id

  def answer(self, prompts: Sequence[Prompt]) -> list[str]:
    toks = [formatting.tokenize_prompt(self.tokenizer, p.messages) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(toks[i]))
    out = [""] * len(prompts)
    for s in range(0, len(order), self.batch_size):
      idx = order[s:s + self.batch_size]
      res = sampler.generate(self.cfg, self.params, [toks[i] for i in idx],
                             prompt_keys(self.seed, [prompts[i].id for i in idx]),
                             self.method, self.max_new_tokens, self.stop, 1, self.pad,
                             self.mesh, self.rules)
      for i, text in zip(idx, res.texts(self.tokenizer, self.stop)):
        out[i] = text.strip()
    return out


# ------------------------------------------------------------------- judging


def completion_records(prompts: Sequence[Prompt], answers: Sequence[str], name: str):
  """CompletionRecords of the non-empty answers, and their indices."""
  idx = [i for i, a in enumerate(answers) if a.strip()]
  recs = [records.CompletionRecord(id=f"{prompts[i].id}#{name}", language=prompts[i].language,
                                   prompt=prompts[i].messages, completion=answers[i],
                                   teacher=name) for i in idx]
  return recs, idx


def _pointwise(judge, prompts, answers, name):
  """Judge scores (NaN for empty answers)."""
  recs, idx = completion_records(prompts, answers, name)
  out = np.full(len(prompts), np.nan)
  if recs:
    out[idx] = np.asarray(judge.score(recs), np.float64)
  return out


def outcomes(judge, prompts: Sequence[Prompt], answers_a: Sequence[str],
             answers_b: Sequence[str], tie_margin: float = 0.0) -> np.ndarray:
  """Per prompt: 1 A wins, 0.5 tie, 0 B wins (pairwise: the mean of both orders)."""
  if not len(prompts) == len(answers_a) == len(answers_b):
    raise ValueError(f"outcomes: {len(prompts)} prompts, {len(answers_a)} and "
                     f"{len(answers_b)} answers")
  empty_a = np.asarray([not a.strip() for a in answers_a])
  empty_b = np.asarray([not b.strip() for b in answers_b])
  out = np.full(len(prompts), 0.5)
  out[empty_a & ~empty_b] = 0.0
  out[~empty_a & empty_b] = 1.0
  both = np.flatnonzero(~empty_a & ~empty_b)
  if not both.size:
    return out
  ps = [prompts[i] for i in both]
  ra, _ = completion_records(ps, [answers_a[i] for i in both], "A")
  rb, _ = completion_records(ps, [answers_b[i] for i in both], "B")
  if hasattr(judge, "compare"):  # pairwise: both orders (Arena-Hard)
    ab = np.asarray(judge.compare(ra, rb), np.float64)
    ba = np.asarray(judge.compare(rb, ra), np.float64)
    out[both] = 0.5 * (ab + (1.0 - ba))
  else:
    sa, sb = np.asarray(judge.score(ra), np.float64), np.asarray(judge.score(rb), np.float64)
    out[both] = np.where(sa > sb + tie_margin, 1.0, np.where(sb > sa + tie_margin, 0.0, 0.5))
  return out


def bootstrap_ci(x: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of mean(x): `n_boot` resamples of len(x)
  indices drawn by `np.random.default_rng(seed).integers(0, n, (n_boot, n))`,
  then the (1-level)/2 and (1+level)/2 percentiles (linear interpolation)."""
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return float("nan"), float("nan")
  idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
  means = x[idx].mean(axis=1)
  lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
  return float(lo), float(hi)


def verifier_scores(prompts: Sequence[Prompt], answers: Sequence[str],
                    verifier=None) -> Optional[np.ndarray]:
  """Verifier score per prompt, or None when a prompt is not the world's."""
  verifier = verifier or synthetic.Verifier()
  try:
    insts = [synthetic.parse_id(p.id) for p in prompts]
  except ValueError:
    return None
  return np.asarray([verifier.score_answer(inst, a) for inst, a in zip(insts, answers)])


def by_language(prompts: Sequence[Prompt], values: np.ndarray) -> dict:
  langs = sorted({p.language for p in prompts})
  lang_of = np.asarray([p.language for p in prompts])
  return {lang: np.asarray(values)[lang_of == lang] for lang in langs}


def compare(model_a, model_b, prompts: Sequence[Prompt], judge=None, n_boot: int = 1000,
            seed: int = 0, tie_margin: float = 0.0, answers: Optional[dict] = None) -> dict:
  """Win rate of A over B per language (and 'all'); see the module docstring.

  `answers` (name -> list[str]) caches answers across comparisons."""
  judge = judge or synthetic.Verifier()
  answers = {} if answers is None else answers
  for m in (model_a, model_b):
    if m.name not in answers:
      answers[m.name] = list(m.answer(prompts))
  ans_a, ans_b = answers[model_a.name], answers[model_b.name]
  out = outcomes(judge, prompts, ans_a, ans_b, tie_margin)
  va, vb = verifier_scores(prompts, ans_a), verifier_scores(prompts, ans_b)
  groups = by_language(prompts, out)
  groups["all"] = out
  result = dict(a=model_a.name, b=model_b.name, judge=type(judge).__name__,
                pairwise=hasattr(judge, "compare"), per_language={})
  lang_of = np.asarray([p.language for p in prompts])
  for lang, o in groups.items():
    mask = np.ones(len(prompts), bool) if lang == "all" else lang_of == lang
    lo, hi = bootstrap_ci(o, n_boot, seed)
    row = dict(n=int(o.size), win_rate=float(o.mean()), ci=[lo, hi],
               wins=int((o > 0.5).sum()), ties=int((o == 0.5).sum()), losses=int((o < 0.5).sum()))
    if va is not None:
      row.update(verifier_a=float(va[mask].mean()), verifier_b=float(vb[mask].mean()))
    result["per_language"][lang] = row
  # per prompt, for paired comparisons of two stages (the pipeline report)
  result["per_prompt"] = dict(outcome=out.tolist(),
                              verifier_a=None if va is None else va.tolist())
  return result


def markdown(results: Sequence[dict]) -> str:
  lines = []
  for r in results:
    lines += [f"## {r['a']} vs {r['b']} (judge: {r['judge']})", "",
              "| language | n | win rate A | 95% CI | W / T / L | verifier A | verifier B |",
              "|---|---|---|---|---|---|---|"]
    for lang, row in r["per_language"].items():
      v = lambda k: f"{row[k]:.3f}" if k in row else "-"  # noqa: E731
      lines.append(f"| {lang} | {row['n']} | {row['win_rate']:.3f} | "
                   f"[{row['ci'][0]:.3f}, {row['ci'][1]:.3f}] | "
                   f"{row['wins']} / {row['ties']} / {row['losses']} | "
                   f"{v('verifier_a')} | {v('verifier_b')} |")
    lines.append("")
  return "\n".join(lines)


# -------------------------------------------------------------------- stage


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "eval"
  c.seed = 0
  c.prompts = ""          # JSONL of prompts; "" = the world's held-out test split
  c.languages = ()        # known languages (and those of the world split); () = all
  c.tasks = ()            # world split tasks; () = all
  c.n_per_language = 50   # world split size
  c.models = ""           # 'name=path,name=path' (params/ or HF dirs)
  c.baseline = ""         # B of every comparison; "" = the last model
  c.tokenizer = ""        # for params/ dirs ("" = the model dir)
  c.judge = "verifier"    # the only built-in judge; pass objects via `compare`
  c.tie_margin = 0.0
  c.n_boot = 1000
  c.temperature = 0.0
  c.top_k = 0
  c.top_p = 1.0
  c.max_new_tokens = 48
  c.batch_size = 32
  return c


def parse_models(spec: str) -> list[tuple[str, str]]:
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
  languages = tuple(config.languages) or synthetic.LANGUAGES
  if config.prompts:
    prompts = read_prompts(config.prompts, languages)
  else:
    prompts = world_prompts("test", config.n_per_language, languages,
                            tuple(config.tasks) or synthetic.TASKS, config.seed)
    write_prompts(os.path.join(workdir, "prompts.jsonl"), prompts)
  if config.judge != "verifier":
    raise ValueError(f"config.judge={config.judge!r}: only 'verifier' is built in (any "
                     "Scorer or pairwise judge object goes to `compare`)")
  for p in prompts:
    try:
      synthetic.parse_id(p.id)
    except ValueError:
      raise ValueError(f"{config.prompts}: prompt {p.id!r} is not one of the world's; the "
                       "verifier judges only world prompts (ids 'syn:...')") from None
  method = methods_lib.from_config(config.temperature, config.top_k, config.top_p)
  models = [Model(name, path, config.tokenizer or None, method, config.max_new_tokens,
                  config.batch_size, config.seed) for name, path in parse_models(config.models)]
  names = [m.name for m in models]
  base = config.baseline or names[-1]
  if base not in names:
    raise ValueError(f"config.baseline={base!r} is not one of {names}")
  b = models[names.index(base)]
  answers: dict = {}
  results = [compare(m, b, prompts, synthetic.Verifier(), config.n_boot, config.seed,
                     config.tie_margin, answers) for m in models if m is not b]
  report = dict(prompts=config.prompts or os.path.join(workdir, "prompts.jsonl"),
                models=dict(parse_models(config.models)), comparisons=results)
  atomic.write_json(os.path.join(workdir, "eval.json"), report, indent=1)
  atomic.write_text(os.path.join(workdir, "eval.md"), markdown(results))
  for r in results:
    logging.info("eval %s vs %s: %s", r["a"], r["b"],
                 {k: round(v["win_rate"], 3) for k, v in r["per_language"].items()})
  return results
