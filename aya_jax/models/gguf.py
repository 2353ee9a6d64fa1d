"""GGUF files (llama.cpp's format) -> aya_jax params, with numpy only (no torch).

A `.gguf` file (or a directory holding one) is read with the `gguf` package. Its
metadata become a Hugging Face config dict (`hf_config_dict`), read by the same
`hf_config.config_from_hf` as a config.json, and its tensors are dequantised by the
package's numpy code to float32 and renamed to their HF names (`hf_name`), with
llama.cpp's rotary row order of Llama's q and k projections undone and Gemma's norm
weights back from llama.cpp's (1 + w) to w; the HF tables
(`hf.entries`) then place them, so a GGUF and the HF checkpoint it came from give
the same params. `Reader` has the API of `hf.Reader`: `checkpoint.load_model`,
`peek_config` and `open_reader` take a GGUF path wherever they take a model directory
(teachers, SFT init, merge inputs, evaluation).

The tokenizer (vocabulary, merges, special tokens, chat template) is converted once
by transformers into an ordinary tokenizer directory, cached under
`$AYA_JAX_CACHE/gguf` (default `~/.cache/aya_jax/gguf`) and keyed by the file's
path, size and mtime: `tokenizer_dir(path)`; `formatting.load_tokenizer` takes a
GGUF path through it. `convert(path, out)` writes a whole HF directory
(safetensors, config.json, the tokenizer):

    python -m aya_jax.models.gguf model.gguf out_dir
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

from aya_jax.models import hf
from aya_jax.models.config import ModelConfig
from aya_jax.models.hf_config import config_from_hf

# GGUF general.architecture -> (HF architecture, HF model_type)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"),
                 "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}
# the tensor types read (gguf's numpy dequantisation, checked against transformers)
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
               "Q4_K", "Q5_K", "Q6_K")
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
           "output": "lm_head"}
_PROJECTIONS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER = {  # per architecture: a layer's GGUF tensor -> its HF module
    "llama": dict(_PROJECTIONS, attn_norm="input_layernorm",
                  ffn_norm="post_attention_layernorm"),
    "gemma3": dict(_PROJECTIONS, attn_norm="input_layernorm",
                   post_attention_norm="post_attention_layernorm",
                   ffn_norm="pre_feedforward_layernorm",
                   post_ffw_norm="post_feedforward_layernorm",
                   attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm"),
}
# llama.cpp's Gemma 3: every sixth layer global, local layers' RoPE base 10k (constants
# of its code, not metadata)
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA = 6, 10000.0
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                     "tokenizer.ggml.token_type")


def find(path) -> str:
  """The .gguf file of `path`: the file itself or the one .gguf in a directory."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  if os.path.isdir(path):
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) == 1:
      return os.path.join(path, found[0])
    raise ValueError(f"{path}: {'no' if not found else 'several'} .gguf files "
                     f"{found if found else ''} (give the file)")
  raise FileNotFoundError(f"{path}: no such GGUF file or directory")


def is_gguf(path) -> bool:
  """A .gguf file, or a directory without config.json that holds exactly one."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path.endswith(".gguf")
  return (os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json"))
          and sum(f.endswith(".gguf") for f in os.listdir(path)) == 1)


def _open(path: str):
  import gguf  # the package: a dependency, imported when a GGUF is read
  try:
    return gguf.GGUFReader(path, "r")
  except Exception as e:  # noqa: BLE001 -- its errors name no file
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                     "truncated or corrupt?") from None


def metadata(reader) -> dict:
  """The GGUF's key/value metadata (the tokenizer's big arrays left out)."""
  out = {}
  for key, field in reader.fields.items():
    if key in _TOKENIZER_ARRAYS or key.startswith("GGUF."):
      continue
    out[key] = field.contents()
  return out


def hf_name(gguf_name: str, arch: str = "llama") -> str:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; '' when the
  tensor has no HF counterpart in `arch`."""
  stem, _, kind = gguf_name.rpartition(".")
  if stem in _GLOBAL:
    return f"{_GLOBAL[stem]}.{kind}"
  parts, layer = stem.split("."), _LAYER[arch]
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer:
    return f"model.layers.{parts[1]}.{layer[parts[2]]}.{kind}"
  return ""


