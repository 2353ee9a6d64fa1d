"""aya_jax.models.hf: configs, HF <-> params round trips, transformers loading, parity.

References: the tiny random transformers models of conftest.hf_tiny_dirs (torch,
fp32, eager attention) and the safetensors files they were saved to.
"""

import contextlib
import json
import logging
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from aya_jax.models import config as config_lib
from aya_jax.models import forward, hf, hf_config

VARIANTS = ("cohere", "cohere_qk", "cohere2", "llama", "llama_bias", "gemma2", "gemma3",
            "qwen2")


def _tensors(path):
  return dict(hf.iter_tensors(path))


def _assert_same_tensors(a_dir, b_dir):
  a, b = _tensors(a_dir), _tensors(b_dir)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    assert a[name].shape == b[name].shape, name
    assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name


def _assert_same_params(a, b):
  import jax
  fa, ta = jax.tree_util.tree_flatten_with_path(a)
  fb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@contextlib.contextmanager
def _transformers_warnings():
  """Collects transformers log records at WARNING and above."""
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logger = logging.getLogger("transformers")
  logger.addHandler(handler)
  try:
    yield records
  finally:
    logger.removeHandler(handler)


def _hf_model(path, cls=None):
  cls = cls or transformers.AutoModelForCausalLM
  with _transformers_warnings() as records:
    model, info = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"] and not info["error_msgs"], info
  assert not [r.getMessage() for r in records]
  return model.eval()


def _batch(length=12, pad=4):
  """Two rows of random tokens; the second is right-padded with `pad` pad tokens."""
  tokens = np.random.RandomState(0).randint(3, 97, (2, length))
  mask = np.ones((2, length), np.int32)
  mask[1, length - pad:] = 0
  tokens[1, length - pad:] = 0
  return tokens, mask


def _hf_logits(model, tokens, mask):
  with torch.no_grad():
    out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.logits.float().numpy()


# --- 2./3. round trips through our params and through transformers -------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_params_hf_round_trip_is_bit_identical(hf_tiny_dirs, variant, tmp_path):
  src = hf_tiny_dirs[variant]
  cfg, params = hf.load(src)
  assert params["layers"]["attn"]["q"]["kernel"].shape == (2, 48, 3, 16)
  assert params["layers"]["attn"]["o"]["kernel"].shape == (2, 3, 16, 48)
  hf.save(cfg, params, tmp_path)
  _assert_same_tensors(src, tmp_path)
  with open(os.path.join(src, "config.json")) as f, open(tmp_path / "config.json") as g:
    assert hf_config.config_from_hf(json.load(f)) == hf_config.config_from_hf(json.load(g))
  assert hf.load(tmp_path)[0] == cfg
  _assert_same_params(hf.load(tmp_path)[1], params)


