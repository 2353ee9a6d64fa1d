"""The pipeline's steps (aya_jax.recipe.pipeline chains them): each
`fn(config, directory, ...)` runs one stage in its directory and returns its
outputs (JSON).

`inputs` (`recipe.inputs.Inputs`) is what the steps train from: the world
step's models, or local paths on real inputs (`inputs.real`). On the world the
prompts are its splits and the judge its verifier; on real inputs the prompts
are `inputs.prompts` / `inputs.eval_prompts` and the judge a reward model
(`inputs.judge`), or real models answer the world's tasks under its verifier
(`'world'` / `'verifier'`: configs/real_small.py).
"""

from __future__ import annotations

import os

import jax
from absl import logging

from aya_jax import evaluation, reward, sharding
from aya_jax.arbitrage import contrast
from aya_jax.arbitrage import stage as arbitrage
from aya_jax.arbitrage import teachers
from aya_jax.data import atomic, records
from aya_jax.merging import stream as merge_stream
from aya_jax.recipe import blocks
from aya_jax.recipe.inputs import VERIFIER, Inputs
from aya_jax.sampling import methods
from aya_jax.train import dpo, online, reward_model, sft
from aya_jax.world import bootstrap as world
from aya_jax.world import evaluate as world_evaluate
from aya_jax.world import tasks as world_tasks
from aya_jax.world import verifier


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


def merge(directory: str, inputs: list) -> str:
  """Linear merge with equal weights (Aya Expanse's most consistent method), streamed one
  tensor at a time from the checkpoints (LoRA ones merged with their base) to params/: no
  model is ever whole in memory; on several hosts process 0 merges."""
  return merge_stream.merge_checkpoints(
      list(inputs), "linear", {"normalize": True}, out=os.path.join(directory, "params"),
      model_merge_parameters=[{"weight": 1.0} for _ in inputs])


def _mesh(inputs: Inputs, config):
  """Sharded sampling and scoring on real inputs over several devices; None on
  the world (its models fit one device)."""
  if inputs.real and jax.device_count() > 1:
    return sharding.make_mesh(tuple(config.mesh.shape))
  return None


def _rules(config) -> str:
  """The sharding rules preset of the run's mesh."""
  return (config.mesh.rules if config is not None else None) or "fsdp"


def scorer(inputs: Inputs, config, arbiter: dict, judge: bool = False):
  """The arbiter (or, `judge`, the eval judge) as a RewardModelScorer, scoring in
  batches of config.arbitrage.scorer.batch_size."""
  path, tokenizer = (inputs.judge, inputs.judge_tokenizer) if judge else (
      arbiter["params"], arbiter.get("tokenizer") or inputs.tokenizer)
  if path == VERIFIER:  # real models answering the world's tasks
    return verifier.verifier_scorer()
  s = config.arbitrage.scorer
  return reward.RewardModelScorer.load(path, tokenizer, mesh=_mesh(inputs, config),
                                       rules=_rules(config), batch_size=s.batch_size,
                                       max_len=s.max_len or None)


# ------------------------------------------------------------------- steps


def run_world(config, directory):
  out = world.bootstrap(directory, config.world)
  return dict(tokenizer=out["tokenizer"], base=out["base"], teachers=out["teachers"],
              weak=out["weak"],
              families={k: list(v) for k, v in world.families(config.world).items()},
              report_md=world.report_markdown(out["report"]))