def hf_config_dict(meta: dict, tensors: dict, source: str) -> dict:
  """The config.json of the model in a GGUF (its metadata; its tensors by name)."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported "
                     f"(supported: {sorted(ARCHITECTURES)})")

  def get(key, default=None, required=True):
    value = meta.get(f"{arch}.{key}", default)
    if value is None and required:
      raise ValueError(f"{source}: GGUF metadata {arch}.{key} is missing")
    return value

  if "rope_freqs.weight" in tensors:
    raise ValueError(f"{source}: tensor 'rope_freqs.weight' (Llama 3 rope scaling) is not "
                     "supported")
  n_heads = int(get("attention.head_count"))
  d_model = int(get("embedding_length"))
  vocab = meta.get(f"{arch}.vocab_size")
  if vocab is None and "token_embd.weight" in tensors:
    vocab = int(tensors["token_embd.weight"].shape[1])  # [D, V] in GGUF order
  architecture, model_type = ARCHITECTURES[arch]
  d = dict(
      architectures=[architecture], model_type=model_type, hidden_size=d_model,
      intermediate_size=int(get("feed_forward_length")),
      num_hidden_layers=int(get("block_count")), num_attention_heads=n_heads,
      num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
      head_dim=int(get("attention.key_length", d_model // n_heads)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      max_position_embeddings=int(get("context_length", 2048)),
      tie_word_embeddings="output.weight" not in tensors,
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
      eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
      pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
      attention_bias="blk.0.attn_q.bias" in tensors)
  if vocab is not None:
    d["vocab_size"] = int(vocab)
  scaling = get("rope.scaling.type", "none", required=False)
  if scaling == "linear":
    d["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
  elif scaling not in ("none", None):
    raise ValueError(f"{source}: rope scaling {scaling!r} is not supported (linear)")
  if arch == "gemma3":
    # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(d_model / heads) for the
    # 62-layer 27B (query_pre_attn_scalar 168 in its config.json)
    scalar = d_model // n_heads if d["num_hidden_layers"] == 62 else d["head_dim"]
    d.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
             sliding_window=int(get("attention.sliding_window")),
             sliding_window_pattern=_GEMMA3_PATTERN,
             rope_local_base_freq=_GEMMA3_LOCAL_THETA,
             attn_logit_softcapping=None, final_logit_softcapping=None)
  return d


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp stores each head's q/k rows with the two rotary halves interleaved
  (row 2j + t holds HF's row t * Dh/2 + j); back to HF's order."""
  rows = w.shape[0]
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Reader:
  """A GGUF's tensors in our layout, with hf.Reader's API (`cfg`, `leaves`, `shape`,
  `dtype`, `chunk`, `read`); every tensor dequantised to float32 when read."""

  def __init__(self, path):
    self.path = find(path)
    self.file = _open(self.path)
    self.meta = metadata(self.file)
    by_name = {t.name: t for t in self.file.tensors}
    self.config_dict = hf_config_dict(self.meta, by_name, self.path)
    self.arch = self.meta["general.architecture"]
    self.cfg: ModelConfig = config_from_hf(self.config_dict, self.path)
    self.tensors, unknown = {}, []
    for name, t in by_name.items():
      kind = t.tensor_type.name
      if kind not in QUANT_TYPES:
        raise ValueError(f"{self.path}: tensor {name!r} is stored as {kind}, which is not "
                         f"supported (supported: {', '.join(QUANT_TYPES)})")
      renamed = hf_name(name, self.arch)
      if renamed:
        self.tensors[renamed] = t
      else:
        unknown.append(name)
    if unknown:
      raise ValueError(f"{self.path}: tensor {unknown[0]!r} has no place in a "
                       f"{self.cfg.family} model ({len(unknown)} such: {unknown[:8]})")
    self.leaves = {"/".join(leaf): (name, transform, shape, is_layer)
                   for leaf, name, transform, shape, is_layer in hf.entries(self.cfg)}
    used = set()
    for path_, (name, transform, shape, is_layer) in self.leaves.items():  # all there
      for i in range(self.cfg.n_layers) if is_layer else [0]:
        used.add(name.format(i=i))
        self._tensor_info(name.format(i=i), path_, hf.hf_shape(transform, shape))
    extra = sorted(set(self.tensors) - used)
    if extra:
      raise ValueError(f"{self.path}: tensor {self.tensors[extra[0]].name!r} is not used by "
                       f"{self.cfg.family} with this metadata ({len(extra)} such)")

  def _tensor_info(self, name: str, path: str, want):
    if name not in self.tensors:
      raise ValueError(f"{self.path}: no tensor for {name!r} (params {path})")
    t = self.tensors[name]
    shape = tuple(int(x) for x in reversed(t.shape))
    if shape != tuple(want):
      raise ValueError(f"{self.path}: tensor {t.name!r} has shape {shape}; expected "
                       f"{tuple(want)} for params {path}")
    return t

  def hf_tensor(self, name: str) -> np.ndarray:
    """One tensor under its HF name, dequantised to float32 in HF's layout and order."""
    import gguf
    t = self.tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    w = w.reshape(tuple(int(x) for x in reversed(t.shape)))
    if self.cfg.family == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
      w = _unpermute(w, self.cfg.n_heads)
    elif self.cfg.family == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
      w = _unpermute(w, self.cfg.n_kv_heads)
    elif self.cfg.norm == "rms_plus_one" and name.endswith("norm.weight"):
      w = w - 1.0  # llama.cpp stores Gemma's (1 + w) multiplier; HF and we keep w
    return w

  def _leaf(self, path, layer):
    name, transform, shape, _ = self.leaves[path]
    return transform, shape, self.hf_tensor(name.format(i=layer))

  def shape(self, path):
    _, _, shape, is_layer = self.leaves[path]
    return ((self.cfg.n_layers,) if is_layer else ()) + tuple(shape)

  def dtype(self, path):
    del path
    return np.dtype(np.float32)

  def chunk(self, path, axis):
    return None

  def read(self, path, layer=None, span=None):
    transform, shape, w = self._leaf(path, layer)
    if span is None:
      return hf.to_ours(transform, w, shape)
    rows = w[span[1]:span[2]]
    return rows.T if transform == "lin" else rows


