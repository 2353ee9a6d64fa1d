"""params/ directories one leaf, layer or block at a time (streaming merges):
`ParamsReader` reads one with tensorstore, the store under Orbax, `ParamsWriter` writes one,
`AdapterReader` reads a LoRA adapter checkpoint as the merged model (W + scale * A B per
kernel, over its base's reader). The readers share hf.Reader's API (`.cfg`, `.leaves`,
`shape`, `dtype`, `chunk`, `read(path, layer, span)`); `checkpoint.open_reader` picks one.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from aya_jax.data import atomic
from aya_jax.models import lora
from aya_jax.models.config import ModelConfig

MODEL_CONFIG = "model_config.json"


def unreadable(path, what, error) -> ValueError:
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
      raise unreadable(path, "params/ directory", e) from e
    self.opened, self.cache = {}, (None, None)

  def _open(self, path):
    if path not in self.opened:
      import tensorstore as ts
      spec = {"driver": "zarr3" if self.zarr3 else "zarr", "fill_missing_data_reads": False,
              "kvstore": _kvstore(self.arrays, self.leaves[path], self.ocdbt)}
      try:
        self.opened[path] = ts.open(spec, open=True, read=True).result()
      except Exception as e:  # noqa: BLE001 -- tensorstore raises many kinds; cause kept
        raise unreadable(self.path, f"params {path} of", e) from e
    return self.opened[path]

  def _get(self, path, array):
    try:
      return array.read().result()
    except Exception as e:  # noqa: BLE001
      raise unreadable(self.path, f"params {path} of", e) from e

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


class AdapterReader:
  """A LoRA adapter checkpoint read as the merged model: the base's leaves (less an LM head
  that a value-head model has not), the value head of the adapter checkpoint, and every
  adapted kernel read as W + scale * A B (a layer, a span at a time). The base reader may
  be the adapters' own (a params/ dir holding base and adapters)."""

  def __init__(self, base_reader, adapters: ParamsReader):
    self.path, self.base, self.adapters = adapters.path, base_reader, adapters
    self.cfg = adapters.cfg.replace(lora=None)
    self.scale = adapters.cfg.lora.scale
    if adapters.cfg.lora.experts:
      raise ValueError(f"{adapters.path} holds MoLoRA adapters (experts mix per token): they "
                       "have no merged weights to read")
    own = {p for p in adapters.leaves if not p.startswith(lora.KEY + "/")}
    self.leaves = {p: "base" for p in base_reader.leaves if not p.startswith(lora.KEY + "/")
                   and (self.cfg.has_lm_head or not p.startswith("lm_head/"))}
    self.leaves.update({p: "adapters" for p in own})
    self.kernels = {p[len(lora.KEY) + 1:-2] + "/kernel"
                    for p in adapters.leaves if p.endswith("/a")}

  def _reader(self, path):
    return self.adapters if self.leaves[path] == "adapters" else self.base

  def shape(self, path):
    return self._reader(path).shape(path)

  def dtype(self, path):
    return self._reader(path).dtype(path)

  def chunk(self, path, axis):
    return self._reader(path).chunk(path, axis)

  def read(self, path, layer=None, span=None):
    w = self._reader(path).read(path, layer, span)
    if path not in self.kernels:
      return w
    stem = lora.KEY + "/" + path[:-len("/kernel")]
    a, b = (self.adapters.read(f"{stem}/{x}", layer) for x in ("a", "b"))
    full = self.base.shape(path)[0 if layer is None else 1:]
    delta = lora.kernel_delta(np.asarray(a), np.asarray(b), full, self.scale)
    return (np.asarray(w, np.float32) + delta[_index(None, span)]).astype(w.dtype)
