"""Preference pairs beyond arbitrage: translation contrast, verifier-labelled.

Translation contrast ("RLHF Can Speak Many Languages", Dang et al. 2024):
for a prompt in language X, chosen = a strong model's answer written in X;
rejected = a weaker model's answer to the English version of the prompt,
translated into X. The pair teaches that a native answer beats translationese.

    items, problems = contrast_items(prompt_records)
    pairs, more = translation_contrast_pairs(
        items, strong=responder_a, weak=responder_b,
        translator=lexicon_translator())           # or PromptedTranslator(...)

- An *item* is a `ContrastItem(id, language, prompt, english_prompt,
  english_id)`; `contrast_items(records)` builds them: for the embedded world
  the English version of a task instance is the same instance in English
  (English id = its world id, shared by all languages), for other prompts
  the translator translates the user turns into English.
- A *responder* is `fn([PromptRecord, ...]) -> [answer, ...]` ("" when it had
  no answer); `pool_responder(pool, teacher, path)` runs a teacher of a pool
  (`teachers.TeacherPool`, `arbitrage.FunctionPool`), resumable through its
  completions file.
- A *translator* is `fn(text, src, tgt, rng) -> text`: the world's lexicon
  translator by default, or any responder prompted to translate.

`run_contrast` is the arbitrage stage's step (`config.contrast`): it writes
pairs_contrast.jsonl; a rerun generates and scores only what is missing.
Problems (an empty answer, an English item, a pair whose sides are equal, a
NaN score, a gap below min_gap) are returned per item, never dropped silently.

`verifier_labelled_pairs` builds a toy preference set from gold SFT records:
the gold answer against corrupted versions (the answer in English, a verbose
answer, another prompt's answer), each scored by a scorer (the world's
Verifier), chosen = best, rejected = worst.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Optional, Sequence

import numpy as np

from aya_jax.arbitrage import teachers as teachers_lib
from aya_jax.data import records as records_lib
from aya_jax.world import tasks as synthetic
from aya_jax.world import translator
from aya_jax.world import verifier

SOURCE = "translation_contrast"


@dataclasses.dataclass(frozen=True)
class ContrastItem:
  id: str
  language: str
  prompt: tuple          # messages in `language`, ending with the user turn
  english_prompt: tuple  # the same request in English
  english_id: str = ""   # id of the English request ("" = '<id>#en')


# ------------------------------------------------------------- translators


def lexicon_translator(untranslated_rate: float = 0.1) -> Callable:
  """The world's word-by-word translator (`translator.translate`)."""
  def translate(text, src, tgt, rng):
    return translator.translate(text, src, tgt, rng, untranslated_rate)
  return translate


PROMPT_TEMPLATE = ("Translate the following text from {src} into {tgt}. Reply with the "
                   "translation only.\n\n{text}")


class PromptedTranslator:
  """Any responder (a teacher) prompted to translate. `prefetch` asks for many
  texts in one responder call (one model load); a call asks for one."""

  def __init__(self, responder: Callable, template: str = PROMPT_TEMPLATE):
    self.responder, self.template, self.cache = responder, template, {}

  def _request(self, text, src, tgt) -> records_lib.PromptRecord:
    key = hashlib.sha256(f"{src}\0{tgt}\0{text}".encode()).hexdigest()[:16]
    msg = {"role": "user", "content": self.template.format(src=src, tgt=tgt, text=text)}
    return records_lib.PromptRecord(id=f"translate:{key}", language=tgt, messages=(msg,))

  def prefetch(self, requests: Sequence[tuple]):
    """requests: (text, src, tgt) triples."""
    todo = {}
    for text, src, tgt in requests:
      if (text, src, tgt) not in self.cache:
        todo[text, src, tgt] = self._request(text, src, tgt)
    if todo:
      self.cache.update(zip(todo, self.responder(list(todo.values()))))

  def __call__(self, text, src, tgt, rng):
    del rng
    self.prefetch([(text, src, tgt)])
    return self.cache[text, src, tgt]


# -------------------------------------------------------------- responders


def _answers(path: str, teacher: str) -> dict:
  """{prompt id: sample-0 answer ("" when empty)} of `teacher` in a completions file."""
  got = {}
  done = teachers_lib.done_ids(path)
  if os.path.exists(path) and os.path.getsize(path):
    got = {r.id: r.completion for r in records_lib.iter_jsonl(path, "completion")}
  out = {}
  for cid in done:
    pid, t, j = records_lib.parse_completion_id(cid)
    if t == teacher and j == 0:
      out[pid] = got.get(cid, "")
  return out


