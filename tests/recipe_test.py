"""The whole recipe (smoke variant) end to end: artefacts, resume, re-run on change."""

import importlib.util
import json
import os

import numpy as np
import pytest

from aya_jax import checkpoint, recipe, recipe_report
from aya_jax.data import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant="smoke"):
  spec = importlib.util.spec_from_file_location("pipeline_cfg",
                                                os.path.join(ROOT, "configs/pipeline.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


class Killed(RuntimeError):
  pass


@pytest.mark.slow
def test_smoke_pipeline_artefacts_resume_and_rerun_on_change(tmp_path, monkeypatch):
  c = _config()
  work = str(tmp_path / "p")
  real_dpo = recipe.dpo.run
  # 1. killed during the first offline DPO step
  def killed(*a, **k):
    raise Killed("simulated kill")
  monkeypatch.setattr(recipe.dpo, "run", killed)
  with pytest.raises(Killed):
    recipe.run(c, work)
  monkeypatch.setattr(recipe.dpo, "run", real_dpo)
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
  assert len(saved["verdicts"]) == 5
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
  # 4. a changed block re-runs that step and those after it, nothing before
  with c.unlocked():
    c.dpo.beta = 0.2
  ran = recipe.run(c, work)["ran"]
  assert ran == ["dpo_european", "dpo_slavic_turkic", "dpo_merged", "online", "rloo", "eval"]


def _result(verifier_a, win):
  row = dict(n=4, win_rate=win, ci=[win - 0.1, win + 0.1], wins=1, ties=2, losses=1,
             verifier_a=verifier_a, verifier_b=0.3)
  return {"per_language": {"en": row, "all": row}}


def test_report_verdicts_are_computed_from_the_scores(tmp_path):
  ev = dict(baseline="sft_single", n_prompts=4, results={
      "sft_single": _result(0.30, 0.5), "sft_mixed": _result(0.40, 0.6),
      "sft_merged": _result(0.395, 0.55), "dpo_merged": _result(0.39, 0.5),
      "online_1": _result(0.45, 0.7), "rloo": _result(0.50, 0.72)})
  rep = recipe_report.write(str(tmp_path), ev, dict(seed=0, wall_seconds=1.0))
  got = {v["claim"]: v["holds"] for v in rep["verdicts"]}
  assert got == {
      "arbitrage SFT beats single-teacher SFT": True,             # 0.40 > 0.30
      "merged family models at least match mixed-data SFT": True,  # 0.395 >= 0.40 - 0.01
      "offline DPO improves on SFT": False,                        # 0.39 < 0.395
      "online rounds improve on offline DPO": True,                # 0.45 > 0.39
      "online DPO beats RLOO": False,                              # 0.45 < 0.50
  }
  assert "**NO**" in open(tmp_path / "report.md").read()
  assert recipe_report.table(rep).splitlines()[3].startswith("| sft_single | 0.50 (0.30)")


def test_runner_skips_a_finished_step_and_reruns_a_changed_one(tmp_path):
  r = recipe.Runner(str(tmp_path))
  calls = []
  fn = lambda d: calls.append(d) or {"x": len(calls)}
  assert r.step("a", {"k": 1}, fn)[0] == {"x": 1}
  r2 = recipe.Runner(str(tmp_path))  # a new process reads pipeline_state.json
  assert r2.step("a", {"k": 1}, fn)[0] == {"x": 1} and len(calls) == 1
  assert r2.step("a", {"k": 2}, fn)[0] == {"x": 2} and r2.ran == ["a"]
