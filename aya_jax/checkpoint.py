"""Orbax checkpoints: the train state with its data iterator, and params alone.

Layout (DESIGN.md "Checkpoints"):
  workdir/checkpoints/<step>/state   the TrainState (params, opt state, step)
  workdir/checkpoints/<step>/data    the data iterator state (JSON)
  workdir/params/model_config.json   the ModelConfig of the params
  workdir/params/arrays/             the params tree (Orbax), nothing else

`params/` is the unit that teachers, merging and evaluation consume;
`load_model(path)` reads it or a Hugging Face directory alike, `open_reader(path)` one
tensor (layer, block) at a time, and `ParamsWriter` writes one that way.

Damaged or mismatched inputs fail as one ValueError naming the directory (Orbax's and
tensorstore's error kept as the cause): a params/ dir with a missing or truncated array file
(a missing chunk never reads as zeros), a train-state checkpoint of another model (paths
or shapes differ from the run's), a reward model given where a language model is loaded
(`load_model(..., language_model=True)`). HF directories are checked in models/hf.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from aya_jax.data import atomic
from aya_jax.models.config import ModelConfig
from aya_jax.params_stream import MODEL_CONFIG, ParamsReader, unreadable



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
    where = os.path.join(self.directory, str(step))
    _check_same_model(where, os.path.join(where, "state"), target_state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target_state)), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise unreadable(where, "checkpoint", e) from e
    logging.info("restored checkpoint %s/%d", self.directory, step)
    return restored.state, restored.data

  def close(self):
    self.manager.close()


def _path_shapes(tree) -> dict:
  """'a/0/b' -> shape of every array leaf (attribute, key and index paths alike)."""
  def key(k):
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {"/".join(key(k) for k in kp): tuple(x.shape)
          for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


def _check_same_model(where, state_dir, target):
  """Refuses a checkpoint whose arrays (paths, shapes) are not those of `target`."""
  handler = ocp.StandardCheckpointHandler()
  try:
    have = _path_shapes(handler.metadata(epath.Path(state_dir)))
  except Exception as e:  # noqa: BLE001 -- Orbax raises many kinds; the cause is kept
    raise unreadable(where, "checkpoint", e) from e
  finally:
    handler.close()
  want = _path_shapes(target)
  diff = sorted((p for p in set(have) | set(want) if have.get(p) != want.get(p)),
                key=lambda p: (not p.startswith("params/"), p))
  if diff:
    show = lambda s: "absent" if s is None else str(s)
    raise ValueError(
        f"{where} holds a checkpoint of a different model: {diff[0]} is "
        f"{show(have.get(diff[0]))} there but {show(want.get(diff[0]))} in this run "
        f"({len(diff)} array(s) differ). Train this model in a fresh workdir (or remove "
        f"{os.path.dirname(where)} to start over).")


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
    atomic.write_json(os.path.join(path, MODEL_CONFIG), cfg.to_dict(), indent=1)
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
  try:
    meta = checkpointer.metadata(arrays)
  except Exception as e:  # noqa: BLE001 -- Orbax raises many kinds; the cause is kept
    raise unreadable(path, "params/ directory", e) from e
  tree = _as_dict(getattr(meta, "item_metadata", meta))
  if shardings is None:  # one device, whatever mesh saved it
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, tree)
  target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                        tree, shardings)
  try:
    params = checkpointer.restore(arrays, target)
  except Exception as e:  # noqa: BLE001
    raise unreadable(path, "params/ directory", e) from e
  return cfg, _as_dict(params)


def _as_dict(tree) -> Any:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _kind_of(path: str) -> Optional[str]:
  """'peft' (a PEFT LoRA adapter directory), 'adapters' (a params/ dir of a model with LoRA
  adapters: naming its base, or holding it), 'params', 'hf' (config.json) or 'gguf' (a
  .gguf, or a directory holding one); None for anything else."""
  from aya_jax.models import gguf, peft
  if peft.is_peft_dir(path):
    return "peft"
  if is_params_dir(path):
    return "adapters" if _names_base(path) or peek_lora(path) else "params"
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  return "gguf" if gguf.is_gguf(path) else None


def is_model_dir(path: str) -> bool:
  """An aya_jax params/ directory, a Hugging Face directory (config.json) or a GGUF
  file (or a directory holding one)."""
  return _kind_of(path) is not None


def _kind(path: str) -> str:
  kind = _kind_of(path)
  if kind is not None:
    return kind
  raise FileNotFoundError(
      f"{path}: neither an aya_jax params/ directory ({MODEL_CONFIG}), a Hugging Face "
      "directory (config.json), a PEFT adapter directory nor a GGUF file")


def peek_config(path: str) -> ModelConfig:
  """The ModelConfig of a params/ dir, an HF dir or a GGUF, without reading arrays."""
  kind = _kind(path)
  if kind in ("params", "adapters"):
    with open(os.path.join(path, MODEL_CONFIG)) as f:
      cfg = ModelConfig.from_dict(json.load(f))
    mergeable = cfg.lora is not None and not cfg.lora.experts
    return cfg.replace(lora=None) if mergeable else cfg
  if kind == "peft":
    from aya_jax.models import peft
    return peek_config(peft.base_path(path))
  if kind == "gguf":
    from aya_jax.models import gguf
    return gguf.read_config(path)
  from aya_jax.models import hf_config
  return hf_config.read_config(path)


def load_model(path: str, shardings=None, language_model: bool = False):
  """(ModelConfig, params) from an aya_jax params/ dir, a Hugging Face dir or a GGUF. With
  `language_model`, a reward model (a value head, no LM head) is refused up front. A LoRA
  adapter checkpoint gives the merged model (MoLoRA's: the base with its adapters under
  'lora'); `shardings` are those of `peek_config(path)`'s model."""
  if language_model and peek_config(path).value_head:
    raise ValueError(f"the checkpoint at {path} is a reward model (a value head, no LM head): "
                     "it cannot initialise a language model; give a language model "
                     "(an SFT or base checkpoint)")
  kind = _kind(path)
  if kind == "adapters":
    return _load_adapters(path, shardings)
  if kind == "params":
    return load_params(path, shardings)
  if kind == "peft":
    from aya_jax.models import lora, peft
    cfg, params = load_model(peft.base_path(path), shardings)
    cfg, adapters = peft.read(path, cfg)
    return lora.merge(cfg, {**params, **adapters})
  if kind == "gguf":
    from aya_jax.models import gguf
    return gguf.load(path, shardings=shardings)
  from aya_jax.models import hf
  return hf.load(path, shardings=shardings)


