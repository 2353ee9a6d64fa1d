"""Merges over checkpoints, streaming: aya_jax params/ or HF dirs in, params/ (and HF) out.

`merge_checkpoints` reads one tensor, or one layer of a stacked 'layers/...' leaf, from each
input at a time (a big 2-D tensor under an elementwise method: one block of rows of HF's
layout at a time), merges it with `merging.merge_tensor` and writes it, so host memory stays
at a few tensors, not the model size. The result equals `merging.merge` on the loaded trees.
A merge is described by a mergekit-style YAML or configs/merge.py (`MergeSpec`); `run` is
the 'merge' stage: `python -m aya_jax.main --config=configs/merge.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from typing import Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

from aya_jax import merging

_BLOCK = 1 << 22  # elements of one fp32 block of a big 2-D tensor (16 MiB)


# ---------------------------------------------------------------------------
# Merge specifications (mergekit-style YAML, ml_collections)
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class MergeSpec:
  """One merge: `models` (and `base`) are paths (streaming) or ignored (pytrees)."""
  method: str
  models: list
  model_parameters: list = dataclasses.field(default_factory=list)
  base: Optional[str] = None
  parameters: dict = dataclasses.field(default_factory=dict)
  dtype: Optional[str] = None
  include: Optional[str] = None  # regex: only matching paths are merged
  seed: int = 0

  def __post_init__(self):
    if self.method not in merging.METHODS:
      raise ValueError(f"unknown merge_method {self.method!r}; known: {sorted(merging.METHODS)}")
    if not self.model_parameters:
      self.model_parameters = [{} for _ in self.models]
    if len(self.model_parameters) != len(self.models):
      raise ValueError(f"{len(self.model_parameters)} model_parameters for "
                       f"{len(self.models)} models")
    if merging.METHODS[self.method][0] and self.base in self.models:
      i = self.models.index(self.base)  # mergekit lists the base among the models too
      self.models = self.models[:i] + self.models[i + 1:]
      self.model_parameters = self.model_parameters[:i] + self.model_parameters[i + 1:]


def spec_from_yaml(text_or_path: str) -> MergeSpec:
  """A MergeSpec from mergekit YAML (merge_method, models, base_model, parameters, dtype)."""
  import yaml
  text = text_or_path
  if "\n" not in text and os.path.exists(text):
    with open(text) as f:
      text = f.read()
  d = yaml.safe_load(text)
  unsupported = sorted(set(d) - {"merge_method", "models", "base_model", "parameters",
                                 "dtype", "out_dtype", "tokenizer_source", "include",
                                 "seed"})
  if unsupported:
    raise ValueError(f"merge YAML: {unsupported} are not supported (slices, modules, "
                     "tokenizer merges); use models/base_model/parameters")
  models = [m["model"] if isinstance(m, Mapping) else m for m in d.get("models") or []]
  params = [dict((m.get("parameters") or {}) if isinstance(m, Mapping) else {})
            for m in d.get("models") or []]
  return MergeSpec(method=d["merge_method"], models=models, model_parameters=params,
                   base=d.get("base_model"), parameters=dict(d.get("parameters") or {}),
                   dtype=d.get("out_dtype") or d.get("dtype"), include=d.get("include"),
                   seed=int(d.get("seed", 0)))


def spec_from_config(c) -> MergeSpec:
  """A MergeSpec from configs/merge.py's `merge` block (or its `yaml` path)."""
  if c.get("yaml"):
    return spec_from_yaml(c.yaml)
  models = list(c.models)
  per_model = {k: v for k, v in dict(c.model_parameters).items() if v is not None}
  for k, v in per_model.items():
    if len(v) != len(models):
      raise ValueError(f"config model_parameters.{k} has {len(v)} values for "
                       f"{len(models)} models")
  params = [{k: v[i] for k, v in per_model.items()} for i in range(len(models))]
  shared = {k: v for k, v in dict(c.parameters).items() if v is not None}
  return MergeSpec(method=c.method, models=models, model_parameters=params,
                   base=c.base or None, parameters=shared, dtype=c.dtype or None,
                   include=c.include or None, seed=int(c.seed))


