"""The whole Aya Expanse recipe as one resumable pipeline (stage 'pipeline').

The steps, their order and the config blocks that set them are documented once,
in configs/pipeline.py; the steps themselves are in aya_jax.recipe.steps, the
real inputs in aya_jax.recipe.inputs and the step cache in aya_jax.artifacts.
`run` checks the choice fields (CHOICES) before the first step, then chains the
steps through the cache, each keyed by its block and what it reads.
"""

from __future__ import annotations

import json
import os
import time


from aya_jax import artifacts, console
from aya_jax import axes
from aya_jax.arbitrage import contrast as preference
from aya_jax.models import config as model_config
from aya_jax.recipe import headlines
from aya_jax.recipe import inputs as recipe_inputs
from aya_jax.recipe import steps
from aya_jax.train import online
from aya_jax.world import bootstrap as world
from aya_jax.world import tasks as synthetic

# config field -> its allowed values (a tuple field: each of its items);
# checked at the start, not after the steps before the one that reads it
CHOICES = {
    "mesh.rules": ("",) + tuple(axes.PRESETS),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "sft_family.warm_start": ("base", "mixed"),
    "online.reward": ("arbiter", "verifier"),
}
WORLD_CHOICES = {  # only without real inputs
    "world.model.family": model_config.FAMILIES,
    "world.languages": synthetic.LANGUAGES,
    "world.tasks": synthetic.TASKS,
    "world.weak_languages": synthetic.LANGUAGES,
    "reward_model.synthetic.kinds": preference.CORRUPTIONS,
}


def _field(c, name: str):
  for key in name.split("."):
    if c is None or key not in c:
      return None
    c = c[key]
  return c


def check_config(c, real: bool):
  """Raises ValueError naming the field, its value and the allowed values for
  every choice field (CHOICES, and WORLD_CHOICES on the world) holding
  another value, and for a baseline teacher the world lacks (real inputs:
  checked once they are resolved)."""
  table = dict(CHOICES, **({} if real else WORLD_CHOICES))
  for name, allowed in table.items():
    value = _field(c, name)
    if value is None:
      continue
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if v not in allowed:
        raise ValueError(f"config.{name}={value!r}: {v!r} is not one of {list(allowed)}")
  if not real:  # the world's teachers: one per family
    check_baseline(c, list(world.families(c.world, "config.world")))


def check_baseline(c, teachers: list):
  """config.arbitrage.baseline_teacher names one of `teachers` (or is "")."""
  baseline = c.arbitrage.get("baseline_teacher", "")
  if baseline and baseline not in teachers:
    raise ValueError(f"config.arbitrage.baseline_teacher={baseline!r}: not a teacher {teachers}")


def _cfg_dict(c):
  return json.loads(c.to_json_best_effort()) if hasattr(c, "to_json_best_effort") else c


