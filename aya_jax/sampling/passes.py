"""A sampling pass over many prompts, in batches, that resumes where it stopped.

`generate_batches(...)` calls `sampler.generate` on `batch` prompts at a time, batch s
with the key `fold_in(rng, s)`, so every batch's samples depend only on the pass's key
and the batch's own prompts. With a `cache_dir`, each finished batch is written there
(`batch_<start>.<process>.npz`, atomically; each process writes and reads its own, so
hosts need no shared filesystem) under a directory named by a hash of what the samples
depend on (the prompts' ids, n, max_new_tokens, the method, the stop ids, the key data).
A pass that was killed and runs again reads its finished batches and generates only the
rest: the same samples as an uninterrupted pass. The policy is not part of the hash: a
cache directory belongs to one policy (the caller's workdir of that policy's round).
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from aya_jax import console
from aya_jax.sampling import sampler


def _key(prompt_ids, n, max_new_tokens, method, stop, rng, batch) -> str:
  h = hashlib.sha256()
  for p in prompt_ids:
    h.update(np.asarray(p, np.int32).tobytes() + b"|")
  h.update(repr((n, max_new_tokens, method, tuple(stop), batch)).encode())
  h.update(np.asarray(jax.random.key_data(rng)).tobytes())
  return h.hexdigest()[:16]


def _save(path: str, rows: list, lengths: np.ndarray, stopped: np.ndarray):
  flat = np.concatenate([np.asarray(r, np.int32) for r in rows]) if rows else np.zeros(0)
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, flat=flat.astype(np.int32), sizes=np.asarray([len(r) for r in rows], np.int64),
           lengths=lengths, stopped=stopped)
  os.replace(tmp, path)


def _load(path: str):
  """A finished batch (rows, lengths, stopped), or None: no file, or a torn one (the batch
  is generated again)."""
  try:
    with np.load(path) as z:
      flat, sizes = z["flat"], z["sizes"]
      rows = np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else []
      return list(rows), z["lengths"], z["stopped"]
  except (OSError, ValueError, KeyError):
    return None


def generate_batches(cfg, params, prompt_ids: Sequence[np.ndarray], rng, method,
                     max_new_tokens: int, stop_ids, n: int, batch: int, mesh=None,
                     rules: str = "fsdp", cache_dir: str = "", label: str = "sampling",
                     generate: Optional[Callable] = None):
  """(completions [P*n] token id arrays, lengths [P*n], stopped [P*n]) of every prompt,
  prompt-major; each finished batch kept in `cache_dir` when given (module docstring)."""
  generate = generate or sampler.generate
  directory = ""
  if cache_dir:
    directory = os.path.join(cache_dir, _key(prompt_ids, n, max_new_tokens, method, stop_ids,
                                             rng, batch))
    os.makedirs(directory, exist_ok=True)
  rows, lengths, stopped = [], [], []
  progress = console.Progress(len(prompt_ids), label, unit="prompt")
  for s in range(0, len(prompt_ids), batch):
    path = os.path.join(directory, f"batch_{s}.{jax.process_index()}.npz") if directory else ""
    got = _load(path) if path else None
    if got is None:
      res = generate(cfg, params, list(prompt_ids[s:s + batch]), jax.random.fold_in(rng, s),
                     method, max_new_tokens, stop_ids, n, mesh=mesh, rules=rules)
      got = ([res.completion(r) for r in range(res.tokens.shape[0])], res.lengths, res.stopped)
      if path:
        _save(path, *got)
    rows += got[0]
    lengths.append(np.asarray(got[1]))
    stopped.append(np.asarray(got[2], bool))
    progress.update(len(prompt_ids[s:s + batch]))
  progress.close()
  return rows, np.concatenate(lengths), np.concatenate(stopped)
