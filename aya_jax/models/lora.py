"""Low-rank adapters (LoRA, rsLoRA) and a mixture of LoRA experts (MoLoRA).

A model with adapters has `cfg.lora` (a LoraConfig) and its params tree one more
top-level key, `params['lora']`, mirroring the adapted kernels' paths:

  lora/layers/attn/q/a   [L, *in, r]        (MoLoRA: [L, *in, E, r])
  lora/layers/attn/q/b   [L, r, *out]       (MoLoRA: [L, E, r, *out])
  lora/layers/attn/q/router                 (MoLoRA only: [L, *in, E])

`Dense` adds `scale * dropout(x) A B` to `x W` wherever an adapter exists, so the
base with its adapters switched off is the same params tree less that key
(`without_adapters`): no second copy of the weights. The adapters are created by
the model's own init (the base's init is dead code there); `split` separates what
trains (the adapters, and a reward model's value head) from the frozen base.

MoLoRA (Zadouri et al. 2023): per kernel, E adapters mixed by softmax(x R) on the
token's input; with one expert the router's weight is exactly 1 and it is LoRA.
"""

from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aya_jax.models.config import LORA_TARGETS, LoraConfig, ModelConfig

KEY = "lora"
# what trains besides the adapters: a reward model's value head (PEFT's modules_to_save)
ALSO_TRAINED = ("value_head",)


def lora_block() -> ml_collections.ConfigDict:
  """Every training stage's `lora` block; rank 0 trains all the weights."""
  c = ml_collections.ConfigDict()
  c.rank = 0              # > 0: train low-rank adapters of this rank, the base frozen
  c.alpha = 16.0          # scale = alpha / rank (alpha / sqrt(rank) with rslora)
  c.dropout = 0.0         # on the adapters' input, in training steps
  c.targets = LORA_TARGETS  # regex over kernel paths ('layers/attn/q/kernel')
  c.rslora = False
  c.experts = 0           # > 0: MoLoRA with this many experts per kernel
  return c


def from_block(block) -> LoraConfig | None:
  if not block or not block.rank:
    return None
  return LoraConfig(rank=int(block.rank), alpha=float(block.alpha),
                    dropout=float(block.dropout), targets=str(block.targets),
                    rslora=bool(block.rslora), experts=int(block.experts))


# ---------------------------------------------------------------------- the forward


def _contract(x, w, n):
  """x's trailing n axes against w's leading n axes."""
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))),
                                    ((), ())))


def _uniform_fan_in(fan_in):
  bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform(a=sqrt(5)) of lora_A
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def adapt(module: nn.Module, x, y, in_shape, out_shape, in_axes, out_axes, dtype):
  """y (+ the adapter's term) for the Dense `module` with input x; creates the adapter at
  init when cfg.lora targets the module's kernel."""
  lcfg = module.cfg.lora
  if lcfg is None:
    return y
  if module.is_initializing():
    path = "/".join(str(p) for p in module.scope.path) + "/kernel"
    if not _targets(lcfg).fullmatch(path):
      return y
  elif not module.has_variable(KEY, "a"):
    return y
  r, e, n_in = lcfg.rank, lcfg.experts, len(in_shape)
  in_shape, out_shape = tuple(in_shape), tuple(out_shape)
  experts = (e,) if e else ()
  part = lambda init, axes: nn.with_logical_partitioning(init, tuple(axes))
  a = module.variable(KEY, "a", part(_uniform_fan_in(math.prod(in_shape)),
                                     tuple(in_axes) + (None,) * (1 + bool(e))),
                      module.make_rng("params") if module.is_initializing() else None,
                      in_shape + experts + (r,), jnp.float32).value
  b = module.variable(KEY, "b", part(nn.initializers.zeros, (None,) * (1 + bool(e))
                                     + tuple(out_axes)),
                      None, experts + (r,) + out_shape, jnp.float32).value
  a, b = nn.meta.unbox(a), nn.meta.unbox(b)
  h = x.astype(dtype)
  if lcfg.dropout and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lcfg.dropout, h.shape)
    h = jnp.where(keep, h / (1.0 - lcfg.dropout), 0).astype(dtype)
  xa = _contract(h, a.astype(dtype), n_in)                       # [..., (E,) r]
  if e:
    router = module.variable(KEY, "router", part(nn.initializers.normal(0.02),
                                                 tuple(in_axes) + (None,)),
                             module.make_rng("params") if module.is_initializing() else None,
                             in_shape + (e,), jnp.float32).value
    router = nn.meta.unbox(router)
    gates = jax.nn.softmax(_contract(x.astype(jnp.float32), router, n_in), axis=-1)
    xa = xa * gates[..., None].astype(dtype)
  delta = _contract(xa, b.astype(dtype), 1 + bool(e))
  return y + (lcfg.scale * delta).astype(y.dtype)


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str):
  return re.compile(pattern)


