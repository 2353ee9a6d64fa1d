"""What the training stages share: the config blocks, the model loaded or initialised on
a mesh with the model block's execution fields, the trainer, the final params."""

import jax
import numpy as np
import pytest

from aya_jax import axes, checkpoint, sharding
from aya_jax.models import tiny
from aya_jax.train import common, sft
from conftest import random_params


def test_base_config_has_the_shared_blocks_and_the_stage():
  c = common.base_config("dpo")
  assert c.stage == "dpo"
  assert set(c.keys()) >= {"model", "optim", "loop", "mesh", "distributed", "tokenizer",
                           "export_hf", "seed"}
  assert c.mesh.rules == sharding.mesh_block().rules
  c.model.dtype, c.model.remat, c.model.attention_chunk = "bfloat16", "full", 64
  assert common.execution(c.model) == dict(dtype="bfloat16", remat="full", attention_chunk=64)


def test_setup_model_loads_a_checkpoint_with_the_blocks_execution_fields(tmp_path):
  cfg = tiny("llama", vocab_size=97)
  params = random_params(cfg, 1)
  checkpoint.save_params(str(tmp_path / "p"), cfg, params)
  mesh = sharding.make_mesh((1, 8, 1))
  block = common.model_block()
  block.init, block.remat = str(tmp_path / "p"), "full"
  got_cfg, got = common.setup_model(block, 97, mesh, axes.rules("fsdp"), seed=0)
  assert got_cfg == cfg.replace(remat="full")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, params)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(got))
  with pytest.raises(ValueError, match="has vocab 97 but the tokenizer has 120 tokens"):
    common.setup_model(block, 120, mesh, axes.rules("fsdp"), seed=0)
  # no init: the preset, random, sized to the tokenizer; the same seed, the same params
  block.init, block.preset = "", "tiny_qwen2"
  cfg_a, a = common.setup_model(block, 101, mesh, axes.rules("fsdp"), seed=3)
  _, b = common.setup_model(block, 101, mesh, axes.rules("fsdp"), seed=3)
  assert cfg_a.family == "qwen2" and cfg_a.vocab_size == 101 and cfg_a.remat == "full"
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_finish_writes_params_and_optionally_an_hf_directory(tmp_path):
  """params/ exactly; hf/ streamed from params/, bf16 by default (each weight rounded to
  bf16, as ml_dtypes rounds it), float32 on request (exactly)."""
  import ml_dtypes
  from aya_jax.models import hf
  cfg = tiny("llama")
  params = random_params(cfg, 2)
  common.finish(str(tmp_path / "w"), cfg, params, export_hf=True)
  loaded_cfg, loaded = checkpoint.load_model(str(tmp_path / "w" / "params"))
  assert loaded_cfg == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)
  reader = hf.Reader(str(tmp_path / "w" / "hf"))
  assert {str(reader.dtype(p)) for p in reader.leaves} == {"bfloat16"}
  _, from_hf = checkpoint.load_model(str(tmp_path / "w" / "hf"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b).astype(ml_dtypes.bfloat16).astype(np.float32)),
      from_hf, params)
  common.finish(str(tmp_path / "f"), cfg, params, export_hf=True, export_dtype="float32")
  _, from_hf = checkpoint.load_model(str(tmp_path / "f" / "hf"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), from_hf, params)
  with pytest.raises(ValueError, match="export_hf_dtype='fp8'"):
    common.finish(str(tmp_path / "x"), cfg, params, export_hf=True, export_dtype="fp8")


def test_set_schedule_maps_a_small_block_onto_the_stage_fields():
  c = common.set_schedule(sft.default_config(), 120, 3e-4, 16, 96, warmup_steps=12,
                          log_every=24, checkpoint_every=60)
  assert (c.data.batch_size, c.data.seq_len) == (16, 96)
  assert (c.loop.num_steps, c.optim.total_steps, c.optim.lr) == (120, 120, 3e-4)
  assert (c.optim.warmup_steps, c.loop.log_every, c.loop.checkpoint_every) == (12, 24, 60)
