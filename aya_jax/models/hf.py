"""Hugging Face checkpoints <-> aya_jax params, both directions, table-driven.

A HF model directory is `config.json` (hf_config.py) plus `model.safetensors` (or shards
listed in `model.safetensors.index.json`). One table per family (`TABLES`) lists, for every
params leaf, the HF tensor name (`{i}` = layer), its transform and its shape in our layout;
loading, saving and shape checks follow it. Safetensors are read (and checked: a model
directory from elsewhere is untrusted input) and written with numpy in safetensors_io, no
torch: `Reader` a tensor, layer or block at a time (memory-mapped), `Writer` shards in
sequence; `load` and `save` are built on them.

Value heads (reward models): Llama, Gemma 2, Gemma 3 and Qwen 2 are saved as
`<Family>ForSequenceClassification` (num_labels=1, `score.weight`). Cohere (1 and 2) has
no such class in transformers, so a Cohere value-head model is saved as `CohereForCausalLM` with
`score.weight` in the extra file `value_head.safetensors` (and `"aya_value_head": true` in
config.json; transformers ignores that file). A value-head model has no LM head
(`ModelConfig.has_lm_head`), as a sequence classifier has none.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from aya_jax.models import safetensors_io as st
from aya_jax.models.config import ModelConfig
from aya_jax.models.hf_config import architecture, config_to_hf, read_config, write_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tensors that an architecture has no slot for go to their own file
SIDE_FILES = {"score.weight": ("ForCausalLM", "value_head.safetensors")}
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)

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
]
_QK_NORM = [  # Cohere: per head
    ("layers/attn/q_norm/scale", _L + "self_attn.q_norm.weight", "copy", "H Dh", "qk_norm"),
    ("layers/attn/k_norm/scale", _L + "self_attn.k_norm.weight", "copy", "K Dh", "qk_norm"),
]
_QK_NORM_SHARED = [  # Gemma 3: one weight for every head
    ("layers/attn/q_norm/scale", _L + "self_attn.q_norm.weight", "copy", "Dh", "qk_norm"),
    ("layers/attn/k_norm/scale", _L + "self_attn.k_norm.weight", "copy", "Dh", "qk_norm"),
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
_SANDWICH = [_norm("pre_attn_norm", "input_layernorm"),
             _norm("post_attn_norm", "post_attention_layernorm"),
             _norm("pre_mlp_norm", "pre_feedforward_layernorm"),
             _norm("post_mlp_norm", "post_feedforward_layernorm")]
TABLES = {
    "cohere": _ENDS + _ATTN + _QK_NORM + _MLP + [_norm("pre_attn_norm", "input_layernorm")],
    "cohere2": _ENDS + _ATTN + _MLP + [_norm("pre_attn_norm", "input_layernorm")],
    "llama": _ENDS + _ATTN + _MLP + _SEQUENTIAL,
    "qwen2": _ENDS + _ATTN + _MLP + _SEQUENTIAL,
    "gemma2": _ENDS + _ATTN + _MLP + _SANDWICH,
    "gemma3": _ENDS + _ATTN + _QK_NORM_SHARED + _MLP + _SANDWICH,
}


def entries(cfg: ModelConfig):
  """(path tuple, HF name pattern, transform, per-layer shape, is_layer) for cfg."""
  dims = {"1": 1, "V": cfg.vocab_size, "D": cfg.d_model, "H": cfg.n_heads,
          "K": cfg.n_kv_heads, "Dh": cfg.head_dim, "F": cfg.d_ff}
  for path, name, transform, shape, cond in TABLES[cfg.family]:
    if cond is not None and bool(getattr(cfg, cond.lstrip("!"))) == cond.startswith("!"):
      continue
    yield (tuple(path.split("/")), name, transform,
           tuple(dims[s] for s in shape.split()), path.startswith("layers/"))


def hf_shape(transform, shape):
  """The HF shape of a tensor of our (per-layer) `shape`."""
  if transform == "copy":
    return shape
  if transform == "flat":
    return (math.prod(shape),)
  n_in = 1 if transform == "lin" else 2
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def to_ours(transform, w, shape):
  """A HF tensor in our layout (a transposed view for 'lin': nothing is copied)."""
  return (w.T if transform in ("lin", "lin2") else w).reshape(shape)


def to_hf(transform, a, shape):
  """Our tensor in HF's layout; for 'lin', `a` may be a block of columns (HF rows)."""
  if transform in ("lin", "lin2"):
    n_in = 1 if transform == "lin" else 2
    return a.reshape(math.prod(shape[:n_in]), -1).T
  return a.reshape(hf_shape(transform, shape))


