"""A whole merge as a `MergeSpec`: from a mergekit-style YAML (`spec_from_yaml`) or
configs/merge.py's `merge` block (`spec_from_config`); merging/stream.py runs it over
checkpoints. Its parameters are resolved per tensor by merging/parameters.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

from aya_jax.merging.methods import METHODS


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
    if self.method not in METHODS:
      raise ValueError(f"unknown merge_method {self.method!r}; known: {sorted(METHODS)}")
    if not self.model_parameters:
      self.model_parameters = [{} for _ in self.models]
    if len(self.model_parameters) != len(self.models):
      raise ValueError(f"{len(self.model_parameters)} model_parameters for "
                       f"{len(self.models)} models")
    if METHODS[self.method][0] and self.base in self.models:
      i = self.models.index(self.base)  # mergekit lists the base among the models too
      self.models = self.models[:i] + self.models[i + 1:]
      self.model_parameters = self.model_parameters[:i] + self.model_parameters[i + 1:]


def _read_yaml(text_or_path: str):
  """(parsed YAML, where: the file or '<merge YAML text>'). One line that is an existing
  file, or that has no ':' or ends in .yml / .yaml, is a path: it must exist."""
  import yaml
  text, where = text_or_path, "<merge YAML text>"
  if "\n" not in text and (os.path.isfile(text) or ":" not in text or
                           text.rstrip().endswith((".yml", ".yaml"))):
    if not os.path.isfile(text):
      raise FileNotFoundError(f"merge YAML file {text!r} does not exist (config merge.yaml "
                              "takes a path or the YAML text itself)")
    with open(text, encoding="utf-8") as f:
      text, where = f.read(), text
  try:
    d = yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None))
                    if x) or str(e)
    raise ValueError(f"{at}: merge YAML is not valid YAML: {what}") from None
  if not isinstance(d, Mapping) or "merge_method" not in d:
    got = "a mapping without merge_method" if isinstance(d, Mapping) else type(d).__name__
    raise ValueError(f"{where}: a merge YAML is a mapping with merge_method, models, ...; "
                     f"got {got}")
  return d, where


def spec_from_yaml(text_or_path: str) -> MergeSpec:
  """A MergeSpec from mergekit YAML (merge_method, models, base_model, parameters, dtype):
  a file's path or the text; errors name the file (and line)."""
  d, where = _read_yaml(text_or_path)
  unsupported = sorted(set(d) - {"merge_method", "models", "base_model", "parameters",
                                 "dtype", "out_dtype", "tokenizer_source", "include",
                                 "seed"})
  if unsupported:
    raise ValueError(f"{where}: {unsupported} are not supported (slices, modules, "
                     "tokenizer merges); use models/base_model/parameters")
  models = [m["model"] if isinstance(m, Mapping) else m for m in d.get("models") or []]
  params = [dict((m.get("parameters") or {}) if isinstance(m, Mapping) else {})
            for m in d.get("models") or []]
  try:
    return MergeSpec(method=d["merge_method"], models=models, model_parameters=params,
                     base=d.get("base_model"), parameters=dict(d.get("parameters") or {}),
                     dtype=d.get("out_dtype") or d.get("dtype"), include=d.get("include"),
                     seed=int(d.get("seed", 0)))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


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
