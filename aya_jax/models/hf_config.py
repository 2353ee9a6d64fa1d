"""Hugging Face config.json <-> ModelConfig, both directions, per family.

`config_from_hf` reads a config.json dict (Cohere, Cohere 2, Llama, Gemma 2, Gemma 3,
Qwen 2; value-head
models as `<Family>ForSequenceClassification`, or Cohere's `aya_value_head` flag);
`config_to_hf` writes one that transformers rebuilds the same model from, and refuses a
ModelConfig that the family's HF class cannot express. `write_config` writes config.json
and generation_config.json into a HF directory.
"""

from __future__ import annotations

import json
import os

import numpy as np

from aya_jax.models.config import EXECUTION_FIELDS, ModelConfig, _family_defaults

CONFIG_FILE = "config.json"
# family -> (causal LM class, sequence classification class or None)
ARCHITECTURES = {
    "cohere": ("CohereForCausalLM", None),
    "cohere2": ("Cohere2ForCausalLM", None),
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
}
# family -> config.json model_type where it is not the family's name
MODEL_TYPES = {"gemma3": "gemma3_text"}
# family -> config.json keys that differ, and the HF default rope theta
_HF_KEYS = {
    "cohere": dict(eps="layer_norm_eps", act="hidden_act", theta=500000.0),
    "cohere2": dict(eps="layer_norm_eps", act="hidden_act", theta=10000.0),
    "llama": dict(eps="rms_norm_eps", act="hidden_act", theta=10000.0),
    "gemma2": dict(eps="rms_norm_eps", act="hidden_activation", theta=10000.0),
    "gemma3": dict(eps="rms_norm_eps", act="hidden_activation", theta=1000000.0),
    "qwen2": dict(eps="rms_norm_eps", act="hidden_act", theta=10000.0),
}
# families with sliding-window layers: the default period of their full layers
_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4}
_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _family_of(d: dict, source: str) -> tuple[str, str]:
  archs = d.get("architectures") or []
  for arch in archs[:1]:
    for family, classes in ARCHITECTURES.items():
      if arch in classes:
        return family, arch
    raise ValueError(f"unsupported architecture {arch!r} in {source}; supported: "
                     f"{[a for c in ARCHITECTURES.values() for a in c if a]}")
  model_type = d.get("model_type")
  family = {v: k for k, v in MODEL_TYPES.items()}.get(model_type, model_type)
  if family in ARCHITECTURES:
    return family, ARCHITECTURES[family][0]
  raise ValueError(f"unsupported model_type {model_type!r} (no architectures) in {source}; "
                   f"supported: {sorted(ARCHITECTURES)}")


def _local_rope_from_hf(d: dict, source: str) -> tuple[dict, float]:
  """Gemma 3: (the full-attention layers' rope spec, the sliding layers' theta)."""
  params = d.get("rope_parameters") or {}
  if params and all(isinstance(v, dict) for v in params.values()):  # transformers 5
    local = params.get("sliding_attention", {})
    if local.get("rope_type", "default") != "default":
      raise ValueError(f"rope_parameters.sliding_attention in {source}: only the default "
                       "rope type is supported for sliding-window layers")
    return dict(d, rope_parameters=params.get("full_attention", {})), float(
        local.get("rope_theta", d.get("rope_local_base_freq", 10000.0)))
  return d, float(d.get("rope_local_base_freq", 10000.0))  # 4.x keys


