"""aya_jax.checkpoint on damaged or mismatched inputs: a truncated or corrupt model never
trains, evaluates or merges; each failure is one clear error naming what is wrong.

References: the params each directory was written from (a damaged one must not load as
anything), and the shapes of the model each checkpoint was written for."""

import glob
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from conftest import random_params

from aya_jax import axes, checkpoint, config_files, sharding
from aya_jax.merging import stream as merge_stream
from aya_jax.models import config as config_lib
from aya_jax.models import hf
from aya_jax.train import common
from aya_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_all(reader):
  for path in reader.leaves:
    n = reader.shape(path)[0] if path.startswith("layers/") else None
    for layer in (range(n) if n else [None]):
      reader.read(path, layer)


@pytest.fixture(scope="module")
def llama():
  cfg = config_lib.tiny("llama", vocab_size=97)
  return cfg, random_params(cfg, 1)


# --- Hugging Face directories (issue 16 item 3) ------------------------------------------
@pytest.mark.parametrize("keep", [0.5, "all but 4 bytes"])
def test_truncated_hf_safetensors_never_loads_nor_merges(llama, tmp_path, keep):
  cfg, params = llama
  good, bad = tmp_path / "good", tmp_path / "bad"
  hf.save(cfg, params, good)
  shutil.copytree(good, bad)
  file = str(bad / hf.SINGLE_FILE)
  size = os.path.getsize(file)
  with open(file, "r+b") as f:
    f.truncate(int(size * keep) if isinstance(keep, float) else size - 4)
  match = rf"tensor '[\w.]+' in {file}: .*past the end.*truncated"
  with pytest.raises(ValueError, match=match):
    checkpoint.load_model(str(bad))
  with pytest.raises(ValueError, match=match):
    checkpoint.open_reader(str(bad))
  with pytest.raises(ValueError, match=match):
    merge_stream.merge_checkpoints([str(good), str(bad)], "linear", None, str(tmp_path / "m"))
  assert not os.path.exists(tmp_path / "m" / checkpoint.MODEL_CONFIG)
  # the intact copy loads as what was saved
  _, back = checkpoint.load_model(str(good))
  jax.tree.map(np.testing.assert_array_equal, back, params)


# --- params/ directories -----------------------------------------------------------------
def _biggest_array_file(params_dir):
  files = [f for f in glob.glob(os.path.join(params_dir, "arrays", "**", "*"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_params_dir_is_one_clear_error(llama, tmp_path, damage):
  cfg, params = llama
  path = checkpoint.save_params(str(tmp_path / "params"), cfg, params)
  victim = _biggest_array_file(path)
  if damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 3)
  else:
    os.remove(victim)
  match = f"params/ directory {path} cannot be read"
  with pytest.raises(ValueError, match=match) as e:
    checkpoint.load_model(path)
  assert e.value.__cause__ is not None and len(str(e.value)) < 1000
  with pytest.raises(ValueError, match=rf"params [\w/]+ of {path} cannot be read") as e:
    _read_all(checkpoint.open_reader(path))
  assert e.value.__cause__ is not None and len(str(e.value)) < 1000


def test_merged_params_dir_with_a_missing_chunk_does_not_read_as_zeros(llama, tmp_path):
  cfg, params = llama
  hf.save(cfg, params, tmp_path / "a")
  out = merge_stream.merge_checkpoints([str(tmp_path / "a"), str(tmp_path / "a")], "linear",
                                       None, str(tmp_path / "merged"),
                                       model_merge_parameters=[{"weight": 0.5}, {"weight": 0.5}])
  _, merged = checkpoint.load_model(out)  # intact, it is the model merged with itself
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  chunk = os.path.join(out, "arrays", "layers.mlp.up.kernel", "1.0.0")
  assert os.path.isfile(chunk)  # merges write plain zarr: one file per layer chunk
  os.remove(chunk)
  with pytest.raises(ValueError, match=f"params layers/mlp/up/kernel of {out} cannot be read"):
    checkpoint.open_reader(out).read("layers/mlp/up/kernel", 1)
  with pytest.raises(ValueError, match=f"params/ directory {out} cannot be read"):
    checkpoint.load_model(out)


# --- a reward model given as a language model's init -------------------------------------
@pytest.mark.parametrize("kind", ["params", "hf"])
def test_reward_model_cannot_initialise_a_language_model(tmp_path, kind):
  cfg = config_lib.tiny("llama", vocab_size=97, value_head=True)
  params = random_params(cfg, 2)
  assert "value_head" in params and "lm_head" not in params
  path = str(tmp_path / "rm")
  if kind == "params":
    checkpoint.save_params(path, cfg, params)
  else:
    hf.save(cfg, params, path)
  match = f"checkpoint at {path} is a reward model \\(a value head, no LM head\\)"
  with pytest.raises(ValueError, match=match):
    checkpoint.load_model(path, language_model=True)
  c = config_files.load_module(os.path.join(ROOT, "configs/sft.py")).get_config()
  c.model.init = path
  mesh = sharding.make_mesh((2, 4, 1))
  with pytest.raises(ValueError, match=match):
    common.setup_model(c.model, 97, mesh, axes.rules("fsdp"), 0)
  # scoring with it (no language_model) still loads it
  loaded_cfg, loaded = checkpoint.load_model(path)
  assert loaded_cfg.value_head
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# --- a workdir holding another model's checkpoints ---------------------------------------
def _state(d_model):
  cfg = config_lib.tiny("llama", vocab_size=97, d_model=d_model)
  return state_lib.create_state(random_params(cfg, 0), optax.adamw(1e-3))


def test_workdir_with_another_models_checkpoints(tmp_path):
  workdir = str(tmp_path / "work")
  ckpt = checkpoint.Checkpointer(workdir)
  saved = _state(48)
  ckpt.save(3, saved, {"pos": 7})
  ckpt.close()
  ckpt = checkpoint.Checkpointer(workdir)  # a new run in the same workdir
  try:
    state, data = ckpt.restore(_state(48))  # the same model resumes exactly
    jax.tree.map(np.testing.assert_array_equal, state, saved)
    assert data == {"pos": 7}
    where = os.path.join(workdir, "checkpoints", "3")
    with pytest.raises(ValueError, match=(
        f"{where} holds a checkpoint of a different model: params/embedder/embedding is "
        r"\(97, 48\) there but \(97, 64\) in this run .*fresh workdir")):
      ckpt.restore(_state(64))
  finally:
    ckpt.close()
