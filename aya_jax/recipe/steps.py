"""The pipeline's steps (aya_jax.recipe.pipeline chains them): each `fn(config, dir, ...)`
runs one stage in its directory and returns its outputs (JSON).

`w` is what the inputs are: the world step's outputs, or
`recipe_inputs.resolve(config)` on real inputs (then `w["hashes"]` is set).
On the world the prompts are its splits and the judge its verifier; on real
inputs the prompts are `w["prompts"]` / `w["eval_prompts"]` and the judge a
reward model (`w["judge"]`).
"""

from __future__ import annotations

import os

import jax
from absl import logging

from aya_jax import checkpoint, evaluation, reward, sharding
from aya_jax.arbitrage import contrast as preference
from aya_jax.arbitrage import stage as arbitrage
from aya_jax.arbitrage import teachers
from aya_jax.data import atomic, records
from aya_jax.merging import methods as merging
from aya_jax.sampling import methods
from aya_jax.train import dpo, online, reward_model, sft
from aya_jax.world import bootstrap as world
from aya_jax.world import evaluate as world_evaluate
from aya_jax.world import tasks as synthetic
from aya_jax.world import verifier


def real(w: dict) -> bool:
  return "hashes" in w


# ------------------------------------------------------------ stage configs


def train_block(c, block, tok: str, init: str, pc):
  """Applies the pipeline's {steps, lr, batch_size, seq_len, checkpoint_every
  (optional; default half the steps)}, its mesh and its model settings
  (pc.model: dtype, remat, vocab_chunk) to a stage config."""
  c.tokenizer, c.model.init, c.seed = tok, init, block.get("seed", c.seed)
  c.data.seq_len, c.data.batch_size = block.seq_len, block.batch_size
  c.optim.lr, c.optim.total_steps = block.lr, block.steps
  c.optim.warmup_steps = min(block.steps // 10, 20)
  c.loop.num_steps, c.loop.log_every = block.steps, max(1, block.steps // 5)
  c.loop.checkpoint_every = block.get("checkpoint_every") or max(1, block.steps // 2)
  c.loop.eval_every = 0
  c.mesh.shape = tuple(pc.mesh.shape)
  c.mesh.rules = pc.mesh.rules or c.mesh.rules
  for k, v in (pc.model.items() if pc.get("model") is not None else ()):
    if k not in c.model or k in ("init", "preset"):
      raise ValueError(f"config.model.{k}: not a setting of the {c.stage} stage's model block "
                       f"({sorted(set(c.model) - {'init', 'preset'})})")
    c.model[k] = v
  return c


def filter_languages(path: str, out: str, languages, required: bool = True):
  """The records of `path` in `languages`, written to `out`; None when there
  are none and they are optional (an error naming the file otherwise)."""
  langs = set(languages)
  kind = "sft" if "sft" in os.path.basename(path) else "preference"
  recs = [r for r in records.read_jsonl(path, kind) if r.language in langs]
  if not recs:
    if required:
      raise ValueError(f"{path}: no records in languages {sorted(langs)}")
    return None
  records.write_jsonl(out, recs)
  return out


def merge(d: str, inputs: list) -> str:
  """Linear merge with equal weights (Aya Expanse's most consistent method)."""
  models = [checkpoint.load_model(p) for p in inputs]
  cfg = models[0][0]
  merged = merging.merge("linear", [jax.device_get(p) for _, p in models],
                         parameters={"normalize": True},
                         model_parameters=[{"weight": 1.0} for _ in models])
  return checkpoint.save_params(os.path.join(d, "params"), cfg, merged)


def _mesh(w, c):
  """Sharded sampling and scoring on real inputs over several devices; None on
  the world (its models fit one device)."""
  return sharding.make_mesh(tuple(c.mesh.shape)) if real(w) and jax.device_count() > 1 else None


def _rules(c) -> str:
  """The sharding rules preset of the run's mesh."""
  return (c.mesh.rules if c is not None else None) or "fsdp"


def scorer(w, c, rm: dict, judge: bool = False):
  """The arbiter (or, `judge`, the eval judge) as a RewardModelScorer."""
  path, tok = (w["judge"], w["judge_tokenizer"]) if judge else (
      rm["params"], rm.get("tokenizer") or w["tokenizer"])
  return reward.RewardModelScorer.load(path, tok, mesh=_mesh(w, c),
                                       rules=_rules(c))


# ------------------------------------------------------------------- steps


def run_world(c, d):
  out = world.bootstrap(d, c.world)
  return dict(tokenizer=out["tokenizer"], base=out["base"], teachers=out["teachers"],
              weak=out["weak"], families={k: list(v) for k, v in world.families(c.world).items()},
              report_md=world.report_markdown(out["report"]))


def train_reward_model(c, d, w):
  """Bradley-Terry on verifier-labelled pairs: gold answers against corrupted
  ones, and (reward_model.samples) the world models' own answers to other
  training prompts, labelled by the verifier: what the arbiter will judge."""
  b = c.reward_model
  rc = reward_model.default_config()
  train_block(rc, b, w["tokenizer"], w["base"], c)
  rc.synthetic.n_per_language = b.n_per_language
  rc.synthetic.languages = tuple(c.world.languages)
  rc.synthetic.tasks = tuple(c.world.tasks)
  rc.synthetic.kinds = tuple(b.kinds)
  s = b.get("samples")
  if s is not None and s.n_per_language > 0:
    train, valid, _ = reward_model.synthetic_data(rc, d)
    recs = synthetic.make_split("train", s.n_per_language, c.seed + 2,
                                tuple(c.world.languages), tuple(c.world.tasks))
    comp = os.path.join(d, "sample_completions.jsonl")
    pool(w, s, c.seed + 2).answer(_prompt_records(recs), comp)
    pairs = preference.sample_labelled_pairs(
        records.read_jsonl(comp, "completion"), min_gap=s.min_gap,
        max_per_prompt=s.max_pairs_per_prompt, seed=c.seed)
    path = os.path.join(d, "pairs_samples.jsonl")
    records.write_jsonl(path, pairs)
    rc.data.train, rc.data.eval = tuple(train) + (path,), tuple(valid)
  reward_model.run(rc, d)
  acc = atomic.read_json_cache(os.path.join(d, "reward_eval.json"), "reward model evaluation")
  return dict(params=os.path.join(d, "params"), eval=acc)


def pool(w, b, seed: int, c=None):
  """The teachers (b.k samples each) and the weak model (one sample, when
  there is one); each teacher with its own tokenizer on real inputs."""
  method = methods.from_config(b.temperature, 0, 1.0)
  toks = w.get("teacher_tokenizers") or {}
  names = list(w["teachers"]) if real(w) else sorted(w["teachers"])
  members = [teachers.Teacher(name, w["teachers"][name], toks.get(name, w["tokenizer"]), method,
                              b.k, b.max_new_tokens) for name in names]
  if w.get("weak"):
    members.append(teachers.Teacher("weak", w["weak"], toks.get("weak", w["tokenizer"]), method,
                                    1, b.max_new_tokens))
  mesh = _mesh(w, c) if c is not None else None
  return teachers.TeacherPool(members, batch_size=b.batch_size, seed=seed, mesh=mesh,
                              rules=_rules(c))


def _prompt_file(c, d, w) -> str:
  """The prompts every teacher answers: the world's train split, or the
  records of w["prompts"] in the pipeline's languages."""
  out = os.path.join(d, "prompts_only.jsonl")
  if real(w):
    langs, recs, seen = set(w["languages"]), [], set()
    for path in w["prompts"]:
      for p in records.read_prompts(path):
        if p.id in seen:
          raise ValueError(f"config.inputs.prompts: id {p.id!r} of {path} appears twice")
        seen.add(p.id)
        recs.append(p)
    kept = [p for p in recs if p.language in langs]
    missing = sorted(langs - {p.language for p in kept})
    if missing:
      raise ValueError(f"config.inputs.prompts {w['prompts']}: no prompts in {missing}")
    logging.info("arbitrage: %d of %d prompts in %s", len(kept), len(recs), sorted(langs))
    records.write_jsonl(out, kept)
    return out
  prompts = os.path.join(d, "prompts.jsonl")
  recs = synthetic.make_split("train", c.arbitrage.n_per_language, c.seed + 1,
                              tuple(c.world.languages), tuple(c.world.tasks))
  records.write_jsonl(prompts, recs)
  records.write_jsonl(out, _prompt_records(recs))
  return out


def _prompt_records(recs) -> list:
  """The requests (messages up to the user turn) of world SFT records."""
  return [records.PromptRecord(id=r.id, language=r.language, messages=tuple(r.messages[:-1]))
          for r in recs]


def run_arbitrage(c, d, w, rm):
  """Reward routing with the arbiter, translation-contrast pairs (the world:
  lexicon; real inputs: prompted `w["translator"]`, only when set) and the
  single-teacher baseline's data."""
  b = c.arbitrage
  ac = arbitrage.default_config()
  names = list(w["teachers"]) if real(w) else sorted(w["teachers"])
  contrast = b.contrast and (not real(w) or bool(w.get("translator")))
  with ac.unlocked():
    ac.seed, ac.mode, ac.synthetic.teachers = c.seed, "reward", ""
    ac.routing.min_gap = b.min_gap
    ac.scorer.kind, ac.scorer.path = "reward_model", rm["params"]
    ac.scorer.tokenizer = rm.get("tokenizer") or w["tokenizer"]
    ac.contrast.enabled = contrast
    ac.contrast.strong = w.get("translator") or names[0]
    ac.contrast.weak = "weak"
    if real(w):
      ac.contrast.translator, ac.contrast.translator_teacher = "prompted", w.get("translator")
    ac.prompts = _prompt_file(c, d, w)
  report = arbitrage.run(ac, d, pool=pool(w, b, c.seed, c), scorer=scorer(w, c, rm))
  baseline = b.baseline_teacher or names[0]
  if baseline not in names:
    raise ValueError(f"config.arbitrage.baseline_teacher={baseline!r}: not a teacher {names}")
  single = _single_teacher(d, baseline)
  made = lambda name: os.path.join(d, name) if os.path.exists(os.path.join(d, name)) else ""
  # "" = none kept: every output path recorded exists (recipe.Runner checks them)
  return dict(sft=os.path.join(d, "sft.jsonl"), pairs=made("pairs_offline.jsonl"),
              contrast=made("pairs_contrast.jsonl") if contrast else "",
              single=single, report={k: report.get(k) for k in ("per_language",)
                                     if isinstance(report, dict)})


def _single_teacher(d: str, teacher: str) -> str:
  """The baseline's data: one teacher's first sample for every prompt (no arbiter)."""
  out, seen = [], set()
  for r in records.read_jsonl(os.path.join(d, "completions.jsonl"), "completion"):
    pid, t, j = records.parse_completion_id(r.id)
    if t == teacher and j == 0 and pid not in seen:
      seen.add(pid)
      out.append(records.SFTRecord(id=pid, language=r.language, messages=tuple(r.prompt) + (
          {"role": "assistant", "content": r.completion},)))
  path = os.path.join(d, "sft_single.jsonl")
  records.write_jsonl(path, out)
  return path


def run_sft(c, d, tok, init, data, block=None):
  sc = train_block(sft.default_config(), block or c.sft, tok, init, c)
  sc.data.train = (data,)
  return dict(params=sft.run(sc, d))


def run_dpo(c, d, tok, init, arb, fam):
  dc = train_block(dpo.default_config(), c.dpo, tok, init, c)
  dc.dpo.beta, dc.dpo.rpo_alpha = c.dpo.beta, c.dpo.rpo_alpha
  if not arb["pairs"]:
    raise ValueError("arbitrage kept no best/worst pair (every score gap below "
                     "config.arbitrage.min_gap? see arbitrage/report.md)")
  files = [filter_languages(arb["pairs"], os.path.join(d, "pairs.jsonl"), fam)]
  if arb.get("contrast"):
    files.append(filter_languages(arb["contrast"], os.path.join(d, "contrast.jsonl"), fam,
                                  False))
  dc.data.train = tuple(f for f in files if f)
  return dict(params=dpo.run(dc, d))


def run_online(c, d, w, init, rm, arb, fams, langs, algorithm):
  """`online.iterations` rounds from `init` on the arbitrage prompts, ranked
  by the arbiter; per family then merged when online.per_family."""
  b, tok = c.online, w["tokenizer"]
  oc = train_block(online.default_config(), b, tok, init, c)
  oc.dpo.rpo_alpha = b.rpo_alpha
  oc.online.algorithm, oc.online.iterations, oc.online.k = algorithm, 1, b.k
  oc.online.betas, oc.online.max_new_tokens = (b.beta,), b.max_new_tokens
  oc.online.temperature = b.temperature
  prompts = filter_languages(arb["sft"], os.path.join(d, "prompts_sft.jsonl"), langs)
  arbiter = scorer(w, c, rm)
  rounds, current = [], init
  groups = fams if b.per_family else {"all": tuple(langs)}
  for i in range(b.iterations):
    outs = []
    for name, fl in groups.items():
      sub = os.path.join(d, f"round_{i + 1}", name)
      done = os.path.join(sub, "params")
      if not checkpoint.is_params_dir(done):
        oc_i = oc.copy_and_resolve_references()
        with oc_i.unlocked():
          oc_i.model.init, oc_i.seed = current, c.seed + i
          # one fixed reference for every round (RLOO's KL): the stage's start
          oc_i.dpo.reference_init = init
          oc_i.data.prompts = (filter_languages(prompts, os.path.join(d, f"prompts_{name}.jsonl"),
                                                fl),)
        online.run(oc_i, sub, scorer=arbiter)
      outs.append(done)
    current = outs[0] if len(outs) == 1 else merge(os.path.join(d, f"round_{i + 1}"), outs)
    rounds.append(current)
  return dict(rounds=rounds)


def _eval_prompts(path: str, langs) -> list:
  """The prompts of `path` in `langs`, read strictly (errors name file and line)."""
  prompts = records.read_prompts(path, only=langs)
  missing = sorted(set(langs) - {p.language for p in prompts})
  if missing:
    raise ValueError(f"config.inputs.eval_prompts={path!r}: no prompts in {missing}")
  return prompts


def run_eval(c, d, w, models: dict, langs, rm=None):
  """Every model against sft_single on held-out prompts: the world's test
  split under its verifier, or w["eval_prompts"] under the judge reward model."""
  b, tok = c.eval, w["tokenizer"]
  if real(w):
    prompts = _eval_prompts(w["eval_prompts"], langs)
    judge, judge_name = scorer(w, c, rm, judge=True), f"reward model {w['judge']}"
  else:
    prompts = world_evaluate.world_prompts("test", b.n_per_language, langs,
                                           tuple(c.world.tasks), c.seed)
    judge, judge_name = verifier.Verifier(), "verifier"
  records.write_jsonl(os.path.join(d, "prompts.jsonl"), prompts)
  mesh = _mesh(w, c)  # real inputs on several devices: the run's mesh
  ms = {name: evaluation.Model(name, path, tok, max_new_tokens=b.max_new_tokens,
                               batch_size=b.batch_size, seed=c.seed, mesh=mesh,
                               rules=_rules(c))
        for name, path in models.items()}
  answers, results = {}, {}
  base = ms["sft_single"]
  for name, m in ms.items():
    results[name] = evaluation.compare(m, base, prompts, judge, b.n_boot, c.seed,
                                       answers=answers, reference=world_evaluate.verifier_scores)
  atomic.write_json(os.path.join(d, "answers.json"), answers)
  atomic.write_json(os.path.join(d, "per_prompt.json"),  # for the report's paired intervals
                     {name: r.pop("per_prompt") for name, r in results.items()})
  return dict(results=results, baseline="sft_single", n_prompts=len(prompts), judge=judge_name,
              n_boot=b.n_boot, seed=c.seed,
              per_prompt=os.path.join(  # relative to the workdir: it may move
                  os.path.basename(os.path.normpath(d)), "per_prompt.json"))
