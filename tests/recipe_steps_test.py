"""Pipeline steps: what a step refuses before it trains; how online rounds chain."""

import os

import pytest

from aya_jax import checkpoint, config_files
from aya_jax.models import tiny
from aya_jax.recipe import inputs as recipe_inputs
from aya_jax.recipe import steps as recipe_steps
from conftest import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant="smoke"):
  return config_files.load_module(os.path.join(ROOT, "configs/pipeline.py")).get_config(variant)


def test_dpo_without_pairs_blames_min_gap(tmp_path):
  # no pairs at all is recorded as "" and blamed on min_gap, with no path to mislead
  with pytest.raises(ValueError, match=r"^arbitrage kept no best/worst pair \(every score gap "
                                       r"below config\.arbitrage\.routing\.min_gap"):
    recipe_steps.run_dpo(_config(), str(tmp_path / "dpo"), "tok", "init", dict(pairs=""), ["en"])


def test_pipeline_online_rounds_are_one_online_run(tmp_path, monkeypatch):
  """run_online: one call of the online stage, every round from the stage's start as
  the fixed reference, per family when online.per_family; the rounds' params in order."""
  seen = []

  def fake_run(stage_config, workdir, scorer=None):
    seen.append(stage_config)
    for i in range(stage_config.online.iterations):
      cfg = tiny("llama")
      checkpoint.save_params(os.path.join(workdir, f"iter_{i}", "params"), cfg,
                             random_params(cfg))

  monkeypatch.setattr(recipe_steps.online, "run", fake_run)
  monkeypatch.setattr(recipe_steps, "scorer", lambda *a, **k: object())  # online.run is faked
  monkeypatch.setattr(recipe_steps, "filter_languages", lambda path, out, langs, *a: path)
  c = _config()
  c.online.online.iterations, c.online.per_family, c.online.online.betas = 3, True, (0.25,)
  c.online.dpo.rpo_alpha = 0.75
  inputs = recipe_inputs.Inputs(tokenizer="tok", base="", teachers={},
                                families={"eu": ("en", "fr"), "sl": ("en", "ru")},
                                languages=("en", "fr", "ru"))
  out = recipe_steps.run_online(c, str(tmp_path), inputs, "start/params", {},
                                {"sft": "sft.jsonl"}, ("en", "fr", "ru"), "rloo")
  assert out["rounds"] == [str(tmp_path / f"iter_{i}" / "params") for i in range(3)]
  (stage_config,) = seen
  assert stage_config.model.init == stage_config.dpo.reference_init == "start/params"
  assert stage_config.online.iterations == 3 and stage_config.online.algorithm == "rloo"
  assert tuple(stage_config.online.betas) == (0.25,) and stage_config.dpo.rpo_alpha == 0.75
  assert stage_config.online.families == "eu:en,fr;sl:en,ru"
  assert tuple(stage_config.data.prompts) == ("sft.jsonl",)


def test_the_pipelines_merge_streams_the_mean_of_its_inputs(tmp_path, monkeypatch):
  """The family models' merge: the mean of the inputs' tensors (by hand), read tensor by
  tensor (no input is ever loaded whole)."""
  import jax
  import numpy as np
  cfg = tiny("llama")
  trees = [random_params(cfg, seed) for seed in (1, 2, 3)]
  dirs = [checkpoint.save_params(str(tmp_path / f"m{i}" / "params"), cfg, t)
          for i, t in enumerate(trees)]
  monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded whole"))
  out = recipe_steps.merge(str(tmp_path / "merged"), dirs)
  monkeypatch.undo()
  got_cfg, got = checkpoint.load_params(out)
  assert got_cfg == cfg
  for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]:
    parts = [jax.tree_util.tree_flatten_with_path(t)[0] for t in trees]
    want = sum(np.asarray(dict(p)[path], np.float64) for p in parts) / 3
    np.testing.assert_allclose(np.asarray(leaf), want, rtol=1e-6, atol=1e-7)
