"""Merging checkpoints on disk: mergekit 0.1.5 parity on tiny HF Llama checkpoints (fp32;
bf16 bit for bit; DARE's statistics), streaming == in memory, bounded memory, a failed merge
keeps the previous one, the config stage."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

from aya_jax import checkpoint
from aya_jax.merging import methods as merging
from aya_jax.merging import pytree
from aya_jax.merging import spec as merge_spec
from aya_jax.merging import stage as merge_stage
from aya_jax.merging import stream as merge_stream
from aya_jax.models import hf

from conftest import hf_tiny_model

A = np.float32


# ---------------------------------------------------------------------------
# checkpoints on disk: tiny HF Llama models
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("merge_llama")
  dirs = []
  for seed in range(3):
    dirs.append(str(root / f"m{seed}"))
    hf_tiny_model("llama", seed + 10).save_pretrained(dirs[-1])
  return dirs


def _load(path):
  return pytree._flat(checkpoint.load_model(path)[1])


MERGEKIT_CASES = {
    "linear": ("", [dict(weight=0.3), dict(weight=[0.7, 0.2])], {}),
    "task_arithmetic": ("base", [dict(weight=0.3), dict(weight=-0.2)], {"lambda": 0.9}),
    "ties": ("base", [dict(weight=0.6, density=0.5), dict(weight=0.5, density=[0.3, 0.9])], {}),
    "dare_ties": ("base", [dict(weight=0.6, density=1.0), dict(weight=0.5, density=1.0)], {}),
    "dare_linear": ("base", [dict(weight=0.6, density=1.0), dict(weight=0.5, density=1.0)], {}),
    "breadcrumbs": ("base", [dict(weight=0.6, density=0.7, gamma=0.05),
                             dict(weight=0.5, density=0.8, gamma=0.02)], {}),
    "slerp": ("base", [{}], {"t": [{"filter": "self_attn", "value": [0.1, 0.9]},
                                   {"value": 0.4}]}),
    "model_stock": ("base", [{}, {}], {}),
}


def _mergekit_and_ours(d, tmp_path):
  """The merge `d` (a mergekit config dict) by mergekit 0.1.5 and by merge_stream (from the
  same YAML); both outputs loaded as flat params."""
  import yaml
  from mergekit.config import MergeConfiguration
  from mergekit.merge import MergeOptions, run_merge
  run_merge(MergeConfiguration.model_validate(d), str(tmp_path / "mk"),
            MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
  merge_stage.merge_from_spec(merge_spec.spec_from_yaml(yaml.safe_dump(d)),
                               str(tmp_path / "ours"))
  ref, ours = _load(str(tmp_path / "mk")), _load(str(tmp_path / "ours"))
  assert set(ref) == set(ours)
  return ref, ours


def _mergekit_config(method, base, mps, params, dirs, **extra):
  d = dict(merge_method=method, parameters=params,
           models=[dict(model=m, parameters=p) for m, p in zip(dirs[1:1 + len(mps)], mps)],
           **extra)
  if base:
    d["base_model"] = dirs[0]
    d["models"].insert(0, dict(model=dirs[0]))  # mergekit style: base listed too
  return d


@pytest.mark.parametrize("method", sorted(MERGEKIT_CASES))
def test_matches_mergekit(method, llama_dirs, tmp_path):
  d = _mergekit_config(method, *MERGEKIT_CASES[method], llama_dirs, dtype="float32")
  ref, ours = _mergekit_and_ours(d, tmp_path)
  diff = max(float(np.abs(ref[k] - ours[k]).max()) for k in ref)
  assert diff < 1e-6, (method, diff)


@pytest.fixture(scope="module")
def coarse_bf16_dirs(tmp_path_factory):
  """Tiny HF Llama checkpoints in bf16 whose values are multiples of 1/32: |d| ties a lot."""
  import torch
  root = tmp_path_factory.mktemp("merge_bf16")
  dirs = []
  for seed in range(4):
    model = hf_tiny_model("llama", seed + 20)
    with torch.no_grad():
      for _, t in model.named_parameters():
        t.copy_(torch.round(t * 32) / 32)
    dirs.append(str(root / f"m{seed}"))
    model.to(torch.bfloat16).save_pretrained(dirs[-1])
  return dirs


@pytest.mark.parametrize("method, mps", [
    ("ties", [dict(weight=0.6, density=0.5), dict(weight=0.5, density=[0.3, 0.9]),
              dict(weight=0.3, density=0.7)]),
    ("breadcrumbs", [dict(weight=0.6, density=0.7, gamma=0.05),
                     dict(weight=0.5, density=0.4, gamma=0.1)]),
    ("breadcrumbs_ties", [dict(weight=0.6, density=0.6, gamma=0.02),
                          dict(weight=0.5, density=0.8, gamma=0.1),
                          dict(weight=0.4, density=0.5, gamma=0.05)])])
def test_matches_mergekit_bf16_exactly(method, mps, coarse_bf16_dirs, tmp_path):
  # bf16 checkpoints with coarse values: many equal |d| at each TIES / breadcrumbs cut,
  # where mergekit's sort decides which are kept. mergekit computes in fp32 (dtype) and
  # writes bf16 (out_dtype), as we do: every output bit must be the same.
  d = _mergekit_config(method, "base", mps, {}, coarse_bf16_dirs, dtype="float32",
                       out_dtype="bfloat16")
  ref, ours = _mergekit_and_ours(d, tmp_path)
  assert {ours[k].dtype for k in ours} == {np.dtype(ml_dtypes.bfloat16)}  # (hf.load: mergekit's
  bits = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).view(np.uint16)  # bf16 in fp32)
  differ = {k: int(np.count_nonzero(bits(ref[k]) != bits(ours[k]))) for k in ref}
  assert sum(differ.values()) == 0, {k: v for k, v in differ.items() if v}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_drop_matches_mergekit_statistics(method, density, llama_dirs, tmp_path):
  # DARE's masks come from different RNGs (torch.bernoulli vs jax), so compare what they
  # must share: one model, weight 1, out - base = scale * mask * d. Kept fraction: over the
  # ~50k elements its sd is sqrt(p (1 - p) / n) < 0.0023, so 1% is > 4 sd (torch seeded:
  # no flakes). Scale: mergekit matches each tensor's L1 norm, |out - b|_1 = |x - b|_1
  # (not 1/p: |m d|_1 / p misses it by ~0.5% on a 4608-element tensor at p = 0.3).
  import torch
  torch.manual_seed(0)
  d = _mergekit_config(method, "base", [dict(weight=1.0, density=density)], {}, llama_dirs,
                       dtype="float32")
  ref, ours = _mergekit_and_ours(d, tmp_path)
  b, x = _load(llama_dirs[0]), _load(llama_dirs[1])
  delta = {k: np.asarray(x[k], np.float64) - np.asarray(b[k], np.float64) for k in b}
  kept = {}
  for name, out in (("mergekit", ref), ("ours", ours)):
    moved = {k: np.asarray(out[k], np.float64) - np.asarray(b[k], np.float64) for k in b}
    kept[name] = (sum(np.count_nonzero(np.abs(m) > 1e-9) for m in moved.values()) /
                  sum(m.size for m in moved.values()))
    for k in b:  # the L1 norm of every tensor (per layer for stacked ones) is the delta's
      for i in range(moved[k].shape[0] if k.startswith("layers/") else 1):
        sl = (lambda a: a[i]) if k.startswith("layers/") else (lambda a: a)
        np.testing.assert_allclose(np.abs(sl(moved[k])).sum(), np.abs(sl(delta[k])).sum(),
                                   rtol=2e-5, err_msg=f"{name} {k} {i}")
  assert abs(kept["mergekit"] - density) < 0.01 and abs(kept["ours"] - density) < 0.01, kept
  assert abs(kept["mergekit"] - kept["ours"]) < 0.01, kept


@pytest.mark.parametrize("method", ["dare_ties", "task_arithmetic"])
@pytest.mark.parametrize("as_params", [False, True])
def test_streaming_equals_in_memory(llama_dirs, tmp_path, as_params, method, monkeypatch):
  # tiny blocks and chunks: elementwise merges (task_arithmetic) of the embedding, lm_head
  # and MLP kernels run in blocks of HF rows, aligned to the params/ inputs' chunks
  monkeypatch.setattr(merge_stream, "_BLOCK", 500)
  monkeypatch.setattr(checkpoint, "PARAMS_CHUNK_BYTES", 4096)
  inputs = llama_dirs
  cfg, trees = zip(*[hf.load(p) for p in llama_dirs])
  if as_params:  # aya_jax params/ checkpoints (Orbax), as SFT writes them
    inputs = [checkpoint.save_params(str(tmp_path / f"p{i}"), c, t)
              for i, (c, t) in enumerate(zip(cfg, trees))]
    assert checkpoint.open_reader(inputs[0]).chunk("embedder/embedding", 0) < 97
  mp = [{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 0.7}]
  params = {"lambda": [1.0, 0.8]}
  if method == "task_arithmetic":
    mp = [{"weight": 0.6}, {"weight": -0.5}]
    assert merge_stream._blocks((97, 48), False, "copy", [], "") == (0, 10)
  want = pytree._flat(pytree.merge(method, trees[1:], base=trees[0], parameters=params,
                                     model_parameters=mp, seed=5, cfg=cfg[0], dtype="bfloat16"))
  merge_stream.merge_checkpoints(inputs[1:], method, params, str(tmp_path / "out"),
                                 base=inputs[0], out_hf=str(tmp_path / "hf"),
                                 model_merge_parameters=mp, seed=5, dtype="bfloat16")
  for out in ("out", "hf"):
    got = _load(str(tmp_path / out))
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_fast_bf16_cast_equals_ml_dtypes():
  x = np.random.default_rng(0).normal(size=(64, 33)).astype(A) * 1e3
  x[0, :5] = [np.inf, -np.inf, 3.4e38, -0.0, 1.00390625]  # overflow; a tie rounds to even
  for a in (x, x.T, x[:, ::2]):
    got = merging.cast(a, "bfloat16")
    np.testing.assert_array_equal(got.view(np.uint16),
                                  a.astype(ml_dtypes.bfloat16).view(np.uint16))
  assert merging.cast(x.T, "bfloat16").flags.f_contiguous  # memory order kept
  x[1, 1] = np.nan
  assert np.isnan(merging.cast(x, "bfloat16")[1, 1].astype(A))


def test_merged_hf_dir_loads_in_transformers(llama_dirs, tmp_path):
  import torch
  import transformers
  merge_stream.merge_checkpoints(llama_dirs[1:], "ties", None, str(tmp_path / "out"),
                                 base=llama_dirs[0], out_hf=str(tmp_path / "hf"),
                                 model_merge_parameters=[{"weight": 1.0, "density": 0.5}] * 2,
                                 dtype="bfloat16")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
  assert model.model.embed_tokens.weight.dtype == torch.bfloat16
  ours = _load(str(tmp_path / "out"))
  q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(q, ours["layers/attn/q/kernel"][1].astype(A).reshape(48, -1).T)
  with torch.no_grad():
    out = model(torch.tensor([[1, 5, 7]])).logits
  assert out.shape == (1, 3, 97) and torch.isfinite(out).all()


def test_checkpoint_errors_name_the_path(llama_dirs, tmp_path):
  cfg, tree = hf.load(llama_dirs[0])
  other = checkpoint.save_params(str(tmp_path / "v"), cfg.replace(vocab_size=101), dict(
      tree, embedder={"embedding": np.zeros((101, 48), A)}, lm_head={"kernel": np.zeros(
          (48, 101), A)}))
  with pytest.raises(ValueError, match="vocab sizes differ.*embedder/embedding"):
    merge_stream.merge_checkpoints([llama_dirs[1], other], "linear", None, str(tmp_path / "o"),
                                   model_merge_parameters=[{"weight": 1.0}] * 2)
  bf = checkpoint.save_params(str(tmp_path / "bf"), cfg,
                              jax.tree.map(lambda x: x.astype("bfloat16"), tree))
  with pytest.raises(ValueError, match="params .* is bfloat16 in .* pass dtype="):
    merge_stream.merge_checkpoints([llama_dirs[1], bf], "linear", None, str(tmp_path / "o"),
                                   model_merge_parameters=[{"weight": 1.0}] * 2)


def test_yaml_and_config_stage(llama_dirs, tmp_path):
  yml = tmp_path / "m.yml"
  yml.write_text(textwrap.dedent(f"""\
      merge_method: task_arithmetic
      base_model: {llama_dirs[0]}
      models:
        - model: {llama_dirs[0]}
        - model: {llama_dirs[1]}
          parameters: {{weight: 0.5}}
      parameters: {{normalize: false}}
      dtype: float32
      """))
  spec = merge_spec.spec_from_yaml(str(yml))
  assert spec.models == [llama_dirs[1]] and spec.base == llama_dirs[0]
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import merge as merge_config
  config = merge_config.get_config()
  config.merge.yaml = str(yml)
  merge_stage.run(config, str(tmp_path / "w"))
  got, b, x = _load(str(tmp_path / "w/params")), _load(llama_dirs[0]), _load(llama_dirs[1])
  np.testing.assert_allclose(got["layers/mlp/up/kernel"],
                             b["layers/mlp/up/kernel"] + 0.5 * (x["layers/mlp/up/kernel"] -
                                                                b["layers/mlp/up/kernel"]),
                             atol=1e-6)
  config = merge_config.get_config()
  config.merge.models = tuple(llama_dirs[1:])
  config.merge.model_parameters.weight = (0.25, 0.75)
  spec = merge_spec.spec_from_config(config.merge)
  assert spec.model_parameters == [{"weight": 0.25}, {"weight": 0.75}]


def _files(root):
  """relative path -> bytes of every file under root."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), root)] = f.read()
  return out


