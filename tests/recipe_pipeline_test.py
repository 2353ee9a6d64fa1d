"""The whole recipe (smoke variant) end to end: artefacts, resume, re-run on change;
and on real inputs (local HF teachers and base, a reward model, prompt files)."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from aya_jax import artifacts
from aya_jax import checkpoint, config_files
from aya_jax.data import formatting, records
from aya_jax.models import config as model_config
from aya_jax.recipe import blocks
from aya_jax.models import hf
from aya_jax.recipe import inputs as recipe_inputs
from aya_jax.recipe import pipeline as recipe
from aya_jax.world import bootstrap as world
from conftest import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant="smoke"):
  mod = config_files.load_module(os.path.join(ROOT, "configs/pipeline.py"))
  return mod.get_config(variant)


class Killed(RuntimeError):
  pass


@pytest.mark.slow
def test_smoke_pipeline_artefacts_resume_and_rerun_on_change(tmp_path, monkeypatch):
  c = _config()
  work = str(tmp_path / "p")
  real_dpo = recipe.steps.dpo.run
  # 1. killed during the first offline DPO step
  def killed(*a, **k):
    raise Killed("simulated kill")
  monkeypatch.setattr(recipe.steps.dpo, "run", killed)
  with pytest.raises(Killed):
    recipe.run(c, work)
  monkeypatch.setattr(recipe.steps.dpo, "run", real_dpo)
  # 2. the re-run continues where it stopped: nothing before DPO is redone
  rep = recipe.run(c, work)
  assert rep["ran"][0] == "dpo_european", rep["ran"]
  for name in ("world", "reward_model", "arbitrage", "sft_single", "sft_merged"):
    assert name not in rep["ran"]
  # every artefact exists and is well-formed
  for name in ("report.json", "report.md", "report.png", "pipeline_state.json"):
    assert os.path.getsize(os.path.join(work, name)) > 0
  with open(os.path.join(work, "report.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(work, "report.json")) as f:
    saved = json.load(f)
  stages = ["sft_single", "sft_mixed", "sft_merged", "dpo_merged", "online_1", "online_2", "rloo"]
  assert saved["stages"] == stages
  assert saved["languages"] == ["en", "fr", "ru"]
  for s in stages:
    for lang in saved["languages"] + ["all"]:
      row = saved["rows"][s][lang]
      assert 0.0 <= row["win_rate"] <= 1.0 and row["ci"][0] <= row["win_rate"] <= row["ci"][1]
      assert 0.0 <= row["verifier"] <= 1.0
  assert saved["rows"]["sft_single"]["all"]["win_rate"] == 0.5  # the baseline against itself
  assert len(saved["verdicts"]) == 5 and saved["verdict_measure"] == "verifier"
  for v in saved["verdicts"]:  # each with its paired interval, around the difference
    assert v["diff_ci"][0] <= v["diff"] <= v["diff_ci"][1]
    assert v["diff"] == pytest.approx(v["value_a"] - v["value_b"])
  md = open(os.path.join(work, "report.md")).read()
  assert "| sft_merged |" in md and "Does each stage help?" in md
  for d in ("sft_single", "sft_merged", "dpo_merged", "reward_model"):
    cfg, params = checkpoint.load_model(os.path.join(work, d, "params"))
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(params))
  assert records.read_jsonl(os.path.join(work, "arbitrage", "sft.jsonl"), "sft")
  assert records.read_jsonl(os.path.join(work, "arbitrage", "pairs_offline.jsonl"),
                            "preference") is not None
  # 3. a second run does nothing
  assert recipe.run(c, work)["ran"] == []
  ref_files = {f: os.path.getmtime(f) for f in glob.glob(
      os.path.join(work, "cache", "ref_logps", "*.npz"))}
  assert len(ref_files) == 2  # one per family (no held-out pairs)
  # 4. a changed block re-runs that step and those after it, nothing before; the offline
  # CoPG and SRPO ablations train on the same pairs with the same block
  with c.unlocked():
    c.dpo.dpo.beta = 0.2
    c.ablations.update(dict(copg_offline=True, srpo=True, srpo_revisions=(1,)))
  rep = recipe.run(c, work)
  assert rep["ran"] == ["dpo_european", "dpo_slavic_turkic", "dpo_merged", "copg_european",
                        "copg_slavic_turkic", "copg_merged", "srpo_european",
                        "srpo_slavic_turkic", "srpo_merged", "online", "rloo", "eval"]
  assert rep["stages"][4:7] == ["copg_offline", "srpo", "srpo_rev1"]
  claims = [v["claim"] for v in rep["verdicts"]]
  assert [c for c in claims if "CoPG" in c or "SRPO" in c] == [
      "offline CoPG beats offline DPO (same pairs)", "offline SRPO beats offline DPO (same "
      "pairs)", "SRPO's one self-revision improves its answer"]
  for step, loss_type, beta in (("copg_european", "copg", c.ablations.copg_beta),
                                ("srpo_slavic_turkic", "srpo", 0.2)):
    with open(os.path.join(work, step, "run_config.json")) as f:
      run_config = json.load(f)
    assert (run_config["dpo.loss_type"], run_config["dpo.beta"]) == (loss_type, beta)
  answers = json.load(open(os.path.join(work, "eval", "answers.json")))
  assert answers["srpo_rev1"] != answers["srpo"]  # the revised answers are other answers
  # the re-run DPO steps read the reference log-probs the first ones cached (another beta,
  # the same pairs and reference); SRPO's 5 rows are other files
  assert {f: os.path.getmtime(f) for f in ref_files} == ref_files
  assert len(glob.glob(os.path.join(work, "cache", "ref_logps", "*.npz"))) > 2
  # 5. a copy (cp -a) with a changed value trains from the copy's files, not the original's
  copy = str(tmp_path / "copy")
  shutil.copytree(work, copy)
  seen = []
  def stop(c, d, tok, init, arb, fam, overrides=None):
    seen.append((init, arb["pairs"]))
    raise Killed("stop")
  monkeypatch.setattr(recipe.steps, "run_dpo", stop)
  with c.unlocked():
    c.dpo.dpo.beta = 0.3
  with pytest.raises(Killed):
    recipe.run(c, copy)
  assert seen == [(os.path.join(copy, "sft_merged", "params"),
                   os.path.join(copy, "arbitrage", "pairs_offline.jsonl"))]
  monkeypatch.undo()
  # 6. a step whose output was deleted runs again; what follows it is still trusted
  shutil.rmtree(os.path.join(work, "sft_merged", "params"))
  with c.unlocked():
    c.dpo.dpo.beta = 0.2
  assert recipe.run(c, work)["ran"] == ["sft_merged"]
  assert checkpoint.is_params_dir(os.path.join(work, "sft_merged", "params"))


@pytest.mark.parametrize("field,value,message", [
    ("sft_family.warm_start", "foo", r"config\.sft_family\.warm_start='foo': 'foo' is not one "
     r"of \['base', "
     r"'mixed'\]"),
    ("mesh.rules", "fsdp_pt", r"config\.mesh\.rules='fsdp_pt': .* not one of \['', 'dp', 'fsdp', "
     r"'fsdp_tp'\]"),
    ("model.remat", "ful", r"config\.model\.remat='ful'"),
    ("online.reward", "oracle", r"config\.online\.reward='oracle': 'oracle' is not one of "
     r"\['arbiter', 'verifier'\]"),
    ("model.dtype", "bf16", r"config\.model\.dtype='bf16'"),
    ("world.languages", ("en", "xx"), r"config\.world\.languages=\('en', 'xx'\): 'xx' is not"),
    ("world.tasks", ("next_day", "nextday"), r"config\.world\.tasks=.*'nextday' is not"),
    ("world.model.family", "lama", r"config\.world\.model\.family='lama'"),
    ("reward_model.synthetic.kinds", ("english", "verbos"),
     r"config\.reward_model\.synthetic\.kinds=.*'verbos'"),
    ("arbitrage.baseline_teacher", "eu", r"config\.arbitrage\.baseline_teacher='eu': not a "
     r"teacher \['european', 'slavic_turkic'\]"),
])
def test_a_wrong_choice_fails_before_the_first_step(tmp_path, monkeypatch, field, value,
                                                    message):
  c = _config()
  node = c
  *path, last = field.split(".")
  for key in path:
    node = node[key]
  node[last] = value
  monkeypatch.setattr(recipe.steps, "run_world", lambda *a: pytest.fail("a step ran"))
  with pytest.raises(ValueError, match=message):
    recipe.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / artifacts.STATE)


# ------------------------------------------------------------- real inputs

LANGS = ("en", "fr", "ru")


def _prompts(path, prefix, n, langs):
  with open(path, "w", encoding="utf-8") as f:
    for lang in langs:
      for i in range(n):
        f.write(json.dumps(dict(id=f"{prefix}-{lang}-{i}", language=lang, messages=[
            dict(role="user", content=f"{lang} question {i}: one two three")])) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
  """A world tokenizer; base and two teachers as tiny random HF dirs (the
  teachers with their own tokenizer); a random value-head reward model as
  params/; train and eval prompts with ids that are not the world's."""
  d = tmp_path_factory.mktemp("real")
  tok = world.build_tokenizer(str(d / "tok"), LANGS)
  cfg = model_config.tiny("llama", vocab_size=len(tok), pad_id=tok.pad_token_id,
                          bos_id=tok.bos_token_id, eos_ids=formatting.end_of_turn_ids(tok))
  out = dict(tokenizer=str(d / "tok"))
  for i, name in enumerate(("base", "teacher_a", "teacher_b")):
    out[name] = str(d / name)
    hf.save(cfg, random_params(cfg, i), out[name])
    if name != "base":
      tok.save_pretrained(out[name])
  rm_cfg = cfg.replace(value_head=True)
  out["rm"] = checkpoint.save_params(str(d / "rm" / "params"), rm_cfg, random_params(rm_cfg, 7))
  out["train"] = _prompts(d / "train.jsonl", "q", 4, LANGS + ("de",))  # de: not used
  out["eval"] = _prompts(d / "eval.jsonl", "e", 3, LANGS)
  return out