# ---------------------------------------------------------------------------
# Readers and writers: one tensor, layer slice or block of rows at a time
# ---------------------------------------------------------------------------
_ST = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_ST_CODE = {np.dtype(v): k for k, v in _ST.items()}
_ZARR_DTYPE = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "bfloat16"}


def _index(layer, span):
  """Index of a layer slice and/or a block span = (axis in the slice, start, stop)."""
  lead = () if layer is None else (layer,)
  return lead + (() if span is None else (slice(None),) * span[0] + (slice(*span[1:]),))


class _HFReader:
  """Reads our-layout tensors (or one layer, or one block of HF rows) from a HF directory
  with plain file reads (no mmap: resident memory stays at the tensors in flight). A 'lin'
  tensor comes back as a transposed view: elementwise merges never copy it."""

  def __init__(self, path):
    from aya_jax.models import hf
    self.hf, self.path = hf, path
    config_file = os.path.join(path, hf.CONFIG_FILE)
    with open(config_file) as f:
      self.cfg = hf.config_from_hf(json.load(f), source=config_file)
    self.where, self.headers = hf._weight_files(path), {}
    self.leaves = {"/".join(leaf): (name, transform, shape, is_layer)
                   for leaf, name, transform, shape, is_layer in hf._entries(self.cfg)}

  def _info(self, path, layer):
    name, transform, shape, _ = self.leaves[path]
    name = name.format(i=layer)
    if name not in self.where:
      raise ValueError(f"tensor {name!r} (params {path}) is missing from {self.path}")
    file = self.where[name]
    if file not in self.headers:
      with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        self.headers[file] = (8 + n, json.loads(f.read(n)))
    start, header = self.headers[file]
    info = header[name]
    want = self.hf._hf_shape(transform, shape)
    if tuple(info["shape"]) != tuple(want):
      raise ValueError(f"tensor {name!r} (params {path}) in {file} has shape "
                       f"{tuple(info['shape'])}; the config.json implies {tuple(want)}")
    return file, start, info, transform, shape

  def shape(self, path):
    _, _, shape, is_layer = self.leaves[path]
    self._info(path, 0)
    return ((self.cfg.n_layers,) if is_layer else ()) + tuple(shape)

  def dtype(self, path):
    return np.dtype(_ST[self._info(path, 0)[2]["dtype"]])

  def chunk(self, path, axis):
    return None

  def read(self, path, layer=None, span=None):
    file, start, info, transform, shape = self._info(path, layer)
    (lo, hi), hf_shape, dtype = info["data_offsets"], list(info["shape"]), _ST[info["dtype"]]
    if span is not None:  # rows of HF's layout: 'copy' axis 0, 'lin' axis 1 of ours
      row = math.prod(hf_shape[1:]) * np.dtype(dtype).itemsize
      lo, hi, hf_shape[0] = lo + span[1] * row, lo + span[2] * row, span[2] - span[1]
    with open(file, "rb") as f:
      f.seek(start + lo)
      a = np.frombuffer(f.read(hi - lo), dtype).reshape(hf_shape)
    if span is not None:
      return a.T if transform == "lin" else a
    return self.hf._to_ours(transform, a, shape)


def _kvstore(arrays, name, ocdbt):
  if ocdbt:
    return {"driver": "ocdbt", "base": "file://" + arrays, "path": name}
  return {"driver": "file", "path": os.path.join(arrays, name)}


class _ParamsReader:
  """Reads leaves (a layer, a block) of an aya_jax params/ dir with tensorstore, the store
  under Orbax. What the chunks do not split (a stacked leaf saved as one chunk by older
  checkpoint.save_params) is read whole once, kept, and sliced."""

  def __init__(self, path):
    from aya_jax.models.config import ModelConfig
    self.path = path
    with open(os.path.join(path, "model_config.json")) as f:
      self.cfg = ModelConfig.from_dict(json.load(f))
    self.arrays = os.path.join(os.path.abspath(path), "arrays")
    with open(os.path.join(self.arrays, "_METADATA")) as f:
      meta = json.load(f)
    self.ocdbt, self.zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", False)
    self.leaves = {}
    for entry in meta["tree_metadata"].values():
      keys = [str(k["key"]) for k in entry["key_metadata"]]
      self.leaves["/".join(keys)] = ".".join(keys)
    self.opened, self.cache = {}, (None, None)

  def _open(self, path):
    if path not in self.opened:
      import tensorstore as ts
      spec = {"driver": "zarr3" if self.zarr3 else "zarr",
              "kvstore": _kvstore(self.arrays, self.leaves[path], self.ocdbt)}
      self.opened[path] = ts.open(spec, open=True, read=True).result()
    return self.opened[path]

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
      return arr[_index(layer, span)].read().result()
    unit = (path, layer if by_layer else None)
    if self.cache[0] != unit:
      self.cache = (None, None)
      self.cache = (unit, (arr[lead] if by_layer else arr).read().result())
    return self.cache[1][_index(None if by_layer else layer, span)]


