"""The optimizer and learning-rate schedule, built from a config.

    tx = make_optimizer(cfg, params)      # cfg: default_optim_config() + edits

is, per trainable leaf, in this order:

  1. clip the gradient to global norm ``max_grad_norm`` (0 or None: off),
     the norm taken over trainable leaves only;
  2. Adam moments (b1, b2, eps; bias-corrected, eps outside the sqrt);
  3. decoupled weight decay: + weight_decay * param, on kernels only (not on
     norms, biases, nor, unless ``decay_embeddings``, the embeddings);
  4. times -schedule(step) (``make_schedule``).

That is AdamW as in ``torch.optim.AdamW``: both apply lr * wd * param.

Frozen leaves (``freeze``: regexes full-matched against '/'-joined dict
paths such as 'embedder/embedding' or 'layers/attn/.*') get zero updates
and hold no optimizer state. A pattern that matches nothing is an error (a
typo must not silently train everything). Frozen leaves still get
gradients unless the loss stops them; the training loop may
``stop_gradient`` them to save the backward work.

Gradient accumulation: with ``grad_accum`` > 1 the optimizer is wrapped in
``optax.MultiSteps``: it averages k calls' gradients and updates on every
k-th call (updates are zero in between); the schedule counts real updates.
The training loop should prefer accumulating inside one jitted step (a scan
over micro-batches with the loss normalised by the global token count,
see ``losses.sft_loss``); then keep ``grad_accum`` = 1 here.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")


def default_optim_config() -> ml_collections.ConfigDict:
  """All optimizer fields with their defaults; locked (typos fail)."""
  cfg = ml_collections.ConfigDict()
  cfg.lr = 1e-4               # peak learning rate
  cfg.warmup_steps = 0        # linear warmup from 0 to lr
  cfg.total_steps = 1000      # optimizer updates in the run (decay horizon)
  cfg.schedule = "cosine"     # after warmup: cosine | linear | constant
  cfg.end_lr_ratio = 0.0      # final lr = end_lr_ratio * lr
  cfg.b1 = 0.9
  cfg.b2 = 0.999              # torch/HF default; 0.95 common for long runs
  cfg.eps = 1e-8
  cfg.weight_decay = 0.0      # decoupled (AdamW)
  cfg.max_grad_norm = 1.0     # 0 disables clipping
  cfg.decay_embeddings = False
  cfg.freeze = ()             # regexes over '/'-joined param paths
  cfg.grad_accum = 1          # >1: optax.MultiSteps (prefer in-step)
  cfg.lock()
  return cfg


def _resolve(cfg: Any) -> ml_collections.ConfigDict:
  """Defaults overlaid with cfg (a ConfigDict or mapping); unknown keys fail."""
  out = default_optim_config()
  items = cfg.items() if hasattr(cfg, "items") else dict(cfg).items()
  for key, value in items:
    if key not in out:
      raise KeyError(f"unknown optimizer config field {key!r}; known: "
                     f"{sorted(out.keys())}")
    if key == "freeze":
      value = tuple([value] if isinstance(value, str) else value or ())
    out[key] = value if key != "max_grad_norm" else (value or 0.0)
  if out.schedule not in SCHEDULES:
    raise ValueError(f"schedule {out.schedule!r} not in {SCHEDULES}")
  if not (math.isfinite(float(out.lr)) and out.lr > 0):
    raise ValueError(f"optim.lr={out.lr!r}: the learning rate must be a finite number > 0")
  if out.total_steps < 1 or not 0 <= out.warmup_steps <= out.total_steps:
    raise ValueError(f"need 0 <= warmup_steps ({out.warmup_steps}) <= "
                     f"total_steps ({out.total_steps}) and total_steps >= 1")
  if out.grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {out.grad_accum}")
  return out


def make_schedule(cfg: Any) -> Callable[[Any], jax.Array]:
  """step -> learning rate: linear warmup from 0, then decay to the end lr.

  lr(s) = lr * s / warmup                               for s < warmup
        = end + (lr - end) * f((s - warmup) / decay)    for warmup <= s
  with decay = total_steps - warmup_steps, the fraction clipped to [0, 1],
  end = end_lr_ratio * lr and f(x) = (1 + cos(pi x)) / 2 (cosine), 1 - x
  (linear) or 1 (constant: end is not used). Step s is the number of
  updates already made, so the first update (s = 0) has lr 0 when warming
  up, as in optax and the HF schedulers.
  """
  cfg = _resolve(cfg)
  peak, warmup = float(cfg.lr), int(cfg.warmup_steps)
  end = float(cfg.end_lr_ratio) * peak
  decay = max(int(cfg.total_steps) - warmup, 1)
  kind = cfg.schedule

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    x = jnp.clip((s - warmup) / decay, 0.0, 1.0)
    if kind == "cosine":
      after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * x))
    elif kind == "linear":
      after = peak + (end - peak) * x
    else:
      after = jnp.full_like(x, peak)
    if warmup == 0:
      return after
    return jnp.where(s < warmup, peak * s / warmup, after)

  return schedule


def param_paths(params: Any) -> Any:
  """The tree of '/'-joined key paths of ``params`` ('layers/attn/q/kernel')."""
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(name(k) for k in path), params)


def _is_embedding(path: str) -> bool:
  parts = path.split("/")
  return parts[-1] == "embedding" or any(p.startswith("embed") for p in parts)


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """True where weight decay applies: not norms, biases, (embeddings)."""
  def decays(path: str) -> bool:
    parts = path.split("/")
    if any("norm" in p.lower() for p in parts) or parts[-1] == "bias":
      return False
    return decay_embeddings or not _is_embedding(path)
  return jax.tree_util.tree_map(decays, param_paths(params))


def freeze_labels(params: Any, patterns: Any) -> Any:
  """'frozen' where a path full-matches one of ``patterns``, else 'train'."""
  patterns = tuple(patterns or ())
  paths = param_paths(params)
  flat = jax.tree_util.tree_leaves(paths)
  regexes = []
  for p in patterns:
    try:
      regexes.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"freeze pattern {p!r} is not a regex: {e}") from None
    if not any(regexes[-1].fullmatch(path) for path in flat):
      raise ValueError(f"freeze pattern {p!r} matches no parameter; paths "
                       f"look like {flat[:4]}")
  return jax.tree_util.tree_map(
      lambda path: "frozen" if any(r.fullmatch(path) for r in regexes)
      else "train", paths)


def make_optimizer(cfg: Any, params: Any) -> optax.GradientTransformation:
  """AdamW + schedule + clipping + decay mask + freezing (see module doc).

  Args:
    cfg: ConfigDict or mapping with any subset of ``default_optim_config()``
      fields; unknown fields raise KeyError.
    params: the params tree (arrays or shapes); only its structure and
      paths are used, to build the decay mask and freeze labels.
  """
  cfg = _resolve(cfg)
  parts = []
  if cfg.max_grad_norm and cfg.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
  parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  if cfg.weight_decay:
    decay_embeddings = bool(cfg.decay_embeddings)
    decay_mask(params, decay_embeddings)  # fail early on odd trees
    parts.append(optax.add_decayed_weights(
        float(cfg.weight_decay),
        mask=lambda p: decay_mask(p, decay_embeddings)))
  parts.append(optax.scale_by_learning_rate(make_schedule(cfg)))
  tx = optax.chain(*parts)
  if cfg.freeze:
    labels = freeze_labels(params, cfg.freeze)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               labels)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.grad_accum))
  return tx


def updates_applied(opt_state: Any) -> jax.Array:
  """How many updates the optimizer has applied: the count of its learning-rate
  schedule (a skipped non-finite step keeps the old optimizer state, so this can
  be less than the train state's step). The lr of the next update is
  ``make_schedule(cfg)(updates_applied(opt_state))``."""
  counts = [leaf.count for leaf in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(leaf, optax.ScaleByScheduleState)]
  if len(counts) != 1:
    raise ValueError(f"expected one learning-rate schedule in the optimizer state, found "
                     f"{len(counts)}")
  return counts[0]


def optim_config_from(cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A validated, locked copy of ``cfg`` over the defaults."""
  return _resolve(cfg)