def _merge_config(models, weights, method="linear", out_hf=False):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import merge as merge_config
  config = merge_config.get_config()
  config.merge.method, config.merge.models = method, tuple(models)
  config.merge.model_parameters.weight = tuple(weights)
  config.merge.out_hf = out_hf
  return config


@pytest.mark.parametrize("out_hf", [False, True])
def test_failed_merge_keeps_the_previous_one(llama_dirs, tmp_path, out_hf):
  # a good merge, then one whose weights cannot be normalised (they sum to 0), into the
  # same workdir: the error names the problem, and params/ (and hf/) and merge_spec.json
  # are byte for byte the good merge's; nothing half-written is left beside them
  work = str(tmp_path / "w")
  merge_stage.run(_merge_config(llama_dirs[1:], (0.25, 0.75), out_hf=out_hf), work)
  before = _files(work)
  assert "merge_spec.json" in before and "params/model_config.json" in before
  assert json.loads(before["merge_spec.json"])["model_parameters"][0] == {"weight": 0.25}
  with pytest.raises(ValueError, match=r"linear weights \[1.0, -1.0\] sum to 0 for tensor"):
    merge_stage.run(_merge_config(llama_dirs[1:], (1.0, -1.0), out_hf=out_hf), work)
  assert _files(work) == before
  assert sorted(os.listdir(tmp_path)) == ["w"] and sorted(os.listdir(work)) == sorted(
      ["merge_spec.json", "params"] + (["hf"] if out_hf else []))
  # a merge that fails while writing (here: a tensor's merge raises) is rolled back too
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(merging, "merge_tensor", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
      merge_stage.run(_merge_config(llama_dirs[1:], (0.5, 0.5), out_hf=out_hf), work)
  assert _files(work) == before and sorted(os.listdir(tmp_path)) == ["w"]
  # and a good one replaces it
  merge_stage.run(_merge_config(llama_dirs[1:], (0.5, 0.5), out_hf=out_hf), work)
  assert json.loads(_files(work)["merge_spec.json"])["model_parameters"][0] == {"weight": 0.5}
  assert sorted(os.listdir(work)) == sorted(["merge_spec.json", "params"] +
                                            (["hf"] if out_hf else []))


_RSS_SCRIPT = """
import resource, sys
import numpy as np
from aya_jax.merging import stream as merge_stream
from aya_jax.models import config, hf
mode, n_layers, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "make":
  cfg = config.tiny("llama", d_model=512, n_heads=8, n_kv_heads=8, head_dim=64, d_ff=2048,
                    n_layers=n_layers)
  rng = np.random.default_rng(0)
  for i in range(4):
    p = {}
    for leaf, name, transform, shape, is_layer in hf.entries(cfg):
      node = p
      for k in leaf[:-1]:
        node = node.setdefault(k, {})
      node[leaf[-1]] = rng.normal(size=((n_layers,) if is_layer else ()) + shape).astype("f4")
    hf.save(cfg, p, f"{root}/m{i}")
else:
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  merge_stream.merge_checkpoints([f"{root}/m{i}" for i in (1, 2, 3)], "ties", None,
                                 f"{root}/out", base=f"{root}/m0", out_hf=f"{root}/hf",
                                 model_merge_parameters=[{"weight": 1.0, "density": 0.5}] * 3)
  print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_depth(tmp_path):
  # peak RSS of a ties merge of 3 models + base (writing params/ and HF), above the
  # process's peak after imports, for 2 and 8 layers (16 MiB per layer per model)
  grow = {}
  for n_layers in (2, 8):
    root = str(tmp_path / f"L{n_layers}")
    for mode in ("make", "merge"):
      res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode, str(n_layers), root],
                           capture_output=True, text=True, check=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
    grow[n_layers] = int(res.stdout.split()[-1])
  layer_bytes = 4 * (4 * 512 * 512 + 3 * 512 * 2048)
  # 8 layers: 4 x 128 MiB of inputs and 128 MiB out; the merge holds a few layer slices
  assert grow[8] < 16 * layer_bytes, grow
  assert grow[8] - grow[2] < 3 * layer_bytes, grow