def test_layout_matches_params_spec(hf_tiny_dirs):
  cfg, params = hf.load(hf_tiny_dirs["qwen2"])
  q = hf.read_hf_tensor(hf_tiny_dirs["qwen2"], "model.layers.1.self_attn.q_proj.weight")
  np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"][1],
                                q.T.reshape(48, 3, 16))
  o = hf.read_hf_tensor(hf_tiny_dirs["qwen2"], "model.layers.0.self_attn.o_proj.weight")
  np.testing.assert_array_equal(params["layers"]["attn"]["o"]["kernel"][0],
                                o.T.reshape(3, 16, 48))
  qb = hf.read_hf_tensor(hf_tiny_dirs["qwen2"], "model.layers.0.self_attn.q_proj.bias")
  np.testing.assert_array_equal(params["layers"]["attn"]["q"]["bias"][0], qb.reshape(3, 16))
  assert "lm_head" not in params and "o" in params["layers"]["attn"]
  assert "bias" not in params["layers"]["attn"]["o"]
  _, params = hf.load(hf_tiny_dirs["gemma2"])
  assert sorted(params["layers"]) == ["attn", "mlp", "post_attn_norm", "post_mlp_norm",
                                      "pre_attn_norm", "pre_mlp_norm"]
  _, params = hf.load(hf_tiny_dirs["cohere_qk"])
  assert params["layers"]["attn"]["k_norm"]["scale"].shape == (2, 1, 16)
  assert sorted(params["layers"]) == ["attn", "mlp", "pre_attn_norm"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_loads_our_save(hf_tiny_dirs, variant, tmp_path):
  cfg, params = hf.load(hf_tiny_dirs[variant])
  hf.save(cfg, params, tmp_path)
  with open(tmp_path / "generation_config.json") as f:
    assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
  tokens, mask = _batch()
  ref = _hf_logits(_hf_model(hf_tiny_dirs[variant]), tokens, mask)
  np.testing.assert_array_equal(_hf_logits(_hf_model(tmp_path), tokens, mask), ref)


# --- 4. logits parity with transformers ----------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_parity_with_transformers(hf_tiny_dirs, variant):
  cfg, params = hf.load(hf_tiny_dirs[variant])
  tokens, mask = _batch(length=12, pad=4)  # 12 > gemma2's sliding window of 4
  ref = _hf_logits(_hf_model(hf_tiny_dirs[variant]), tokens, mask)
  ours = np.asarray(forward(cfg, params, tokens, segment_ids=mask))
  assert ours.shape == ref.shape == (2, 12, 97) and ours.dtype == np.float32
  valid = mask.astype(bool)
  scale = 1.0 / cfg.logit_scale  # cohere logits are scaled by 1/16: compare before scaling
  np.testing.assert_allclose(ours[valid] * scale, ref[valid] * scale, rtol=0, atol=1e-4)
  if variant in ("gemma2", "gemma3", "cohere2"):  # the window matters in this test
    full = np.asarray(forward(cfg.replace(sliding_windows=None), params, tokens,
                              segment_ids=mask))
    assert np.abs(full[valid] - ref[valid]).max() > 1e-3
  if variant == "gemma3":  # and the sliding layer's own RoPE base, and the shared q/k norms
    assert cfg.rope_local_theta == 100.0 and cfg.rope_scaling == ("linear", 2.0)
    one_base = np.asarray(forward(cfg.replace(rope_local_theta=None), params, tokens,
                                  segment_ids=mask))
    assert np.abs(one_base[valid] - ref[valid]).max() > 1e-3
    assert params["layers"]["attn"]["q_norm"]["scale"].shape == (2, 16)
  if variant == "cohere2":  # and the full layer's want of a positional encoding
    rope_everywhere = np.asarray(forward(cfg.replace(rope_on_full_layers=True), params, tokens,
                                         segment_ids=mask))
    assert np.abs(rope_everywhere[valid] - ref[valid]).max() * scale > 1e-3


def test_value_head_parity_with_sequence_classification(hf_tiny_dirs, tmp_path):
  cfg, params = hf.load(hf_tiny_dirs["llama"])
  cfg = cfg.replace(value_head=True)
  params.pop("lm_head", None)  # a value-head model has no LM head
  params["value_head"] = {"kernel": np.random.RandomState(1).randn(48, 1).astype(np.float32)}
  hf.save(cfg, params, tmp_path)
  model = _hf_model(tmp_path, transformers.AutoModelForSequenceClassification)
  tokens, mask = _batch()
  ref = _hf_logits(model, tokens, mask)[:, 0]  # HF pools the last non-pad token
  values = np.asarray(forward(cfg, params, tokens, segment_ids=mask))
  last = mask.sum(1) - 1
  np.testing.assert_allclose(values[np.arange(2), last], ref, rtol=0, atol=1e-4)


# --- value heads, shards, dtypes, shardings ------------------------------------------------
@pytest.mark.parametrize("variant, arch, extra_files", [
    ("llama", "LlamaForSequenceClassification", []),
    ("qwen2", "Qwen2ForSequenceClassification", []),
    ("cohere", "CohereForCausalLM", ["value_head.safetensors"]),
    ("gemma3", "Gemma3TextForSequenceClassification", []),
    ("cohere2", "Cohere2ForCausalLM", ["value_head.safetensors"]),
])
def test_value_head_save_load(hf_tiny_dirs, variant, arch, extra_files, tmp_path):
  cfg, params = hf.load(hf_tiny_dirs[variant])
  cfg = cfg.replace(value_head=True)
  params.pop("lm_head", None)  # a value-head model has no LM head
  params["value_head"] = {"kernel": np.random.RandomState(1).randn(48, 1).astype(np.float32)}
  hf.save(cfg, params, tmp_path)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["architectures"] == [arch]
  for name in extra_files:
    assert (tmp_path / name).exists()
  cfg2, params2 = hf.load(tmp_path)
  assert cfg2 == cfg
  _assert_same_params(params2, params)
  if arch.endswith("ForSequenceClassification"):
    model = _hf_model(tmp_path, transformers.AutoModelForSequenceClassification)
    np.testing.assert_array_equal(model.score.weight.detach().numpy(),
                                  params["value_head"]["kernel"].T)
  else:
    _hf_model(tmp_path)  # loads as a causal LM with no unexpected keys


def test_sharded_save_and_load(hf_tiny_dirs, tmp_path):
  src = hf_tiny_dirs["llama_bias"]
  cfg, params = hf.load(src)
  hf.save(cfg, params, tmp_path, max_shard_bytes=40_000)
  shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
  assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
  with open(tmp_path / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == shards
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in _tensors(src).values())
  _assert_same_tensors(src, tmp_path)
  cfg2, params2 = hf.load(tmp_path)
  assert cfg2 == cfg
  _assert_same_params(params2, params)
  tokens, mask = _batch()
  np.testing.assert_array_equal(_hf_logits(_hf_model(tmp_path), tokens, mask),
                                _hf_logits(_hf_model(src), tokens, mask))
  # saving again unsharded removes the stale shards
  hf.save(cfg, params, tmp_path)
  assert not list(tmp_path.glob("model-*")) and not (tmp_path / hf.INDEX_FILE).exists()
  _assert_same_tensors(src, tmp_path)


def test_bfloat16_save_and_load(hf_tiny_dirs, tmp_path):
  cfg, params = hf.load(hf_tiny_dirs["gemma2"])
  hf.save(cfg, params, tmp_path, dtype=ml_dtypes.bfloat16)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  name = "model.layers.0.mlp.up_proj.weight"
  assert hf.read_hf_tensor(tmp_path, name).dtype == ml_dtypes.bfloat16
  _, back = hf.load(tmp_path)
  assert back["layers"]["mlp"]["up"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(
      back["layers"]["mlp"]["up"]["kernel"],
      params["layers"]["mlp"]["up"]["kernel"].astype(ml_dtypes.bfloat16).astype(np.float32))
  _, back16 = hf.load(tmp_path, dtype=ml_dtypes.bfloat16)
  assert back16["embedder"]["embedding"].dtype == ml_dtypes.bfloat16
  _hf_model(tmp_path)


def test_streaming_helpers(hf_tiny_dirs):
  src = hf_tiny_dirs["cohere_qk"]
  names = hf.hf_tensor_names(src)
  assert "model.layers.1.self_attn.q_norm.weight" in names and "lm_head.weight" not in names
  assert [n for n, _ in hf.iter_tensors(src)] == names
  t = hf.read_hf_tensor(src, "model.layers.1.self_attn.q_norm.weight")
  assert t.shape == (3, 16) and t.dtype == np.float32
  with pytest.raises(ValueError, match="model.nope"):
    hf.read_hf_tensor(src, "model.nope")


def test_load_with_shardings(hf_tiny_dirs):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  _, host = hf.load(hf_tiny_dirs["qwen2"])
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), host)
  shardings["embedder"]["embedding"] = NamedSharding(mesh, P(None, "fsdp") if 48 % len(
      jax.devices()) == 0 else P())
  _, params = hf.load(hf_tiny_dirs["qwen2"], shardings=shardings)
  emb = params["embedder"]["embedding"]
  assert isinstance(emb, jax.Array) and emb.sharding == shardings["embedder"]["embedding"]
  _assert_same_params(params, host)


