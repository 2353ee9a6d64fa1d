"""The recipe's held-out gains (issue 9), fixed seed: configs/pipeline.py:gains.

A smaller world than `make demo` (3 languages in 2 families, fewer steps; about
6 minutes on 2 cores) run end to end as `python -m aya_jax.main` on one CPU
device, as a user runs it; every stage is judged by the world's verifier on
held-out test prompts that no step trains, routes or tunes on.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_recipe_gains_on_held_out_prompts(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, not 8
  work = tmp_path / "gains"
  proc = subprocess.run([sys.executable, "-m", "aya_jax.main",
                         "--config=configs/pipeline.py:gains", f"--workdir={work}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
                        # yield the cores to the other xdist workers: their 8-device
                        # CPU collectives abort when starved of threads
                        preexec_fn=lambda: os.nice(15))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(work / "report.json") as f:
    rep = json.load(f)
  rows = rep["rows"]
  v = {s: rows[s]["all"]["verifier"] for s in rep["stages"]}
  n = rep["n_prompts"]
  assert n >= 40, n
  # The test split of this world has ~16 prompts per language, so one stage's
  # mean verifier score moves by ~0.02 per prompt; the thresholds leave room
  # for a few prompts, and the gain asserted is several times that.
  # 1. arbitrage (routing by the learned arbiter) beats the single-teacher
  #    baseline clearly, its win-rate interval above a tie
  assert v["sft_mixed"] >= v["sft_single"] + 0.2, v
  assert rows["sft_mixed"]["all"]["ci"][0] > 0.5, rows["sft_mixed"]["all"]
  # 2. the merge of the family models keeps the mixed model's skill
  assert v["sft_merged"] >= v["sft_mixed"] - 0.05, v
  # 3. no later stage gives the gain back: the preference stages do not game
  #    the arbiter into a collapse (each stays well above the baseline)
  for s in rep["stages"]:
    if s != "sft_single":
      assert v[s] >= v["sft_single"] + 0.15, (s, v)
  verdicts = {d["claim"]: d for d in rep["verdicts"]}
  claim = verdicts["arbitrage SFT beats single-teacher SFT"]
  assert claim["holds"] and claim["measure"] == "verifier", claim
