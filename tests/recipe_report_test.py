"""The pipeline report: verdicts from the scores, paired intervals, the table."""

import json

import pytest

from aya_jax.recipe import report as recipe_report


def _result(verifier_a, win):
  row = dict(n=4, win_rate=win, ci=[win - 0.1, win + 0.1], wins=1, ties=2, losses=1,
             verifier_a=verifier_a, verifier_b=0.3)
  return {"per_language": {"en": row, "all": row}}


def test_report_verdicts_are_computed_from_the_scores(tmp_path):
  ev = dict(baseline="sft_single", n_prompts=4, results={
      "sft_single": _result(0.30, 0.5), "sft_mixed": _result(0.40, 0.6),
      "sft_merged": _result(0.395, 0.55), "dpo_merged": _result(0.39, 0.5),
      "online_1": _result(0.45, 0.7), "rloo": _result(0.50, 0.72)})
  # per-prompt verifier scores with the same means: mixed - single is +0.1 on every prompt
  # (interval [0.1, 0.1], beyond the noise); merged - mixed is +0.195 / -0.205 alternately
  # (mean -0.005, an interval around 0: within the noise)
  per_prompt = {s: dict(verifier_a=[r["per_language"]["all"]["verifier_a"]] * 4, outcome=[0.5] * 4)
                for s, r in ev["results"].items()}
  per_prompt["sft_merged"]["verifier_a"] = [0.595, 0.195, 0.595, 0.195]
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "per_prompt.json").write_text(json.dumps(per_prompt))
  ev["per_prompt"] = "eval/per_prompt.json"
  rep = recipe_report.write(str(tmp_path), ev, dict(seed=0, wall_seconds=1.0))
  paired = {v["a"]: v for v in rep["verdicts"]}
  assert paired["sft_mixed"]["diff"] == pytest.approx(0.1)
  assert paired["sft_mixed"]["diff_ci"] == pytest.approx([0.1, 0.1])
  assert paired["sft_mixed"]["beyond_noise"] is True
  lo, hi = paired["sft_merged"]["diff_ci"]
  assert paired["sft_merged"]["diff"] == pytest.approx(-0.005) and lo < 0 < hi
  assert paired["sft_merged"]["beyond_noise"] is False
  md = open(tmp_path / "report.md").read()
  assert "difference +0.100, paired 95% interval [+0.100, +0.100]: larger than the noise" in md
  assert "difference -0.005" in md and "within the noise" in md
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
