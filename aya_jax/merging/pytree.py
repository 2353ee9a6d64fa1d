"""Merges of whole params pytrees: every tensor (each layer of a 'layers/...' leaf on its
own, as mergekit merges `model.layers.{i}.*`) through `methods.merge_tensor` with its
resolved parameters.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import jax
import numpy as np

from aya_jax.merging.methods import array_module, merge_tensor
from aya_jax.merging.parameters import (check_inputs, check_method, hf_layouts, hf_names,
                                        tensor_parameters, warn_weights)


def _flat(tree) -> dict:
  return {"/".join(str(getattr(k, "key", k)) for k in kp): v
          for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge(method: str, models: Sequence, base=None, parameters=None, model_parameters=None,
          *, include: Optional[str] = None, seed=0, cfg=None, dtype=None):
  """Merged params pytree of `models` (and `base`); methods: merging/methods.py.

  include: regex; paths it does not match are copied from base (or the first model).
  seed: int or jax key for DARE. cfg: ModelConfig, for HF names in parameter filters and
  HF's layout in ties of |d| ranks (mergekit's order).
  dtype: output dtype (default: the inputs' dtype). Accumulation is fp32.
  """
  check_method(method, len(models), base is not None)
  trees = ([base] if base is not None else []) + list(models)
  flats = [_flat(t) for t in trees]
  labels = (["base"] if base is not None else []) + [f"model {i}" for i in range(len(models))]
  check_inputs([{k: np.shape(v) for k, v in f.items()} for f in flats], labels,
               [{k: v.dtype for k, v in f.items()} for f in flats], dtype is not None)
  model_parameters = list(model_parameters or [{} for _ in models])
  warn_weights(method, model_parameters, dict(parameters or {}))
  hf_table = hf_names(cfg) if cfg is not None else None
  layouts = hf_layouts(cfg) if cfg is not None else {}
  xflats, bflat = flats[-len(models):], flats[0] if base is not None else None
  out = {}
  for path, ref in flats[0].items():
    if include is not None and not re.search(include, path):
      out[path] = ref
      continue
    xs = [f[path] for f in xflats]
    b = None if bflat is None else bflat[path]
    layers = [None] if not path.startswith("layers/") else range(np.shape(ref)[0])

    def one(layer):
      sl = (lambda a: a) if layer is None else (lambda a: a[layer])
      names, p, key = tensor_parameters(method, parameters, model_parameters, len(models),
                                        path, layer, len(layers), hf_table, seed)
      return merge_tensor(method, [sl(x) for x in xs], None if b is None else sl(b), p, key,
                          name=names[-1], dtype=dtype or ref.dtype, layout=layouts.get(path))

    parts = [one(layer) for layer in layers]
    out[path] = parts[0] if layers == [None] else array_module(*parts).stack(parts)
  leaves = [out[p] for p in flats[0]]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(trees[0]), leaves)
