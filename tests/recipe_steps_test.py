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
                                       r"below config\.arbitrage\.min_gap"):
    recipe_steps.run_dpo(_config(), str(tmp_path / "dpo"), "tok", "init", dict(pairs=""), ["en"])


def test_pipeline_online_rounds_share_one_reference(tmp_path, monkeypatch):
  """run_online: round r starts from round r-1's policy, and every round's reference is
  the policy the online stage started from."""
  seen = []

  def fake_run(oc, sub, scorer=None):
    seen.append((oc.model.init, oc.dpo.reference_init))
    cfg = tiny("llama")
    checkpoint.save_params(os.path.join(sub, "params"), cfg, random_params(cfg))

  monkeypatch.setattr(recipe_steps.online, "run", fake_run)
  monkeypatch.setattr(recipe_steps, "scorer", lambda *a, **k: object())  # online.run is faked
  monkeypatch.setattr(recipe_steps, "filter_languages", lambda path, out, langs, *a: path)
  c = _config()
  c.online.iterations, c.online.per_family = 3, False
  inputs = recipe_inputs.Inputs(tokenizer="tok", base="", teachers={}, families={},
                                languages=("en",))
  out = recipe_steps.run_online(c, str(tmp_path), inputs, "start/params", {},
                                {"sft": "sft.jsonl"}, ("en",), "rloo")
  rounds = [str(tmp_path / f"round_{i}" / "all" / "params") for i in (1, 2, 3)]
  assert out["rounds"] == rounds
  assert seen == [("start/params", "start/params"), (rounds[0], "start/params"),
                  (rounds[1], "start/params")]