# ---------------------------------------------------------------------------
# The safetensors files of a HF directory (read and checked in safetensors_io)
# ---------------------------------------------------------------------------
def _shard_files(path, index) -> dict:
  """tensor name -> shard file, from a model.safetensors.index.json whose shards must be
  files inside the model directory `path` (a directory from elsewhere is untrusted)."""
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from e
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index}: weight_map is a {type(weight_map).__name__}, not an object")
  where = {}
  for name, shard in weight_map.items():
    norm = os.path.normpath(shard) if isinstance(shard, str) and shard else ".."
    if os.path.isabs(norm) or norm in (".", "..") or norm.startswith(".." + os.sep):
      raise ValueError(f"{index}: tensor {name!r} is in {shard!r}, which is not a file inside "
                       f"{path}")
    where[name] = os.path.join(path, norm)
  for file in sorted(set(where.values())):
    if not os.path.isfile(file):
      raise ValueError(f"{index} lists {file}, which does not exist")
  return where


def weight_files(path) -> dict[str, st.Tensor]:
  """tensor name -> st.Tensor (file, dtype, shape, bytes) for a HF model directory: its
  model.safetensors or the shards of its index, and side files; every header checked."""
  path = os.fspath(path)
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    listed = _shard_files(path, index)
    files = sorted(set(listed.values()))
  elif os.path.exists(os.path.join(path, SINGLE_FILE)):
    listed, files = {}, [os.path.join(path, SINGLE_FILE)]
  else:
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
  files += [f for f in (os.path.join(path, side) for _, side in SIDE_FILES.values())
            if os.path.exists(f)]
  tensors = {}
  for file in files:
    for name, t in st.read_header(file).items():
      if name in tensors:
        raise ValueError(f"tensor {name!r} is in both {tensors[name].file} and {file}")
      tensors[name] = t
  for name, file in listed.items():
    if name not in tensors or tensors[name].file != file:
      raise ValueError(f"{index} lists tensor {name!r} in {file}, which does not hold it")
  return tensors


def hf_tensor_names(path) -> list[str]:
  """Every tensor name in a HF model directory (all shards and extra files)."""
  return sorted(weight_files(path))


def read_hf_tensor(path, name: str) -> np.ndarray:
  """One tensor of a HF model directory, in its stored dtype."""
  tensors = weight_files(path)
  if name not in tensors:
    raise ValueError(f"tensor {name!r} is not in {os.fspath(path)}")
  return st.read(tensors[name])


def iter_tensors(path):
  """Yields (name, array) one tensor at a time, file by file."""
  tensors = weight_files(path)
  for name in sorted(tensors, key=lambda n: (tensors[n].file, n)):
    yield name, st.read(tensors[name])