def _rope_from_hf(d: dict, family: str, source: str):
  params = d.get("rope_parameters") or {}
  if params and all(isinstance(v, dict) for v in params.values()):  # nested per layer type
    kinds = list(params.values())
    if any(k != kinds[0] for k in kinds):
      raise ValueError(f"per-layer-type rope_parameters differ in {source}: {params}")
    params = kinds[0]
  spec = d.get("rope_scaling") or params  # transformers gives rope_scaling priority
  theta = spec.get("rope_theta", params.get("rope_theta", d.get("rope_theta")))
  theta = float(_HF_KEYS[family]["theta"] if theta is None else theta)
  if spec.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"partial_rotary_factor={spec['partial_rotary_factor']} in {source} "
                     "is not supported")
  kind = spec.get("rope_type", spec.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, ("linear", float(spec["factor"]))
  if kind == "llama3":
    original = spec.get("original_max_position_embeddings", d.get("max_position_embeddings"))
    return theta, ("llama3", float(spec["factor"]), float(spec["low_freq_factor"]),
                   float(spec["high_freq_factor"]), int(original))
  raise ValueError(f"rope type {kind!r} in {source} is not supported (default, linear, llama3)")


def config_from_hf(d: dict, source: str = "<config dict>") -> ModelConfig:
  """ModelConfig from a config.json dict; `source` names the file in errors."""
  family, arch = _family_of(d, source)
  for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size"):
    if not (isinstance(d.get(key), int) and not isinstance(d[key], bool) and d[key] > 0):
      raise ValueError(f"{key}={d.get(key)!r} in {source}: a positive integer is required")
  keys = _HF_KEYS[family]
  kw = _family_defaults(family)
  n_heads = d["num_attention_heads"]
  act = d.get(keys["act"]) or d.get("hidden_act") or "silu"
  if act not in _ACT_FROM_HF:
    raise ValueError(f"{keys['act']}={act!r} in {source} is not supported")
  eos = d.get("eos_token_id")
  kw.update(
      vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
      head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
      d_ff=d["intermediate_size"], activation=_ACT_FROM_HF[act],
      norm_eps=float(d.get(keys["eps"], kw.get("norm_eps", 1e-6))),
      max_seq_len=d.get("max_position_embeddings", 2048),
      tie_embeddings=bool(d.get("tie_word_embeddings", kw.get("tie_embeddings", False))),
      bos_id=d.get("bos_token_id"), pad_id=d.get("pad_token_id"),
      eos_ids=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos),
      value_head=arch.endswith("ForSequenceClassification") or bool(d.get("aya_value_head")))
  if family == "gemma3":
    global_rope, kw["rope_local_theta"] = _local_rope_from_hf(d, source)
    kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(global_rope, family, source)
  else:
    kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(d, family, source)
  if family == "qwen2":
    if d.get("use_sliding_window"):
      raise ValueError(f"use_sliding_window=true in {source}: Qwen2 sliding windows are not "
                       "supported")
  else:  # one attention_bias switch for q, k, v and o
    kw["qkv_bias"] = kw["o_bias"] = bool(d.get("attention_bias", False))
  if family == "llama":
    kw["mlp_bias"] = bool(d.get("mlp_bias", False))
  if family in ("cohere", "cohere2"):
    kw["qk_norm"] = bool(d.get("use_qk_norm", False))
    kw["logit_scale"] = float(d.get("logit_scale", 0.0625))
  if family in ("gemma2", "gemma3"):
    kw["query_scale"] = float(d.get("query_pre_attn_scalar", 256)) ** -0.5
    gemma2 = family == "gemma2"
    kw["attn_softcap"] = d.get("attn_logit_softcapping", 50.0 if gemma2 else None)
    kw["final_softcap"] = d.get("final_logit_softcapping", 30.0 if gemma2 else None)
    if d.get("use_bidirectional_attention"):
      raise ValueError(f"use_bidirectional_attention=true in {source} is not supported")
  if family in _SLIDING_PATTERN:
    window, n = d.get("sliding_window", 4096), kw["n_layers"]
    pattern = int(d.get("sliding_window_pattern", d.get("_sliding_window_pattern",
                                                        _SLIDING_PATTERN[family])))
    types = d.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    kw["sliding_windows"] = None if all(w is None for w in windows) else windows
  return ModelConfig(**kw)


def _canonical(cfg: ModelConfig) -> dict:
  d = cfg.to_dict()
  for f in EXECUTION_FIELDS:  # how we run, not what the model is: HF has no field
    d.pop(f)
  if d["query_scale"] is None:
    d["query_scale"] = cfg.head_dim ** -0.5
  if d["sliding_windows"] is not None and all(w is None for w in d["sliding_windows"]):
    d["sliding_windows"] = None
  return d


