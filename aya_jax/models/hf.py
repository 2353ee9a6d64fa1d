"""Hugging Face checkpoints <-> aya_jax params, both directions, table-driven.

A Hugging Face model directory is `config.json` plus `model.safetensors` (or
shards `model-0000i-of-0000n.safetensors` listed in
`model.safetensors.index.json`). Reading uses `safetensors` with numpy only (no
torch). One table per family (`TABLES`) lists, for every params leaf, the HF
tensor name (`{i}` = layer index), how the tensor is transformed and its shape
in our layout; loading, saving and both shape checks are driven by it.

Value heads (reward models): Llama, Gemma 2 and Qwen 2 are saved as
`<Family>ForSequenceClassification` (num_labels=1, `score.weight`). Cohere has
no such class in transformers, so a Cohere value-head model is saved as
`CohereForCausalLM` with `score.weight` in the extra file
`value_head.safetensors` (and `"aya_value_head": true` in config.json;
transformers ignores that file). A value-head model has no LM head
(`ModelConfig.has_lm_head`), as a sequence classifier has none.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from aya_jax.models.config import ModelConfig, _family_defaults

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tensors that an architecture has no slot for go to their own file
SIDE_FILES = {"score.weight": ("ForCausalLM", "value_head.safetensors")}
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)

# family -> (causal LM class, sequence classification class or None)
ARCHITECTURES = {
    "cohere": ("CohereForCausalLM", None),
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
}
# family -> config.json keys that differ, and the HF default rope theta
_HF_KEYS = {
    "cohere": dict(eps="layer_norm_eps", act="hidden_act", theta=500000.0),
    "llama": dict(eps="rms_norm_eps", act="hidden_act", theta=10000.0),
    "gemma2": dict(eps="rms_norm_eps", act="hidden_activation", theta=10000.0),
    "qwen2": dict(eps="rms_norm_eps", act="hidden_act", theta=10000.0),
}
_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
# ModelConfig fields that HF configs do not carry (how we run, not what the model is)
_EXECUTION_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll")

# ---------------------------------------------------------------------------
# Param tables: (our path, HF name, transform, our per-layer shape, condition)
# transform: 'copy' same shape; 'flat' HF holds it flattened; 'lin' / 'lin2' a
# torch Linear weight [out, in] whose `in` is our first 1 / 2 axes.
# condition: a ModelConfig bool field ('!' negates) or None.
# ---------------------------------------------------------------------------
_L = "model.layers.{i}."


def _norm(ours, hf):
  return (f"layers/{ours}/scale", f"{_L}{hf}.weight", "copy", "D", None)


_ENDS = [
    ("embedder/embedding", "model.embed_tokens.weight", "copy", "V D", None),
    ("final_norm/scale", "model.norm.weight", "copy", "D", None),
    ("lm_head/kernel", "lm_head.weight", "lin", "D V", "has_lm_head"),
    ("value_head/kernel", "score.weight", "lin", "D 1", "value_head"),
]
_ATTN = [
    ("layers/attn/q/kernel", _L + "self_attn.q_proj.weight", "lin", "D H Dh", None),
    ("layers/attn/k/kernel", _L + "self_attn.k_proj.weight", "lin", "D K Dh", None),
    ("layers/attn/v/kernel", _L + "self_attn.v_proj.weight", "lin", "D K Dh", None),
    ("layers/attn/o/kernel", _L + "self_attn.o_proj.weight", "lin2", "H Dh D", None),
    ("layers/attn/q/bias", _L + "self_attn.q_proj.bias", "flat", "H Dh", "qkv_bias"),
    ("layers/attn/k/bias", _L + "self_attn.k_proj.bias", "flat", "K Dh", "qkv_bias"),
    ("layers/attn/v/bias", _L + "self_attn.v_proj.bias", "flat", "K Dh", "qkv_bias"),
    ("layers/attn/o/bias", _L + "self_attn.o_proj.bias", "copy", "D", "o_bias"),
    ("layers/attn/q_norm/scale", _L + "self_attn.q_norm.weight", "copy", "H Dh", "qk_norm"),
    ("layers/attn/k_norm/scale", _L + "self_attn.k_norm.weight", "copy", "K Dh", "qk_norm"),
]
_MLP = [
    ("layers/mlp/gate/kernel", _L + "mlp.gate_proj.weight", "lin", "D F", None),
    ("layers/mlp/up/kernel", _L + "mlp.up_proj.weight", "lin", "D F", None),
    ("layers/mlp/down/kernel", _L + "mlp.down_proj.weight", "lin", "F D", None),
    ("layers/mlp/gate/bias", _L + "mlp.gate_proj.bias", "copy", "F", "mlp_bias"),
    ("layers/mlp/up/bias", _L + "mlp.up_proj.bias", "copy", "F", "mlp_bias"),
    ("layers/mlp/down/bias", _L + "mlp.down_proj.bias", "copy", "D", "mlp_bias"),
]
_SEQUENTIAL = [_norm("pre_attn_norm", "input_layernorm"),
               _norm("pre_mlp_norm", "post_attention_layernorm")]
TABLES = {
    "cohere": _ENDS + _ATTN + _MLP + [_norm("pre_attn_norm", "input_layernorm")],
    "llama": _ENDS + _ATTN + _MLP + _SEQUENTIAL,
    "qwen2": _ENDS + _ATTN + _MLP + _SEQUENTIAL,
    "gemma2": _ENDS + _ATTN + _MLP + [
        _norm("pre_attn_norm", "input_layernorm"),
        _norm("post_attn_norm", "post_attention_layernorm"),
        _norm("pre_mlp_norm", "pre_feedforward_layernorm"),
        _norm("post_mlp_norm", "post_feedforward_layernorm")],
}


def _entries(cfg: ModelConfig):
  """(path tuple, HF name pattern, transform, per-layer shape, is_layer) for cfg."""
  dims = dict(V=cfg.vocab_size, D=cfg.d_model, H=cfg.n_heads, K=cfg.n_kv_heads,
              Dh=cfg.head_dim, F=cfg.d_ff)
  dims["1"] = 1
  for path, name, transform, shape, cond in TABLES[cfg.family]:
    if cond is not None and bool(getattr(cfg, cond.lstrip("!"))) == cond.startswith("!"):
      continue
    yield (tuple(path.split("/")), name, transform,
           tuple(dims[s] for s in shape.split()), path.startswith("layers/"))


def _hf_shape(transform, shape):
  if transform == "copy":
    return shape
  if transform == "flat":
    return (math.prod(shape),)
  n_in = 1 if transform == "lin" else 2
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_ours(transform, w, shape):
  return (w.T if transform in ("lin", "lin2") else w).reshape(shape)


def _to_hf(transform, a, shape):
  if transform in ("lin", "lin2"):
    n_in = 1 if transform == "lin" else 2
    return a.reshape(math.prod(shape[:n_in]), -1).T
  return a.reshape(_hf_shape(transform, shape))


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------
def _family_of(d: dict, source: str) -> tuple[str, str]:
  archs = d.get("architectures") or []
  for arch in archs[:1]:
    for family, classes in ARCHITECTURES.items():
      if arch in classes:
        return family, arch
    raise ValueError(f"unsupported architecture {arch!r} in {source}; supported: "
                     f"{[a for c in ARCHITECTURES.values() for a in c if a]}")
  model_type = d.get("model_type")
  if model_type in ARCHITECTURES:
    return model_type, ARCHITECTURES[model_type][0]
  raise ValueError(f"unsupported model_type {model_type!r} (no architectures) in {source}; "
                   f"supported: {sorted(ARCHITECTURES)}")


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
  kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(d, family, source)
  if family == "qwen2":
    if d.get("use_sliding_window"):
      raise ValueError(f"use_sliding_window=true in {source}: Qwen2 sliding windows are not "
                       "supported")
  else:  # one attention_bias switch for q, k, v and o
    kw["qkv_bias"] = kw["o_bias"] = bool(d.get("attention_bias", False))
  if family == "llama":
    kw["mlp_bias"] = bool(d.get("mlp_bias", False))
  if family == "cohere":
    kw["qk_norm"] = bool(d.get("use_qk_norm", False))
    kw["logit_scale"] = float(d.get("logit_scale", 0.0625))
  if family == "gemma2":
    kw["query_scale"] = float(d.get("query_pre_attn_scalar", 256)) ** -0.5
    kw["attn_softcap"] = d.get("attn_logit_softcapping", 50.0)
    kw["final_softcap"] = d.get("final_logit_softcapping", 30.0)
    window, n = d.get("sliding_window", 4096), kw["n_layers"]
    types = d.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    kw["sliding_windows"] = None if all(w is None for w in windows) else windows
  return ModelConfig(**kw)


def _canonical(cfg: ModelConfig) -> dict:
  d = cfg.to_dict()
  for f in _EXECUTION_FIELDS:
    d.pop(f)
  if d["query_scale"] is None:
    d["query_scale"] = cfg.head_dim ** -0.5
  if d["sliding_windows"] is not None and all(w is None for w in d["sliding_windows"]):
    d["sliding_windows"] = None
  return d


def config_to_hf(cfg: ModelConfig) -> dict:
  """config.json content that transformers rebuilds the same model from.

  Raises ValueError when the family's HF class cannot express a switch of cfg.
  """
  family = cfg.family
  keys = _HF_KEYS[family]
  causal, seq_cls = ARCHITECTURES[family]
  arch = seq_cls if cfg.value_head and seq_cls else causal
  eos = list(cfg.eos_ids)
  d = dict(
      architectures=[arch], model_type=family, vocab_size=cfg.vocab_size,
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
  if family == "gemma2":
    windows = cfg.sliding_windows or (None,) * cfg.n_layers
    sizes = sorted({w for w in windows if w is not None})
    d.update(query_pre_attn_scalar=round((cfg.query_scale or cfg.head_dim ** -0.5) ** -2),
             attn_logit_softcapping=cfg.attn_softcap,
             final_logit_softcapping=cfg.final_softcap,
             sliding_window=sizes[0] if sizes else None,
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


# ---------------------------------------------------------------------------
# Reading safetensors
# ---------------------------------------------------------------------------
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _weight_files(path) -> dict:
  """tensor name -> safetensors file, for a HF model directory."""
  path = os.fspath(path)
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    for file in sorted(set(where.values())):
      if not os.path.exists(file):
        raise ValueError(f"{index} lists {file}, which does not exist")
  elif os.path.exists(os.path.join(path, SINGLE_FILE)):
    where = {}
  else:
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
  files = [] if where else [os.path.join(path, SINGLE_FILE)]
  files += [os.path.join(path, side) for _, side in SIDE_FILES.values()]
  for file in files:
    if os.path.exists(file):
      with safe_open(file, framework="numpy") as f:
        where.update({k: file for k in f.keys()})
  return where


def _read(handle, file, name):
  try:
    return handle.get_tensor(name)
  except TypeError:  # a dtype this numpy/safetensors cannot build (bf16 on old versions)
    with open(file, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      info = json.loads(f.read(n))[name]
      start, end = info["data_offsets"]
      f.seek(8 + n + start)
      data = f.read(end - start)
    return np.frombuffer(data, _ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def hf_tensor_names(path) -> list[str]:
  """Every tensor name in a HF model directory (all shards and extra files)."""
  return sorted(_weight_files(path))


def read_hf_tensor(path, name: str) -> np.ndarray:
  """One tensor of a HF model directory, in its stored dtype."""
  where = _weight_files(path)
  if name not in where:
    raise ValueError(f"tensor {name!r} is not in {os.fspath(path)}")
  with safe_open(where[name], framework="numpy") as f:
    return _read(f, where[name], name)


def iter_tensors(path):
  """Yields (name, array) one tensor at a time, file by file."""
  by_file = {}
  for name, file in _weight_files(path).items():
    by_file.setdefault(file, []).append(name)
  for file, names in sorted(by_file.items()):
    with safe_open(file, framework="numpy") as f:
      for name in sorted(names):
        yield name, _read(f, file, name)


def _tree_get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _tree_set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load(path, dtype=np.float32, shardings=None):
  """(ModelConfig, params) from a local HF model directory.

  Leaves are numpy arrays of `dtype`, or, with `shardings` (a pytree of
  jax.sharding.Sharding matching params), jax arrays put leaf by leaf.
  """
  path = os.fspath(path)
  config_file = os.path.join(path, CONFIG_FILE)
  with open(config_file) as f:
    cfg = config_from_hf(json.load(f), source=config_file)
  where = _weight_files(path)
  params, used = {}, set()
  with contextlib.ExitStack() as stack:
    handles = {}

    def get(name, shape, leaf):
      if name not in where:
        files = sorted(set(where.values())) or [path]
        raise ValueError(f"tensor {name!r} (for params {'/'.join(leaf)}) is missing from "
                         f"{', '.join(files)}")
      file = where[name]
      if file not in handles:
        handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
      found = tuple(handles[file].get_slice(name).get_shape())
      if found != tuple(shape):
        raise ValueError(f"tensor {name!r} in {file} has shape {found}; expected "
                         f"{tuple(shape)} for params {'/'.join(leaf)} ({cfg.family})")
      used.add(name)
      return _read(handles[file], file, name)

    for leaf, name, transform, shape, is_layer in _entries(cfg):
      hf_shape = _hf_shape(transform, shape)
      if is_layer:
        out = np.empty((cfg.n_layers,) + shape, dtype)
        for i in range(cfg.n_layers):
          out[i] = _to_ours(transform, get(name.format(i=i), hf_shape, leaf), shape)
      else:
        out = np.asarray(_to_ours(transform, get(name, hf_shape, leaf), shape), dtype)
      if shardings is not None:
        import jax  # only when placing on devices
        out = jax.device_put(out, _tree_get(shardings, leaf))
      _tree_set(params, leaf, out)

    extra = sorted(n for n in set(where) - used if not n.endswith(IGNORABLE_SUFFIXES))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
      head = get("lm_head.weight", (cfg.vocab_size, cfg.d_model), ("lm_head",))
      if not np.array_equal(head, _read(handles[where["model.embed_tokens.weight"]],
                                        where["model.embed_tokens.weight"],
                                        "model.embed_tokens.weight")):
        raise ValueError(f"tied model, but lm_head.weight in {where['lm_head.weight']} differs "
                         "from model.embed_tokens.weight")
      extra.remove("lm_head.weight")
  if extra:
    raise ValueError(f"unexpected tensor {extra[0]!r} in {where[extra[0]]} (not used by "
                     f"{cfg.family} with this config.json; {len(extra)} unexpected in all: "
                     f"{extra[:8]})")
  return cfg, params


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def save(cfg: ModelConfig, params, path, dtype=np.float32, max_shard_bytes=5 * 2**30):
  """Writes config.json, generation_config.json and safetensors (sharded with an
  index above `max_shard_bytes`) that transformers' from_pretrained loads."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  d = config_to_hf(cfg)
  d["dtype"] = d["torch_dtype"] = np.dtype(dtype).name  # transformers 5 / 4.x
  arch = d["architectures"][0]
  plan, covered = [], set()  # (name, leaf path, transform, shape, layer or None)
  for leaf, name, transform, shape, is_layer in _entries(cfg):
    covered.add(leaf)
    try:
      value = _tree_get(params, leaf)
    except (KeyError, TypeError):
      raise ValueError(f"params has no {'/'.join(leaf)} (needed by {cfg.family})") from None
    want = ((cfg.n_layers,) if is_layer else ()) + shape
    if tuple(np.shape(value)) != want:
      raise ValueError(f"params {'/'.join(leaf)} has shape {tuple(np.shape(value))}; "
                       f"expected {want}")
    for i in range(cfg.n_layers) if is_layer else [None]:
      plan.append((name.format(i=i), leaf, transform, shape, i))
  import jax  # for tree paths only
  for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = tuple(str(k.key) for k in kp)
    if leaf not in covered:
      raise ValueError(f"params {'/'.join(leaf)} has no place in a {arch} checkpoint")

  def tensor(leaf, transform, shape, i):
    a = np.asarray(_tree_get(params, leaf) if i is None else _tree_get(params, leaf)[i])
    return np.ascontiguousarray(_to_hf(transform, a, shape).astype(dtype))

  side, main = {}, []
  for item in plan:
    suffix, file = SIDE_FILES.get(item[0], (None, None))
    (side.setdefault(file, []) if suffix and arch.endswith(suffix) else main).append(item)
  itemsize = np.dtype(dtype).itemsize
  shards, size, total = [[]], 0, 0
  for item in main:
    nbytes = math.prod(item[3]) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
    total += nbytes
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  stale = [SINGLE_FILE, INDEX_FILE] + [s for _, s in SIDE_FILES.values()]
  for file in os.listdir(path):  # stale files would shadow or add tensors
    if file in stale or re.fullmatch(r"model-\d+-of-\d+\.safetensors", file):
      os.remove(os.path.join(path, file))
  for file, items in list(zip(names, shards)) + list(side.items()):
    save_file({n: tensor(*rest) for n, *rest in items}, os.path.join(path, file),
              metadata={"format": "pt"})
  if len(shards) > 1:
    weight_map = {item[0]: file for file, items in zip(names, shards) for item in items}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(d, f, indent=2)
  generation = {k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if d[k] is not None}
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(generation, f, indent=2)
