"""aya_jax.main: the stage registry and when jax.distributed is initialised."""

import importlib

import ml_collections
import pytest

from aya_jax import main


def test_every_registered_stage_module_has_run():
  for stage, module in main.STAGES.items():
    assert callable(getattr(importlib.import_module(module), "run", None)), stage


def test_unknown_stage_names_the_known_ones(tmp_path):
  c = ml_collections.ConfigDict(dict(stage="sft_lora"))
  with pytest.raises(ValueError, match=r"config.stage='sft_lora' is not a stage; known: .*'dpo'"):
    main.run_stage(c, str(tmp_path))


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "host0"}, False),  # a single-host slice
    ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),
])
def test_distributed_is_initialised_only_for_several_processes(monkeypatch, env, expected):
  import jax
  for key in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS",
              "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert main.maybe_initialize_distributed(ml_collections.ConfigDict()) is expected
  assert calls == ([{}] if expected else [])


def test_explicit_distributed_block_is_passed_through(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  c = ml_collections.ConfigDict(dict(distributed=dict(
      coordinator_address="127.0.0.1:5555", num_processes=2, process_id=1)))
  assert main.maybe_initialize_distributed(c)
  assert calls == [dict(coordinator_address="127.0.0.1:5555", num_processes=2, process_id=1)]