def open_reader(path: str):
  """A per-tensor reader of a params/ dir (ParamsReader) or a HF dir (hf.Reader)."""
  kind = _kind(path)
  if kind == "params":
    return ParamsReader(path)
  if kind == "peft":
    raise ValueError(f"{path} is a PEFT adapter directory: streaming merges read aya_jax "
                     "adapter checkpoints (train with lora.rank > 0) or whole models")
  if kind == "adapters":
    from aya_jax.params_stream import AdapterReader
    own = ParamsReader(path)
    return AdapterReader(open_reader(_checked_base(path)) if _names_base(path) else own, own)
  if kind == "gguf":
    from aya_jax.models import gguf
    return gguf.Reader(path)
  from aya_jax.models import hf
  return hf.Reader(path)


# ---------------------------------------------------------------------------
# LoRA adapter checkpoints: params/ of the trained part, naming the base
# ---------------------------------------------------------------------------
BASE_FILE = "base.json"


def files_sha256(path: str) -> str:
  """sha256 over a model file, or over every file of a model directory (relative path and
  contents, in order): what an adapter checkpoint records of its base. Kept per process
  for files of unchanged size and mtime, so a base loaded again is not read again."""
  path = os.path.abspath(path)
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
  stats = [(f, os.stat(f)) for f in files]
  return _sha256_of(path, tuple((f, st.st_size, st.st_mtime_ns) for f, st in stats))


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, files: tuple) -> str:
  h = hashlib.sha256()
  for f, _, _ in files:
    h.update(os.path.relpath(f, path).encode() + b"\0")
    with open(f, "rb") as fh:
      for block in iter(lambda: fh.read(1 << 24), b""):
        h.update(block)
  return h.hexdigest()