def _targets(lcfg: LoraConfig):
  return _compiled(lcfg.targets)


# ------------------------------------------------------------------- params trees


def variables(params) -> dict:
  """The model's variables for `Transformer.apply`: the base under 'params' and the
  adapters (when the tree has them) under 'lora'."""
  if KEY not in params:
    return {"params": params}
  return {"params": without_adapters(params), KEY: params[KEY]}


def has_adapters(params) -> bool:
  return isinstance(params, dict) and KEY in params


def without_adapters(params) -> dict:
  """The base: the same arrays, the adapters left out (the DPO reference)."""
  return {k: v for k, v in params.items() if k != KEY}


def split(params):
  """(trainable, frozen) top-level parts of a params tree with adapters: the adapters
  (and a value head) train, the rest is the frozen base. Without adapters everything
  trains and frozen is None."""
  if not has_adapters(params):
    return params, None
  trained = (KEY,) + ALSO_TRAINED
  return ({k: v for k, v in params.items() if k in trained},
          {k: v for k, v in params.items() if k not in trained})


def combine(trainable, frozen):
  """The whole params tree from `split`'s parts."""
  return trainable if frozen is None else {**frozen, **trainable}


def copy_trained(params):
  """A copy of what training changes (and donates): the adapters and value head of a LoRA
  tree, which keeps sharing its frozen base; without adapters, the whole tree."""
  trainable, frozen = split(params)
  return combine(jax.tree.map(jnp.copy, trainable), frozen)


def adapters_are_fresh(params) -> bool:
  """Every B is zero: the model is still exactly its base (LoRA's init)."""
  bs = [ad["b"] for ad in adapted_paths(params).values()]
  return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(b == 0) for b in bs]))))


def check_targets(cfg: ModelConfig, adapters, kernel_paths):
  """A clear error when cfg.lora.targets matched no kernel."""
  if not jax.tree.leaves(adapters):
    raise ValueError(f"lora.targets={cfg.lora.targets!r} matches no kernel; kernel paths "
                     f"look like {sorted(kernel_paths)[:4]}")


# ----------------------------------------------------------------------- merging


def adapted_paths(params):
  """'layers/attn/q' -> {'a': .., 'b': .., ('router')} for every adapter of the tree."""
  out = {}

  def walk(node, prefix):
    if "a" in node and "b" in node and not isinstance(node["a"], dict):
      out["/".join(prefix)] = node
      return
    for k, v in node.items():
      walk(v, prefix + (k,))

  walk(params.get(KEY, {}), ())
  return out


def kernel_delta(a, b, kernel_shape, scale: float, xp=np):
  """scale * A B in the kernel's shape [*lead, *in, *out] (lead: the stacked layers)."""
  n_lead = a.ndim + b.ndim - 2 - len(kernel_shape)
  lead, n_in = tuple(kernel_shape[:n_lead]), a.ndim - 1 - n_lead
  fan_in = math.prod(a.shape[n_lead:n_lead + n_in])
  r = a.shape[-1]
  a2 = a.reshape(lead + (fan_in, r)).astype(xp.float32)
  b2 = b.reshape(lead + (r, -1)).astype(xp.float32)
  return (scale * xp.matmul(a2, b2)).reshape(kernel_shape)


def merge(cfg: ModelConfig, params):
  """(cfg without adapters, params with W + scale * A B in every adapted kernel): the
  same function as the model with its adapters (MoLoRA's input-dependent mixture has no
  such form: an error)."""
  if cfg.lora is None or not has_adapters(params):
    return cfg.replace(lora=None), without_adapters(params) if has_adapters(params) else params
  if cfg.lora.experts:
    raise ValueError("MoLoRA adapters (lora.experts > 0) mix experts per token: they cannot "
                     "be merged into dense weights; keep the adapter checkpoint")
  base = without_adapters(params)
  out = jax.tree.map(lambda x: x, base)
  for path, ad in adapted_paths(params).items():
    node = out
    keys = path.split("/")
    for k in keys[:-1]:
      node = node[k]
    leaf = node[keys[-1]]
    kernel = leaf["kernel"]
    xp = jnp if isinstance(kernel, jax.Array) else np
    delta = kernel_delta(ad["a"], ad["b"], kernel.shape, cfg.lora.scale, xp)
    node[keys[-1]] = {**leaf, "kernel": (kernel.astype(xp.float32) + delta).astype(kernel.dtype)}
  return cfg.replace(lora=None), out
