"""Hugging Face PEFT LoRA adapters <-> aya_jax adapters, both ways, numpy only.

A PEFT adapter directory is `adapter_config.json` (peft_type LORA: r, lora_alpha,
use_rslora, lora_dropout, target_modules, base_model_name_or_path) and
`adapter_model.safetensors` with, per adapted Linear of the HF model,
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. Our
adapter of a kernel [*in, *out] is A [*in, r] and B [r, *out] per layer, so A's HF
tensor is A flattened to [in, r] and transposed, and B's is B flattened to [r, out] and
transposed, the same flattening as the kernel's own HF tensor (models/hf.py's tables).

`save(cfg, params, out, base)` writes one (MoLoRA has no PEFT form: an error);
`read(path, base_cfg)` gives (cfg with cfg.lora, the adapters tree) for a base of
`base_cfg`; `checkpoint.load_model` takes a PEFT directory as the merged model.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from aya_jax.models import hf, lora
from aya_jax.models import safetensors_io as st
from aya_jax.models.config import LoraConfig, ModelConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_peft_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG))


def _kernels(cfg: ModelConfig):
  """our kernel path -> (HF module pattern with {i}, 'lin' | 'lin2') for cfg's family."""
  out = {}
  for path, name, transform, _, is_layer in hf.entries(cfg):
    if path[-1] == "kernel" and transform.startswith("lin") and is_layer:
      out["/".join(path)] = (name[:-len(".weight")], transform)
  return out


def save(cfg: ModelConfig, params, out: str, base: str) -> str:
  """Writes a PEFT LoRA adapter directory of `params['lora']` for the base at `base`."""
  if cfg.lora is None or lora.KEY not in params:
    raise ValueError("peft.save: the model has no LoRA adapters")
  if cfg.value_head:
    raise ValueError("peft.save writes language-model adapters; a reward model's value head "
                     "stays in the aya_jax adapter checkpoint")
  if cfg.lora.experts:
    raise ValueError("MoLoRA adapters (lora.experts > 0) have no PEFT form; keep the aya_jax "
                     "adapter checkpoint")
  kernels = _kernels(cfg)
  tensors, modules = [], set()
  for stem, ad in sorted(lora.adapted_paths(params).items()):
    module, _ = kernels[stem + "/kernel"]
    modules.add(module.rsplit(".", 1)[-1])
    a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
    r = a.shape[-1]
    for i in range(a.shape[0]):
      name = PREFIX + module.format(i=i)
      tensors.append((name + ".lora_A.weight", a[i].reshape(-1, r).T))
      tensors.append((name + ".lora_B.weight", b[i].reshape(r, -1).T))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, WEIGHTS), "wb") as f:
    f.write(st.header_bytes([(n, np.float32, t.shape) for n, t in tensors]))
    for _, t in tensors:
      f.write(np.ascontiguousarray(t).tobytes())
  config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout, use_rslora=cfg.lora.rslora,
                target_modules=sorted(modules), bias="none", fan_in_fan_out=False,
                inference_mode=True, init_lora_weights=True,
                base_model_name_or_path=os.path.abspath(base), modules_to_save=None)
  with open(os.path.join(out, CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return out


def read_config(path: str) -> dict:
  with open(os.path.join(path, CONFIG)) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{path}/{CONFIG}: peft_type {config.get('peft_type')!r}; only LORA "
                     "adapters can be read")
  for field in ("bias", "modules_to_save", "layers_to_transform", "use_dora"):
    if config.get(field) not in (None, "none", False, []):
      raise ValueError(f"{path}/{CONFIG}: {field}={config[field]!r} is not supported (plain "
                       "LoRA on Linear layers)")
  return config


def base_path(path: str) -> str:
  """The local base model an adapter directory names (no hub at run time)."""
  base = read_config(path).get("base_model_name_or_path") or ""
  if not os.path.exists(base):
    raise FileNotFoundError(f"{path}/{CONFIG} names the base {base!r}, which is not a local "
                            "path: set base_model_name_or_path to the base model's directory")
  return base


def read(path: str, base_cfg: ModelConfig):
  """(base_cfg with its LoraConfig, adapters tree) of a PEFT LoRA adapter directory."""
  config = read_config(path)
  tensors = st.read_header(os.path.join(path, WEIGHTS))
  kernels = _kernels(base_cfg)
  found, adapters = set(), {}
  for kernel, (module, _) in kernels.items():
    names = [PREFIX + module.format(i=i) for i in range(base_cfg.n_layers)]
    have = [n + ".lora_A.weight" in tensors for n in names]
    if not any(have):
      continue
    if not all(have):
      missing = names[have.index(False)]
      raise ValueError(f"{path}/{WEIGHTS}: {missing}.lora_A.weight is missing (adapters on "
                       "some layers only are not supported)")
    a = np.stack([st.read(tensors[n + ".lora_A.weight"]).T for n in names])
    b = np.stack([st.read(tensors[n + ".lora_B.weight"]).T for n in names])
    found.add(kernel)
    shape = hf_kernel_shape(base_cfg, kernel)
    n_in = 1 if kernels[kernel][1] == "lin" else 2
    r = a.shape[-1]
    node = adapters
    for k in kernel.split("/")[:-1]:
      node = node.setdefault(k, {})
    node["a"] = a.reshape((base_cfg.n_layers,) + shape[:n_in] + (r,)).astype(np.float32)
    node["b"] = b.reshape((base_cfg.n_layers, r) + shape[n_in:]).astype(np.float32)
  if not found:
    raise ValueError(f"{path}/{WEIGHTS} holds no LoRA tensor of a {base_cfg.family} model's "
                     f"projections (names like {PREFIX}{next(iter(kernels.values()))[0]}"
                     ".lora_A.weight)")
  stems = "|".join(sorted(re.escape(k[:-len("/kernel")]) for k in found))
  lcfg = LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                    dropout=float(config.get("lora_dropout") or 0.0),
                    targets=f"({stems})/kernel", rslora=bool(config.get("use_rslora")))
  return base_cfg.replace(lora=lcfg), {lora.KEY: adapters}


def hf_kernel_shape(cfg: ModelConfig, kernel: str) -> tuple:
  """Our per-layer shape of a kernel."""
  for path, _, _, shape, _ in hf.entries(cfg):
    if "/".join(path) == kernel:
      return shape
  raise KeyError(kernel)
