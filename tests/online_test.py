"""Online iterative DPO and RLOO: a scorer that prefers answers containing
'red' makes a policy that says 'red' or 'cat' (50/50 after SFT) say 'red'
more often, round after round; per-iteration artefacts; resume."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from aya_jax.data import formatting, records
from aya_jax.train import online, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 16


class LikesRed:
  """A Scorer: 1 for answers containing 'red', else 0."""

  def score(self, recs):
    return np.asarray([float("red" in r.completion) for r in recs], np.float32)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
  d = tmp_path_factory.mktemp("online")
  rows = []
  for i in range(N):
    for j, ans in enumerate(("red", "cat")):
      rows.append({"id": f"p{i}_{j}", "language": "en" if i % 2 else "fr", "messages": [
          {"role": "user", "content": f"name a thing number {i}"},
          {"role": "assistant", "content": ans}]})
  (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
  formatting.train_tokenizer([f"name a thing number {i}" for i in range(N)] + ["red", "cat"] * 8,
                             str(d / "tok"), vocab_size=300)
  c = sft.default_config()
  c.tokenizer, c.data.train = str(d / "tok"), (str(d / "sft.jsonl"),)
  c.data.seq_len, c.data.batch_size, c.data.pack = 32, 8, False
  c.optim.lr, c.optim.warmup_steps, c.optim.total_steps = 1e-2, 3, 40
  c.loop.num_steps, c.loop.log_every, c.loop.checkpoint_every = 40, 10, 100
  c.mesh.shape = (8, 1, 1)
  sft.run(c, str(d / "sft"))
  return d


def _config(d, algorithm):
  spec = importlib.util.spec_from_file_location("online_cfg",
                                                os.path.join(ROOT, "configs/online_dpo.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.tokenizer, c.model.init = str(d / "tok"), str(d / "sft" / "params")
  c.data.prompts = (str(d / "prompts.jsonl"),)
  c.data.seq_len, c.data.batch_size = 32, 8
  c.online.algorithm, c.online.iterations, c.online.k = algorithm, 2, 4
  c.online.max_new_tokens, c.online.sample_batch = 6, 16
  c.online.betas = (0.5,)
  c.optim.lr, c.optim.warmup_steps, c.optim.total_steps = 2e-3, 1, 8
  c.dpo.rpo_alpha = 1.0  # keeps the chosen answers (and their end of turn) likely
  c.loop.num_steps, c.loop.log_every, c.loop.checkpoint_every = 8, 4, 100
  c.mesh.shape = (8, 1, 1)
  return c


@pytest.mark.parametrize("algorithm", ["dpo", "rloo"])
def test_online_rounds_raise_the_preferred_property(sft_model, tmp_path, algorithm):
  c = _config(sft_model, algorithm)
  _, reports = online.run(c, str(tmp_path), scorer=LikesRed())
  scores = [r["mean_score"] for r in reports]
  print(algorithm, [{k: round(v, 3) for k, v in r.items()} for r in reports])
  assert 0.2 < scores[0] < 0.8  # the SFT policy says red about half the time
  assert scores[-1] > scores[0] + 0.2
  assert reports[1]["win_rate_vs_prev"] > 0.5
  for key in ("mean_length", "frac_no_stop", "mean_score/en", "win_rate_vs_prev/fr"):
    assert key in reports[-1]
  assert (tmp_path / "iter_0" / "samples.jsonl").exists()
  assert (tmp_path / "iter_1" / "params" / "model_config.json").exists()
  if algorithm == "dpo":
    pairs = records.read_jsonl(tmp_path / "iter_0" / "pairs.jsonl", "preference")
    assert all("red" in p.chosen and "red" not in p.rejected for p in pairs)
  # a second run finds every iteration done: same final report, no training
  _, again = online.run(c, str(tmp_path), scorer=LikesRed())
  assert again[-1]["mean_score"] == pytest.approx(reports[-1]["mean_score"])


def test_best_worst_pairs_and_report_by_hand():
  prompts = [("a", "en", ({"role": "user", "content": "q"},)),
             ("b", "fr", ({"role": "user", "content": "q"},))]
  texts = ["x", "y", "z", "u", "v", "w"]
  scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3]], np.float32)
  pairs = online.best_worst_pairs(prompts, texts, scores, 0.0, "t")
  assert len(pairs) == 1 and pairs[0].chosen == "y" and pairs[0].rejected == "x"  # b: a tie
  rep = online.round_report(prompts, scores, np.array([2, 4, 6, 1, 1, 1]),
                            np.array([1, 1, 0, 1, 1, 1], bool), np.zeros_like(scores) + 0.3)
  assert rep["mean_length"] == pytest.approx(15 / 6)
  assert rep["frac_no_stop"] == pytest.approx(1 / 6)
  assert rep["win_rate_vs_prev/fr"] == 0.5 and rep["win_rate_vs_prev/en"] == pytest.approx(2 / 3)