def train_reward_model(config, directory, inputs: Inputs):
  """Bradley-Terry on verifier-labelled pairs: gold answers against corrupted
  ones, and (reward_model.samples) the world models' own answers to other
  training prompts, labelled by the verifier: what the arbiter will judge."""
  block = config.reward_model
  stage_config = blocks.training_stage(reward_model.default_config(), block, "reward_model",
                                       config, inputs.tokenizer, inputs.base, ("samples",))
  stage_config.synthetic.languages = tuple(config.world.languages)
  stage_config.synthetic.tasks = tuple(config.world.tasks)
  samples = block.get("samples")
  if samples is not None and samples.n_per_language > 0:
    train, valid, _ = reward_model.synthetic_data(stage_config, directory)
    recs = world_tasks.make_split("train", samples.n_per_language, config.seed + 2,
                                  tuple(config.world.languages), tuple(config.world.tasks))
    completions = os.path.join(directory, "sample_completions.jsonl")
    pool(inputs, samples.k, samples.temperature, samples.max_new_tokens, samples.batch_size,
         config.seed + 2).answer(_prompt_records(recs), completions)
    pairs = contrast.sample_labelled_pairs(
        records.read_jsonl(completions, "completion"), min_gap=samples.min_gap,
        max_per_prompt=samples.max_pairs_per_prompt, seed=config.seed)
    path = os.path.join(directory, "pairs_samples.jsonl")
    records.write_jsonl(path, pairs)
    stage_config.data.train = tuple(train) + (path,)
    stage_config.data.eval = tuple(valid)
  reward_model.run(stage_config, directory)
  accuracy = atomic.read_json_cache(os.path.join(directory, "reward_eval.json"),
                                    "reward model evaluation")
  return dict(params=os.path.join(directory, "params"), eval=accuracy)


def pool(inputs: Inputs, k: int, temperature: float, max_new_tokens: int, batch_size: int,
         seed: int, config=None, top_k: int = 0, top_p: float = 1.0):
  """The teachers (k samples each) and the weak model (one sample, when there is
  one); each teacher with its own tokenizer on real inputs."""
  method = methods.from_config(temperature, top_k, top_p)
  members = [teachers.Teacher(name, inputs.teachers[name], inputs.tokenizer_of(name), method,
                              k, max_new_tokens) for name in inputs.teacher_names]
  if inputs.weak:
    members.append(teachers.Teacher("weak", inputs.weak, inputs.tokenizer_of("weak"), method,
                                    1, max_new_tokens))
  mesh = _mesh(inputs, config) if config is not None else None
  return teachers.TeacherPool(members, batch_size=batch_size, seed=seed, mesh=mesh,
                              rules=_rules(config))


def _prompt_file(config, directory, inputs: Inputs) -> str:
  """The prompts every teacher answers: the world's train split (on the world, or
  inputs.prompts='world'), or the records of inputs.prompts in the pipeline's languages."""
  out = os.path.join(directory, "prompts_only.jsonl")
  if not inputs.world_prompts:
    langs, prompts, seen = set(inputs.languages), [], set()
    for path in inputs.prompts:
      for prompt in records.read_prompts(path):
        if prompt.id in seen:
          raise ValueError(f"config.inputs.prompts: id {prompt.id!r} of {path} appears twice")
        seen.add(prompt.id)
        prompts.append(prompt)
    kept = [p for p in prompts if p.language in langs]
    missing = sorted(langs - {p.language for p in kept})
    if missing:
      raise ValueError(f"config.inputs.prompts {list(inputs.prompts)}: no prompts in {missing}")
    logging.info("arbitrage: %d of %d prompts in %s", len(kept), len(prompts), sorted(langs))
    records.write_jsonl(out, kept)
    return out
  split = world_tasks.make_split("train", config.arbitrage.synthetic.n_per_language,
                                 config.seed + 1,
                                 tuple(inputs.languages), tuple(config.world.tasks))
  records.write_jsonl(os.path.join(directory, "prompts.jsonl"), split)
  records.write_jsonl(out, _prompt_records(split))
  return out


def _prompt_records(recs) -> list:
  """The requests (messages up to the user turn) of world SFT records."""
  return [records.PromptRecord(id=r.id, language=r.language, messages=tuple(r.messages[:-1]))
          for r in recs]