def pool_responder(pool, teacher: str, out_path: str, reuse: Sequence[str] = ()) -> Callable:
  """A responder that asks one teacher of a pool (sample 0), appending to
  `out_path` (so a second call resumes instead of regenerating). Answers
  already in a `reuse` completions file (arbitrage's) are not asked again."""
  def respond(requests):
    requests = list(requests)
    have = {}
    for path in (*reuse, out_path):
      have.update(_answers(path, teacher))
    todo = list({r.id: r for r in requests if r.id not in have}.values())
    if todo:
      pool.answer(todo, out_path, teachers=[teacher])
      have.update(_answers(out_path, teacher))
    return [have.get(r.id, "") for r in requests]
  return respond


# ---------------------------------------------------------------- contrast


def contrast_items(records, translator: Optional[Callable] = None, seed: int = 0,
                   source_language: str = "en") -> tuple[list, list]:
  """ContrastItems for records (prompt or SFT records). A world record's
  English version is its instance in English; any other record's user turns
  are translated into English by `translator`. English records, and records
  with no English version, are problems."""
  items, problems = [], []
  for r in records:
    msgs = tuple(r.messages)
    prompt = msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
    if r.language == source_language:
      problems.append(dict(id=r.id, problem="english prompt: nothing to contrast"))
      continue
    try:
      try:
        inst = synthetic.parse_id(r.id)
      except ValueError:
        inst = None
      if inst is not None:
        en = synthetic.Instance(source_language, inst.task, inst.args, inst.template)
        items.append(ContrastItem(r.id, r.language, prompt,
                                  ({"role": "user", "content": en.prompt()},), en.id))
        continue
      if translator is None:
        raise ValueError("not a world prompt and no translator")
      rng = records_lib.keyed_rng(seed, r.id + "#prompt")
      english = tuple(dict(m, content=translator(m["content"], r.language, source_language, rng))
                      if m["role"] == "user" else m for m in prompt)
      items.append(ContrastItem(r.id, r.language, prompt, english))
    except ValueError as e:
      problems.append(dict(id=r.id, problem=f"no English version: {e}"))
  return items, problems


def translation_contrast_pairs(items: Sequence[ContrastItem], strong: Callable, weak: Callable,
                               translator: Optional[Callable] = None, seed: int = 0,
                               scorer=None, source: str = SOURCE,
                               source_language: str = "en",
                               known_scores: Optional[dict] = None) -> tuple[list, list]:
  """(PreferenceRecords, problems); see the module docstring. With a scorer,
  chosen_score / rejected_score are filled (a NaN score is a problem and the
  score stays None); `known_scores` {(id, chosen, rejected): (chosen_score,
  rejected_score)} are reused instead of scoring again."""
  translator = translator or lexicon_translator()
  items = list(items)
  en_id = lambda it: it.english_id or f"{it.id}#{source_language}"  # noqa: E731
  strong_answers = strong([records_lib.PromptRecord(it.id, it.language, it.prompt) for it in items])
  weak_answers = weak([records_lib.PromptRecord(en_id(it), source_language, it.english_prompt)
                       for it in items])
  pairs, problems, todo = [], [], []
  for it, good, bad in zip(items, strong_answers, weak_answers):
    if it.language == source_language:
      problems.append(dict(id=it.id, problem=f"prompt already in {source_language}"))
    elif not good or not good.strip():
      problems.append(dict(id=it.id, problem="strong model gave an empty answer"))
    elif not bad or not bad.strip():
      problems.append(dict(id=it.id, problem="weak model gave an empty English answer"))
    else:
      todo.append((it, good, bad))
  if hasattr(translator, "prefetch"):
    translator.prefetch([(bad, source_language, it.language) for it, _, bad in todo])
  for it, good, bad in todo:
    rejected = translator(bad, source_language, it.language, records_lib.keyed_rng(seed, it.id))
    if not rejected.strip():
      problems.append(dict(id=it.id, problem="translator returned an empty text"))
    elif rejected.strip() == good.strip():
      problems.append(dict(id=it.id, problem="translated answer equals the native answer"))
    else:
      pairs.append(dict(id=f"{it.id}#tc", language=it.language, prompt=list(it.prompt),
                        chosen=good, rejected=rejected, source=source))
  if scorer is not None:
    problems += _score_pairs(pairs, scorer, known_scores or {})
  return [records_lib.PreferenceRecord.from_dict(p) for p in pairs], problems