def open_checkpoint(path):
  """A reader of an aya_jax params/ dir or a HF dir: .cfg, .leaves, shape/dtype/read."""
  from aya_jax import checkpoint
  if checkpoint.is_params_dir(path):
    return _ParamsReader(path)
  if os.path.exists(os.path.join(path, "config.json")):
    return _HFReader(path)
  raise FileNotFoundError(f"{path}: neither an aya_jax params/ dir (model_config.json) nor "
                          "a HF dir (config.json)")


class _ParamsWriter:
  """Writes a params/ dir piece by piece: Orbax writes the tree metadata (use_ocdbt=False),
  tensorstore the zarr arrays that Orbax restores, one chunk per layer and per block."""

  def __init__(self, out, leaves: dict, cfg):
    import orbax.checkpoint as ocp
    import tensorstore as ts
    self.out, self.cfg = os.path.abspath(out), cfg
    self.arrays = os.path.join(self.out, "arrays")
    os.makedirs(self.out, exist_ok=True)
    if os.path.exists(os.path.join(self.out, "model_config.json")):
      os.remove(os.path.join(self.out, "model_config.json"))
    skeleton = {}
    for path, (_, dtype, _) in leaves.items():
      node = skeleton
      for k in path.split("/")[:-1]:
        node = node.setdefault(k, {})
      node[path.split("/")[-1]] = np.zeros((1,), dtype)
    ckpt = ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False))
    ckpt.save(self.arrays, args=ocp.args.StandardSave(skeleton), force=True)
    self.stores = {}
    for path, (shape, dtype, chunks) in leaves.items():
      spec = {"driver": "zarr", "kvstore": _kvstore(self.arrays, path.replace("/", "."), False),
              "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": None,
                           "dtype": _ZARR_DTYPE[np.dtype(dtype).name]}}
      self.stores[path] = ts.open(spec, create=True, delete_existing=True).result()

  def write(self, path, value, layer=None, span=None):
    self.stores[path][_index(layer, span)].write(value).result()

  def close(self):
    with open(os.path.join(self.out, "model_config.json"), "w") as f:
      json.dump(self.cfg.to_dict(), f, indent=1)


