"""Model configs to and from Hugging Face config.json: round trips, every family's fields,
old-style keys, and errors for what one side cannot express."""

import json
import os

import pytest
import transformers

from aya_jax.models import config as config_lib
from aya_jax.models import hf_config


@pytest.mark.parametrize("cfg", [
    config_lib.tiny("cohere"),
    config_lib.tiny("cohere", qk_norm=True, qkv_bias=True, o_bias=True, value_head=True),
    config_lib.tiny("cohere2"),
    config_lib.tiny("cohere2", n_layers=4, sliding_windows=(4, 4, 4, None), value_head=True),
    config_lib.tiny("llama"),
    config_lib.tiny("llama", qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True,
                    rope_scaling=("llama3", 8.0, 1.0, 4.0, 32), rope_theta=500000.0),
    config_lib.tiny("llama", rope_scaling=("linear", 2.0), eos_ids=(2, 3), bos_id=None,
                    value_head=True),
    config_lib.tiny("gemma2"),
    config_lib.tiny("gemma2", sliding_windows=None, attn_softcap=None, final_softcap=None),
    config_lib.tiny("gemma3"),
    config_lib.tiny("gemma3", rope_scaling=("linear", 8.0), rope_local_theta=100.0,
                    value_head=True, n_layers=6,
                    sliding_windows=(4, 4, 4, 4, 4, None)),
    config_lib.preset("gemma3_270m"),
    config_lib.tiny("qwen2", tie_embeddings=True, rope_theta=1e6, norm_eps=1e-5),
    config_lib.tiny("qwen2", value_head=True, pad_id=None, eos_ids=()),
], ids=lambda c: c.family)
def test_config_round_trip(cfg):
  d = hf_config.config_to_hf(cfg)
  assert hf_config.config_from_hf(json.loads(json.dumps(d))) == cfg
  # transformers rebuilds the same config from it
  hf_cfg = transformers.AutoConfig.for_model(**d)
  assert hf_config.config_from_hf(hf_cfg.to_dict()) == cfg


def test_config_from_hf_fields(hf_tiny_dirs):
  def cfg(variant):
    with open(os.path.join(hf_tiny_dirs[variant], "config.json")) as f:
      return hf_config.config_from_hf(json.load(f))
  c = cfg("cohere_qk")
  assert (c.family, c.norm, c.block, c.qk_norm, c.logit_scale, c.tie_embeddings,
          c.rope_interleaved, c.norm_eps) == ("cohere", "layernorm", "parallel", True, 0.0625,
                                              True, True, 1e-5)
  assert (c.bos_id, c.eos_ids, c.pad_id) == (1, (2,), 0)
  assert cfg("cohere").rope_theta == 500000.0  # CohereConfig's default theta
  c = cfg("llama_bias")
  assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_embeddings) == (True, True, True, True)
  assert c.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 32)
  c = cfg("llama")
  assert (c.rope_scaling, c.tie_embeddings, c.norm_eps) == (("linear", 2.0), False, 1e-5)
  c = cfg("gemma2")
  assert c.sliding_windows == (4, None)
  assert c.query_scale == pytest.approx(24 ** -0.5)
  assert (c.attn_softcap, c.final_softcap, c.activation, c.embed_scale, c.block) == (
      2.0, 1.5, "gelu_tanh", True, "sandwich")
  c = cfg("qwen2")
  assert (c.qkv_bias, c.o_bias, c.rope_theta, c.tie_embeddings) == (True, False, 1e6, True)


def test_config_from_hf_old_style_keys():
  base = dict(vocab_size=97, hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
              intermediate_size=96, num_hidden_layers=4, max_position_embeddings=256)
  # transformers 4 layout: top-level rope_theta, rope_scaling with 'type', eos as a list
  c = hf_config.config_from_hf(dict(base, architectures=["LlamaForCausalLM"], rope_theta=5e5,
                             rope_scaling={"type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0},
                             eos_token_id=[2, 5], bos_token_id=1))
  assert c.rope_theta == 5e5 and c.eos_ids == (2, 5) and c.head_dim == 16
  assert c.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 256)
  # gemma2 without layer_types: even layers slide
  c = hf_config.config_from_hf(dict(base, model_type="gemma2", sliding_window=7, head_dim=16,
                             hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=16))
  assert c.sliding_windows == (7, None, 7, None) and c.query_scale == 0.25


@pytest.mark.parametrize("d, match", [
    (dict(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel.*my/config.json"),
    (dict(model_type="gpt2"), "gpt2.*my/config.json"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True), "use_sliding_window"),
    (dict(architectures=["LlamaForCausalLM"], rope_parameters={"rope_type": "yarn",
                                                               "factor": 2.0}), "yarn"),
])
def test_config_from_hf_errors(d, match):
  base = dict(vocab_size=97, hidden_size=48, num_attention_heads=3, intermediate_size=96,
              num_hidden_layers=2)
  with pytest.raises(ValueError, match=match):
    hf_config.config_from_hf(dict(base, **d), source="my/config.json")


@pytest.mark.parametrize("cfg, field", [
    (config_lib.tiny("llama", qk_norm=True), "qk_norm"),
    (config_lib.tiny("qwen2", o_bias=True), "o_bias"),
    (config_lib.tiny("gemma2", sliding_windows=(4, 8)), "sliding_windows"),
    (config_lib.tiny("llama", logit_scale=0.5), "logit_scale"),
])
def test_config_to_hf_refuses_what_hf_cannot_express(cfg, field):
  with pytest.raises(ValueError, match=field):
    hf_config.config_to_hf(cfg)
