"""The 'merge' stage with a weight search: every candidate is scored by what its answers
earn, the best weights are the ones merged, and merge_spec.json records them."""

import json
import os

import jax
import numpy as np
import pytest

from aya_jax import checkpoint, config_files
from aya_jax.data import records
from aya_jax.merging import pytree
from aya_jax.merging import stage as merge_stage
from aya_jax.models import init_params
from aya_jax.world import evaluate as world_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def search_inputs(world_models, tmp_path_factory):
  """Two tiny Llamas as params/ dirs, a random reward model, six world prompts."""
  d = tmp_path_factory.mktemp("merge_search")
  cfg = world_models["cfg"]
  models = [checkpoint.save_params(str(d / name), cfg, init_params(cfg, jax.random.key(seed)))
            for name, seed in (("m0", 11), ("m1", 12))]
  rm_cfg = cfg.replace(value_head=True)
  rm = checkpoint.save_params(str(d / "rm"), rm_cfg, init_params(rm_cfg, jax.random.key(13)))
  prompts = world_evaluate.world_prompts("valid", 2, ("en", "fr", "ru"))
  records.write_jsonl(str(d / "prompts.jsonl"), prompts)
  return dict(models=models, rm=rm, prompts=str(d / "prompts.jsonl"), tok=world_models["tok"])


def _config(inputs, budget):
  c = config_files.load_module(os.path.join(ROOT, "configs/merge.py")).get_config()
  c.merge.models = tuple(inputs["models"])
  s = c.merge.search
  s.budget, s.optimizer, s.prompts, s.tokenizer = budget, "random", inputs["prompts"], inputs["tok"]
  s.scorer, s.scorer_tokenizer, s.max_new_tokens = inputs["rm"], inputs["tok"], 6
  return c


@pytest.mark.slow
def test_search_merges_the_best_candidate_and_records_it(search_inputs, tmp_path):
  c = _config(search_inputs, budget=5)
  out = merge_stage.run(c, str(tmp_path))
  log = [json.loads(line) for line in open(tmp_path / "search.jsonl")]
  assert len(log) == 5
  best = max(log, key=lambda e: e["score"])
  recorded = json.load(open(tmp_path / "merge_spec.json"))
  assert recorded["search"]["weights"] == best["weights"]
  assert recorded["search"]["score"] == best["score"] and recorded["search"]["n_prompts"] == 6
  assert [m["weight"] for m in recorded["model_parameters"]] == best["weights"]
  # the merged params are the linear merge with those weights
  trees = [jax.device_get(checkpoint.load_model(p)[1]) for p in search_inputs["models"]]
  want = pytree.merge("linear", trees,
                      model_parameters=[{"weight": w} for w in best["weights"]])
  _, got = checkpoint.load_model(out)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6), got, want)
  # the objective is the mean reward of the answers: the best candidate's score again
  score = merge_stage.answer_score(
      c.merge.search, records.read_prompts(search_inputs["prompts"]), search_inputs["tok"],
      merge_stage._scorer(c.merge.search))  # pylint: disable=protected-access
  assert score(*checkpoint.load_model(out)) == pytest.approx(best["score"], abs=1e-4)


def test_search_needs_prompts_and_a_method_with_weights(search_inputs, tmp_path):
  c = _config(search_inputs, budget=2)
  c.merge.search.prompts = ""
  with pytest.raises(ValueError, match="config.merge.search.prompts is empty"):
    merge_stage.run(c, str(tmp_path))
  c = _config(search_inputs, budget=2)
  c.merge.method, c.merge.base = "slerp", search_inputs["models"][0]
  c.merge.models = (search_inputs["models"][1],)
  with pytest.raises(ValueError, match="needs at least 2 models"):
    merge_stage.run(c, str(tmp_path))
