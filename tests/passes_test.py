"""A sampling pass in batches: the same samples in one call as batch by batch, and a
killed pass resumes at its first unfinished batch with the same samples."""

import os

import jax
import numpy as np
import pytest

from aya_jax.models import init_params, tiny
from aya_jax.sampling import methods, passes, sampler


@pytest.fixture(scope="module")
def model():
  cfg = tiny("llama")
  return cfg, jax.jit(lambda k: init_params(cfg, k))(jax.random.key(3))


PROMPTS = [np.random.default_rng(i).integers(3, 97, 3 + i % 4).astype(np.int32)
           for i in range(7)]
METHOD = methods.from_config(1.0, 0, 1.0)


class _Killed(Exception):
  pass


def _counting(fail_at=None):
  calls = []

  def generate(*args, **kw):
    calls.append(len(args[2]))
    if fail_at is not None and len(calls) == fail_at:
      raise _Killed()
    return sampler.generate(*args, **kw)
  return generate, calls


def _run(model, cache_dir="", generate=None):
  cfg, params = model
  return passes.generate_batches(cfg, params, PROMPTS, jax.random.key(5), METHOD, 6, (1,), 2,
                                 3, cache_dir=cache_dir, generate=generate)


def _same(a, b):
  assert len(a[0]) == len(b[0]) == 2 * len(PROMPTS)
  for x, y in zip(a[0], b[0]):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(a[2], b[2])


def test_batches_use_the_key_of_their_start(model):
  """Batch s samples with fold_in(key, s): batch 3..5 by itself gives its rows of the pass."""
  cfg, params = model
  whole = _run(model)
  part = sampler.generate(cfg, params, PROMPTS[3:6], jax.random.fold_in(jax.random.key(5), 3),
                          METHOD, 6, (1,), 2)
  for r in range(6):
    np.testing.assert_array_equal(whole[0][6 + r], part.completion(r))


def test_a_killed_pass_resumes_with_the_same_samples(model, tmp_path):
  whole = _run(model)
  generate, calls = _counting(fail_at=3)
  with pytest.raises(_Killed):
    _run(model, str(tmp_path), generate)
  assert calls == [3, 3, 1]  # killed in the last batch: two batches written
  (cache,) = os.listdir(tmp_path)
  assert sorted(os.listdir(tmp_path / cache)) == ["batch_0.0.npz", "batch_3.0.npz"]
  generate, calls = _counting()
  _same(_run(model, str(tmp_path), generate), whole)
  assert calls == [1]  # only the unfinished batch
  generate, calls = _counting()
  _same(_run(model, str(tmp_path), generate), whole)
  assert calls == []  # a finished pass reads every batch
  # a torn batch file is generated again; other settings get a directory of their own
  (tmp_path / cache / "batch_3.0.npz").write_bytes(b"torn")
  generate, calls = _counting()
  _same(_run(model, str(tmp_path), generate), whole)
  assert calls == [3]
  cfg, params = model
  passes.generate_batches(cfg, params, PROMPTS, jax.random.key(6), METHOD, 6, (1,), 2, 3,
                          cache_dir=str(tmp_path))
  assert len(os.listdir(tmp_path)) == 2
