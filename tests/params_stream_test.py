"""params/ streaming (params_stream.py): a LoRA adapter checkpoint read as its merged
model, a layer and a block at a time, and the merge stage over adapter checkpoints (Aya's
per-family merge of LoRA runs): linear over adapters is linear over the fine-tunes' task
vectors, and every method equals the in-memory merge of the merged models."""

import numpy as np
import pytest

from aya_jax import checkpoint
from aya_jax.merging import pytree
from aya_jax.merging import stream as merge_stream
from aya_jax.models import config as mc
from aya_jax.models import lora

from conftest import random_params


def _adapters(cfg, seed):
  """Random, non-zero adapters of rank 3 on q, v and the MLP's down projection."""
  rng = np.random.default_rng(seed)
  shapes = {"attn/q": ((48,), (3, 16)), "attn/v": ((48,), (1, 16)), "mlp/down": ((96,), (48,))}
  out = {}
  for stem, (i, o) in shapes.items():
    a, m = stem.split("/")
    out.setdefault(a, {})[m] = dict(
        a=(rng.standard_normal((cfg.n_layers,) + i + (3,)) * 0.3).astype(np.float32),
        b=(rng.standard_normal((cfg.n_layers, 3) + o) * 0.3).astype(np.float32))
  return {lora.KEY: {"layers": out}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A base params/ dir and two adapter checkpoints on it (different adapters)."""
  d = tmp_path_factory.mktemp("adapters")
  cfg = mc.tiny("llama")
  base = random_params(cfg, 0)
  checkpoint.save_params(str(d / "base"), cfg, base)
  lcfg = cfg.replace(lora=mc.LoraConfig(rank=3, alpha=6.0, targets=r".*/(q|v|down)/kernel"))
  paths = []
  for seed in (1, 2):
    paths.append(checkpoint.save_adapters(str(d / f"run{seed}"), lcfg,
                                          {**base, **_adapters(cfg, seed)}, str(d / "base")))
  return d, cfg, base, lcfg, paths


def test_adapter_reader_reads_the_merged_model(runs):
  d, cfg, base, lcfg, paths = runs
  reader = checkpoint.open_reader(paths[0])
  _, want = lora.merge(lcfg, {**base, **_adapters(cfg, 1)})
  assert reader.cfg == lcfg.replace(lora=None)
  assert set(reader.leaves) == set(pytree._flat(want))
  q = want["layers"]["attn"]["q"]["kernel"]
  np.testing.assert_allclose(reader.read("layers/attn/q/kernel"), q, atol=1e-6)
  np.testing.assert_allclose(reader.read("layers/attn/q/kernel", 1), q[1], atol=1e-6)
  down = want["layers"]["mlp"]["down"]["kernel"]
  np.testing.assert_allclose(reader.read("layers/mlp/down/kernel", 0, (1, 8, 24)),
                             down[0][:, 8:24], atol=1e-6)
  np.testing.assert_array_equal(reader.read("layers/attn/k/kernel", 1),
                                base["layers"]["attn"]["k"]["kernel"][1])  # not adapted


def test_linear_merge_of_adapters_is_the_merge_of_task_vectors(runs, tmp_path):
  d, cfg, base, lcfg, paths = runs
  out = merge_stream.merge_checkpoints(
      paths, "linear", {"normalize": False}, str(tmp_path / "linear"),
      model_merge_parameters=[{"weight": 0.5}, {"weight": 0.5}])
  _, got = checkpoint.load_model(out)
  tuned = [lora.merge(lcfg, {**base, **_adapters(cfg, s)})[1] for s in (1, 2)]
  # by hand: base + the mean of the two task vectors (W_i - W = scale * A_i B_i)
  flat_base, flat = pytree._flat(base), [pytree._flat(t) for t in tuned]
  for path, w in flat_base.items():
    want = w + 0.5 * ((flat[0][path] - w) + (flat[1][path] - w))
    np.testing.assert_allclose(pytree._flat(got)[path], want, atol=1e-5, err_msg=path)


@pytest.mark.parametrize("method,params,per_model", [
    ("task_arithmetic", {"lambda": 0.8}, [{"weight": 0.6}, {"weight": 0.3}]),
    ("ties", {}, [{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 0.7}]),
])
def test_every_method_merges_adapter_checkpoints_as_their_merged_models(runs, tmp_path, method,
                                                                       params, per_model):
  d, cfg, base, lcfg, paths = runs
  out = merge_stream.merge_checkpoints(paths, method, params, str(tmp_path / method),
                                       base=str(d / "base"), model_merge_parameters=per_model)
  _, got = checkpoint.load_model(out)
  tuned = [lora.merge(lcfg, {**base, **_adapters(cfg, s)})[1] for s in (1, 2)]
  want = pytree.merge(method, tuned, base=base, parameters=params, model_parameters=per_model,
                      cfg=cfg)
  for path, x in pytree._flat(want).items():
    np.testing.assert_allclose(pytree._flat(got)[path], x, atol=1e-5, err_msg=path)


def test_a_params_dir_holding_base_and_adapters_reads_as_the_merged_model(runs, tmp_path):
  """A params/ dir of the whole tree with adapters (an online round's merged policy with
  fresh or trained adapters on it) streams as its merged model, like load_model reads it."""
  d, cfg, base, lcfg, paths = runs
  whole = checkpoint.save_params(str(tmp_path / "whole"), lcfg, {**base, **_adapters(cfg, 1)})
  reader = checkpoint.open_reader(whole)
  _, want = lora.merge(lcfg, {**base, **_adapters(cfg, 1)})
  assert set(reader.leaves) == set(pytree._flat(want))
  for path, x in pytree._flat(want).items():
    np.testing.assert_allclose(reader.read(path), x, atol=1e-6, err_msg=path)
  _, loaded = checkpoint.load_model(whole)
  for path, x in pytree._flat(want).items():
    np.testing.assert_allclose(pytree._flat(loaded)[path], x, atol=1e-6, err_msg=path)