def read_config(path) -> ModelConfig:
  return Reader(path).cfg


def load(path, dtype=np.float32, shardings=None):
  """(ModelConfig, params) of a GGUF: numpy arrays of `dtype`, or jax arrays placed
  on `shardings` leaf by leaf."""
  reader = Reader(path)
  return reader.cfg, hf.assemble(reader, dtype, shardings)


def _cache_root() -> str:
  return os.path.join(os.environ.get("AYA_JAX_CACHE") or
                      os.path.join(os.path.expanduser("~"), ".cache", "aya_jax"), "gguf")


def tokenizer_dir(path, cache: str = "") -> str:
  """A tokenizer directory converted (once) from the GGUF's tokenizer, with its chat
  template; under `cache` (default $AYA_JAX_CACHE/gguf), keyed by path, size and mtime."""
  path = os.path.abspath(find(path))
  stat = os.stat(path)
  key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
  out = os.path.join(cache or _cache_root(), f"{os.path.basename(path)}-{key}", "tokenizer")
  if os.path.exists(os.path.join(out, "tokenizer_config.json")):
    return out
  import tempfile

  import transformers
  try:
    tok = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)
  except Exception as e:  # noqa: BLE001 -- name the file
    raise ValueError(f"{path}: its tokenizer cannot be converted ({type(e).__name__}: "
                     f"{e})") from None
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".tokenizer-")
  tok.save_pretrained(tmp)
  try:
    os.replace(tmp, out)  # whole or not at all (another process may have won)
  except OSError:
    if not os.path.exists(os.path.join(out, "tokenizer_config.json")):
      raise
  return out


def convert(path, out: str, dtype=np.float32) -> str:
  """A Hugging Face directory from a GGUF: config.json + safetensors (dequantised, in
  `dtype`) + the tokenizer with the GGUF's chat template. Returns `out`."""
  import shutil
  cfg, params = load(path, dtype)
  hf.save(cfg, params, out, dtype)
  tok = tokenizer_dir(path)
  for name in os.listdir(tok):
    shutil.copy2(os.path.join(tok, name), os.path.join(out, name))
  return out


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: python -m aya_jax.models.gguf MODEL.gguf OUT_DIR")
  print(convert(sys.argv[1], sys.argv[2]))