def run(config, workdir: str) -> dict:
  t_start = time.time()
  real = bool(config.get("inputs") and config.inputs.base)
  check_config(config, real)
  runner = artifacts.Runner(workdir, log_dir=os.path.join(workdir, console.LOG_DIR))
  if real:  # local paths instead of the world; spec hashes name the paths read
    inputs = recipe_inputs.resolve(config)
    check_baseline(config, inputs.teacher_names)
    arbiter = dict(params=inputs.reward_model, tokenizer=inputs.reward_tokenizer)
    arbiter_hash = inputs.hashes["rm"]

    def inputs_spec(*groups, **extra):
      """The part of a step's spec that names what it reads of the inputs."""
      return dict(real={**{g: inputs.hashes[g] for g in groups}, **extra})
  else:
    world_out, world_hash = runner.step("world", dict(world=_cfg_dict(config.world)),
                                        lambda d: steps.run_world(config, d),
                                        lambda _, d: headlines.world(d))
    inputs = recipe_inputs.Inputs.from_world(world_out, config.world.languages)

    def inputs_spec(*groups, **extra):
      """On the world every step reads the world (its spec covers the groups)."""
      del groups, extra
      return dict(w=world_hash)

    arbiter, arbiter_hash = runner.step(
        "reward_model", dict(w=world_hash, rm=_cfg_dict(config.reward_model)),
        lambda d: steps.train_reward_model(config, d, inputs),
        lambda _, d: headlines.reward_model(d))
  tokenizer, families, languages = inputs.tokenizer, inputs.families, inputs.languages

  # the teachers' answers and the arbiter's scores outlive a changed arbitrage block:
  # kept under cache/arbitrage/, keyed by what they depend on
  arb = config.arbitrage
  completions_key = artifacts.spec_hash(dict(
      **inputs_spec("pool", "prompts"), seed=config.seed, sampling=_cfg_dict(arb.sampling),
      batch=arb.batch_size, prompts=_cfg_dict(arb.synthetic)))
  cache = dict(dir=os.path.join(runner.workdir, "cache", "arbitrage"),
               completions_key=completions_key, scores_key=artifacts.spec_hash(dict(
                   completions=completions_key, rm=arbiter_hash,
                   max_len=arb.scorer.max_len)))
  arbitraged, arbitrage_hash = runner.step(
      "arbitrage", dict(**inputs_spec("pool", "prompts"), rm=arbiter_hash,
                        arb=_cfg_dict(config.arbitrage)),
      lambda d: steps.run_arbitrage(config, d, inputs, arbiter, cache),
      lambda _, d: headlines.arbitrage(d))

  def sft_step(name, data_fn, block="sft", init=inputs.base, init_hash=None, **family):
    spec = dict(**inputs_spec("base", **family), arb=arbitrage_hash,
                sft=_cfg_dict(config[block]), name=name)
    if init_hash is not None:
      spec["init"] = init_hash
    return runner.step(name, spec, lambda d: steps.run_sft(config, d, tokenizer, init,
                                                           data_fn(d), block),
                       lambda _, d: headlines.final_loss(d))

  single, _ = sft_step("sft_single", lambda d: arbitraged["single"])
  models = {"sft_single": single["params"]}
  # the family runs: from sft_mixed (sft_family.warm_start='mixed') or from base
  warm_start = config.sft_family.warm_start  # 'base' | 'mixed' (check_config)
  if config.ablations.mixed or warm_start == "mixed":
    mixed, mixed_hash = sft_step("sft_mixed", lambda d: arbitraged["sft"])
    models["sft_mixed"] = mixed["params"]
  start = dict(init=mixed["params"], init_hash=mixed_hash) if warm_start == "mixed" else {}
  family_sft, family_sft_hashes = {}, []
  for name, family_languages in families.items():
    out, spec_hash = sft_step(
        f"sft_{name}", lambda d, fl=family_languages: steps.filter_languages(
            arbitraged["sft"], os.path.join(d, "data.jsonl"), fl),
        block="sft_family", fam=list(family_languages), **start)
    family_sft[name] = out["params"]
    family_sft_hashes.append(spec_hash)
  merged_sft, merged_sft_hash = runner.step(
      "sft_merged", dict(inputs=family_sft_hashes),
      lambda d: dict(params=steps.merge(d, list(family_sft.values()))),
      lambda *_: headlines.merged(len(family_sft)))
  models["sft_merged"] = merged_sft["params"]

  def offline_steps(prefix, **overrides):
    """Offline preference training per family from sft_merged (the dpo block, its dpo
    fields `overrides` replaced), then their merge."""
    family, hashes = {}, []
    for name, family_languages in families.items():
      spec = dict(init=merged_sft_hash, arb=arbitrage_hash, dpo=_cfg_dict(config.dpo),
                  fam=family_languages, **({"over": overrides} if overrides else {}))
      out, spec_hash = runner.step(
          f"{prefix}_{name}", spec, lambda d, fl=family_languages: steps.run_dpo(
              config, d, tokenizer, merged_sft["params"], arbitraged, fl, overrides),
          lambda _, d: headlines.final_loss(d))
      family[name] = out["params"]
      hashes.append(spec_hash)
    return runner.step(f"{prefix}_merged", dict(inputs=hashes),
                       lambda d: dict(params=steps.merge(d, list(family.values()))),
                       lambda *_: headlines.merged(len(family)))

  merged_dpo, merged_dpo_hash = offline_steps("dpo")
  models["dpo_merged"] = merged_dpo["params"]
  if config.ablations.copg_offline:  # CoPG on the same pairs with their arbiter scores
    models["copg_offline"] = offline_steps(
        "copg", loss_type="copg", beta=config.ablations.copg_beta)[0]["params"]
  if config.ablations.srpo:  # SRPO on the same pairs; evaluated with 0 and n self-revisions
    models["srpo"] = offline_steps("srpo", loss_type="srpo")[0]["params"]
    for n in config.ablations.srpo_revisions:
      models[f"srpo_rev{n}"] = (models["srpo"], int(n))

  def online_step(name, algorithm):
    spec = dict(init=merged_dpo_hash, rm=arbiter_hash, on=_cfg_dict(config.online),
                algo=algorithm)
    return runner.step(name, spec, lambda d: steps.run_online(
        config, d, inputs, merged_dpo["params"], arbiter, arbitraged, languages, algorithm),
        lambda _, d: headlines.online(d))[0]

  for i, params in enumerate(online_step("online", "dpo")["rounds"], 1):
    models[f"online_{i}"] = params
  for algorithm in [a for a in online.ALGORITHMS if a != "dpo"]:  # ablations: the same rounds, another objective
    if config.ablations.get(algorithm):
      models[algorithm] = online_step(algorithm, algorithm)["rounds"][-1]

  spec = dict(models=sorted(models), eval=_cfg_dict(config.eval),
              inputs={s: runner.state[s]["hash"] for s in runner.state if s != "eval"})
  if real:
    spec["judge"] = inputs_spec("eval")
  evaluated, _ = runner.step("eval", spec, lambda d: steps.run_eval(
      config, d, inputs, models, languages, arbiter), lambda out, _: headlines.evaluation(out))
  from aya_jax.recipe import report as recipe_report
  report = recipe_report.write(runner.workdir, evaluated, dict(
      seed=config.seed, wall_seconds=time.time() - t_start,
      step_seconds={k: v.get("seconds") for k, v in runner.state.items()},
      ran=runner.ran, world_report=inputs.world_report,
      inputs=config.inputs.to_dict() if real else None))
  print(recipe_report.table(report), flush=True)
  return report
