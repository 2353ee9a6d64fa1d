"""Merges over checkpoints, streaming: aya_jax params/ or HF dirs in, params/ (and HF) out.

`merge_checkpoints` reads one tensor, or one layer of a stacked 'layers/...' leaf, from each
input at a time (a big 2-D tensor under an elementwise method: one block of rows of HF's
layout at a time), merges it with `methods.merge_tensor` and writes it, so host memory stays
at a few tensors, not the model size. Reading the next piece (HF tensors are memory-mapped),
merging this one and writing the last overlap on threads. The result equals `pytree.merge`
on the loaded trees. The 'merge' stage that runs a `spec.MergeSpec` through it is
merging/stage.py.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional, Sequence

import numpy as np

from aya_jax import artifacts, checkpoint, params_stream
from aya_jax.merging import methods as merging
from aya_jax.merging import parameters
from aya_jax.models import hf
from aya_jax.models.config import EXECUTION_FIELDS

_BLOCK = 1 << 22  # elements of one fp32 block of a big 2-D tensor (16 MiB)


# ---------------------------------------------------------------------------
# The streaming merge
# ---------------------------------------------------------------------------
_SOFT_FIELDS = ("bos_id", "eos_ids", "pad_id", "max_seq_len")  # differ: warn, take the first


def _check_configs(readers, labels):
  ref = {k: v for k, v in readers[0].cfg.to_dict().items() if k not in EXECUTION_FIELDS}
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


def merge_checkpoints(inputs: Sequence[str], method: str,
                      merge_parameters: Optional[Mapping] = None, out: str = None,
                      base: Optional[str] = None, out_hf: Optional[str] = None, *,
                      model_merge_parameters: Optional[Sequence[Mapping]] = None,
                      include: Optional[str] = None, seed=0, dtype=None,
                      max_shard_bytes: int = 5 << 30) -> str:
  """Merges checkpoints (aya_jax params/ or HF dirs) into params/ `out` (and HF `out_hf`),
  one tensor, layer of a stacked leaf, or block of an elementwise merge at a time.

  merge_parameters: the shared merge parameters (mergekit's `parameters`);
  model_merge_parameters: one dict per input (weight, density, gamma).
  Returns `out`. Equal to `pytree.merge` on the loaded trees (same seed: same DARE masks).
  Over several processes (every host runs the merge stage) process 0 merges, the others
  wait for it: the work is on the host and the output files are shared."""
  import jax
  kwargs = dict(model_merge_parameters=model_merge_parameters, include=include, seed=seed,
                dtype=dtype, max_shard_bytes=max_shard_bytes)
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      _merge_checkpoints(inputs, method, merge_parameters, out, base, out_hf, **kwargs)
    artifacts.sync(f"merge_checkpoints {out}")
    return out
  return _merge_checkpoints(inputs, method, merge_parameters, out, base, out_hf, **kwargs)


def _merge_checkpoints(inputs, method, merge_parameters, out, base, out_hf, *,
                       model_merge_parameters, include, seed, dtype, max_shard_bytes):
  parameters.check_method(method, len(inputs), bool(base))
  labels = list(([base] if base else []) + list(inputs))
  readers = [checkpoint.open_reader(p) for p in labels]
  _check_configs(readers, labels)
  cfg = readers[0].cfg
  paths = list(readers[0].leaves)
  parameters.check_inputs([{p: r.shape(p) for p in r.leaves} for r in readers], labels,
                          [{p: r.dtype(p) for p in r.leaves} for r in readers],
                          dtype is not None)
  model_merge_parameters = list(model_merge_parameters or [{} for _ in inputs])
  parameters.warn_weights(method, model_merge_parameters, dict(merge_parameters or {}))
  transforms = {"/".join(leaf): tr for leaf, _, tr, *_ in hf.entries(cfg)}
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
  order = [(p, i) for p in paths for i in (range(shapes[p][0]) if is_layer[p] else [None])]
  hf_table, layouts = parameters.hf_names(cfg), parameters.hf_layouts(cfg)
  units = []  # (path, layer, span, (names, parameters, key) or None when copied)
  for path, layer in order:
    merged = None
    if include is None or re.search(include, path):
      merged = parameters.tensor_parameters(
          method, merge_parameters, model_merge_parameters, len(inputs), path, layer,
          shapes[path][0] if is_layer[path] else 1, hf_table, seed)
    spans = [None]
    if blocks[path] and (not merged or merging.is_elementwise(method, merged[1])):
      axis, rows = blocks[path]
      n = shapes[path][axis + is_layer[path]]
      spans = [(axis, lo, min(n, lo + rows)) for lo in range(0, n, rows)]
    units += [(path, layer, span, merged) for span in spans]

  def fetch(unit):
    path, layer, span, merged = unit
    return [r.read(path, layer, span) for r in (readers if merged else readers[:1])]

  # everything is checked: write beside the targets, then move them in (a failed merge
  # leaves the previous out / out_hf as they were)
  staged = {o: _staging_dir(o) for o in (out, out_hf) if o}
  writer = hf_writer = None
  try:
    writer = params_stream.ParamsWriter(
        staged[out], {p: (shapes[p], out_dtypes[p], chunks[p]) for p in paths}, cfg)
    hf_writer = (hf.Writer(staged[out_hf], cfg, order, out_dtypes, max_shard_bytes)
                 if out_hf else None)
    _write(units, fetch, writer, hf_writer, method, base, len(inputs), layouts, out_dtypes)
  except BaseException:
    for f in writer.futures if writer is not None else ():
      try:  # wait for the writes in flight before removing their directory
        f.result()
      except Exception:  # pylint: disable=broad-except
        pass
    for tmp in staged.values():
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  for target, tmp in staged.items():
    _move_in(tmp, target)
  return out


def _staging_dir(target):
  """A new empty directory beside `target` (same filesystem: a rename moves it in)."""
  parent = os.path.dirname(os.path.abspath(target))
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.", suffix=".partial")


def _move_in(tmp, target):
  """Renames the finished directory tmp to target; a previous target goes only after."""
  old = None
  if os.path.lexists(target):
    old = tmp[:-len(".partial")] + ".old"
    os.rename(target, old)
  os.rename(tmp, target)
  if old is not None:
    shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


def _write(units, fetch, writer, hf_writer, method, base, n, layouts, out_dtypes):
  """Reads, merges and writes every unit, then closes the writers."""

  def emit(path, layer, span, value):
    writer.write(path, value, layer, span)
    if hf_writer is not None:
      hf_writer.write(path, layer, value)

  # three threads: this one merges piece i while piece i + 1 is read and i - 1 written
  with ThreadPoolExecutor(1, "merge-read") as reads, \
       ThreadPoolExecutor(1, "merge-write") as writes:
    ahead, pending = reads.submit(fetch, units[0]), []
    for i, (path, layer, span, merged) in enumerate(units):
      arrays = ahead.result()
      if i + 1 < len(units):
        ahead = reads.submit(fetch, units[i + 1])
      if merged is None:
        value = merging.cast(np.asarray(arrays[0]), out_dtypes[path])
      else:
        names, p, key = merged
        value = merging.merge_tensor(method, arrays[-n:], arrays[0] if base else None, p,
                                     key, name=names[-1], dtype=out_dtypes[path],
                                     layout=layouts.get(path))
      pending.append(writes.submit(emit, path, layer, span, value))
      while len(pending) > 2:
        pending.pop(0).result()
      del arrays, value
    for f in pending:
      f.result()
  writer.close()
  if hf_writer is not None:
    hf_writer.close()
