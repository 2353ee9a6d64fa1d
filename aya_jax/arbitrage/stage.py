r"""Multilingual data arbitrage: a teacher pool answers, a scorer arbitrates.

    python -m aya_jax.main --config=configs/arbitrage.py --workdir=runs/arb

Modes (`config.mode`):

  reward  every teacher answers every prompt (k samples each), the scorer
          scores all; per prompt the best answer -> sft.jsonl and best vs
          worst -> pairs_offline.jsonl (kept when the score gap >= min_gap).
          Optionally trains the learned router on these decisions.
  fixed   a language -> teacher table; only that teacher answers (the best
          of its k samples is the SFT target; pairs from its samples).
  learned a trained router picks one teacher per prompt from prompt
          features; only that teacher answers.

Scores are compared only among answers to one prompt (so within a language);
means in the report are per language and never pooled across languages.
Ties are broken deterministically: higher score, then the teacher with the
higher mean score in the prompt's language, then earlier teacher (the pool's
order), then lower sample index; the worst answer is the reverse. The fixed
table, the learned router and the report live in `aya_jax.arbitrage.routing`.

Translation contrast (`config.contrast.enabled`): `preference.run_contrast`
adds pairs_contrast.jsonl (chosen: the strong teacher's in-language answer,
reused from completions.jsonl when there; rejected: the weak teacher's
English answer, translated by the world's lexicon or a prompted teacher).

Resumable: completions.jsonl (appended by the pool, per batch) and
scored.jsonl (appended per scoring chunk; both under `cache.dir` when set, keyed by
what they depend on, so a changed routing setting reuses them) are reused; a rerun
generates only
the (prompt, teacher, sample) ids that are missing and scores only the
unscored. Problems are reported per record, never dropped: invalid prompt
lines (e.g. no language), empty answers (the pool's `.empty` sidecar), NaN
scores (`scored.jsonl.nan`), prompts left without any scored answer, pairs
below min_gap. Outputs: sft.jsonl, pairs_offline.jsonl, report.json,
report.md (per language: teacher wins, mean score per teacher, mean routed
score, pairs, router agreement), router.npz (reward mode with router.train),
pairs_contrast.jsonl, contrast_scored.jsonl and contrast_completions.jsonl
(contrast enabled).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Callable, Optional, Sequence

import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from aya_jax import artifacts, sharding
from aya_jax.arbitrage import contrast as preference
from aya_jax.arbitrage import routing
from aya_jax.arbitrage import teachers as teachers_lib
from aya_jax.data import atomic
from aya_jax.data import records as records_lib

SOURCE = "arbitrage_offline"


# ----------------------------------------------------------------- prompts


def read_prompts(src) -> tuple[list, list]:
  """(valid PromptRecords, problems) from a JSONL path or dicts; an invalid
  line (not UTF-8, not JSON, not a prompt) is a problem naming its line, id
  and reason, and is not answered. A file whose last line is cut off (no
  newline, not JSON: a half-written file) is not trusted: RecordError."""
  if isinstance(src, (str, os.PathLike)):
    with open(src, "rb") as f:
      lines = [(i, l) for i, l in enumerate(f, 1) if l.strip()]
    items = []
    for i, line in lines:
      try:
        items.append((i, records_lib.json_line(line)))
      except records_lib.RecordError as e:
        if (i, line) == lines[-1] and not line.endswith(b"\n"):
          raise records_lib.RecordError(f"the last line is cut off ({e.detail}): a half-written "
                                        "file? Write it again", path=src, line=i) from None
        items.append((i, e))
  else:
    items = list(enumerate(src, 1))
  out, problems, seen = [], [], set()
  for line, obj in items:
    rid = obj.get("id") if isinstance(obj, dict) else None
    try:
      if isinstance(obj, records_lib.RecordError):
        raise obj
      rec = obj if isinstance(obj, records_lib.PromptRecord) else records_lib.PromptRecord.from_dict(obj)
      if rec.id in seen:
        raise records_lib.RecordError(f"duplicate id {rec.id!r}", field="id")
    except records_lib.RecordError as e:
      problems.append(dict(line=line, id=rid, problem=f"invalid prompt: {e}"))
      continue
    seen.add(rec.id)
    out.append(rec)
  return out, problems


# ------------------------------------------------------------ simple pools


class FunctionPool:
  """A teacher pool of plain functions with TeacherPool's `answer` contract
  (same ids, append per prompt, `.empty` sidecar, resume by done ids).

  teachers: {name: (fn(prompt_record, sample) -> str, n)}. `generated`
  counts the answers produced (tests check that a resume regenerates none).
  """

  def __init__(self, teachers: dict):
    self.fns = {k: v[0] for k, v in teachers.items()}
    self.teachers = {k: _Named(k, v[1]) for k, v in teachers.items()}
    self.generated = 0

  def answer(self, prompts, out_path, teachers=None, max_batches=None):
    del max_batches
    done = teachers_lib.done_ids(out_path)
    names = list(teachers) if teachers is not None else list(self.teachers)
    written = 0
    for name in names:
      for p in records_lib.as_prompts(prompts):
        for j in range(self.teachers[name].n):
          cid = records_lib.completion_id(p.id, name, j)
          if cid in done:
            continue
          text = self.fns[name](p, j)
          self.generated += 1
          if not text or not text.strip():
            with open(out_path + teachers_lib.EMPTY_SUFFIX, "a", encoding="utf-8") as f:
              f.write(cid + "\n")
            continue
          records_lib.write_jsonl(out_path, [records_lib.CompletionRecord(
              id=cid, language=p.language, prompt=p.messages, completion=text,
              teacher=name)], append=True)
          written += 1
    return dict(written=written)


@dataclasses.dataclass(frozen=True)
class _Named:
  name: str
  n: int


def synthetic_teacher(skill: dict, seed: int = 0, name: str = "") -> Callable:
  """A world teacher: answers a prompt right with probability skill[lang]
  (key '*' = other languages); otherwise answers in English (language
  confusion) or with another number/word. Deterministic per prompt/sample."""
  from aya_jax.world import tasks as synthetic

  def respond(p, j):
    inst = synthetic.parse_id(p.id)
    rng = records_lib.keyed_rng(seed, f"{name}\0{p.id}\0{j}")
    if rng.random() < skill.get(p.language, skill.get("*", 0.5)):
      return inst.answer()
    if inst.answer_language != "en" and rng.random() < 0.5:
      return inst.answer("en")
    return " ".join([inst.answer()] * 4)  # verbose: penalised per extra unit
  return respond


def parse_skills(spec: str) -> dict:
  """'a:en=0.9,fr=0.8,*=0.2;b:*=0.5' -> {'a': {'en': .9, ...}, 'b': {...}}."""
  out = {}
  for part in filter(None, (s.strip() for s in spec.split(";"))):
    name, _, body = part.partition(":")
    out[name.strip()] = {k.strip(): float(v) for k, v in
                         (kv.split("=") for kv in body.split(",") if kv.strip())}
  return out


# ------------------------------------------------- generation and scoring


def generate(prompts, pool, path: str, teachers: Optional[Sequence[str]] = None) -> dict:
  """Asks the pool only for prompts with a missing (teacher, sample) id."""
  names = list(teachers) if teachers is not None else list(pool.teachers)
  done = teachers_lib.done_ids(path)
  todo = [p for p in prompts if any(
      records_lib.completion_id(p.id, t, j) not in done
      for t in names for j in range(pool.teachers[t].n))]
  expected = sum(pool.teachers[t].n for t in names) * len(prompts)
  if todo:
    pool.answer(todo, path, teachers=names)
  return dict(prompts_to_generate=len(todo), prompts_done_before=len(prompts) - len(todo),
              generations_asked=expected)


def _jsonl_ids(path):
  if not os.path.exists(path):
    return []
  records_lib.drop_partial_line(path)
  return [l.strip() for l in open(path, encoding="utf-8") if l.strip()]


def score_completions(path: str, scored_path: str, scorer, chunk: int = 64,
                      keep: Optional[Callable] = None) -> tuple[list, list]:
  """(scored CompletionRecords, problems); scores only what scored_path and
  its `.nan` sidecar do not hold yet, appending per chunk. `keep(completion
  id)` restricts to some completions (the routed teacher's)."""
  import jax
  writer = jax.process_index() == 0  # one writer; every process scores (a sharded scorer)
  comps = list(records_lib.iter_jsonl(path, "completion")) if os.path.exists(path) else []
  if keep is not None:
    comps = [c for c in comps if keep(c.id)]
  # every process reads the same lines: none reads before the writer trimmed a torn last
  # line, and the writer appends only after every process has read
  artifacts.sync(f"score_completions {scored_path} start")
  if writer and os.path.exists(scored_path):
    records_lib.drop_partial_line(scored_path)
  artifacts.sync(f"score_completions {scored_path} trimmed")
  have = {}
  if os.path.exists(scored_path) and any(l.strip() for l in open(scored_path, encoding="utf-8")):
    have = {r.id: r for r in records_lib.iter_jsonl(scored_path, "completion")}
  nan_ids = set(_jsonl_ids(scored_path + ".nan"))
  artifacts.sync(f"score_completions {scored_path} read")
  todo = [c for c in comps if c.id not in have and c.id not in nan_ids]
  for s in range(0, len(todo), chunk):
    part = todo[s:s + chunk]
    scores = np.asarray(scorer.score(part), np.float64)
    ok = [dataclasses.replace(c, score=float(v)) for c, v in zip(part, scores) if np.isfinite(v)]
    bad = [c.id for c, v in zip(part, scores) if not np.isfinite(v)]
    if ok and writer:
      records_lib.write_jsonl(scored_path, ok, append=True)
    if bad and writer:
      with open(scored_path + ".nan", "a", encoding="utf-8") as f:
        f.write("".join(b + "\n" for b in bad))
    have.update((c.id, c) for c in ok)
    nan_ids.update(bad)
  problems = [dict(id=i, problem="score is NaN") for i in sorted(nan_ids)]
  problems += [dict(id=i, problem="empty answer")
               for i in _jsonl_ids(path + teachers_lib.EMPTY_SUFFIX) if keep is None or keep(i)]
  scored = [have[c.id] for c in comps if c.id in have]
  return scored, problems


# ----------------------------------------------------------------- routing


@dataclasses.dataclass
class Decision:
  prompt: records_lib.PromptRecord
  best: records_lib.CompletionRecord
  worst: records_lib.CompletionRecord
  n_candidates: int

  @property
  def gap(self) -> float:
    return self.best.score - self.worst.score


def route_by_reward(prompts, scored, teacher_order: Sequence[str],
                    tie_break: str = "language_mean") -> tuple[list, list]:
  """(Decisions, problems): per prompt, the arg-max / arg-min score. Ties go
  to the teacher with the higher mean score in the prompt's language
  (`tie_break="language_mean"`; "order" skips this), then to the earlier
  teacher, then to the lower sample; the worst answer is the reverse order.
  Consistent ties make reward routing a cleaner target for the router."""
  rank = {t: i for i, t in enumerate(teacher_order)}
  sums = collections.defaultdict(lambda: [0.0, 0])
  by_prompt = collections.defaultdict(list)
  for c in scored:
    pid, teacher, j = records_lib.parse_completion_id(c.id)
    by_prompt[pid].append((teacher, j, c))
    sums[c.language, teacher][0] += c.score
    sums[c.language, teacher][1] += 1
  mean = lambda lang, t: sums[lang, t][0] / max(sums[lang, t][1], 1)  # noqa: E731
  decisions, problems = [], []
  for p in prompts:
    cands = by_prompt.get(p.id)
    if not cands:
      problems.append(dict(id=p.id, problem="no scored answer (all empty or NaN)"))
      continue
    key = lambda x: (-x[2].score, -mean(p.language, x[0]) if tie_break == "language_mean"  # noqa
                     else 0.0, rank.get(x[0], len(rank)), x[1])
    order = sorted(cands, key=key)
    decisions.append(Decision(p, order[0][2], order[-1][2], len(cands)))
  return decisions, problems


def extract(decisions, min_gap=0.0, source: str = SOURCE,
            min_score: Optional[float] = None) -> tuple[list, list, list]:
  """(SFTRecords, PreferenceRecords, skipped). min_gap: a float or {language: float}
  (scores compare within a language only). min_score: a prompt whose best answer scores
  below it gives no SFT record (rejection sampling: for teachers that are often wrong);
  None keeps every best answer. Skipped pairs and SFT records are listed with why."""
  sft, pairs, skipped = [], [], []
  for d in decisions:
    p = d.prompt
    if min_score is not None and not d.best.score >= min_score:
      skipped.append(dict(id=p.id, record="sft", problem=f"best score {d.best.score:.4g} "
                          f"below min_score {min_score}"))
    else:
      sft.append(records_lib.SFTRecord(id=p.id, language=p.language, messages=tuple(
          p.messages) + ({"role": "assistant", "content": d.best.completion},)))
    gap_min = min_gap.get(p.language, 0.0) if isinstance(min_gap, dict) else min_gap
    if d.n_candidates < 2:
      skipped.append(dict(id=p.id, problem="one answer: no pair"))
    elif d.best.completion.strip() == d.worst.completion.strip():
      skipped.append(dict(id=p.id, problem="best and worst answers are identical"))
    elif d.gap < gap_min or d.gap <= 0:
      skipped.append(dict(id=p.id, problem=f"score gap {d.gap:.4g} below {gap_min}"))
    else:
      pairs.append(records_lib.PreferenceRecord(
          id=p.id, language=p.language, prompt=p.messages, chosen=d.best.completion,
          rejected=d.worst.completion, chosen_score=d.best.score,
          rejected_score=d.worst.score, source=source))
  return sft, pairs, skipped


# ------------------------------------------------------------------- stage


def make_pool(config):
  if config.synthetic.teachers:
    return FunctionPool({name: (synthetic_teacher(skill, config.seed, name), config.synthetic.n)
                         for name, skill in parse_skills(config.synthetic.teachers).items()})
  import jax
  ts = [t for t in teachers_lib.teachers_from_config(config) if t.model]
  if not ts:
    raise ValueError("arbitrage: no teachers (set config.teachers.<name>.model or "
                     "config.synthetic.teachers)")
  mesh = sharding.make_mesh(tuple(config.mesh.shape)) if jax.device_count() > 1 else None
  return teachers_lib.TeacherPool(ts, batch_size=config.batch_size, seed=config.seed,
                                  mesh=mesh, rules=config.mesh.rules)


def make_scorer(config):
  from aya_jax import reward
  s = config.scorer
  if s.kind == "verifier":
    from aya_jax.world import verifier
    return verifier.verifier_scorer()
  if s.kind == "reward_model":
    return reward.RewardModelScorer.load(s.path, s.tokenizer or None, batch_size=s.batch_size,
                                         max_len=s.max_len or None)
  raise ValueError(f"config.scorer.kind={s.kind!r}; use verifier | reward_model")


def _prompts_source(config, workdir):
  """config.prompts, or the synthetic prompts written (again, atomically: an
  existing file is never trusted) to workdir/prompts.jsonl."""
  if config.prompts:
    return config.prompts
  from aya_jax.world import tasks as synthetic
  path = os.path.join(workdir, "prompts.jsonl")
  langs = tuple(config.synthetic.languages) or synthetic.LANGUAGES
  recs = synthetic.make_split("train", config.synthetic.n_per_language, config.seed, langs)
  records_lib.write_jsonl(path, [records_lib.PromptRecord(r.id, r.language, tuple(r.messages[:-1]))
                                 for r in recs])
  return path


def cached_paths(cache, workdir: str) -> tuple[str, str]:
  """(completions.jsonl, scored.jsonl): in the workdir, or with `cache.dir` under
  cache.dir/completions_<cache.completions_key>/ and cache.dir/scores_<cache.scores_key>/,
  so a run whose routing or output settings changed (a new workdir) reuses the teachers'
  answers and their scores; the keys name what those depend on (the caller's hashes)."""
  if not cache.dir:
    return os.path.join(workdir, "completions.jsonl"), os.path.join(workdir, "scored.jsonl")
  if not cache.completions_key or not cache.scores_key:
    raise ValueError(f"config.cache.dir={cache.dir!r} needs cache.completions_key and "
                     "cache.scores_key (hashes of what the answers and scores depend on)")
  comp_dir = os.path.join(cache.dir, f"completions_{cache.completions_key}")
  scores_dir = os.path.join(cache.dir, f"scores_{cache.scores_key}")
  for d in (comp_dir, scores_dir):
    os.makedirs(d, exist_ok=True)
  return os.path.join(comp_dir, "completions.jsonl"), os.path.join(scores_dir, "scored.jsonl")


def run(config, workdir: str, pool=None, scorer=None) -> dict:
  """The arbitrage stage; `pool` / `scorer` override the config's (tests)."""
  os.makedirs(workdir, exist_ok=True)
  prompts, problems = read_prompts(_prompts_source(config, workdir))
  pool = pool if pool is not None else make_pool(config)
  scorer = scorer if scorer is not None else make_scorer(config)
  names = list(pool.teachers)
  n = {t: pool.teachers[t].n for t in names}
  comp, scored_path = cached_paths(config.cache, workdir)
  mode, routes = config.mode, None
  if mode == "fixed":
    routes, more = routing.fixed_routes(prompts, routing.parse_table(config.routing.table),
                                        config.routing.default)
    problems += more
  elif mode == "learned":
    router = routing.LearnedRouter.load(config.router.path)
    routes = dict(zip([p.id for p in prompts], router.predict(prompts)))
  elif mode != "reward":
    raise ValueError(f"config.mode={mode!r}; use reward | fixed | learned")
  gen = {}
  if routes is None:
    gen = generate(prompts, pool, comp)
    keep = None
  else:
    for t in names:
      mine = [p for p in prompts if routes.get(p.id) == t]
      if mine:
        gen[t] = generate(mine, pool, comp, [t])

    def keep(cid):  # only the routed teacher's answers count
      pid, teacher, _ = records_lib.parse_completion_id(cid)
      return routes.get(pid) == teacher
  routed = [p for p in prompts if routes is None or p.id in routes]
  scored, more = score_completions(comp, scored_path, scorer, config.scorer.chunk, keep)
  problems += more
  decisions, more = route_by_reward(routed, scored, names)
  problems += more
  sft, pairs, skipped = extract(decisions, config.routing.min_gap,
                                min_score=config.routing.get("min_score"))
  for name, recs in (("sft.jsonl", sft), ("pairs_offline.jsonl", pairs)):
    if recs:
      records_lib.write_jsonl(os.path.join(workdir, name), recs)
    elif os.path.exists(os.path.join(workdir, name)):  # an earlier run's: not this one's
      os.remove(os.path.join(workdir, name))
  asked = sum(n[routes[p.id]] if routes else sum(n.values()) for p in routed)
  compute = dict(generations=asked, generations_all_teachers=len(prompts) * sum(n.values()),
                 generation=gen)
  router_eval = None
  if mode == "reward" and config.router.train and decisions:
    router, router_eval = routing.evaluate_router(
        decisions, names, scored, config.router.holdout_fraction, config.router.dim,
        config.router.steps, n)
    router.save(os.path.join(workdir, "router.npz"))
  contrast = None
  if config.contrast.enabled:
    contrast = preference.run_contrast(config.contrast, workdir, prompts, pool, scorer,
                                       config.seed, reuse=(comp,))
  report = routing.build_report(prompts, scored, decisions, pairs, skipped, names, mode,
                                problems, router_eval, compute, contrast)
  atomic.write_json(os.path.join(workdir, "report.json"), report, indent=1)
  atomic.write_text(os.path.join(workdir, "report.md"), routing.markdown(report))
  logging.info("arbitrage: %d sft, %d pairs, %s contrast pairs, %d problems -> %s", len(sft),
               len(pairs), contrast["n_pairs"] if contrast else "no", len(problems), workdir)
  return report


def _teacher(model: str = "") -> ml_collections.ConfigDict:
  ref = ml_collections.FieldReference
  return ml_collections.ConfigDict(dict(
      model=model, tokenizer="", n=ref(None, field_type=int),
      max_new_tokens=ref(None, field_type=int), temperature=ref(None, field_type=float),
      top_k=ref(None, field_type=int), top_p=ref(None, field_type=float)))


def default_config() -> ml_collections.ConfigDict:
  """Every field of the arbitrage stage (configs/arbitrage.py documents the command)."""
  c = ml_collections.ConfigDict()
  c.stage = "arbitrage"
  c.seed = 0
  c.mode = "reward"          # reward | fixed | learned
  c.prompts = ""             # prompts JSONL {"id", "language", "messages"}; "" = synthetic
  # model teachers (aya_jax.arbitrage.teachers); a teacher with model "" is left out
  c.batch_size = 16
  c.mesh = sharding.mesh_block()
  c.sampling = ml_collections.ConfigDict(dict(
      temperature=0.7, top_k=0, top_p=0.95, n=2, max_new_tokens=256))
  c.teachers = ml_collections.ConfigDict(dict(teacher_a=_teacher(), teacher_b=_teacher()))
  # embedded synthetic world: prompts and teachers ('name:lang=p,...,*=p;...')
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.n_per_language = 40
  c.synthetic.languages = ()
  c.synthetic.n = 2
  c.synthetic.teachers = ("eu:en=0.9,fr=0.9,es=0.9,de=0.9,*=0.2;"
                          "asia:hi=0.9,ar=0.9,zh=0.9,*=0.2")
  c.scorer = ml_collections.ConfigDict()
  c.scorer.kind = "verifier"  # verifier | reward_model
  c.scorer.path = ""          # reward model params/ or HF directory
  c.scorer.tokenizer = ""
  c.scorer.batch_size = 32
  c.scorer.max_len = 0        # 0 = the model's max_seq_len
  c.scorer.chunk = 256        # records per scoring call (appended after each)
  c.routing = ml_collections.ConfigDict()
  c.routing.min_gap = 0.1     # skip pairs whose best - worst score is smaller
  c.routing.min_score = config_dict.placeholder(float)  # no SFT
  # record from a prompt whose best answer scores below it (None: keep every prompt)
  c.routing.table = ""        # fixed mode: 'fr:teacher_a,de:teacher_b'
  c.routing.default = ""      # fixed mode: teacher for languages not in the table
  c.router = ml_collections.ConfigDict()
  c.router.train = True       # reward mode: fit the learned router, report agreement
  c.router.path = ""          # learned mode: router.npz
  c.router.holdout_fraction = 0.2
  c.router.dim = 1024
  c.router.steps = 300
  # translation-contrast pairs -> pairs_contrast.jsonl (preference.run_contrast)
  c.contrast = ml_collections.ConfigDict()
  c.contrast.enabled = False
  c.contrast.strong = "eu"          # teacher whose in-language answer is chosen
  c.contrast.weak = "asia"          # teacher whose English answer, translated, is rejected
  c.contrast.translator = "lexicon"  # lexicon (the world's) | prompted (a teacher)
  c.contrast.translator_teacher = ""  # prompted: the translating teacher ("" = strong)
  c.contrast.untranslated_rate = 0.1  # lexicon: chance a word stays in English
  c.contrast.min_gap = 0.0          # drop scored pairs with chosen - rejected < min_gap
  # completions and scores outside the workdir, keyed by what they depend on (the
  # pipeline's hashes): "" = in the workdir (`cached_paths`)
  c.cache = ml_collections.ConfigDict(dict(dir="", completions_key="", scores_key=""))
  return c
