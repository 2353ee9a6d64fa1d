"""The spec-hash step cache: a step runs once per spec and its outputs are
remembered in a state file (`<label>_state.json` of the directory: the
pipeline's `pipeline_state.json`, the world's `world_state.json`).

A step is skipped when the state records it finished with the same spec hash
(its config block plus the hashes of the steps and input paths it reads) and
every output path it recorded still exists; a changed spec re-runs it, a
missing output re-runs it. Output paths inside the directory are stored
relative to it ("./sft_merged/params") and resolved on read, so a copied or
moved directory reads its own files, never the original's; an unreadable
state file is stale (a warning names it) and every step is checked again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Optional

from absl import logging

from aya_jax import console
from aya_jax.data import atomic

STATE = "pipeline_state.json"  # the pipeline's state file (label "pipeline")
HERE = "./"  # how a stored output path inside the workdir starts


def spec_hash(obj) -> str:
  """A short hash of a JSON-able spec: steps are keyed by it."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lead() -> bool:
  import jax
  return jax.process_index() == 0


def sync(tag: str):
  """Every process waits here for the others (nothing on one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def _is_path(s) -> bool:
  """An absolute path among the strings of a step's outputs."""
  return isinstance(s, str) and os.path.isabs(s) and "\n" not in s


def _map_strings(obj, fn):
  if isinstance(obj, dict):
    return {k: _map_strings(v, fn) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_map_strings(v, fn) for v in obj]
  return fn(obj) if isinstance(obj, str) else obj


class Runner:
  """Runs named steps once per spec; remembers finished steps in <label>_state.json.
  A step's directory is workdir/<name> (a name may hold '/')."""

  def __init__(self, workdir: str, label: str = "pipeline", log_dir: Optional[str] = None):
    """log_dir: each step's log also goes to log_dir/<name>.log (None: no step logs)."""
    self.workdir, self.label, self.log_dir = os.path.abspath(workdir), label, log_dir
    os.makedirs(self.workdir, exist_ok=True)
    self.path = os.path.join(self.workdir, f"{label}_state.json")
    self.state = self._load()
    self.ran, self.seconds = [], {}

  def dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def _load(self) -> dict:
    """The recorded steps, output paths resolved against this workdir; an
    unreadable file or entry is dropped with a warning (its steps are checked
    again: those whose directory holds a finished run resume from it)."""
    state = atomic.read_json_cache(self.path, f"{self.label} state")
    if state is not None and not isinstance(state, dict):
      logging.warning("%s: not a JSON object: treated as stale", self.path)
    out = {}
    for name, entry in (state.items() if isinstance(state, dict) else ()):
      if not (isinstance(entry, dict) and isinstance(entry.get("hash"), str)
              and "outputs" in entry):
        logging.warning("%s: entry %r is malformed: step %s will run again", self.path, name,
                        name)
        continue
      out[name] = dict(entry, outputs=_map_strings(entry["outputs"], self._resolve))
    return out

  def _resolve(self, s: str) -> str:
    return os.path.join(self.workdir, os.path.normpath(s[len(HERE):])) if s.startswith(HERE) \
        else s

  def _inside(self, path: str):
    """`path` relative to the workdir; None when it is outside."""
    rel = os.path.relpath(os.path.normpath(path), self.workdir)
    return None if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel

  def _relative(self, s: str) -> str:
    rel = self._inside(s) if _is_path(s) else None
    return s if rel is None else HERE + rel

  def _untrusted(self, outputs) -> str:
    """Why a recorded step cannot be trusted ("" if it can): an output path
    that is missing, or outside this workdir (a state file written with
    absolute paths, then copied or moved)."""
    paths = []
    _map_strings(outputs, lambda s: paths.append(s) if _is_path(s) else None)
    for p in paths:
      if self._inside(p) is None:
        return f"its recorded output {p} is outside the workdir {self.workdir} (a copy?)"
      if not os.path.exists(p):
        return f"its recorded output {p} is missing"
    return ""

  def step(self, name: str, spec: dict, fn, headline=None):
    """fn(directory) -> outputs (JSON); returns (outputs, spec hash).
    `headline(outputs, directory) -> str`: the figure its 'done' line shows."""
    h = spec_hash(spec)
    done = self.state.get(name)
    if done and done["hash"] == h:
      why = self._untrusted(done["outputs"])
      if not why:
        logging.info("%s: %s is done (spec %s), skipped", self.label, name, h)
        return done["outputs"], h
      logging.warning("%s: %s is recorded as done but %s: running it again", self.label, name,
                      why)
    d = self.dir(name)
    partial = os.path.join(d, ".spec")
    if self.state.pop(name, None) is not None:  # its artefacts go: no longer done
      self._save()
    if _lead():  # several processes share the workdir: one cleans it, the others wait
      if os.path.exists(d):
        if _read_text(partial) != h:  # another spec's leftovers: start clean
          shutil.rmtree(d)
      os.makedirs(d, exist_ok=True)
      atomic.write_text(partial, h)
    sync(f"{self.label} step {name} {h}")
    logging.info("%s: running %s (spec %s)", self.label, name, h)
    print(f"[{self.label}] {name} ...", flush=True)
    t0 = time.time()
    with console.step_log(self.log_dir, name):
      outputs = fn(d)
    self.seconds[name] = time.time() - t0
    figure = headline(outputs, d) if headline is not None else ""
    print(f"[{self.label}] {name} done in {self.seconds[name]:.0f}s"
          + (f": {figure}" if figure else ""), flush=True)
    self.state[name] = dict(hash=h, outputs=outputs, seconds=self.seconds[name])
    self.ran.append(name)
    self._save()
    return outputs, h

  def _save(self):
    if not _lead():
      return
    state = {name: dict(entry, outputs=_map_strings(entry["outputs"], self._relative))
             for name, entry in self.state.items()}
    atomic.write_json(self.path, state, indent=1)


def _read_text(path: str):
  """The file's text; None when it is absent or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, ValueError):
    return None