# --- 5. errors ----------------------------------------------------------------------------
def _edited_copy(src, dst, edit):
  """Copies a HF dir and rewrites model.safetensors with edit(tensors)."""
  shutil.copytree(src, dst)
  tensors = _tensors(dst)
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return os.path.join(dst, "model.safetensors")


def test_missing_tensor_names_tensor_and_file(hf_tiny_dirs, tmp_path):
  name = "model.layers.1.mlp.up_proj.weight"
  file = _edited_copy(hf_tiny_dirs["llama"], tmp_path / "m", lambda t: t.pop(name))
  with pytest.raises(ValueError, match=f"{name}.*missing.*{file}"):
    hf.load(tmp_path / "m")


def test_missing_untied_lm_head_is_an_error(hf_tiny_dirs, tmp_path):
  _edited_copy(hf_tiny_dirs["llama"], tmp_path / "m", lambda t: t.pop("lm_head.weight"))
  with pytest.raises(ValueError, match="lm_head.weight.*missing"):
    hf.load(tmp_path / "m")


def test_unexpected_tensor_names_it(hf_tiny_dirs, tmp_path):
  def edit(t):
    t["model.layers.0.self_attn.extra.weight"] = np.zeros((3, 3), np.float32)
    t["model.rotary_emb.inv_freq"] = np.zeros((8,), np.float32)  # ignorable
  file = _edited_copy(hf_tiny_dirs["qwen2"], tmp_path / "m", edit)
  with pytest.raises(ValueError, match=f"unexpected.*model.layers.0.self_attn.extra.weight.*{file}"):
    hf.load(tmp_path / "m")


def test_shape_mismatch_names_tensor_and_shapes(hf_tiny_dirs, tmp_path):
  name = "model.layers.0.self_attn.k_proj.weight"
  file = _edited_copy(hf_tiny_dirs["gemma2"], tmp_path / "m",
                      lambda t: t.update({name: np.zeros((32, 48), np.float32)}))
  with pytest.raises(ValueError, match=rf"{name}.*{file}.*\(32, 48\).*expected \(16, 48\)"):
    hf.load(tmp_path / "m")


