r"""The whole Aya Expanse recipe as one resumable pipeline (stage 'pipeline').

    python -m aya_jax.main --config=configs/pipeline.py --workdir=runs/pipeline

Steps, each a directory of the workdir and each still a stage of its own:

  world         tokenizer, base model, a teacher per language family, a weak
                English-only model (aya_jax.world)
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

Real inputs (`config.inputs`, aya_jax.recipe_inputs): with inputs.base set
there is no world and no reward_model step; the base, teachers (local HF or
params/ dirs), arbiter reward model and prompt JSONL files are read from the
given paths, translation contrast runs only with inputs.translator (a
prompted teacher) and inputs.weak, and eval judges inputs.eval_prompts with a
reward model (inputs.judge, default the arbiter) instead of the verifier.

A step is skipped when `pipeline_state.json` records it finished with the same
spec hash (its config block plus the hashes of the steps and input paths it
reads); a changed block or path re-runs that step and every step after it
that reads it. Inside a step, a killed run continues from its checkpoints
(the stages' own resume). The steps themselves are in aya_jax.recipe_steps.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import logging

from aya_jax import recipe_inputs, world
from aya_jax import recipe_steps as steps
from aya_jax.data import records

STATE = "pipeline_state.json"


_hash = world.spec_hash


def _cfg_dict(c):
  return json.loads(c.to_json_best_effort()) if hasattr(c, "to_json_best_effort") else c


def _lead() -> bool:
  import jax
  return jax.process_index() == 0


def _sync(tag: str):
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


class Runner:
  """Runs named steps once per spec; remembers finished steps in pipeline_state.json."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.path = os.path.join(self.workdir, STATE)
    self.state = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.state = json.load(f)
    self.ran, self.seconds = [], {}

  def dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def step(self, name: str, spec: dict, fn):
    """fn(directory) -> outputs (JSON); returns (outputs, spec hash)."""
    h = _hash(spec)
    done = self.state.get(name)
    if done and done["hash"] == h:
      logging.info("pipeline: %s is done (spec %s), skipped", name, h)
      return done["outputs"], h
    d = self.dir(name)
    partial = os.path.join(d, ".spec")
    if self.state.pop(name, None) is not None:  # its artefacts go: no longer done
      self._save()
    if _lead():  # several processes share the workdir: one cleans it, the others wait
      if os.path.exists(d):
        same = os.path.exists(partial) and open(partial).read() == h
        if not same:  # another spec's leftovers: start clean
          shutil.rmtree(d)
      os.makedirs(d, exist_ok=True)
      with open(partial, "w") as f:
        f.write(h)
    _sync(f"pipeline step {name} {h}")
    logging.info("pipeline: running %s (spec %s)", name, h)
    print(f"[pipeline] {name} ...", flush=True)
    t0 = time.time()
    outputs = fn(d)
    self.seconds[name] = time.time() - t0
    print(f"[pipeline] {name} done in {self.seconds[name]:.0f}s", flush=True)
    self.state[name] = dict(hash=h, outputs=outputs, seconds=self.seconds[name])
    self.ran.append(name)
    self._save()
    return outputs, h

  def _save(self):
    if not _lead():
      return
    records.write_json(self.path, self.state, indent=1)


def run(config, workdir: str) -> dict:
  r = Runner(workdir)
  c = config
  t_start = time.time()
  real = bool(c.get("inputs") and c.inputs.base)
  if real:  # local paths instead of the world; spec hashes name the paths read
    w = recipe_inputs.resolve(c)
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
  warm = fb.get("init", "base")
  if warm not in ("base", "mixed"):
    raise ValueError(f"config.sft_family.init={warm!r}: use 'base' or 'mixed'")
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
  from aya_jax import recipe_report
  rep = recipe_report.write(r.workdir, ev, dict(
      seed=c.seed, wall_seconds=time.time() - t_start,
      step_seconds={k: v.get("seconds") for k, v in r.state.items()},
      ran=r.ran, world_report=w.get("report_md", ""),
      inputs=c.inputs.to_dict() if real else None))
  print(recipe_report.table(rep), flush=True)
  return rep
