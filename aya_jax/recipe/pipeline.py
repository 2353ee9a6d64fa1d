r"""The whole Aya Expanse recipe as one resumable pipeline (stage 'pipeline').

    python -m aya_jax.main --config=configs/pipeline.py --workdir=runs/pipeline

Steps, each a directory of the workdir and each still a stage of its own:

  world         tokenizer, base model, a teacher per language family, a weak
                English-only model (aya_jax.world.bootstrap)
  reward_model  the arbiter: a reward model on verifier-labelled pairs (gold
                vs corrupted answers; with reward_model.samples, the pool's
                own answers to other prompts, labelled by the verifier)
  arbitrage     every teacher answers (k samples), the reward model scores,
                reward-based routing -> sft.jsonl + pairs_offline.jsonl, plus
                translation-contrast pairs (strong in-language vs weak English
                answer, translated)
  sft_single    baseline: SFT on one teacher's answers (the single-teacher
                ablation of the arbitrage paper)
  sft_mixed     SFT on all arbitraged data, one model (the ablation; and the
                family models' warm start with sft_family.init='mixed')
  sft_<family>  SFT on the family's arbitraged data (each family has English),
                from the base or (sft_family.init='mixed') from sft_mixed
  sft_merged    linear merge of the family SFT models
  dpo_<family>  offline DPO of sft_merged on the family's pairs (best/worst
                arbitrage pairs + translation-contrast pairs)
  dpo_merged    linear merge of the family DPO models
  online        online DPO from dpo_merged: sample k, rank with the reward
                model, best/worst, DPO; `online.iterations` rounds (each round
                per family then merged when online.per_family)
  rloo          ablation: RLOO instead of online DPO, same rounds and scorer
  eval          every stage against sft_single on held-out test prompts under
                the world's verifier (never seen in training or tuning)
  report        report.json, report.md, report.png

Real inputs (`config.inputs`, aya_jax.recipe.inputs): with inputs.base set
there is no world and no reward_model step; the base, teachers (local HF or
params/ dirs), arbiter reward model and prompt JSONL files are read from the
given paths, translation contrast runs only with inputs.translator (a
prompted teacher) and inputs.weak, and eval judges inputs.eval_prompts with a
reward model (inputs.judge, default the arbiter) instead of the verifier.

A step is skipped when `pipeline_state.json` records it finished with the same
spec hash (its config block plus the hashes of the steps and input paths it
reads) and every output path it recorded still exists; a changed block or
path re-runs that step and every step after it that reads it, a missing
output re-runs the step. Inside a step, a killed run continues from its
checkpoints (the stages' own resume). The steps themselves are in
aya_jax.recipe.steps.

Output paths inside the workdir are stored relative to it ("./sft_merged/
params") and resolved on read, so a copied or moved workdir reads its own
files, never the original's; an unreadable state file is stale (a warning
names it) and every step is checked again. The choice fields of the config
(CHOICES) are checked before the first step runs.
"""

from __future__ import annotations

import json
import os
import time


from aya_jax import axes
from aya_jax.arbitrage import contrast as preference
from aya_jax.models import config as model_config
from aya_jax.recipe import artifacts
from aya_jax.recipe import inputs as recipe_inputs
from aya_jax.recipe import steps
from aya_jax.world import bootstrap as world
from aya_jax.world import tasks as synthetic