def run_arbitrage(config, directory, inputs: Inputs, arbiter: dict, cache=None):
  """Reward routing with the arbiter, translation-contrast pairs (the world:
  lexicon; real inputs: prompted `inputs.translator`, only when set) and the
  single-teacher baseline's data; `cache` (the stage's cache block: dir and keys) keeps
  the teachers' answers and their scores outside the step's directory."""
  block = config.arbitrage
  stage_config = blocks.stage_config(arbitrage.default_config(), block, "arbitrage",
                                     ("baseline_teacher",))
  names = inputs.teacher_names
  with_contrast = block.contrast.enabled and (not inputs.real or bool(inputs.translator))
  with stage_config.unlocked():
    stage_config.seed, stage_config.mode = config.seed, "reward"
    stage_config.synthetic.teachers = ""
    stage_config.scorer.kind, stage_config.scorer.path = "reward_model", arbiter["params"]
    stage_config.scorer.tokenizer = arbiter.get("tokenizer") or inputs.tokenizer
    stage_config.contrast.enabled = with_contrast
    stage_config.contrast.strong = inputs.translator or names[0]
    stage_config.contrast.weak = "weak"
    if inputs.real:
      stage_config.contrast.translator = "prompted"
      stage_config.contrast.translator_teacher = inputs.translator
    stage_config.prompts = _prompt_file(config, directory, inputs)
    if cache:
      stage_config.cache.update(cache)
  s = block.sampling
  members = pool(inputs, s.n, s.temperature, s.max_new_tokens, block.batch_size, config.seed,
                 config, s.top_k, s.top_p)
  report = arbitrage.run(stage_config, directory, pool=members,
                         scorer=scorer(inputs, config, arbiter))
  baseline = block.baseline_teacher or names[0]
  if baseline not in names:
    raise ValueError(f"config.arbitrage.baseline_teacher={baseline!r}: not a teacher {names}")
  single = _single_teacher(directory, arbitrage.cached_paths(stage_config.cache, directory)[0],
                           baseline)

  def made(name):  # "" = none kept: every output path recorded exists (the Runner checks)
    path = os.path.join(directory, name)
    return path if os.path.exists(path) else ""

  return dict(sft=os.path.join(directory, "sft.jsonl"), pairs=made("pairs_offline.jsonl"),
              contrast=made("pairs_contrast.jsonl") if with_contrast else "",
              single=single, report={k: report.get(k) for k in ("per_language",)
                                     if isinstance(report, dict)})


def _single_teacher(directory: str, completions: str, teacher: str) -> str:
  """The baseline's data: one teacher's first sample for every prompt (no arbiter)."""
  out, seen = [], set()
  for r in records.read_jsonl(completions, "completion"):
    prompt_id, answered_by, sample = records.parse_completion_id(r.id)
    if answered_by == teacher and sample == 0 and prompt_id not in seen:
      seen.add(prompt_id)
      out.append(records.SFTRecord(id=prompt_id, language=r.language,
                                   messages=tuple(r.prompt) + (
                                       {"role": "assistant", "content": r.completion},)))
  path = os.path.join(directory, "sft_single.jsonl")
  records.write_jsonl(path, out)
  return path


def run_sft(config, directory, tokenizer, init, data, name="sft"):
  """The sft stage with the block config.<name> (sft or sft_family) on `data`."""
  stage_config = blocks.training_stage(sft.default_config(), config[name], name, config,
                                       tokenizer, init, ("warm_start",))
  stage_config.data.train = (data,)
  return dict(params=sft.run(stage_config, directory))


def run_dpo(config, directory, tokenizer, init, arbitraged, family_languages,
            overrides=None):
  """The dpo stage (block config.dpo) on the family's arbitrage and contrast pairs;
  `overrides` replace fields of the block's dpo part (the CoPG and SRPO ablations: the
  same pairs and block, another loss_type, CoPG's own beta)."""
  stage_config = blocks.training_stage(dpo.default_config(), config.dpo, "dpo", config,
                                       tokenizer, init)
  # reference log-probs outlive a changed dpo block (keyed by pairs, reference and mode)
  stage_config.dpo.ref_cache_dir = stage_config.dpo.ref_cache_dir or os.path.join(
      os.path.dirname(os.path.normpath(directory)), "cache", "ref_logps")
  if overrides:  # CoPG: only the scored pairs; SRPO: only those whose revision rows fit
    stage_config.dpo.update(overrides)
    stage_config.data.skip_invalid = stage_config.dpo.loss_type in ("copg", "srpo")
  if not arbitraged["pairs"]:
    raise ValueError("arbitrage kept no best/worst pair (every score gap below "
                     "config.arbitrage.routing.min_gap? see arbitrage/report.md)")
  files = [filter_languages(arbitraged["pairs"], os.path.join(directory, "pairs.jsonl"),
                            family_languages)]
  if arbitraged.get("contrast"):
    files.append(filter_languages(arbitraged["contrast"],
                                  os.path.join(directory, "contrast.jsonl"), family_languages,
                                  False))
  stage_config.data.train = tuple(f for f in files if f)
  return dict(params=dpo.run(stage_config, directory))