def _real_config(dirs):
  c = _config()
  c.inputs.update(dict(
      base=dirs["base"], tokenizer=dirs["tokenizer"], reward_model=dirs["rm"],
      teachers=f"a:{dirs['teacher_a']};b:{dirs['teacher_b']}",
      families="european:en,fr;slavic:en,ru", prompts=(dirs["train"],),
      eval_prompts=dirs["eval"]))
  c.ablations.update(dict(mixed=False, rloo=False))  # the world's smoke test runs them
  c.sft_family.warm_start = "base"  # family models from the base: no sft_mixed step at all
  for block in (c.sft, c.sft_family, c.dpo, c.online):
    blocks.reschedule(block, 2).loop.checkpoint_every = 2
  c.online.online.iterations = 1
  c.arbitrage.routing.min_gap = 0.0  # a random reward model's scores are close together
  return c


def test_real_inputs_errors_name_the_field(real_dirs):
  c = _real_config(real_dirs)
  with c.unlocked():
    c.inputs.teachers = f"a:{real_dirs['teacher_a']};b:/nonexistent/teacher"
  with pytest.raises(FileNotFoundError, match=r"config\.inputs\.teachers \(b\)"):
    recipe_inputs.resolve(c)
  c = _real_config(real_dirs)
  c.inputs.reward_model = ""
  with pytest.raises(ValueError, match=r"config\.inputs\.reward_model is empty"):
    recipe_inputs.resolve(c)
  c = _real_config(real_dirs)
  c.inputs.translator = "a"  # contrast needs a weak model
  with pytest.raises(ValueError, match=r"config\.inputs\.weak is empty"):
    recipe_inputs.resolve(c)
  c = _real_config(real_dirs)
  c.inputs.tokenizer = ""  # the base dir has none
  with pytest.raises(ValueError, match=r"config\.inputs\.tokenizer is empty and neither "
                                       r"config\.inputs\.base="):
    recipe_inputs.resolve(c)
  c = _real_config(real_dirs)
  c.inputs.families = "european:en,fr;slavic:en,de"
  c.inputs.languages = LANGS
  with pytest.raises(ValueError, match=r"config\.inputs\.families: family slavic"):
    recipe_inputs.resolve(c)


