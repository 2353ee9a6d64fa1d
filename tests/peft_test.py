"""PEFT LoRA adapters both ways (models/peft.py): our adapters exported load in `peft` on
the HF export of the base with our logits, and `peft`'s adapters load here with its
logits; on tiny Llama and Cohere models and on SmolLM2-135M-Instruct."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from aya_jax import checkpoint
from aya_jax.models import config as mc
from aya_jax.models import forward, hf, lora, peft


TOKENS = (np.arange(30).reshape(2, 15) * 11) % 90 + 3


def _our_adapters(cfg, params, seed=0, std=0.2, **kw):
  """cfg with a LoraConfig and params with random (non-zero) adapters."""
  lcfg = cfg.replace(lora=mc.LoraConfig(**{"rank": 4, "alpha": 8.0, **kw}))
  rng = np.random.default_rng(seed)
  ads = {}
  for path, _, transform, shape, is_layer in hf.entries(cfg):
    stem = "/".join(path[:-1])
    if path[-1] != "kernel" or not is_layer or not lora._compiled(lcfg.lora.targets).fullmatch(
        "/".join(path)):
      continue
    n_in = 1 if transform == "lin" else 2
    node = ads
    for k in stem.split("/"):
      node = node.setdefault(k, {})
    node["a"] = (rng.standard_normal((cfg.n_layers,) + shape[:n_in] + (4,)) * std
                 ).astype(np.float32)
    node["b"] = (rng.standard_normal((cfg.n_layers, 4) + shape[n_in:]) * std
                 ).astype(np.float32)
  return lcfg, {**params, lora.KEY: ads}


def _torch_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("variant", ["llama", "cohere"])
@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapters_load_in_peft_with_our_logits(variant, rslora, hf_tiny_dirs, tmp_path):
  from peft import PeftModel
  cfg, params = hf.load(hf_tiny_dirs[variant])
  lcfg, with_adapters = _our_adapters(cfg, params, rslora=rslora)
  ours = np.asarray(forward(lcfg, with_adapters, TOKENS))
  out = peft.save(lcfg, with_adapters, str(tmp_path / "adapter"), hf_tiny_dirs[variant])
  config = json.load(open(os.path.join(out, peft.CONFIG)))
  assert config["r"] == 4 and config["use_rslora"] == rslora
  assert sorted(config["target_modules"]) == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_tiny_dirs[variant]).eval()
  model = PeftModel.from_pretrained(base, out).eval()
  theirs = _torch_logits(model)
  assert np.abs(ours - np.asarray(forward(cfg, params, TOKENS))).max() > 1e-2
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("variant", ["llama", "cohere"])
def test_peft_adapters_load_here_with_peft_logits(variant, hf_tiny_dirs, tmp_path):
  import peft as hf_peft
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_tiny_dirs[variant]).eval()
  config = hf_peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                              init_lora_weights=False, use_rslora=True)
  torch.manual_seed(0)
  model = hf_peft.get_peft_model(base, config).eval()
  theirs = _torch_logits(model)
  model.save_pretrained(str(tmp_path / "adapter"))
  path = str(tmp_path / "adapter")
  assert json.load(open(os.path.join(path, peft.CONFIG)))["base_model_name_or_path"] == \
      hf_tiny_dirs[variant]
  cfg, adapters = peft.read(path, hf.read_config(hf_tiny_dirs[variant]))
  assert cfg.lora.rank == 8 and cfg.lora.rslora and cfg.lora.scale == 4 / 8 ** 0.5
  assert sorted(lora.adapted_paths(adapters)) == ["layers/attn/q", "layers/attn/v",
                                                  "layers/mlp/down"]
  merged_cfg, merged = checkpoint.load_model(path)  # a PEFT directory is a model path
  assert merged_cfg.lora is None
  np.testing.assert_allclose(np.asarray(forward(merged_cfg, merged, TOKENS)), theirs, atol=1e-4)
  assert checkpoint.peek_config(path) == merged_cfg


def test_unsupported_adapters_are_named(hf_tiny_dirs, tmp_path):
  cfg, params = hf.load(hf_tiny_dirs["llama"])
  ecfg = cfg.replace(lora=mc.LoraConfig(rank=2, experts=2))
  with pytest.raises(ValueError, match="MoLoRA"):
    peft.save(ecfg, {**params, lora.KEY: {}}, str(tmp_path / "x"), hf_tiny_dirs["llama"])
  lcfg, with_adapters = _our_adapters(cfg, params)
  out = peft.save(lcfg, with_adapters, str(tmp_path / "a"), hf_tiny_dirs["llama"])
  config = json.load(open(os.path.join(out, peft.CONFIG)))
  json.dump(dict(config, use_dora=True), open(os.path.join(out, peft.CONFIG), "w"))
  with pytest.raises(ValueError, match="use_dora"):
    checkpoint.load_model(out)
  json.dump(dict(config, base_model_name_or_path="org/some-hub-model"),
            open(os.path.join(out, peft.CONFIG), "w"))
  with pytest.raises(FileNotFoundError, match="org/some-hub-model.*not a local path"):
    checkpoint.load_model(out)


@pytest.mark.slow
def test_smollm2_adapters_round_trip_through_peft(tmp_path):
  """A real model: SmolLM2-135M-Instruct's HF export, our adapters on it, in peft."""
  from peft import PeftModel
  from aya_jax.models import gguf
  from gguf_test import smollm2_path
  os.environ.setdefault("AYA_JAX_CACHE", str(tmp_path / "cache"))
  base_dir = str(tmp_path / "smollm2")
  gguf.convert(smollm2_path(), base_dir)
  cfg, params = hf.load(base_dir)
  lcfg, with_adapters = _our_adapters(cfg, params, seed=1, std=0.05,
                                      targets=r".*/attn/(q|v)/kernel")
  tokens = TOKENS[:1] * 97
  ours = np.asarray(forward(lcfg, with_adapters, tokens))
  out = peft.save(lcfg, with_adapters, str(tmp_path / "adapter"), base_dir)
  model = PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval(), out).eval()
  theirs = _torch_logits(model, tokens)
  assert np.abs(ours - np.asarray(forward(cfg, params, tokens))).max() > 1e-2
  np.testing.assert_allclose(ours, theirs, atol=1e-4 * max(1.0, np.abs(theirs).max()))
  back_cfg, back = checkpoint.load_model(out)  # and back through our PEFT reader
  np.testing.assert_allclose(np.asarray(forward(back_cfg, back, tokens)), ours, atol=1e-4)