class _HFWriter:
  """Writes safetensors shards sequentially in the order tensors (blocks) are merged."""

  def __init__(self, out, cfg, order, dtypes: dict, max_shard_bytes=5 << 30):
    from aya_jax.models import hf
    self.hf, self.out, self.cfg = hf, out, cfg
    table = {"/".join(leaf): (name, transform, shape)
             for leaf, name, transform, shape, _ in hf._entries(cfg)}
    self.plan, shards, size = [], [[]], 0
    for path, layer in order:
      name, transform, shape = table[path]
      hf_shape = hf._hf_shape(transform, shape)
      nbytes = int(np.prod(hf_shape)) * np.dtype(dtypes[path]).itemsize
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      item = (path, layer, name.format(i=layer), transform, shape, hf_shape, nbytes)
      shards[-1].append(item)
      self.plan.append((len(shards) - 1, item))
      size += nbytes
    os.makedirs(out, exist_ok=True)
    self.files = ([hf.SINGLE_FILE] if len(shards) == 1 else
                  [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                   for k in range(len(shards))])
    self.shards, self.dtypes, self.step, self.written, self.handle = shards, dtypes, 0, 0, None

  def _open(self, k):
    if self.handle is not None:
      self.handle.close()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for path, _, name, _, _, hf_shape, nbytes in self.shards[k]:
      header[name] = {"dtype": _ST_CODE[np.dtype(self.dtypes[path])], "shape": list(hf_shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    self.handle = open(os.path.join(self.out, self.files[k]), "wb")
    self.handle.write(len(text).to_bytes(8, "little") + text)

  def write(self, path, layer, value):
    """value: the tensor (layer slice), or the next block of it (of HF's rows)."""
    k, (want_path, want_layer, _, transform, shape, _, nbytes) = self.plan[self.step]
    assert (path, layer) == (want_path, want_layer), ((path, layer), (want_path, want_layer))
    if self.written == 0 and (self.step == 0 or self.plan[self.step - 1][0] != k):
      self._open(k)
    # 'lin' blocks split axis 1 (HF's rows) and _to_hf(lin) keeps axis 0; other transforms
    # only reshape, so the C-order bytes of any block are already HF's
    a = self.hf._to_hf(transform, value, shape) if transform.startswith("lin") else value
    a = np.ascontiguousarray(merging.cast(a, self.dtypes[path]))
    self.handle.write(a.reshape(-1).view(np.uint8).data)
    self.written += a.nbytes
    if self.written == nbytes:
      self.step, self.written = self.step + 1, 0

  def close(self):
    self.handle.close()
    hf = self.hf
    if len(self.files) > 1:
      weight_map = {it[2]: f for f, items in zip(self.files, self.shards) for it in items}
      total = sum(it[6] for items in self.shards for it in items)
      with open(os.path.join(self.out, hf.INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    d = hf.config_to_hf(self.cfg)
    d["dtype"] = d["torch_dtype"] = np.dtype(next(iter(self.dtypes.values()))).name
    with open(os.path.join(self.out, hf.CONFIG_FILE), "w") as f:
      json.dump(d, f, indent=2)
    gen = {k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if d[k] is not None}
    with open(os.path.join(self.out, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)


# ---------------------------------------------------------------------------
# The streaming merge
# ---------------------------------------------------------------------------
_EXECUTION_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll")
_SOFT_FIELDS = ("bos_id", "eos_ids", "pad_id", "max_seq_len")  # differ: warn, take the first


def _check_configs(readers, labels):
  ref = {k: v for k, v in readers[0].cfg.to_dict().items() if k not in _EXECUTION_FIELDS}
  for r, label in zip(readers[1:], labels[1:]):
    d = r.cfg.to_dict()
    bad = {k: (d[k], v) for k, v in ref.items() if d[k] != v}
    soft = {k: bad.pop(k) for k in _SOFT_FIELDS if k in bad}
    if soft:
      warnings.warn(f"{label} differs from {labels[0]} in {soft}; the output takes "
                    f"{labels[0]}'s")
    if "vocab_size" in bad:
      raise ValueError(f"vocab sizes differ: {label} has {bad['vocab_size'][0]}, {labels[0]} "
                       f"{bad['vocab_size'][1]} (params embedder/embedding); merge "
                       "checkpoints with the same tokenizer")
    if bad:
      raise ValueError(f"{label} is a different model than {labels[0]}: {bad}")

def _blocks(shape, is_layer, transform, readers, path):
  """(axis in the slice, rows) for a 2-D tensor (layer slice) over _BLOCK elements, along
  HF's rows ('copy': axis 0, 'lin': axis 1), aligned to a params/ input's chunks; or None."""
  s = shape[1:] if is_layer else shape
  if len(s) != 2 or s[0] * s[1] <= _BLOCK or transform not in ("copy", "lin"):
    return None
  axis = 1 if transform == "lin" else 0
  rows = max(1, _BLOCK // s[1 - axis])
  for r in readers:
    c = r.chunk(path, axis + is_layer)
    if c is not None:
      return axis, c * max(1, rows // c)
  return axis, rows


def merge_checkpoints(inputs: Sequence[str], method: str, params: Optional[Mapping] = None,
                      out: str = None, base: Optional[str] = None, out_hf: Optional[str] = None,
                      *, model_params: Optional[Sequence[Mapping]] = None,
                      include: Optional[str] = None, seed=0, dtype=None,
                      max_shard_bytes: int = 5 << 30) -> str:
  """Merges checkpoints (aya_jax params/ or HF dirs) into params/ `out` (and HF `out_hf`),
  one tensor, layer of a stacked leaf, or block of an elementwise merge at a time.

  params: shared parameters; model_params: one dict per input (weight, density, gamma).
  Returns `out`. Equal to `merging.merge` on the loaded trees (same seed: same DARE masks)."""
  labels = list(([base] if base else []) + list(inputs))
  readers = [open_checkpoint(p) for p in labels]
  _check_configs(readers, labels)
  cfg = readers[0].cfg
  paths = list(readers[0].leaves)
  merging.check_inputs([{p: r.shape(p) for p in r.leaves} for r in readers], labels,
                       [{p: r.dtype(p) for p in r.leaves} for r in readers], dtype is not None)
  model_params = list(model_params or [{} for _ in inputs])
  merging.warn_weights(method, model_params, dict(params or {}))
  from aya_jax.models import hf
  transforms = {"/".join(leaf): tr for leaf, _, tr, *_ in hf._entries(cfg)}
  out_dtypes = {p: np.dtype(dtype) if dtype else readers[0].dtype(p) for p in paths}
  shapes = {p: readers[0].shape(p) for p in paths}
  is_layer = {p: p.startswith("layers/") for p in paths}
  blocks = {p: _blocks(shapes[p], is_layer[p], transforms.get(p, "copy"), readers, p)
            for p in paths}
  chunks = {}
  for p in paths:
    chunks[p] = [1] + list(shapes[p][1:]) if is_layer[p] else list(shapes[p])
    if blocks[p]:
      chunks[p][blocks[p][0] + is_layer[p]] = blocks[p][1]
  writer = _ParamsWriter(out, {p: (shapes[p], out_dtypes[p], chunks[p]) for p in paths}, cfg)
  order = [(p, i) for p in paths for i in (range(shapes[p][0]) if is_layer[p] else [None])]
  hf_writer = (_HFWriter(out_hf, cfg, order, out_dtypes, max_shard_bytes)
               if out_hf and not cfg.value_head else None)
  hf_table, models = merging.hf_names(cfg), readers[-len(inputs):]
  base_reader = readers[0] if base else None
  for path, layer in order:
    merged = include is None or re.search(include, path)
    if merged:
      names, p, key = merging.tensor_parameters(
          method, params, model_params, len(inputs), path, layer,
          shapes[path][0] if is_layer[path] else 1, hf_table, seed)
    spans = [None]
    if blocks[path] and (not merged or merging.is_elementwise(method, p)):
      axis, rows = blocks[path]
      n = shapes[path][axis + is_layer[path]]
      spans = [(axis, lo, min(n, lo + rows)) for lo in range(0, n, rows)]
    for span in spans:
      if not merged:
        value = readers[0].read(path, layer, span)
      else:
        value = merging.merge_tensor(
            method, [r.read(path, layer, span) for r in models],
            None if base_reader is None else base_reader.read(path, layer, span), p, key,
            name=names[-1])
      value = merging.cast(np.asarray(value), out_dtypes[path])
      writer.write(path, value, layer, span)
      if hf_writer is not None:
        hf_writer.write(path, layer, value)
      del value
  writer.close()
  if hf_writer is not None:
    hf_writer.close()
  elif out_hf:  # value heads go to side files: hf.save handles them (in memory)
    from aya_jax import checkpoint
    hf.save(cfg, checkpoint.load_params(out)[1], out_hf, dtype=next(iter(out_dtypes.values())))
  return out


def merge_from_spec(spec: MergeSpec, out: str, out_hf: Optional[str] = None) -> str:
  return merge_checkpoints(spec.models, spec.method, spec.parameters, out, base=spec.base,
                           out_hf=out_hf, model_params=spec.model_parameters,
                           include=spec.include, seed=spec.seed, dtype=spec.dtype)


def run(config, workdir: str):
  """Stage entry point (configs/merge.py): writes workdir/params (and workdir/hf)."""
  from absl import logging
  spec = spec_from_config(config.merge)
  out = os.path.join(workdir, "params")
  out_hf = os.path.join(workdir, "hf") if config.merge.out_hf else None
  logging.info("merge %s of %s (base %s) -> %s", spec.method, spec.models, spec.base, out)
  merge_from_spec(spec, out, out_hf)
  with open(os.path.join(workdir, "merge_spec.json"), "w") as f:
    json.dump(dataclasses.asdict(spec), f, indent=1)
  return out
