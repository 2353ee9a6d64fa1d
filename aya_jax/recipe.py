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
reads) and every output path it recorded still exists; a changed block or
path re-runs that step and every step after it that reads it, a missing
output re-runs the step. Inside a step, a killed run continues from its
checkpoints (the stages' own resume). The steps themselves are in
aya_jax.recipe_steps.

Output paths inside the workdir are stored relative to it ("./sft_merged/
params") and resolved on read, so a copied or moved workdir reads its own
files, never the original's; an unreadable state file is stale (a warning
names it) and every step is checked again. The choice fields of the config
(CHOICES) are checked before the first step runs.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import logging

from aya_jax import axes, preference, recipe_inputs, world
from aya_jax import recipe_steps as steps
from aya_jax.data import atomic, synthetic
from aya_jax.models import config as model_config

STATE = "pipeline_state.json"
HERE = "./"  # how a stored output path inside the workdir starts

# config field -> its allowed values (a tuple field: each of its items);
# checked at the start, not after the steps before the one that reads it
CHOICES = {
    "mesh_rules": ("",) + tuple(axes.PRESETS),
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


_hash = world.spec_hash


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


def _lead() -> bool:
  import jax
  return jax.process_index() == 0


def _sync(tag: str):
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def _is_path(s) -> bool:
  """An absolute path among the strings of a step's outputs."""
  return isinstance(s, str) and os.path.isabs(s) and "\n" not in s


def _map_strings(obj, fn):
  if isinstance(obj, dict):
    return {k: _map_strings(v, fn) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_map_strings(v, fn) for v in obj]
  return fn(obj) if isinstance(obj, str) else obj


class Runner:
  """Runs named steps once per spec; remembers finished steps in pipeline_state.json."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.path = os.path.join(self.workdir, STATE)
    self.state = self._load()
    self.ran, self.seconds = [], {}

  def dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def _load(self) -> dict:
    """The recorded steps, output paths resolved against this workdir; an
    unreadable file or entry is dropped with a warning (its steps are checked
    again: those whose directory holds a finished run resume from it)."""
    state = atomic.read_json_cache(self.path, "pipeline state")
    if state is not None and not isinstance(state, dict):
      logging.warning("%s: not a JSON object: treated as stale", self.path)
    out = {}
    for name, entry in (state.items() if isinstance(state, dict) else ()):
      if not (isinstance(entry, dict) and isinstance(entry.get("hash"), str)
              and "outputs" in entry):
        logging.warning("%s: entry %r is malformed: step %s will run again", self.path, name,
                        name)
        continue
      out[name] = dict(entry, outputs=_map_strings(entry["outputs"], self._resolve))
    return out

  def _resolve(self, s: str) -> str:
    return os.path.join(self.workdir, os.path.normpath(s[len(HERE):])) if s.startswith(HERE) \
        else s

  def _inside(self, path: str):
    """`path` relative to the workdir; None when it is outside."""
    rel = os.path.relpath(os.path.normpath(path), self.workdir)
    return None if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel

  def _relative(self, s: str) -> str:
    rel = self._inside(s) if _is_path(s) else None
    return s if rel is None else HERE + rel

  def _untrusted(self, outputs) -> str:
    """Why a recorded step cannot be trusted ("" if it can): an output path
    that is missing, or outside this workdir (a state file written with
    absolute paths, then copied or moved)."""
    paths = []
    _map_strings(outputs, lambda s: paths.append(s) if _is_path(s) else None)
    for p in paths:
      if self._inside(p) is None:
        return f"its recorded output {p} is outside the workdir {self.workdir} (a copy?)"
      if not os.path.exists(p):
        return f"its recorded output {p} is missing"
    return ""

  def step(self, name: str, spec: dict, fn):
    """fn(directory) -> outputs (JSON); returns (outputs, spec hash)."""
    h = _hash(spec)
    done = self.state.get(name)
    if done and done["hash"] == h:
      why = self._untrusted(done["outputs"])
      if not why:
        logging.info("pipeline: %s is done (spec %s), skipped", name, h)
        return done["outputs"], h
      logging.warning("pipeline: %s is recorded as done but %s: running it again", name, why)
    d = self.dir(name)
    partial = os.path.join(d, ".spec")
    if self.state.pop(name, None) is not None:  # its artefacts go: no longer done
      self._save()
    if _lead():  # several processes share the workdir: one cleans it, the others wait
      if os.path.exists(d):
        if _read_text(partial) != h:  # another spec's leftovers: start clean
          shutil.rmtree(d)
      os.makedirs(d, exist_ok=True)
      atomic.write_text(partial, h)
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
    state = {name: dict(entry, outputs=_map_strings(entry["outputs"], self._relative))
             for name, entry in self.state.items()}
    atomic.write_json(self.path, state, indent=1)


def _read_text(path: str):
  """The file's text; None when it is absent or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, ValueError):
    return None


def run(config, workdir: str) -> dict:
  c = config
  t_start = time.time()
  real = bool(c.get("inputs") and c.inputs.base)
  check_config(c, real)
  r = Runner(workdir)
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
  from aya_jax import recipe_report
  rep = recipe_report.write(r.workdir, ev, dict(
      seed=c.seed, wall_seconds=time.time() - t_start,
      step_seconds={k: v.get("seconds") for k, v in r.state.items()},
      ran=r.ran, world_report=w.get("report_md", ""),
      inputs=c.inputs.to_dict() if real else None))
  print(recipe_report.table(rep), flush=True)
  return rep
