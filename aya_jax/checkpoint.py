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
    where = os.path.join(self.directory, str(step))
    _check_same_model(where, os.path.join(where, "state"), target_state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target_state)), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise _unreadable(where, "checkpoint", e) from e
    logging.info("restored checkpoint %s/%d", self.directory, step)
    return restored.state, restored.data

  def close(self):
    self.manager.close()


def _unreadable(path, what, error) -> ValueError:
  """One clear error for a checkpoint (params/) directory that Orbax or tensorstore cannot
  read: the directory and the first line of the deepest cause (the rest stays in the
  chained cause)."""
  cause = error
  while cause.__cause__ is not None:
    cause = cause.__cause__
  first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
  first = first if len(first) <= 300 else first[:300] + "..."
  return ValueError(f"{what} {path} cannot be read (is a file of it missing, truncated or "
                    f"corrupt?): {type(cause).__name__}: {first}")


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
    raise _unreadable(where, "checkpoint", e) from e
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
    raise _unreadable(path, "params/ directory", e) from e
  tree = _as_dict(getattr(meta, "item_metadata", meta))
  if shardings is None:  # one device, whatever mesh saved it
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, tree)
  target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                        tree, shardings)
  try:
    params = checkpointer.restore(arrays, target)
  except Exception as e:  # noqa: BLE001
    raise _unreadable(path, "params/ directory", e) from e
  return cfg, _as_dict(params)


def _as_dict(tree) -> Any:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _kind_of(path: str) -> Optional[str]:
  """'params', 'hf' (config.json) or 'gguf' (a .gguf, or a directory holding one);
  None for anything else."""
  from aya_jax.models import gguf
  if is_params_dir(path):
    return "params"
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
      "directory (config.json) nor a GGUF file")


def peek_config(path: str) -> ModelConfig:
  """The ModelConfig of a params/ dir, an HF dir or a GGUF, without reading arrays."""
  kind = _kind(path)
  if kind == "params":
    with open(os.path.join(path, MODEL_CONFIG)) as f:
      return ModelConfig.from_dict(json.load(f))
  if kind == "gguf":
    from aya_jax.models import gguf
    return gguf.read_config(path)
  from aya_jax.models import hf_config
  return hf_config.read_config(path)


def load_model(path: str, shardings=None, language_model: bool = False):
  """(ModelConfig, params) from an aya_jax params/ dir, a Hugging Face dir or a GGUF. With
  `language_model`, a reward model (a value head, no LM head) is refused up front."""
  if language_model and peek_config(path).value_head:
    raise ValueError(f"the checkpoint at {path} is a reward model (a value head, no LM head): "
                     "it cannot initialise a language model; give a language model "
                     "(an SFT or base checkpoint)")
  kind = _kind(path)
  if kind == "params":
    return load_params(path, shardings)
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
  if kind == "gguf":
    from aya_jax.models import gguf
    return gguf.Reader(path)
  from aya_jax.models import hf
  return hf.Reader(path)


# ---------------------------------------------------------------------------
# params/ one leaf, layer or block at a time (streaming merges)
# ---------------------------------------------------------------------------
_ZARR_DTYPE = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "bfloat16"}


def _index(layer, span):
  """Index of a layer slice and/or a block span = (axis in the slice, start, stop)."""
  lead = () if layer is None else (layer,)
  return lead + (() if span is None else (slice(None),) * span[0] + (slice(*span[1:]),))


def _kvstore(arrays, name, ocdbt):
  if ocdbt:
    return {"driver": "ocdbt", "base": "file://" + arrays, "path": name}
  return {"driver": "file", "path": os.path.join(arrays, name)}