class Reader:
  """A HF dir's tensors in our layout, a tensor, layer or block of HF rows (span = (our axis:
  0 'copy', 1 'lin', start, stop)) at a time; big ones as read-only views of memory maps
  (transposed for 'lin'): merges copy only what they compute. API: checkpoint.ParamsReader."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self.cfg = read_config(self.path)
    self.tensors = weight_files(self.path)
    self.leaves = {"/".join(leaf): (name, transform, shape, is_layer)
                   for leaf, name, transform, shape, is_layer in entries(self.cfg)}

  def info(self, name, path="?", want=None) -> st.Tensor:
    """Where tensor `name` lies; checks that it exists (and its HF shape)."""
    if name not in self.tensors:
      files = sorted({t.file for t in self.tensors.values()}) or [self.path]
      raise ValueError(f"tensor {name!r} (for params {path}) is missing from "
                       f"{', '.join(files)}")
    t = self.tensors[name]
    if want is not None and t.shape != tuple(want):
      raise ValueError(f"tensor {name!r} in {t.file} has shape {t.shape}; expected "
                       f"{tuple(want)} for params {path} ({self.cfg.family} config.json)")
    return t

  def _leaf(self, path, layer):
    name, transform, shape, _ = self.leaves[path]
    name = name.format(i=layer)
    return transform, shape, self.info(name, path, hf_shape(transform, shape))

  def shape(self, path):
    self._leaf(path, 0)
    _, _, shape, is_layer = self.leaves[path]
    return ((self.cfg.n_layers,) if is_layer else ()) + tuple(shape)

  def dtype(self, path):
    return self._leaf(path, 0)[2].dtype

  def chunk(self, path, axis):
    return None

  def read(self, path, layer=None, span=None):
    transform, shape, t = self._leaf(path, layer)
    a = st.read(t, None if span is None else span[1:], copy=False)
    if span is None:
      return to_ours(transform, a, shape)
    return a.T if transform == "lin" else a


class Writer:
  """Writes a HF dir: shards of at most `max_shard_bytes` (indexed if several; a value head
  without a sequence classifier to its side file) and the configs. Tensors come in `order`
  ((params path, layer or None)), whole in our layout or as consecutive blocks of HF rows
  ('copy': rows of ours, 'lin': columns), in their `dtypes`."""

  def __init__(self, out, cfg: ModelConfig, order, dtypes: dict, max_shard_bytes=5 * 2**30):
    self.out, self.cfg, self.dtypes = os.fspath(out), cfg, dtypes
    config_to_hf(cfg)  # fails before any file is written when HF cannot express cfg
    table = {"/".join(leaf): rest for leaf, *rest, _ in entries(cfg)}
    plan, size, k = [], 0, 0  # (path, layer, HF name, transform, shape, bytes, file)
    for path, layer in order:
      name, transform, shape = table[path]
      name = name.format(i=layer)
      nbytes = math.prod(hf_shape(transform, shape)) * np.dtype(dtypes[path]).itemsize
      suffix, file = SIDE_FILES.get(name, (None, None))
      if not (suffix and architecture(cfg).endswith(suffix)):
        if size and size + nbytes > max_shard_bytes:
          k, size = k + 1, 0
        file, size = k, size + nbytes
      plan.append((path, layer, name, transform, shape, nbytes, file))
    self.main = [SINGLE_FILE] if k == 0 else [
        f"model-{i + 1:05d}-of-{k + 1:05d}.safetensors" for i in range(k + 1)]
    self.plan = [it[:6] + (self.main[it[6]] if isinstance(it[6], int) else it[6],)
                 for it in plan]
    self.files, self.left = {}, {}
    for it in self.plan:
      self.files.setdefault(it[6], []).append(it)
      self.left[it[6]] = self.left.get(it[6], 0) + it[5]
    self.step, self.written, self.handles = 0, 0, {}
    os.makedirs(self.out, exist_ok=True)
    stale = [SINGLE_FILE, INDEX_FILE] + [s for _, s in SIDE_FILES.values()]
    for file in os.listdir(self.out):  # stale files would shadow or add tensors
      if file in stale or re.fullmatch(r"model-\d+-of-\d+\.safetensors", file):
        os.remove(os.path.join(self.out, file))

  def _open(self, file):
    handle = open(os.path.join(self.out, file), "wb")
    handle.write(st.header_bytes([(name, self.dtypes[path], hf_shape(transform, shape))
                                  for path, _, name, transform, shape, _, _ in self.files[file]]))
    return handle

  def write(self, path, layer, value):
    """value: the tensor (layer slice), or the next block of its HF rows."""
    want_path, want_layer, _, transform, shape, nbytes, file = self.plan[self.step]
    if (path, layer) != (want_path, want_layer):
      raise ValueError(f"Writer got params {path} layer {layer}; expected {want_path} layer "
                       f"{want_layer} (tensors come in the order given)")
    if file not in self.handles:
      self.handles[file] = self._open(file)
    # 'lin' blocks split axis 1 (HF's rows) and to_hf(lin) keeps axis 0; other transforms
    # only reshape, so the C-order bytes of any block are already HF's
    a = to_hf(transform, value, shape) if transform.startswith("lin") else value
    a = np.ascontiguousarray(a, self.dtypes[path])
    self.handles[file].write(a.reshape(-1).view(np.uint8).data)
    self.written, self.left[file] = self.written + a.nbytes, self.left[file] - a.nbytes
    if self.written == nbytes:
      self.step, self.written = self.step + 1, 0
    if not self.left[file]:
      self.handles.pop(file).close()

  def close(self):
    for handle in self.handles.values():
      handle.close()
    if self.step != len(self.plan):
      raise ValueError(f"Writer closed after {self.step} of {len(self.plan)} tensors")
    if len(self.main) > 1:
      items = [it for file in self.main for it in self.files[file]]
      with open(os.path.join(self.out, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(it[5] for it in items)},
                   "weight_map": {it[2]: it[6] for it in items}}, f, indent=2)
    write_config(self.cfg, self.out, next(iter(self.dtypes.values())))


# ---------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------
def _tree_get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def load(path, dtype=np.float32, shardings=None):
  """(ModelConfig, params) from a local HF model directory.

  Leaves are numpy arrays of `dtype`, or, with `shardings` (a pytree of
  jax.sharding.Sharding matching params), jax arrays put leaf by leaf.
  """
  reader = Reader(path)
  cfg = reader.cfg
  for name, (_, _, _, is_layer) in reader.leaves.items():  # all there, before allocating
    for i in range(cfg.n_layers) if is_layer else [None]:
      reader._leaf(name, i)
  params = assemble(reader, dtype, shardings)
  used = {name.format(i=i) for name, _, _, is_layer in reader.leaves.values()
          for i in (range(cfg.n_layers) if is_layer else [0])}
  extra = sorted(n for n in set(reader.tensors) - used if not n.endswith(IGNORABLE_SUFFIXES))
  if cfg.tie_embeddings and "lm_head.weight" in extra:
    head = reader.info("lm_head.weight", "lm_head", (cfg.vocab_size, cfg.d_model))
    if not np.array_equal(st.read(head), reader.read("embedder/embedding")):
      raise ValueError(f"tied model, but lm_head.weight in {head.file} differs from "
                       "model.embed_tokens.weight")
    extra.remove("lm_head.weight")
  if extra:
    raise ValueError(f"unexpected tensor {extra[0]!r} in {reader.tensors[extra[0]].file} (not used "
                     f"by {cfg.family} with this config.json; {len(extra)} unexpected in all: "
                     f"{extra[:8]})")
  return cfg, params


def assemble(reader, dtype=np.float32, shardings=None) -> dict:
  """The params of `reader.cfg`, a leaf (one layer at a time) from `reader.read(path,
  layer)`: numpy arrays of `dtype`, or jax arrays put on `shardings` leaf by leaf."""
  cfg, params = reader.cfg, {}
  for leaf, _, _, shape, is_layer in entries(cfg):
    if is_layer:
      out = np.empty((cfg.n_layers,) + shape, dtype)
      for i in range(cfg.n_layers):
        out[i] = reader.read("/".join(leaf), i)
    else:
      out = np.array(reader.read("/".join(leaf)), dtype)
    if shardings is not None:
      import jax  # only when placing on devices
      out = jax.device_put(out, _tree_get(shardings, leaf))
    node = params
    for k in leaf[:-1]:
      node = node.setdefault(k, {})
    node[leaf[-1]] = out
  return params


def save_from_reader(reader, path, dtype=np.float32, max_shard_bytes=5 * 2**30):
  """Writes the model a per-tensor reader holds (`checkpoint.open_reader`: a params/ dir,
  an adapter checkpoint read as its merged model, an HF or GGUF file) as `save` does, one
  tensor (one layer of it) in memory at a time: on one process, whatever the mesh the
  params were trained on."""
  cfg = reader.cfg
  order = [("/".join(leaf), i) for leaf, _, _, _, is_layer in entries(cfg)
           for i in (range(cfg.n_layers) if is_layer else [None])]
  writer = Writer(path, cfg, order, {leaf: np.dtype(dtype) for leaf, _ in order},
                  max_shard_bytes)
  for leaf, i in order:
    writer.write(leaf, i, np.asarray(reader.read(leaf, i)).astype(dtype))
  writer.close()


def save(cfg: ModelConfig, params, path, dtype=np.float32, max_shard_bytes=5 * 2**30):
  """Writes config.json, generation_config.json and safetensors (sharded with an
  index above `max_shard_bytes`) that transformers' from_pretrained loads."""
  if cfg.lora is not None:
    raise ValueError("hf.save of a model with LoRA adapters: merge them first "
                     "(models.lora.merge), or write the adapters with models.peft.save")
  order, covered = [], set()
  for leaf, _, _, shape, is_layer in entries(cfg):
    covered.add(leaf)
    try:
      value = _tree_get(params, leaf)
    except (KeyError, TypeError):
      raise ValueError(f"params has no {'/'.join(leaf)} (needed by {cfg.family})") from None
    want = ((cfg.n_layers,) if is_layer else ()) + shape
    if tuple(np.shape(value)) != want:
      raise ValueError(f"params {'/'.join(leaf)} has shape {tuple(np.shape(value))}; "
                       f"expected {want}")
    order += [(leaf, i) for i in (range(cfg.n_layers) if is_layer else [None])]
  import jax  # for tree paths only
  for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    if tuple(str(k.key) for k in kp) not in covered:
      raise ValueError(f"params {'/'.join(str(k.key) for k in kp)} has no place in a "
                       f"{architecture(cfg)} checkpoint")
  writer = Writer(path, cfg, [("/".join(leaf), i) for leaf, i in order],
                  {"/".join(leaf): np.dtype(dtype) for leaf in covered}, max_shard_bytes)
  for leaf, i in order:
    value = np.asarray(_tree_get(params, leaf) if i is None else _tree_get(params, leaf)[i])
    writer.write("/".join(leaf), i, value.astype(dtype))
  writer.close()