def save_adapters(path: str, cfg: ModelConfig, params, base: str) -> str:
  """params/ of a LoRA model: its trained part (adapters, a value head) and base.json with
  the base's path and content hash (checked when loaded)."""
  from aya_jax.models import lora
  trainable, _ = lora.split(params)
  base = os.path.abspath(base)
  digest = files_sha256(base)
  out = save_params(path, cfg, trainable)
  if jax.process_index() == 0:
    atomic.write_json(os.path.join(out, BASE_FILE), {"path": base, "sha256": digest}, indent=1)
  return out


def _checked_base(path: str) -> str:
  """The base model path of an adapter checkpoint, after checking it is the one trained on."""
  with open(os.path.join(path, BASE_FILE)) as f:
    info = json.load(f)
  if not is_model_dir(info["path"]):
    raise FileNotFoundError(f"{path} holds LoRA adapters of the base {info['path']}, which is "
                            "not there (move it back, or edit base.json to where it is now)")
  if files_sha256(info["path"]) != info["sha256"]:
    raise ValueError(f"{path} holds LoRA adapters trained on another {info['path']}: its "
                     f"files no longer hash to {info['sha256'][:16]}... (the base changed)")
  return info["path"]


def _load_adapters(path: str, shardings=None):
  """The merged model of a params/ dir with LoRA adapters (MoLoRA: base + 'lora',
  unmerged): its base named in base.json, or held in the directory itself."""
  from aya_jax.models import lora
  with open(os.path.join(path, MODEL_CONFIG)) as f:
    cfg = ModelConfig.from_dict(json.load(f))
  rep = None
  if shardings is not None:
    mesh = jax.tree.leaves(shardings)[0].mesh
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # what the merged model has not (its adapters, an LM head under a value head) comes
  # replicated
  pick = lambda tree: None if shardings is None else {
      k: shardings.get(k, jax.tree.map(lambda _: rep, v)) for k, v in tree.items()}
  meta = ocp.StandardCheckpointer().metadata(os.path.join(os.path.abspath(path), "arrays"))
  _, own = load_params(path, pick(_as_dict(getattr(meta, "item_metadata", meta))))
  if _names_base(path):
    base = _checked_base(path)
    base_cfg = peek_config(base)
    base_keys = {"embedder", "layers", "final_norm"} | (
        {"lm_head"} if base_cfg.has_lm_head else set()) | (
        {"value_head"} if base_cfg.value_head else set())
    _, params = load_model(base, pick({k: {"kernel": 0} for k in base_keys}))
    params = {k: v for k, v in params.items() if k != "lm_head" or cfg.has_lm_head}
    params.update({k: v for k, v in own.items() if k in {lora.KEY, "value_head"}})
  else:
    params = own
  return lora.merge(cfg, params) if not cfg.lora.experts else (cfg, params)


def peek_lora(path: str) -> bool:
  """A params/ dir whose model has LoRA adapters (in it, or naming their base)."""
  with open(os.path.join(path, MODEL_CONFIG)) as f:
    return json.load(f).get("lora") is not None


def _names_base(path: str) -> bool:
  return os.path.exists(os.path.join(path, BASE_FILE))


def is_adapter_dir(path: str) -> bool:
  """A params/ dir of LoRA adapters that names its base (base.json)."""
  return is_params_dir(path) and _names_base(path)
