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
  # Measured at seed 0 (47 prompts; docs/results.md): baseline 0.372, arbitrage 0.681
  # (difference +0.309 [+0.170, +0.457]), merged 0.755 (vs mixed +0.074 [-0.022,
  # +0.191]), offline DPO 0.734, online rounds 0.681 and 0.660, each stage's
  # win-rate interval against the baseline at least [0.61, 0.77]. One prompt
  # moves a mean by ~0.02: the bounds below are the measured ones less a few.
  verdicts = {d["claim"]: d for d in rep["verdicts"]}
  # 1. arbitrage (routing by the learned arbiter) beats the single-teacher
  #    baseline beyond the noise: the paired interval of the difference > 0.1
  claim = verdicts["arbitrage SFT beats single-teacher SFT"]
  assert claim["holds"] and claim["measure"] == "verifier", claim
  assert claim["beyond_noise"] and claim["diff_ci"][0] > 0.1, claim
  assert v["sft_mixed"] >= v["sft_single"] + 0.25, v
  # 2. the merge of the family models keeps the mixed model's skill: not worse
  #    beyond the noise, and within 0.05 of it
  merge = verdicts["merged family models at least match mixed-data SFT"]
  assert merge["diff_ci"][1] > 0 and merge["diff"] >= -0.05, merge
  # 3. no later stage gives the gain back: each beats the baseline beyond the
  #    noise (win-rate interval above a tie) by at least 0.25 in mean score
  for s in rep["stages"]:
    if s != "sft_single":
      assert v[s] >= v["sft_single"] + 0.25, (s, v)
      assert rows[s]["all"]["ci"][0] > 0.55, (s, rows[s]["all"])
