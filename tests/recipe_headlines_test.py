"""The pipeline steps' headline figures, read from the files a step leaves."""

import json

from aya_jax.recipe import headlines


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_final_loss_is_the_last_logged_loss(tmp_path):
  _jsonl(tmp_path / "metrics.jsonl", [{"step": 5, "loss": 1.5}, {"step": 10, "loss": 0.07093}])
  assert headlines.final_loss(str(tmp_path)) == "loss 0.07093"
  assert headlines.final_loss(str(tmp_path / "missing")) == ""


def test_reward_model_accuracy_and_loss(tmp_path):
  (tmp_path / "reward_eval.json").write_text(json.dumps(
      {"valid": {"all": {"n": 824, "accuracy": 0.866504854368932}}}))
  _jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.25}])
  assert headlines.reward_model(str(tmp_path)) == "valid accuracy 0.867, loss 0.25"


def test_arbitrage_routing(tmp_path):
  (tmp_path / "report.json").write_text(json.dumps(
      {"n_prompts": 1400, "n_sft": 1390, "n_pairs": 1363}))
  assert headlines.arbitrage(str(tmp_path)) == "1390 of 1400 prompts routed, 1363 pairs"
  (tmp_path / "report.json").write_text("{not json")
  assert headlines.arbitrage(str(tmp_path)) == ""


def test_online_reward_at_the_start_and_after_the_last_iteration(tmp_path):
  _jsonl(tmp_path / "report.jsonl", [{"round": 0, "mean_score": 2.51},
                                     {"round": 1, "mean_score": 2.7},
                                     {"round": 2, "mean_score": 2.837}])
  assert headlines.online(str(tmp_path)) == "mean reward 2.51 -> 2.84 after 2 iterations"


def test_world_teachers_on_their_own_languages(tmp_path):
  (tmp_path / "world_report.json").write_text(json.dumps({"families": {
      "european": {"own": 0.5417, "other": 0.01}, "asian_semitic": {"own": 0.5833}}}))
  assert headlines.world(str(tmp_path)) == \
      "teachers score 0.54-0.58 on their own languages (verifier)"


def test_evaluation_names_the_best_stage_but_not_the_baseline():
  def result(rate):
    return {"per_language": {"fr": {"win_rate": 0.0}, "all": {"win_rate": rate}}}
  outputs = {"baseline": "sft_single", "results": {
      "sft_single": result(0.5), "sft_mixed": result(0.58), "online_2": result(0.59)}}
  assert headlines.evaluation(outputs) == "best online_2: win rate 0.59 vs sft_single"
  assert headlines.evaluation({"results": {}}) == ""


def test_the_loss_of_the_last_training_row_not_of_an_eval_row(tmp_path):
  _jsonl(tmp_path / "metrics.jsonl", [{"step": 10, "loss": 0.5}, {"step": 10, "eval_accuracy": 0.9}])
  assert headlines.final_loss(str(tmp_path)) == "loss 0.5"
