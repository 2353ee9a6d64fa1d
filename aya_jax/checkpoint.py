"""Orbax checkpoints: the train state with its data iterator, and params alone.

Layout (DESIGN.md "Checkpoints"):
  workdir/checkpoints/<step>/state   the TrainState (params, opt state, step)
  workdir/checkpoints/<step>/data    the data iterator state (JSON)
  workdir/params/model_config.json   the ModelConfig of the params
  workdir/params/arrays/             the params tree (Orbax), nothing else

`params/` is the unit that teachers, merging and evaluation consume;
`load_model(path)` reads it or a Hugging Face directory alike.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from aya_jax.models.config import ModelConfig

MODEL_CONFIG = "model_config.json"


def _abstract(tree, shardings=None):
  if shardings is None:
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Periodic train-state checkpoints under workdir/checkpoints (host-coordinated)."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: Optional[dict] = None):
    args = dict(state=ocp.args.StandardSave(state))
    args["data"] = ocp.args.JsonSave(data_state if data_state is not None else {})
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    self.manager.wait_until_finished()
    logging.info("saved checkpoint %s/%d", self.directory, step)

  def restore(self, target_state, step: Optional[int] = None):
    """(state, data_state) of `step` (default latest), in target_state's shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target_state)), data=ocp.args.JsonRestore()))
    logging.info("restored checkpoint %s/%d", self.directory, step)
    return restored.state, restored.data

  def close(self):
    self.manager.close()


PARAMS_CHUNK_BYTES = 32 << 20


def _params_save_args(params):
  """One Orbax chunk per layer of a stacked 'layers/...' leaf, and chunks of at most
  PARAMS_CHUNK_BYTES (split along the largest axis: the vocab) of the other big leaves, so
  that merging streams a params/ dir a layer (a block) at a time."""

  def args(kp, x):
    top = str(getattr(kp[0], "key", kp[0])) if kp else ""
    if top == "layers" and np.ndim(x) >= 1:
      return ocp.SaveArgs(shard_axes=(0,))
    if np.size(x) * np.dtype(x.dtype).itemsize > PARAMS_CHUNK_BYTES:
      return ocp.SaveArgs(chunk_byte_size=PARAMS_CHUNK_BYTES)
    return ocp.SaveArgs()

  return jax.tree_util.tree_map_with_path(args, params)


def save_params(path: str, cfg: ModelConfig, params) -> str:
  """Writes params/ (model config + Orbax arrays); replaces an existing one."""
  path = os.path.abspath(path)
  arrays = os.path.join(path, "arrays")
  os.makedirs(path, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(arrays, params, save_args=_params_save_args(params), force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, MODEL_CONFIG), "w") as f:
      json.dump(cfg.to_dict(), f, indent=1)
  return path


def is_params_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, MODEL_CONFIG))


def load_params(path: str, shardings=None):
  """(ModelConfig, params) from a params/ directory; optional target shardings."""
  cfg_path = os.path.join(path, MODEL_CONFIG)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path} is not an aya_jax params/ directory: {cfg_path} missing")
  with open(cfg_path) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  checkpointer = ocp.StandardCheckpointer()
  arrays = os.path.join(os.path.abspath(path), "arrays")
  meta = checkpointer.metadata(arrays)
  tree = _as_dict(getattr(meta, "item_metadata", meta))
  if shardings is None:  # one device, whatever mesh saved it
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, tree)
  target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                        tree, shardings)
  params = checkpointer.restore(arrays, target)
  return cfg, _as_dict(params)


def _as_dict(tree) -> Any:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def peek_config(path: str) -> ModelConfig:
  """The ModelConfig of a params/ dir or an HF dir, without reading arrays."""
  if is_params_dir(path):
    with open(os.path.join(path, MODEL_CONFIG)) as f:
      return ModelConfig.from_dict(json.load(f))
  if os.path.exists(os.path.join(path, "config.json")):
    from aya_jax.models import hf
    with open(os.path.join(path, "config.json")) as f:
      return hf.config_from_hf(json.load(f))
  raise FileNotFoundError(
      f"{path}: neither an aya_jax params/ directory ({MODEL_CONFIG}) nor a Hugging Face "
      "directory (config.json)")


def load_model(path: str, shardings=None):
  """(ModelConfig, params) from an aya_jax params/ dir or a Hugging Face dir."""
  if is_params_dir(path):
    return load_params(path, shardings)
  if os.path.exists(os.path.join(path, "config.json")):
    from aya_jax.models import hf
    return hf.load(path, shardings=shardings)
  raise FileNotFoundError(
      f"{path}: neither an aya_jax params/ directory ({MODEL_CONFIG}) nor a Hugging Face "
      "directory (config.json)")
