"""Metric writers (JSONL, optional TensorBoard), host 0 only.

    writer = MetricWriter(workdir)
    acc = MeanAccumulator()
    for step in ...:
      state, m = train_step(state, batch)   # m: dict of device scalars
      acc.add(m)                            # no host sync here
      if step % log_every == 0:
        writer.write(step, acc.result())    # one transfer, floats, reset

``workdir/metrics.jsonl`` gets one line per write, ``{"step", "time",
**scalars}``, appended (a resumed run continues the file) and flushed at
once. Non-finite values are written as NaN / Infinity (Python's json reads
them back), so a NaN loss is recorded, not hidden. Processes other than
``jax.process_index() == 0`` write nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Optional

from absl import logging
import jax
import numpy as np

FILENAME = "metrics.jsonl"


def _to_float(name: str, value: Any) -> float:
  arr = np.asarray(jax.device_get(value))
  if arr.size != 1:
    raise ValueError(f"metric {name!r} is not a scalar: shape {arr.shape}")
  return float(arr.reshape(()))


def _tensorboard_writer(logdir: str) -> Optional[Any]:
  """A tensorboardX or flax SummaryWriter if one is importable, else None."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-error
    return SummaryWriter(logdir)
  except ImportError:
    pass
  try:
    from flax.metrics import tensorboard  # needs tensorflow
    return tensorboard.SummaryWriter(logdir)
  except ImportError:
    pass
  logging.warning("TensorBoard requested but neither tensorboardX nor "
                  "tensorflow is installed; writing JSONL only.")
  return None


class MetricWriter:
  """Appends scalar metrics to ``workdir/metrics.jsonl`` on process 0.

  Args:
    workdir: the run directory (created if missing).
    also_tensorboard: also write TensorBoard events under ``workdir/tensorboard``
      (tensorboardX, a dependency; or flax's writer when tensorflow is there;
      without either a warning is logged once). The train loop turns it on:
      `tensorboard --logdir runs/demo` shows every stage's curves.
  """

  def __init__(self, workdir: str, also_tensorboard: bool = False):
    self.path = os.path.join(os.fspath(workdir), FILENAME)
    self.active = jax.process_index() == 0
    self._file = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(os.fspath(workdir), exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    if also_tensorboard:
      self._tb = _tensorboard_writer(os.path.join(os.fspath(workdir),
                                                  "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one line; values may be Python numbers or scalar arrays."""
    if not self.active:
      return
    if self._file is None:
      raise ValueError(f"{self.path}: writer is closed")
    for reserved in ("step", "time"):
      if reserved in scalars:
        raise ValueError(f"metric name {reserved!r} is reserved")
    values = {k: _to_float(k, v) for k, v in scalars.items()}
    line = {"step": int(step), "time": time.time(), **values}
    self._file.write(json.dumps(line) + "\n")
    self._file.flush()
    if self._tb is not None:
      # flax's writer has .scalar(tag, value, step), tensorboardX .add_scalar
      add = getattr(self._tb, "scalar", None) or self._tb.add_scalar
      for k, v in values.items():
        add(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str) -> list[dict]:
  """The lines of a metrics file (or of ``path/metrics.jsonl``), as dicts."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, FILENAME)
  out = []
  with open(path, "r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed metrics line: {e}") \
            from None
  return out


class MeanAccumulator:
  """Averages dicts of scalar metrics over steps; converts at ``result()``.

  ``add`` only keeps references to the (device) arrays, so the step loop
  never waits on the device; ``result`` fetches them all at once and
  returns per-key means as Python floats (keys may come and go: each is
  averaged over the steps that had it), then resets.
  """

  def __init__(self):
    self._values: dict[str, list] = {}

  def add(self, metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
      self._values.setdefault(k, []).append(v)

  def __len__(self) -> int:
    return max((len(v) for v in self._values.values()), default=0)

  def result(self, reset: bool = True) -> dict[str, float]:
    fetched = jax.device_get(self._values)
    out = {}
    for k, vs in fetched.items():
      arrs = [np.asarray(v, np.float64) for v in vs]
      if any(a.size != 1 for a in arrs):
        raise ValueError(f"metric {k!r} is not a scalar")
      out[k] = float(math.fsum(float(a.reshape(())) for a in arrs) / len(arrs))
    if reset:
      self.reset()
    return out

  def reset(self) -> None:
    self._values = {}
