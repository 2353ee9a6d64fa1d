"""Per-language win rates of two models under a judge, m-ArenaHard style.

Two models (`Model`: an aya_jax params/ dir or an HF dir, or anything with
`name` and `answer(prompts) -> list[str]`) answer every prompt with the same
sampling settings and the same per-prompt keys (`sampler.prompt_keys`: from the seed
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
and, given a `reference` (answers -> one score per prompt, e.g. the world's
verifier), each model's mean reference score; `per_prompt` keeps the outcome
(and A's reference score) of every prompt, so two models compared with the
same B can be compared with each other, paired.

Prompts are `records.PromptRecord`s (`records.read_prompts` reads any local
JSONL layout, m-ArenaHard's included). The 'eval' stage over the synthetic
world is `aya_jax.world.evaluate`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np

from aya_jax import console
from aya_jax.data import formatting, records
from aya_jax.sampling import methods as methods_lib
from aya_jax.sampling import sampler

Prompts = Sequence[records.PromptRecord]


class Model:
  """A checkpoint answering prompts: `answer(prompts) -> list[str]`."""

  def __init__(self, name: str, path=None, tokenizer=None, method=methods_lib.Greedy(),
               max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0,
               model: Optional[tuple] = None, mesh=None, rules: str = "fsdp",
               revisions: int = 0, revision_request: str = formatting.REVISION_REQUEST):
    """path: params/ or HF dir; or `model=(cfg, params)` in memory.
    tokenizer: a directory (default: `path` when it holds tokenizer files).
    mesh: params sharded over it (`rules` rules) and sampled on it; None: one device.
    Loaded as a teacher is (`sampler.load_for_sampling`: the same checks and stop ids).
    revisions: the answer is the model's own draft revised that many times (SRPO's
    self-revision: `formatting.revision_messages`, the draft then `revision_request`)."""
    self.name, self.path = name, path
    self.method, self.max_new_tokens = method, max_new_tokens
    self.batch_size, self.seed = batch_size, seed
    self.mesh, self.rules = mesh, rules
    self.revisions, self.revision_request = revisions, revision_request
    if tokenizer is None and path is None:
      raise ValueError(f"model {name}: no tokenizer directory")
    if model is None and path is None:
      raise ValueError(f"model {name}: neither a path nor an in-memory model")
    loaded = sampler.load_for_sampling(
        model if model is not None else os.fspath(path),
        os.fspath(tokenizer) if tokenizer is not None else None, mesh, rules, name)
    self.tokenizer, self.cfg, self.params = loaded.tokenizer, loaded.cfg, loaded.params
    self.stop, self.pad = loaded.stop_ids, loaded.pad_id

  def answer(self, prompts: Prompts) -> list[str]:
    out = self._answer(prompts)
    for _ in range(self.revisions):  # an empty draft stays empty: nothing to revise
      revise = [records.PromptRecord(p.id, p.language, tuple(formatting.revision_messages(
          p.messages, draft, self.revision_request))) for p, draft in zip(prompts, out)]
      new = self._answer([r for r, d in zip(revise, out) if d])
      it = iter(new)
      out = [next(it) if d else d for d in out]
    return out

  def _answer(self, prompts: Prompts) -> list[str]:
    toks = [formatting.tokenize_prompt(self.tokenizer, p.messages) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(toks[i]))
    out = [""] * len(prompts)
    progress = console.Progress(len(prompts), f"answering ({self.name})", unit="prompt")
    for s in range(0, len(order), self.batch_size):
      idx = order[s:s + self.batch_size]
      res = sampler.generate(self.cfg, self.params, [toks[i] for i in idx],
                             sampler.prompt_keys(self.seed, [prompts[i].id for i in idx]),
                             self.method, self.max_new_tokens, self.stop, 1, self.pad,
                             self.mesh, self.rules)
      for i, text in zip(idx, res.texts(self.tokenizer, self.stop)):
        out[i] = text.strip()
      progress.update(len(idx))
    progress.close()
    return out


# ------------------------------------------------------------------- judging


def completion_records(prompts: Prompts, answers: Sequence[str], name: str):
  """CompletionRecords of the non-empty answers, and their indices."""
  idx = [i for i, a in enumerate(answers) if a.strip()]
  recs = [records.CompletionRecord(id=f"{prompts[i].id}#{name}", language=prompts[i].language,
                                   prompt=prompts[i].messages, completion=answers[i],
                                   teacher=name) for i in idx]
  return recs, idx


def outcomes(judge, prompts: Prompts, answers_a: Sequence[str],
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


def by_language(prompts: Prompts, values: np.ndarray) -> dict:
  langs = sorted({p.language for p in prompts})
  lang_of = np.asarray([p.language for p in prompts])
  return {lang: np.asarray(values)[lang_of == lang] for lang in langs}


Reference = Callable[[Prompts, Sequence[str]], Optional[np.ndarray]]


def compare(model_a, model_b, prompts: Prompts, judge, n_boot: int = 1000,
            seed: int = 0, tie_margin: float = 0.0, answers: Optional[dict] = None,
            reference: Optional[Reference] = None) -> dict:
  """Win rate of A over B per language (and 'all'); see the module docstring.

  `answers` (name -> list[str]) caches answers across comparisons; `reference`
  (prompts, answers) -> a score per prompt, or None where it has none for them."""
  answers = {} if answers is None else answers
  for m in (model_a, model_b):
    if m.name not in answers:
      answers[m.name] = list(m.answer(prompts))
  ans_a, ans_b = answers[model_a.name], answers[model_b.name]
  out = outcomes(judge, prompts, ans_a, ans_b, tie_margin)
  va = vb = None
  if reference is not None:
    va, vb = reference(prompts, ans_a), reference(prompts, ans_b)
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