def architecture(cfg: ModelConfig) -> str:
  """The transformers class of cfg: a sequence classifier for a value head, if any."""
  causal, seq_cls = ARCHITECTURES[cfg.family]
  return seq_cls if cfg.value_head and seq_cls else causal


def config_to_hf(cfg: ModelConfig) -> dict:
  """config.json content that transformers rebuilds the same model from.

  Raises ValueError when the family's HF class cannot express a switch of cfg.
  """
  family = cfg.family
  keys = _HF_KEYS[family]
  arch, seq_cls = architecture(cfg), ARCHITECTURES[family][1]
  eos = list(cfg.eos_ids)
  d = dict(
      architectures=[arch], model_type=MODEL_TYPES.get(family, family),
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
      max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
      bos_token_id=cfg.bos_id, pad_token_id=cfg.pad_id,
      eos_token_id=None if not eos else eos[0] if len(eos) == 1 else eos,
      dtype="float32", torch_dtype="float32")
  d[keys["eps"]] = cfg.norm_eps
  d[keys["act"]] = _ACT_TO_HF.get(cfg.activation, cfg.activation)
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling:
    names = {"linear": ("factor",), "llama3": (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    rope.update(rope_type=cfg.rope_scaling[0],
                **dict(zip(names.get(cfg.rope_scaling[0], ()), cfg.rope_scaling[1:])))
  # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling
  d.update(rope_parameters=rope, rope_theta=cfg.rope_theta)
  if cfg.rope_scaling:
    d["rope_scaling"] = dict(rope)
  if family == "qwen2":
    d["use_sliding_window"] = False
  else:
    d["attention_bias"] = cfg.qkv_bias
  if family == "llama":
    d["mlp_bias"] = cfg.mlp_bias
  if family == "cohere":
    d.update(logit_scale=cfg.logit_scale, use_qk_norm=cfg.qk_norm)
  if family == "cohere2":
    d.update(logit_scale=cfg.logit_scale)
  if family == "gemma3":
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
    d.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
             rope_local_base_freq=cfg.rope_local_theta, use_bidirectional_attention=False)
  if family in ("gemma2", "gemma3"):
    d.update(query_pre_attn_scalar=round((cfg.query_scale or cfg.head_dim ** -0.5) ** -2),
             attn_logit_softcapping=cfg.attn_softcap,
             final_logit_softcapping=cfg.final_softcap)
  if family in _SLIDING_PATTERN:
    windows = cfg.sliding_windows or (None,) * cfg.n_layers
    sizes = sorted({w for w in windows if w is not None})
    d.update(sliding_window=sizes[0] if sizes else None,
             layer_types=["full_attention" if w is None else "sliding_attention"
                          for w in windows])
  if cfg.value_head:
    d.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if seq_cls is None:
      d["aya_value_head"] = True
  ours, back = _canonical(cfg), _canonical(config_from_hf(d, source="config_to_hf"))
  bad = {k: (v, back[k]) for k, v in ours.items() if back[k] != v}
  if bad:
    raise ValueError(f"{arch} cannot express ModelConfig fields (ours, as HF would give): {bad}")
  return d


def write_config(cfg: ModelConfig, path, dtype) -> dict:
  """Writes config.json (weights in `dtype`) and generation_config.json into `path`."""
  d = config_to_hf(cfg)
  d["dtype"] = d["torch_dtype"] = np.dtype(dtype).name  # transformers 5 / 4.x
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(d, f, indent=2)
  generation = {k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if d[k] is not None}
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(generation, f, indent=2)
  return d


def read_config(path) -> ModelConfig:
  """The ModelConfig of a HF directory's config.json (errors name the file)."""
  config_file = os.path.join(os.fspath(path), CONFIG_FILE)
  try:
    with open(config_file, encoding="utf-8") as f:
      d = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{config_file} is not valid JSON ({e})") from e
  if not isinstance(d, dict):
    raise ValueError(f"{config_file} holds a JSON {type(d).__name__}, not an object")
  return config_from_hf(d, source=config_file)