def _score_pairs(pairs: list, scorer, known: dict) -> list:
  """Fills chosen_score / rejected_score in place; returns NaN problems."""
  todo = [p for p in pairs if (p["id"], p["chosen"], p["rejected"]) not in known]
  flat = [dict(id=p["id"], language=p["language"], prompt=p["prompt"], completion=p[k])
          for p in todo for k in ("chosen", "rejected")]
  s = np.asarray(scorer.score(flat), np.float64) if flat else np.zeros(0)
  known = dict(known)
  known.update(((p["id"], p["chosen"], p["rejected"]), (s[2 * i], s[2 * i + 1]))
               for i, p in enumerate(todo))
  problems = []
  for p in pairs:
    for key, v in zip(("chosen_score", "rejected_score"),
                      known[p["id"], p["chosen"], p["rejected"]]):
      if v is not None and np.isfinite(v):
        p[key] = float(v)
      else:
        problems.append(dict(id=p["id"], problem=f"{key} is NaN"))
  return problems


def run_contrast(c, workdir: str, prompts, pool, scorer=None, seed: int = 0,
                 reuse: Sequence[str] = ()) -> dict:
  """The arbitrage stage's translation-contrast step; `c` is config.contrast
  (strong, weak, translator = lexicon | prompted, translator_teacher,
  untranslated_rate, min_gap). Generations go to contrast_completions.jsonl
  (strong answers in a `reuse` file are not asked again); all pairs, scored
  by `scorer`, to contrast_scored.jsonl (a rerun reuses their scores); those
  with chosen - rejected >= min_gap to pairs_contrast.jsonl. Returns the
  report section (per-language pair counts and per-item problems)."""
  teacher_of = dict(strong=c.strong, weak=c.weak)
  if c.translator == "prompted":
    teacher_of["translator_teacher"] = c.translator_teacher or c.strong
  for field, name in teacher_of.items():
    if name not in pool.teachers:
      raise ValueError(f"config.contrast.{field}={name!r}: not a teacher of the pool "
                       f"{sorted(pool.teachers)}")
  gen_path = os.path.join(workdir, "contrast_completions.jsonl")
  if c.translator == "lexicon":
    translator = lexicon_translator(c.untranslated_rate)
  elif c.translator == "prompted":
    translator = PromptedTranslator(pool_responder(pool, teacher_of["translator_teacher"],
                                                    gen_path))
  else:
    raise ValueError(f"config.contrast.translator={c.translator!r}; use lexicon | prompted")
  items, problems = contrast_items(prompts, translator, seed)
  out_path = os.path.join(workdir, "pairs_contrast.jsonl")
  scored_path = os.path.join(workdir, "contrast_scored.jsonl")
  known = {}
  if os.path.exists(scored_path):
    known = {(p.id, p.chosen, p.rejected): (p.chosen_score, p.rejected_score)
             for p in records_lib.iter_jsonl(scored_path, "preference")}
  pairs, more = translation_contrast_pairs(
      items, pool_responder(pool, c.strong, gen_path, reuse),
      pool_responder(pool, c.weak, gen_path), translator, seed, scorer, known_scores=known)
  problems += more
  if pairs and scorer is not None:
    records_lib.write_jsonl(scored_path, pairs)
  kept = []
  for p in pairs:
    gap = None if p.chosen_score is None or p.rejected_score is None else \
        p.chosen_score - p.rejected_score
    if gap is not None and gap < c.min_gap:
      problems.append(dict(id=p.id, problem=f"score gap {gap:.4g} below {c.min_gap}"))
    else:
      kept.append(p)
  if kept:
    records_lib.write_jsonl(out_path, kept)
  elif os.path.exists(out_path):
    os.remove(out_path)
  per_language = {}
  for p in kept:
    per_language[p.language] = per_language.get(p.language, 0) + 1
  return dict(strong=c.strong, weak=c.weak, translator=c.translator, n_items=len(items),
              n_pairs=len(kept), per_language=per_language, problems=problems)


# ------------------------------------------------------ verifier-labelled


CORRUPTIONS = ("english", "verbose", "wrong")  # the kinds corrupted_answers makes


def corrupted_answers(record, pool_by_task: dict, rng) -> dict:
  """{kind: answer} worse versions of a world record's gold answer (kinds: CORRUPTIONS)."""
  inst = synthetic.parse_id(record.id)
  gold = inst.answer()
  out = {"verbose": " ".join([gold] * 3)}
  if inst.answer_language != "en":
    out["english"] = inst.answer("en")
  others = [a for a in pool_by_task.get((inst.language, inst.task), []) if a != gold]
  if others:
    out["wrong"] = others[int(rng.integers(len(others)))]
  return out


