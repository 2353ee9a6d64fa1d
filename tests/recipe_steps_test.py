"""Pipeline steps: what a step refuses before it trains."""

import os

import pytest

from aya_jax import config_files
from aya_jax.recipe import steps as recipe_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant="smoke"):
  return config_files.load_module(os.path.join(ROOT, "configs/pipeline.py")).get_config(variant)


def test_dpo_without_pairs_blames_min_gap(tmp_path):
  # no pairs at all is recorded as "" and blamed on min_gap, with no path to mislead
  with pytest.raises(ValueError, match=r"^arbitrage kept no best/worst pair \(every score gap "
                                       r"below config\.arbitrage\.min_gap"):
    recipe_steps.run_dpo(_config(), str(tmp_path / "dpo"), "tok", "init", dict(pairs=""), ["en"])