def test_tied_lm_head_present_must_equal_embedding(hf_tiny_dirs, tmp_path):
  src = hf_tiny_dirs["cohere"]
  _edited_copy(src, tmp_path / "same", lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  _assert_same_params(hf.load(tmp_path / "same")[1], hf.load(src)[1])
  _edited_copy(src, tmp_path / "diff", lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
  with pytest.raises(ValueError, match="lm_head.weight.*differs"):
    hf.load(tmp_path / "diff")


def test_unsupported_architecture_names_it_and_the_file(hf_tiny_dirs, tmp_path):
  shutil.copytree(hf_tiny_dirs["llama"], tmp_path / "m")
  path = tmp_path / "m" / "config.json"
  with open(path) as f:
    d = json.load(f)
  d["architectures"] = ["GPT2LMHeadModel"]
  with open(path, "w") as f:
    json.dump(d, f)
  with pytest.raises(ValueError, match=f"GPT2LMHeadModel.*{path}"):
    hf.load(tmp_path / "m")


def test_save_checks_params(tmp_path):
  cfg = config_lib.tiny("llama")
  params = {"embedder": {"embedding": np.zeros((97, 48), np.float32)}}
  with pytest.raises(ValueError, match="final_norm/scale"):
    hf.save(cfg, params, tmp_path)


def _sharded_copy(src, dst):
  cfg, params = hf.load(src)
  hf.save(cfg, params, dst, max_shard_bytes=40_000)
  with open(os.path.join(dst, hf.INDEX_FILE)) as f:
    return json.load(f)


def _write_index(dst, index):
  with open(os.path.join(dst, hf.INDEX_FILE), "w") as f:
    json.dump(index, f)


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/passwd", "a/../../x.safetensors",
                                   "", "."])
def test_index_shards_stay_inside_the_model_directory(hf_tiny_dirs, tmp_path, shard):
  index = _sharded_copy(hf_tiny_dirs["llama"], tmp_path / "m")
  (tmp_path / "x.safetensors").write_bytes((tmp_path / "m" / next(
      iter(index["weight_map"].values()))).read_bytes())  # a real file outside the dir
  index["weight_map"]["model.norm.weight"] = shard
  _write_index(tmp_path / "m", index)
  match = rf"{hf.INDEX_FILE}: tensor 'model.norm.weight' is in '{shard}', which is not a file"
  with pytest.raises(ValueError, match=match):
    hf.load(tmp_path / "m")
  from aya_jax import checkpoint
  with pytest.raises(ValueError, match=match):
    checkpoint.open_reader(str(tmp_path / "m"))


def test_index_that_disagrees_with_its_shards(hf_tiny_dirs, tmp_path):
  index = _sharded_copy(hf_tiny_dirs["llama"], tmp_path / "m")
  shards = sorted(set(index["weight_map"].values()))
  wrong = next(s for s in shards if s != index["weight_map"]["model.norm.weight"])
  index["weight_map"]["model.norm.weight"] = wrong
  _write_index(tmp_path / "m", index)
  with pytest.raises(ValueError, match=f"lists tensor 'model.norm.weight' in .*{wrong}, which "
                                       "does not hold it"):
    hf.load(tmp_path / "m")
  with open(tmp_path / "m" / hf.INDEX_FILE, "w") as f:
    f.write('{"weight_map": ')
  with pytest.raises(ValueError, match=f"{hf.INDEX_FILE}: not a safetensors index"):
    hf.load(tmp_path / "m")


def test_tensor_in_two_files_is_an_error(hf_tiny_dirs, tmp_path):
  shutil.copytree(hf_tiny_dirs["cohere"], tmp_path / "m")
  norm = hf.read_hf_tensor(tmp_path / "m", "model.norm.weight")
  save_file({"model.norm.weight": norm}, str(tmp_path / "m" / "value_head.safetensors"))
  with pytest.raises(ValueError, match="'model.norm.weight' is in both .*model.safetensors "
                                       "and .*value_head.safetensors"):
    hf.Reader(tmp_path / "m")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("hidden_size"), r"hidden_size=None in .*config.json: a positive integer"),
    (lambda d: d.update(num_hidden_layers=10**9), r"'model.layers.2.[\w.]+' .* is missing "
                                                  "from .*model.safetensors"),
])
def test_config_json_that_disagrees_or_lacks_dims(hf_tiny_dirs, tmp_path, edit, match):
  shutil.copytree(hf_tiny_dirs["llama"], tmp_path / "m")
  path = tmp_path / "m" / "config.json"
  d = json.loads(path.read_text())
  edit(d)
  path.write_text(json.dumps(d))
  with pytest.raises(ValueError, match=match):
    hf.load(tmp_path / "m")  # 10**9 layers: fails before allocating them
  path.write_text('{"architectures": ["LlamaForCausalLM"], ')
  with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
    hf.load(tmp_path / "m")