def verifier_labelled_pairs(records, scorer=None, kinds=("english", "verbose"), seed: int = 0,
                            min_gap: float = 0.1, source: str = "verifier") -> list:
  """PreferenceRecords from gold world SFT records: the gold answer against
  each of `kinds` of corruption ('english': the answer in English, 'verbose':
  repeated, 'wrong': another answer of the same task), labelled by `scorer`
  (default: the Verifier); one pair per kind whose score gap is at least
  `min_gap`, ids '<id>#vp-<kind>'."""
  if scorer is None:
    scorer = verifier.verifier_scorer()
  pool: dict = {}
  for r in records:
    inst = synthetic.parse_id(r.id)
    pool.setdefault((inst.language, inst.task), []).append(inst.answer())
  pairs = []
  for r in records:
    rng = records_lib.keyed_rng(seed, r.id)
    bad = corrupted_answers(r, pool, rng)
    names = [k for k in kinds if k in bad and bad[k] != r.messages[-1]["content"]]
    if not names:
      continue
    answers = [r.messages[-1]["content"]] + [bad[k] for k in names]
    prompt = list(r.messages[:-1])
    s = scorer.score([dict(id=r.id, language=r.language, prompt=prompt, completion=a)
                      for a in answers])
    for j, kind in enumerate(names, 1):
      if abs(s[0] - s[j]) < min_gap:
        continue
      hi, lo = (0, j) if s[0] > s[j] else (j, 0)
      pairs.append(records_lib.PreferenceRecord(
          id=f"{r.id}#vp-{kind}", language=r.language, prompt=tuple(prompt),
          chosen=answers[hi], rejected=answers[lo], chosen_score=float(s[hi]),
          rejected_score=float(s[lo]), source=source))
  return pairs


def sample_labelled_pairs(completions, scorer=None, gold: bool = True, min_gap: float = 0.25,
                          max_per_prompt: int = 4, seed: int = 0,
                          source: str = "verifier_samples") -> list:
  """PreferenceRecords from models' own answers, labelled by `scorer` (default:
  the world's Verifier): the distribution a reward model used as an arbiter
  is asked to judge (how reward models are trained: model answers, labelled).

  `completions` are CompletionRecords (ids '<prompt id>#<teacher>#<j>'); per
  prompt, distinct answers (plus the world's gold answer when `gold`) are
  scored, and up to `max_per_prompt` pairs whose score gap is at least
  `min_gap` are drawn (keyed by the prompt id, so the set does not depend on
  order); ids '<prompt id>#sp-<i>'."""
  if scorer is None:
    scorer = verifier.verifier_scorer()
  by_prompt: dict = {}
  for r in completions:
    pid = records_lib.parse_completion_id(r.id)[0]
    answers = by_prompt.setdefault(pid, (r, {}))[1]
    answers.setdefault(r.completion, None)
  rows, index = [], []
  for pid, (r, answers) in by_prompt.items():
    if gold:
      answers.setdefault(synthetic.parse_id(pid).answer(), None)
    for a in answers:
      rows.append(dict(id=pid, language=r.language, prompt=list(r.prompt), completion=a))
      index.append((pid, a))
  scores = np.asarray(scorer.score(rows), np.float64) if rows else np.zeros(0)
  if np.isnan(scores).any():
    bad = [index[i][0] for i in np.flatnonzero(np.isnan(scores))[:3]]
    raise ValueError(f"sample_labelled_pairs: NaN scores for prompts {bad}")
  for (pid, a), s in zip(index, scores):
    by_prompt[pid][1][a] = float(s)
  pairs = []
  for pid, (r, answers) in by_prompt.items():
    items = sorted(answers.items(), key=lambda kv: (-kv[1], kv[0]))
    cand = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items))
            if items[i][1] - items[j][1] >= min_gap]
    if not cand:
      continue
    rng = records_lib.keyed_rng(seed, pid)
    pick = rng.permutation(len(cand))[:max_per_prompt]
    for n, c in enumerate(sorted(pick)):
      (ca, cs), (ra, rs) = items[cand[c][0]], items[cand[c][1]]
      pairs.append(records_lib.PreferenceRecord(
          id=f"{pid}#sp-{n}", language=r.language, prompt=tuple(r.prompt), chosen=ca,
          rejected=ra, chosen_score=cs, rejected_score=rs, source=source))
  return pairs