class Stop(RuntimeError):
  pass


@pytest.mark.slow
def test_real_inputs_pipeline_without_the_world(real_dirs, tmp_path, monkeypatch):
  c = _real_config(real_dirs)
  work = str(tmp_path / "p")
  rep = recipe.run(c, work)
  assert "world" not in rep["ran"] and "reward_model" not in rep["ran"]
  assert rep["ran"][0] == "arbitrage" and rep["ran"][-1] == "eval"
  with open(os.path.join(work, "report.json")) as f:
    saved = json.load(f)
  stages = ["sft_single", "sft_merged", "dpo_merged", "online_1"]
  assert saved["stages"] == stages and saved["languages"] == list(LANGS)
  assert saved["judge"] == f"reward model {real_dirs['rm']}" and saved["n_prompts"] == 9
  for s in stages:
    for lang in saved["languages"] + ["all"]:
      row = saved["rows"][s][lang]
      assert 0.0 <= row["win_rate"] <= 1.0 and row["ci"][0] <= row["win_rate"] <= row["ci"][1]
      assert row["verifier"] is None  # not the world's prompts: no verifier
  assert saved["rows"]["sft_single"]["all"]["win_rate"] == 0.5
  # verdicts compare the win rate under the judge, and the report says so
  assert saved["verdict_measure"] == "win_rate" and len(saved["verdicts"]) == 2
  for v in saved["verdicts"]:
    assert v["value_a"] == saved["rows"][v["a"]]["all"]["win_rate"]
  md = open(os.path.join(work, "report.md")).read()
  assert "win rate vs sft_single under the judge, reward model" in md
  assert f"- base: {real_dirs['base']}" in md
  with open(os.path.join(work, "report.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  prompts = records.read_prompts(os.path.join(work, "arbitrage", "prompts_only.jsonl"))
  assert len(prompts) == 12 and {p.language for p in prompts} == set(LANGS)  # de dropped
  # the teachers' answers and scores live in cache/arbitrage/, keyed by what they depend on
  comp_path, = glob.glob(os.path.join(work, "cache", "arbitrage", "completions_*",
                                      "completions.jsonl"))
  comp = records.read_jsonl(comp_path, "completion")
  assert {r.teacher for r in comp} == {"a", "b"}
  assert not os.path.exists(os.path.join(work, "arbitrage", "pairs_contrast.jsonl"))
  for d in ("sft_single", "sft_merged", "dpo_merged"):
    cfg, params = checkpoint.load_model(os.path.join(work, d, "params"))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert recipe.run(c, work)["ran"] == []
  # a changed eval prompt file re-runs eval alone
  moved = str(tmp_path / "eval_copy.jsonl")
  shutil.copy(real_dirs["eval"], moved)
  c.inputs.eval_prompts = moved
  assert recipe.run(c, work)["ran"] == ["eval"]
  # a changed base re-runs SFT first; arbitrage (which does not read it) is kept
  calls = []

  def stop(name):
    def fn(c, d, *a, **k):
      calls.append(os.path.basename(d))
      raise Stop(name)
    return fn
  base2 = str(tmp_path / "base_copy")
  shutil.copytree(real_dirs["base"], base2)
  c.inputs.base = base2
  real_arbitrage = recipe.steps.run_arbitrage
  monkeypatch.setattr(recipe.steps, "run_arbitrage", stop("arbitrage"))
  monkeypatch.setattr(recipe.steps, "run_sft", stop("sft"))
  with pytest.raises(Stop, match="sft"):
    recipe.run(c, work)
  assert calls == ["sft_single"]
  # a changed reward model (the arbiter) re-runs arbitrage first
  rm2 = str(tmp_path / "rm_copy")
  shutil.copytree(real_dirs["rm"], rm2)
  c.inputs.reward_model = rm2
  with pytest.raises(Stop, match="arbitrage"):
    recipe.run(c, work)
  assert calls == ["sft_single", "arbitrage"]
  # back to the first arbiter with another min_gap: arbitrage runs again (a new step
  # directory) but generates nothing and scores nothing; it reads the cached answers
  monkeypatch.setattr(recipe.steps, "run_arbitrage", real_arbitrage)
  monkeypatch.setattr(recipe.steps.reward.RewardModelScorer, "score",
                      lambda *a: pytest.fail("scored again"))
  c.inputs.reward_model = real_dirs["rm"]
  c.arbitrage.routing.min_gap = 0.05
  before = {p: open(p, "rb").read() for p in glob.glob(
      os.path.join(work, "cache", "arbitrage", "*", "*.jsonl"))}
  with pytest.raises(Stop, match="sft"):
    recipe.run(c, work)
  assert calls == ["sft_single", "arbitrage", "sft_single"]
  assert {p: open(p, "rb").read() for p in before} == before
  assert records.read_jsonl(os.path.join(work, "arbitrage", "sft.jsonl"), "sft")
