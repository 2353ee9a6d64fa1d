r"""The whole Aya Expanse recipe as one resumable pipeline (stage 'pipeline').

    python -m aya_jax.main --config=configs/pipeline.py --workdir=runs/pipeline

Steps, each a directory of the workdir and each still a stage of its own:

  world         tokenizer, base model, a teacher per language family, a weak
                English-only model (aya_jax.world)
  reward_model  a reward model on verifier-labelled pairs (the arbiter)
  arbitrage     every teacher answers (k samples), the reward model scores,
                reward-based routing -> sft.jsonl + pairs_offline.jsonl, plus
                translation-contrast pairs (strong in-language vs weak English
                answer, translated)
  sft_single    baseline: SFT on one teacher's answers (the single-teacher
                ablation of the arbitrage paper)
  sft_mixed     ablation: SFT on all arbitraged data, one model
  sft_<family>  SFT on the family's arbitraged data (each family has English)
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

A step is skipped when `pipeline_state.json` records it finished with the same
spec hash (its config block plus the hashes of the steps it reads); a changed
block re-runs that step and every step after it that reads it. Inside a
step, a killed run continues from its checkpoints (the stages' own resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np
from absl import logging

from aya_jax import arbitrage, checkpoint, evaluation, merging, reward, teachers, world
from aya_jax.data import records, synthetic
from aya_jax.sampling import methods
from aya_jax.train import dpo, online, reward_model, sft

STATE = "pipeline_state.json"


def _hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cfg_dict(c):
  return json.loads(c.to_json_best_effort()) if hasattr(c, "to_json_best_effort") else c


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
    if os.path.exists(d):
      same = os.path.exists(partial) and open(partial).read() == h
      if not same:  # another spec's leftovers: start clean
        shutil.rmtree(d)
    os.makedirs(d, exist_ok=True)
    with open(partial, "w") as f:
      f.write(h)
    logging.info("pipeline: running %s (spec %s)", name, h)
    print(f"[pipeline] {name} ...", flush=True)
    t0 = time.time()
    outputs = fn(d)
    self.seconds[name] = time.time() - t0
    print(f"[pipeline] {name} done in {self.seconds[name]:.0f}s", flush=True)
    self.state[name] = dict(hash=h, outputs=outputs, seconds=self.seconds[name])
    self.ran.append(name)
    with open(self.path + ".tmp", "w") as f:
      json.dump(self.state, f, indent=1)
    os.replace(self.path + ".tmp", self.path)
    return outputs, h


# ------------------------------------------------------------ stage configs


def _train_block(c, block, tok: str, init: str, mesh_shape):
  """Applies the pipeline's {steps, lr, batch_size, seq_len, warmup} to a stage config."""
  c.tokenizer, c.model.init, c.seed = tok, init, block.get("seed", c.seed)
  c.data.seq_len, c.data.batch_size = block.seq_len, block.batch_size
  c.optim.lr, c.optim.total_steps = block.lr, block.steps
  c.optim.warmup_steps = min(block.steps // 10, 20)
  c.loop.num_steps, c.loop.log_every = block.steps, max(1, block.steps // 5)
  c.loop.checkpoint_every, c.loop.eval_every = max(1, block.steps // 2), 0
  c.mesh.shape = tuple(mesh_shape)
  return c


def _filter(path: str, out: str, languages, required: bool = True):
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


def _merge(d: str, inputs: list) -> str:
  """Linear merge with equal weights (Aya Expanse's most consistent method)."""
  models = [checkpoint.load_model(p) for p in inputs]
  cfg = models[0][0]
  merged = merging.merge("linear", [jax.device_get(p) for _, p in models],
                         parameters={"normalize": True},
                         model_parameters=[{"weight": 1.0} for _ in models])
  return checkpoint.save_params(os.path.join(d, "params"), cfg, merged)


# ------------------------------------------------------------------- steps


def run(config, workdir: str) -> dict:
  r = Runner(workdir)
  c = config
  t_start = time.time()
  mesh = tuple(c.mesh_shape)

  w, w_hash = r.step("world", dict(world=_cfg_dict(c.world)), lambda d: _world(c, d))
  tok, fams = w["tokenizer"], {k: tuple(v) for k, v in w["families"].items()}
  langs = tuple(c.world.languages)

  rm, rm_hash = r.step("reward_model", dict(w=w_hash, rm=_cfg_dict(c.reward_model)),
                       lambda d: _reward_model(c, d, w))
  arb, arb_hash = r.step("arbitrage", dict(w=w_hash, rm=rm_hash, arb=_cfg_dict(c.arbitrage)),
                         lambda d: _arbitrage(c, d, w, rm))

  def sft_step(name, data_fn):
    spec = dict(w=w_hash, arb=arb_hash, sft=_cfg_dict(c.sft), name=name)
    return r.step(name, spec, lambda d: _sft(c, d, tok, w["base"], data_fn(d), mesh))

  single, single_h = sft_step("sft_single", lambda d: arb["single"])
  models = {"sft_single": single["params"]}
  if c.ablations.mixed:
    mixed, _ = sft_step("sft_mixed", lambda d: arb["sft"])
    models["sft_mixed"] = mixed["params"]
  fam_sft, fam_h = {}, []
  for name, fl in fams.items():
    out, h = sft_step(f"sft_{name}", lambda d, fl=fl: _filter(arb["sft"],
                                                              os.path.join(d, "data.jsonl"), fl))
    fam_sft[name], fam_h = out["params"], fam_h + [h]
  merged_sft, msft_h = r.step("sft_merged", dict(inputs=fam_h),
                              lambda d: dict(params=_merge(d, list(fam_sft.values()))))
  models["sft_merged"] = merged_sft["params"]

  fam_dpo, dpo_h = {}, []
  for name, fl in fams.items():
    spec = dict(init=msft_h, arb=arb_hash, dpo=_cfg_dict(c.dpo), fam=fl)
    out, h = r.step(f"dpo_{name}", spec,
                    lambda d, fl=fl: _dpo(c, d, tok, merged_sft["params"], arb, fl, mesh))
    fam_dpo[name], dpo_h = out["params"], dpo_h + [h]
  merged_dpo, mdpo_h = r.step("dpo_merged", dict(inputs=dpo_h),
                              lambda d: dict(params=_merge(d, list(fam_dpo.values()))))
  models["dpo_merged"] = merged_dpo["params"]

  on, on_h = r.step("online", dict(init=mdpo_h, rm=rm_hash, on=_cfg_dict(c.online), algo="dpo"),
                    lambda d: _online(c, d, tok, merged_dpo["params"], rm, arb, fams, "dpo"))
  for i, p in enumerate(on["rounds"], 1):
    models[f"online_{i}"] = p
  if c.ablations.rloo:
    rl, _ = r.step("rloo", dict(init=mdpo_h, rm=rm_hash, on=_cfg_dict(c.online), algo="rloo"),
                   lambda d: _online(c, d, tok, merged_dpo["params"], rm, arb, fams, "rloo"))
    models["rloo"] = rl["rounds"][-1]

  spec = dict(models=sorted(models), eval=_cfg_dict(c.eval),
              inputs={s: r.state[s]["hash"] for s in r.state if s != "eval"})
  ev, _ = r.step("eval", spec, lambda d: _eval(c, d, tok, models, langs))
  from aya_jax import recipe_report
  rep = recipe_report.write(r.workdir, ev, dict(
      seed=c.seed, wall_seconds=time.time() - t_start,
      step_seconds={k: v.get("seconds") for k, v in r.state.items()},
      ran=r.ran, world_report=w.get("report_md", "")))
  print(recipe_report.table(rep), flush=True)
  return rep


def _world(c, d):
  out = world.bootstrap(d, c.world)
  return dict(tokenizer=out["tokenizer"], base=out["base"], teachers=out["teachers"],
              weak=out["weak"], families={k: list(v) for k, v in world.families(c.world).items()},
              report_md=world.report_markdown(out["report"]))


def _reward_model(c, d, w):
  b = c.reward_model
  rc = reward_model.default_config()
  _train_block(rc, b, w["tokenizer"], w["base"], c.mesh_shape)
  rc.synthetic.n_per_language = b.n_per_language
  rc.synthetic.languages = tuple(c.world.languages)
  rc.synthetic.tasks = tuple(c.world.tasks)
  rc.synthetic.kinds = tuple(b.kinds)
  reward_model.run(rc, d)
  acc = None
  path = os.path.join(d, "reward_eval.json")
  if os.path.exists(path):
    with open(path) as f:
      acc = json.load(f)
  return dict(params=os.path.join(d, "params"), eval=acc)


def _arbitrage(c, d, w, rm):
  b = c.arbitrage
  ac = arbitrage.default_config()
  with ac.unlocked():
    ac.seed, ac.mode, ac.synthetic.teachers = c.seed, "reward", ""
    ac.routing.min_gap = b.min_gap
    ac.scorer.kind, ac.scorer.path, ac.scorer.tokenizer = ("reward_model", rm["params"],
                                                           w["tokenizer"])
    ac.contrast.enabled = b.contrast
    names = sorted(w["teachers"])
    ac.contrast.strong = names[0]
    ac.contrast.weak = "weak"
  prompts = os.path.join(d, "prompts.jsonl")
  recs = synthetic.make_split("train", b.n_per_language, c.seed + 1, tuple(c.world.languages),
                              tuple(c.world.tasks))
  records.write_jsonl(prompts, recs)
  with ac.unlocked():
    ac.prompts = _as_prompts(prompts, os.path.join(d, "prompts_only.jsonl"))
  method = methods.from_config(b.temperature, 0, 1.0)
  pool_teachers = [teachers.Teacher(name, path, w["tokenizer"], method, b.k, b.max_new_tokens)
                   for name, path in sorted(w["teachers"].items())]
  pool_teachers.append(teachers.Teacher("weak", w["weak"], w["tokenizer"], method, 1,
                                        b.max_new_tokens))
  pool = teachers.TeacherPool(pool_teachers, batch_size=b.batch_size, seed=c.seed)
  scorer = reward.RewardModelScorer.load(rm["params"], w["tokenizer"])
  report = arbitrage.run(ac, d, pool=pool, scorer=scorer)
  single = _single_teacher(d, b.baseline_teacher or sorted(w["teachers"])[0])
  return dict(sft=os.path.join(d, "sft.jsonl"), pairs=os.path.join(d, "pairs_offline.jsonl"),
              contrast=os.path.join(d, "pairs_contrast.jsonl") if b.contrast else "",
              single=single, report={k: report.get(k) for k in ("per_language",)
                                     if isinstance(report, dict)})


def _as_prompts(src: str, out: str) -> str:
  with open(out, "w", encoding="utf-8") as f:
    for r in records.read_jsonl(src, "sft"):
      f.write(json.dumps(dict(id=r.id, language=r.language, messages=list(r.messages[:-1])),
                         ensure_ascii=False) + "\n")
  return out


def _single_teacher(d: str, teacher: str) -> str:
  """The baseline's data: one teacher's first sample for every prompt (no arbiter)."""
  out, seen = [], set()
  for r in records.read_jsonl(os.path.join(d, "completions.jsonl"), "completion"):
    pid, t, j = teachers.parse_completion_id(r.id)
    if t == teacher and j == 0 and pid not in seen:
      seen.add(pid)
      out.append(records.SFTRecord(id=pid, language=r.language, messages=tuple(r.prompt) + (
          {"role": "assistant", "content": r.completion},)))
  path = os.path.join(d, "sft_single.jsonl")
  records.write_jsonl(path, out)
  return path


def _sft(c, d, tok, init, data, mesh):
  sc = _train_block(sft.default_config(), c.sft, tok, init, mesh)
  sc.data.train = (data,)
  return dict(params=sft.run(sc, d))


def _dpo(c, d, tok, init, arb, fam, mesh):
  dc = _train_block(dpo.default_config(), c.dpo, tok, init, mesh)
  dc.dpo.beta, dc.dpo.rpo_alpha = c.dpo.beta, c.dpo.rpo_alpha
  files = [_filter(arb["pairs"], os.path.join(d, "pairs.jsonl"), fam)]
  if arb.get("contrast") and os.path.exists(arb["contrast"]):
    files.append(_filter(arb["contrast"], os.path.join(d, "contrast.jsonl"), fam, False))
  dc.data.train = tuple(f for f in files if f)
  return dict(params=dpo.run(dc, d))


def _online(c, d, tok, init, rm, arb, fams, algorithm):
  b = c.online
  oc = _train_block(online.default_config(), b, tok, init, c.mesh_shape)
  oc.dpo.rpo_alpha = b.rpo_alpha
  oc.online.algorithm, oc.online.iterations, oc.online.k = algorithm, 1, b.k
  oc.online.betas, oc.online.max_new_tokens = (b.beta,), b.max_new_tokens
  oc.online.temperature = b.temperature
  prompts = _filter(arb["sft"], os.path.join(d, "prompts_sft.jsonl"),
                    tuple(c.world.languages))
  scorer = reward.RewardModelScorer.load(rm["params"], tok)
  rounds, current = [], init
  groups = fams if b.per_family else {"all": tuple(c.world.languages)}
  for i in range(b.iterations):
    outs = []
    for name, fl in groups.items():
      sub = os.path.join(d, f"round_{i + 1}", name)
      done = os.path.join(sub, "params")
      if not checkpoint.is_params_dir(done):
        oc_i = oc.copy_and_resolve_references()
        with oc_i.unlocked():
          oc_i.model.init, oc_i.seed = current, c.seed + i
          oc_i.data.prompts = (_filter(prompts, os.path.join(d, f"prompts_{name}.jsonl"), fl),)
        online.run(oc_i, sub, scorer=scorer)
      outs.append(done)
    current = outs[0] if len(outs) == 1 else _merge(os.path.join(d, f"round_{i + 1}"), outs)
    rounds.append(current)
  return dict(rounds=rounds)


def _eval(c, d, tok, models: dict, langs):
  b = c.eval
  prompts = evaluation.world_prompts("test", b.n_per_language, langs, tuple(c.world.tasks),
                                     c.seed)
  ms = {name: evaluation.Model(name, path, tok, max_new_tokens=b.max_new_tokens,
                               batch_size=b.batch_size, seed=c.seed)
        for name, path in models.items()}
  answers, results = {}, {}
  base = ms["sft_single"]
  for name, m in ms.items():
    results[name] = evaluation.compare(m, base, prompts, synthetic.Verifier(), b.n_boot, c.seed,
                                       answers=answers)
  with open(os.path.join(d, "answers.json"), "w") as f:
    json.dump(answers, f, ensure_ascii=False)
  return dict(results=results, baseline="sft_single", n_prompts=len(prompts))
