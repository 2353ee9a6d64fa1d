"""The pipeline's blocks are the stages' own configs: same field names from
configs/ to the stage, the owned fields set by the pipeline, nothing else."""

import os

import ml_collections
import pytest

from aya_jax import config_files
from aya_jax.arbitrage import stage as arbitrage
from aya_jax.recipe import blocks
from aya_jax.train import dpo, online, reward_model, sft
from aya_jax.world import evaluate

PIPELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "pipeline.py")
STAGES = {"reward_model": reward_model, "sft": sft, "sft_family": sft, "dpo": dpo,
          "online": online, "arbitrage": arbitrage, "eval": evaluate}
EXTRAS = {"reward_model": {"samples"}, "sft_family": {"warm_start"}, "online": {"per_family", "reward"},
          "arbitrage": {"baseline_teacher"}}


def _paths(c, prefix=""):
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _paths(value, f"{prefix}{key}.")
    else:
      yield prefix + key


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_block_is_its_stage_config_less_what_the_pipeline_sets(name):
  c = config_files.get_config(PIPELINE)
  stage = set(_paths(STAGES[name].default_config()))
  mine = {p for p in _paths(c[name]) if p.split(".")[0] not in EXTRAS.get(name, ())}
  assert mine <= stage, sorted(mine - stage)  # every field is the stage's, same name
  missing = stage - mine  # what the pipeline sets itself (its seed, tokenizer, ...)
  assert missing and not [p for p in missing if p.startswith(("optim.", "loop.", "dpo.beta",
                                                              "sampling.", "routing.min_gap"))]
  assert set(c[name]) >= EXTRAS.get(name, set())


def test_a_training_block_schedule_and_the_decay_horizon_follows_the_steps():
  c = blocks.training_block(sft.default_config(), 300, 2e-3, 16, 96, warm_start="mixed")
  assert (c.loop.num_steps, c.optim.total_steps, c.optim.warmup_steps, c.loop.log_every,
          c.loop.checkpoint_every) == (300, 300, 20, 60, 150)
  assert (c.optim.lr, c.data.batch_size, c.data.seq_len, c.warm_start) == (2e-3, 16, 96, "mixed")
  assert "tokenizer" not in c and "train" not in c.data and "mesh" not in c
  c.loop.num_steps = 40  # a sweep from the command line
  assert c.optim.total_steps == 40
  blocks.reschedule(c, 6, lr=1e-3)
  assert (c.loop.num_steps, c.optim.total_steps, c.optim.warmup_steps, c.loop.log_every,
          c.loop.checkpoint_every, c.optim.lr) == (6, 6, 0, 1, 3, 1e-3)


def test_the_stage_gets_the_block_fields_under_their_names_and_the_owned_ones():
  c = config_files.get_config(PIPELINE)
  c.dpo.dpo.beta, c.dpo.dpo.loss_type, c.dpo.optim.weight_decay = 0.37, "ipo", 0.01
  c.seed, c.mesh.shape, c.model.remat = 5, (1, 2, 1), "full"
  stage = blocks.training_stage(dpo.default_config(), c.dpo, "dpo", c, "tok", "start")
  assert (stage.dpo.beta, stage.dpo.loss_type, stage.optim.weight_decay) == (0.37, "ipo", 0.01)
  assert (stage.seed, stage.tokenizer, stage.model.init, tuple(stage.mesh.shape),
          stage.model.remat, stage.stage) == (5, "tok", "start", (1, 2, 1), "full", "dpo")
  assert stage.loop.num_steps == stage.optim.total_steps == 60


def test_a_field_the_stage_lacks_is_named():
  c = config_files.get_config(PIPELINE)
  c.dpo.dpo.betta = 0.1
  with pytest.raises(ValueError, match=r"config\.dpo\.dpo\.betta: not a field of the stage"):
    blocks.training_stage(dpo.default_config(), c.dpo, "dpo", c, "tok", "start")
  c = config_files.get_config(PIPELINE)
  c.model.init = "x"
  with pytest.raises(ValueError, match=r"config\.model\.init: not a setting"):
    blocks.training_stage(dpo.default_config(), c.dpo, "dpo", c, "tok", "start")


def test_the_pipeline_lora_block_reaches_every_training_step_unless_its_own_is_set():
  c = config_files.get_config(PIPELINE)
  assert c.sft.lora.rank == 0 and c.lora.rank == 0  # full fine-tuning by default
  c.lora.rank, c.lora.alpha, c.lora.targets = 16, 32.0, r".*/(q|v)/kernel"
  c.dpo.lora.rank, c.dpo.lora.alpha = 4, 4.0  # a step's own block wins
  for name, module in (("sft", sft), ("sft_family", sft), ("reward_model", reward_model),
                       ("online", online)):
    stage = blocks.training_stage(module.default_config(), c[name], name, c, "tok", "start",
                                  extras=tuple(EXTRAS.get(name, ())))
    assert (stage.lora.rank, stage.lora.alpha, stage.lora.targets) == (
        16, 32.0, r".*/(q|v)/kernel"), name
  stage = blocks.training_stage(dpo.default_config(), c.dpo, "dpo", c, "tok", "start")
  assert (stage.lora.rank, stage.lora.alpha) == (4, 4.0)