class ParamsReader:
  """Reads leaves (a layer, a block) of a params/ dir with tensorstore, the store under
  Orbax: `.cfg`, `.leaves` (paths 'a/b'), `shape`, `dtype`, `chunk`, `read(path, layer,
  span)` (span = (axis in the layer slice, start, stop)). What the chunks do not split (a
  stacked leaf saved as one chunk by older save_params) is read whole once, kept, sliced."""

  def __init__(self, path):
    self.path = path
    with open(os.path.join(path, MODEL_CONFIG)) as f:
      self.cfg = ModelConfig.from_dict(json.load(f))
    self.arrays = os.path.join(os.path.abspath(path), "arrays")
    try:
      with open(os.path.join(self.arrays, "_METADATA")) as f:
        meta = json.load(f)
      self.ocdbt, self.zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", False)
      self.leaves = {}
      for entry in meta["tree_metadata"].values():
        keys = [str(k["key"]) for k in entry["key_metadata"]]
        self.leaves["/".join(keys)] = ".".join(keys)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise _unreadable(path, "params/ directory", e) from e
    self.opened, self.cache = {}, (None, None)

  def _open(self, path):
    if path not in self.opened:
      import tensorstore as ts
      spec = {"driver": "zarr3" if self.zarr3 else "zarr", "fill_missing_data_reads": False,
              "kvstore": _kvstore(self.arrays, self.leaves[path], self.ocdbt)}
      try:
        self.opened[path] = ts.open(spec, open=True, read=True).result()
      except Exception as e:  # noqa: BLE001 -- tensorstore raises many kinds; cause kept
        raise _unreadable(self.path, f"params {path} of", e) from e
    return self.opened[path]

  def _get(self, path, array):
    try:
      return array.read().result()
    except Exception as e:  # noqa: BLE001
      raise _unreadable(self.path, f"params {path} of", e) from e

  def shape(self, path):
    return tuple(self._open(path).shape)

  def dtype(self, path):
    return np.dtype(self._open(path).dtype.numpy_dtype)

  def chunk(self, path, axis):
    """Rows of one read chunk along `axis` (of the whole leaf), or None if unsplit."""
    arr = self._open(path)
    c = arr.chunk_layout.read_chunk.shape[axis]
    return c if c < arr.shape[axis] else None

  def read(self, path, layer=None, span=None):
    arr = self._open(path)
    chunk, lead = arr.chunk_layout.read_chunk.shape, _index(layer, None)
    by_layer = layer is not None and chunk[0] == 1
    d = len(lead) + (span[0] if span else 0)
    if (layer is None or by_layer) and (span is None or chunk[d] < arr.shape[d]):
      return self._get(path, arr[_index(layer, span)])
    unit = (path, layer if by_layer else None)
    if self.cache[0] != unit:
      self.cache = (None, None)
      self.cache = (unit, self._get(path, arr[lead] if by_layer else arr))
    return self.cache[1][_index(None if by_layer else layer, span)]


class ParamsWriter:
  """Writes a params/ dir piece by piece: Orbax writes the tree metadata (use_ocdbt=False),
  tensorstore the zarr arrays that Orbax restores, one chunk per layer and per block.
  leaves: path -> (shape, dtype, chunk shape). Writes are asynchronous (at most `pending`
  in flight) and not fsync'ed one by one; `close` waits for them and writes the config."""

  def __init__(self, out, leaves: dict, cfg, pending: int = 4):
    import tensorstore as ts
    self.out, self.cfg, self.pending, self.futures = os.path.abspath(out), cfg, pending, []
    self.arrays = os.path.join(self.out, "arrays")
    os.makedirs(self.out, exist_ok=True)
    if os.path.exists(os.path.join(self.out, MODEL_CONFIG)):
      os.remove(os.path.join(self.out, MODEL_CONFIG))
    skeleton = {}
    for path, (_, dtype, _) in leaves.items():
      node = skeleton
      for k in path.split("/")[:-1]:
        node = node.setdefault(k, {})
      node[path.split("/")[-1]] = np.zeros((1,), dtype)
    alone = ocp.options.MultiprocessingOptions(active_processes={jax.process_index()})
    ckpt = ocp.Checkpointer(ocp.StandardCheckpointHandler(
        use_ocdbt=False, multiprocessing_options=alone), multiprocessing_options=alone)
    ckpt.save(self.arrays, args=ocp.args.StandardSave(skeleton), force=True)
    context = ts.Context({"file_io_sync": False})
    self.stores = {}
    for path, (shape, dtype, chunks) in leaves.items():
      spec = {"driver": "zarr", "kvstore": _kvstore(self.arrays, path.replace("/", "."), False),
              "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": None,
                           "dtype": _ZARR_DTYPE[np.dtype(dtype).name]}}
      self.stores[path] = ts.open(spec, create=True, delete_existing=True,
                                  context=context).result()

  def write(self, path, value, layer=None, span=None):
    self.futures.append(self.stores[path][_index(layer, span)].write(value))
    while len(self.futures) > self.pending:
      self.futures.pop(0).result()

  def close(self):
    while self.futures:
      self.futures.pop(0).result()
    atomic.write_json(os.path.join(self.out, MODEL_CONFIG), self.cfg.to_dict(), indent=1)
