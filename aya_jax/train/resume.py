"""What makes a resume safe: one run per workdir, and the same training config.

    with resume.WorkdirLock(workdir):
      resume.check_config(workdir, config, has_checkpoint)

- `WorkdirLock`: an exclusive `fcntl.flock` on `workdir/.lock`, held by
  process 0 for the life of the training loop. A second run on the same
  workdir fails at once, naming the workdir and the pid that holds it (two
  runs sharing checkpoints would resume from each other's state). The kernel
  drops the lock when the holder dies (kill -9 included), so a killed run
  never leaves a stale lock.
- `check_config`: the training config of the run that wrote the checkpoints
  is kept beside them (`workdir/run_config.json`); a resume with
  a different training config fails, listing the fields that differ, unless
  `loop.allow_config_change` is set. Fields that do not change what is
  trained (`RESUME_SAFE`: the step count, logging and checkpoint cadence,
  evaluation, the mesh, remat and chunking, HF export) may change between a
  run and its resume. Absolute paths are compared relative to the workdir, so
  a workdir moved or copied together with its inputs still resumes.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

import jax
from absl import logging

from aya_jax.data import atomic

CONFIG_FILE = "run_config.json"

# dotted config fields (or prefixes) that a resumed run may change
RESUME_SAFE = ("loop.num_steps", "loop.log_every", "loop.checkpoint_every",
               "loop.keep_checkpoints", "loop.eval_every", "loop.max_nonfinite",
               "loop.peak_tflops_per_device", "loop.flops_per_token", "loop.allow_config_change",
               "data.eval", "data.eval_batches", "export_hf", "export_hf_dtype", "distributed",
               "mesh", "model.remat", "model.attention_chunk", "model.vocab_chunk", "dry_run")


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir's lock."""


class ConfigChanged(ValueError):
  """The checkpoints in a workdir were written under another training config."""


class WorkdirLock:
  """An exclusive lock on `workdir/.lock` (process 0 only; others no-op)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._fd = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirInUse(
          f"workdir {os.path.dirname(self.path)} is in use by another run (pid {holder} holds "
          f"{self.path}); wait for it to finish or use another workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _flatten(tree: Any, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _safe(name: str) -> bool:
  return any(name == s or name.startswith(s + ".") for s in RESUME_SAFE)


def training_fields(config, workdir: str) -> dict:
  """{dotted field: JSON value} of what a resume must not change."""
  root = os.path.abspath(workdir)

  def norm(v):
    if isinstance(v, str) and os.path.isabs(v):
      return os.path.relpath(v, root)
    if isinstance(v, (list, tuple)):
      return [norm(x) for x in v]
    return v

  flat = _flatten(json.loads(json.dumps(config.to_dict(), default=str)))
  return {k: norm(v) for k, v in sorted(flat.items()) if not _safe(k)}


def check_config(workdir: str, config, has_checkpoint: bool) -> None:
  """Refuses to resume checkpoints written under another training config;
  records the config for the checkpoints this run writes (process 0)."""
  path = os.path.join(workdir, CONFIG_FILE)  # beside checkpoints/, which Orbax owns
  fields = training_fields(config, workdir)
  if has_checkpoint and os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        before = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigChanged(f"{path}: unreadable ({e}); it records the config of the "
                          "checkpoints beside it: restore it or use another workdir") from e
    diff = sorted(k for k in set(before) | set(fields) if before.get(k) != fields.get(k))
    if diff:
      lines = "; ".join(f"{k}: {before.get(k)!r} -> {fields.get(k)!r}" for k in diff[:8])
      if not config.loop.get("allow_config_change", False):
        raise ConfigChanged(
            f"{workdir}/checkpoints holds checkpoints of a run with another training config "
            f"({len(diff)} field(s) differ: {lines}). Use another workdir, or resume anyway "
            "with --config.loop.allow_config_change=True")
      logging.warning("resuming %s despite a changed config (loop.allow_config_change): %s",
                      workdir, lines)
    elif not diff:
      return
  elif has_checkpoint:
    logging.warning("%s has checkpoints but no %s: cannot check that they belong to this "
                    "config", workdir, CONFIG_FILE)
  if jax.process_index() == 0:
    atomic.write_json(path, fields, indent=1, sort_keys=True)