def run_online(config, directory, inputs: Inputs, init, arbiter, arbitraged, languages,
               algorithm):
  """`online.online.iterations` rounds of the online stage from `init` on the
  arbitrage prompts, ranked by the arbiter, or by the world's verifier with
  online.reward='verifier' (the oracle reward), per family then merged when
  online.per_family; the policy of every round."""
  block = config.online
  stage_config = blocks.training_stage(online.default_config(), block, "online", config,
                                       inputs.tokenizer, init, ("per_family", "reward"))
  # one fixed reference for every round (RLOO's KL): the stage's start
  stage_config.dpo.reference_init = init
  stage_config.online.algorithm = algorithm
  if block.per_family:
    stage_config.online.families = ";".join(
        f"{name}:{','.join(langs)}" for name, langs in inputs.families.items())
  stage_config.data.prompts = (filter_languages(
      arbitraged["sft"], os.path.join(directory, "prompts_sft.jsonl"), languages),)
  reward = (verifier.verifier_scorer() if block.reward == "verifier"
            else scorer(inputs, config, arbiter))
  online.run(stage_config, directory, scorer=reward)
  return dict(rounds=[os.path.join(directory, f"iter_{i}", "params")
                      for i in range(block.online.iterations)])


def _eval_prompts(path: str, languages) -> list:
  """The prompts of `path` in `languages`, read strictly (errors name file and line)."""
  prompts = records.read_prompts(path, only=languages)
  missing = sorted(set(languages) - {p.language for p in prompts})
  if missing:
    raise ValueError(f"config.inputs.eval_prompts={path!r}: no prompts in {missing}")
  return prompts


def _revised(item):
  """(name, (path, revisions)) of a `models` entry: a params path, or (path, revisions)
  for a model that revises its own answer (SRPO)."""
  name, value = item
  return name, (value if isinstance(value, tuple) else (value, 0))


def run_eval(config, directory, inputs: Inputs, models: dict, languages, arbiter=None):
  """Every model against sft_single on held-out prompts: the world's test split under
  its verifier (on the world, or inputs.eval_prompts='world'), or inputs.eval_prompts
  under the judge reward model. A model given as (path, n) answers, then revises its
  answer n times (`evaluation.Model(revisions=n)`)."""
  block = config.eval
  if not inputs.world_eval:
    prompts = _eval_prompts(inputs.eval_prompts, languages)
    judge = scorer(inputs, config, arbiter, judge=True)
    judge_name = f"reward model {inputs.judge}"
  else:
    prompts = world_evaluate.world_prompts("test", block.n_per_language, languages,
                                           tuple(config.world.tasks), config.seed)
    judge, judge_name = verifier.Verifier(), "verifier"
  records.write_jsonl(os.path.join(directory, "prompts.jsonl"), prompts)
  mesh = _mesh(inputs, config)  # real inputs on several devices: the run's mesh
  method = methods.from_config(block.temperature, block.top_k, block.top_p)
  answering = {name: evaluation.Model(name, path, inputs.tokenizer, method,
                                      max_new_tokens=block.max_new_tokens,
                                      batch_size=block.batch_size, seed=config.seed, mesh=mesh,
                                      rules=_rules(config), revisions=revisions)
               for name, (path, revisions) in map(_revised, models.items())}
  answers, results = {}, {}
  baseline = answering["sft_single"]
  for name, model in answering.items():
    results[name] = evaluation.compare(model, baseline, prompts, judge, block.n_boot,
                                       config.seed, block.tie_margin, answers=answers,
                                       reference=world_evaluate.verifier_scores)
  atomic.write_json(os.path.join(directory, "answers.json"), answers)
  atomic.write_json(os.path.join(directory, "per_prompt.json"),  # the report's paired intervals
                    {name: r.pop("per_prompt") for name, r in results.items()})
  return dict(results=results, baseline="sft_single", n_prompts=len(prompts), judge=judge_name,
              n_boot=block.n_boot, seed=config.seed,
              per_prompt=os.path.join(  # relative to the workdir: it may move
                  os.path.basename(os.path.normpath(directory)), "per_prompt.json"))