# config field -> its allowed values (a tuple field: each of its items);
# checked at the start, not after the steps before the one that reads it
CHOICES = {
    "mesh.rules": ("",) + tuple(axes.PRESETS),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "sft_family.init": ("base", "mixed"),
}
WORLD_CHOICES = {  # only without real inputs
    "world.model.family": model_config.FAMILIES,
    "world.languages": synthetic.LANGUAGES,
    "world.tasks": synthetic.TASKS,
    "world.weak_languages": synthetic.LANGUAGES,
    "reward_model.kinds": preference.CORRUPTIONS,
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
  c = config
  t_start = time.time()
  real = bool(c.get("inputs") and c.inputs.base)
  check_config(c, real)
  r = artifacts.Runner(workdir)
  if real:  # local paths instead of the world; spec hashes name the paths read
    w = recipe_inputs.resolve(c)
    check_baseline(c, list(w["teachers"]))
    rm, rm_hash = dict(params=w["reward_model"], tokenizer=w["reward_tokenizer"]), w["hashes"]["rm"]
    key = lambda *names, **extra: dict(real={**{n: w["hashes"][n] for n in names}, **extra})
    langs = tuple(w["languages"])
  else:
    w, w_hash = r.step("world", dict(world=_cfg_dict(c.world)), lambda d: steps.run_world(c, d))
    key = lambda *names, **extra: dict(w=w_hash)
    rm, rm_hash = r.step("reward_model", dict(w=w_hash, rm=_cfg_dict(c.reward_model)),
                         lambda d: steps.train_reward_model(c, d, w))
    langs = tuple(c.world.languages)
  tok, fams = w["tokenizer"], {k: tuple(v) for k, v in w["families"].items()}

  arb, arb_hash = r.step("arbitrage", dict(**key("pool", "prompts"), rm=rm_hash,
                                           arb=_cfg_dict(c.arbitrage)),
                         lambda d: steps.run_arbitrage(c, d, w, rm))

  def sft_step(name, data_fn, block=c.sft, init=w["base"], init_h=None, **fam):
    spec = dict(**key("base", **fam), arb=arb_hash, sft=_cfg_dict(block), name=name)
    if init_h is not None:
      spec["init"] = init_h
    return r.step(name, spec, lambda d: steps.run_sft(c, d, tok, init, data_fn(d), block))

  single, _ = sft_step("sft_single", lambda d: arb["single"])
  models = {"sft_single": single["params"]}
  fb = c.get("sft_family") or c.sft   # the family runs (default: like the others, from base)
  warm = fb.get("init", "base")  # 'base' | 'mixed' (check_config)
  if c.ablations.mixed or warm == "mixed":
    mixed, mixed_h = sft_step("sft_mixed", lambda d: arb["sft"])
    models["sft_mixed"] = mixed["params"]
  start = dict(init=mixed["params"], init_h=mixed_h) if warm == "mixed" else {}
  fam_sft, fam_h = {}, []
  for name, fl in fams.items():
    out, h = sft_step(f"sft_{name}", lambda d, fl=fl: steps.filter_languages(
        arb["sft"], os.path.join(d, "data.jsonl"), fl), block=fb, fam=list(fl), **start)
    fam_sft[name], fam_h = out["params"], fam_h + [h]
  merged_sft, msft_h = r.step("sft_merged", dict(inputs=fam_h),
                              lambda d: dict(params=steps.merge(d, list(fam_sft.values()))))
  models["sft_merged"] = merged_sft["params"]

  fam_dpo, dpo_h = {}, []
  for name, fl in fams.items():
    spec = dict(init=msft_h, arb=arb_hash, dpo=_cfg_dict(c.dpo), fam=fl)
    out, h = r.step(f"dpo_{name}", spec,
                    lambda d, fl=fl: steps.run_dpo(c, d, tok, merged_sft["params"], arb, fl))
    fam_dpo[name], dpo_h = out["params"], dpo_h + [h]
  merged_dpo, mdpo_h = r.step("dpo_merged", dict(inputs=dpo_h),
                              lambda d: dict(params=steps.merge(d, list(fam_dpo.values()))))
  models["dpo_merged"] = merged_dpo["params"]

  def online_step(name, algo):
    spec = dict(init=mdpo_h, rm=rm_hash, on=_cfg_dict(c.online), algo=algo)
    return r.step(name, spec, lambda d: steps.run_online(c, d, w, merged_dpo["params"], rm, arb,
                                                         fams, langs, algo))[0]

  for i, p in enumerate(online_step("online", "dpo")["rounds"], 1):
    models[f"online_{i}"] = p
  if c.ablations.rloo:
    models["rloo"] = online_step("rloo", "rloo")["rounds"][-1]

  spec = dict(models=sorted(models), eval=_cfg_dict(c.eval),
              inputs={s: r.state[s]["hash"] for s in r.state if s != "eval"})
  if real:
    spec["judge"] = key("eval")
  ev, _ = r.step("eval", spec, lambda d: steps.run_eval(c, d, w, models, langs, rm))
  from aya_jax.recipe import report as recipe_report
  rep = recipe_report.write(r.workdir, ev, dict(
      seed=c.seed, wall_seconds=time.time() - t_start,
      step_seconds={k: v.get("seconds") for k, v in r.state.items()},
      ran=r.ran, world_report=w.get("report_md", ""),
      inputs=c.inputs.to_dict() if real else None))
  print(recipe_report.table(rep), flush=True)
  return rep
