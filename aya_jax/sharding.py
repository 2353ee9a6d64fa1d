"""Meshes, shardings for param trees, sharded init and global batches.

A mesh always has the axes ('data', 'fsdp', 'tensor'). Params are created
already sharded: eval_shape(init) -> logical specs -> NamedShardings ->
jit(init, out_shardings=...). A logical axis whose dimension does not divide
by its mesh axes is replicated instead (a 1-kv-head model under tensor
parallelism, a vocabulary of 97 over 8 devices), and that is logged once.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aya_jax import axes as axes_lib
from aya_jax.models import lora
from aya_jax.models.config import ModelConfig
from aya_jax.models.transformer import Transformer

BATCH_AXES = ("data", "fsdp")


def mesh_block() -> ml_collections.ConfigDict:
  """Every stage's `mesh` config block: `mesh.shape` and `mesh.rules`."""
  c = ml_collections.ConfigDict()
  c.shape = (-1, 1, 1)    # (data, fsdp, tensor); one -1 takes the remaining devices
  c.rules = "fsdp"        # axes.PRESETS: dp | fsdp | fsdp_tp
  return c


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one -1 entry takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape {shape} must have 3 entries (data, fsdp, tensor)")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"{len(devices)} available")
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), axes_lib.MESH_AXES)


def _mesh_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  names = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh.shape[a] for a in names]))


def logical_to_sharding(logical_spec, shape, mesh: Mesh, rules) -> NamedSharding:
  """NamedSharding for one array from its logical axis names."""
  rule_map = dict(rules)
  used, out = set(), []
  for dim, name in zip(shape, tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))):
    axis = rule_map.get(name) if name is not None else None
    names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    names = tuple(a for a in names if a not in used and mesh.shape.get(a, 1) > 1)
    if names and dim % _mesh_size(mesh, names):
      logging.log_first_n(logging.INFO, "replicating axis %s (size %d) instead of sharding "
                          "over %s", 8, name, dim, names)
      names = ()
    used.update(names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return NamedSharding(mesh, P(*out))


def tree_shardings(boxed_tree, mesh: Mesh, rules):
  """Shardings for a tree of (abstract) boxed params (nn.LogicallyPartitioned leaves)."""
  specs = nn.get_partition_spec(boxed_tree)
  shapes = nn.meta.unbox(boxed_tree)
  return jax.tree.map(lambda s, x: logical_to_sharding(s, x.shape, mesh, rules), specs, shapes,
                      is_leaf=lambda s: isinstance(s, P))


def _boxed_init(cfg: ModelConfig):
  """rng -> the boxed params tree (with cfg.lora, its adapters under 'lora')."""
  def init(rng):
    variables = Transformer(cfg).init(rng, jnp.zeros((1, 4), jnp.int32))
    params = dict(variables["params"])
    if cfg.lora is not None:
      params[lora.KEY] = variables.get(lora.KEY, {})
    return params
  return init


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules):
  """Shardings of the params tree of a model, without allocating it."""
  boxed = jax.eval_shape(_boxed_init(cfg), jax.random.key(0))
  return tree_shardings(boxed, mesh, rules)


def init_params_sharded(cfg: ModelConfig, rng, mesh: Mesh, rules):
  """Random params created directly in their shardings (never whole on one device)."""
  shardings = param_shardings(cfg, mesh, rules)
  init = _boxed_init(cfg)
  return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def add_adapters_sharded(cfg: ModelConfig, params, rng, mesh: Mesh, rules):
  """`params` (a base) with fresh cfg.lora adapters, created in their shardings (the
  base's init is dead code in that computation)."""
  boxed = jax.eval_shape(_boxed_init(cfg), jax.random.key(0))
  lora.check_targets(cfg, boxed[lora.KEY], [
      "/".join(str(getattr(k, "key", k)) for k in kp)
      for kp, _ in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]])
  shardings = tree_shardings(boxed[lora.KEY], mesh, rules)
  init = _boxed_init(cfg)
  adapters = jax.jit(lambda r: nn.meta.unbox(init(r)[lora.KEY]), out_shardings=shardings)(rng)
  return {**lora.without_adapters(params), lora.KEY: adapters}


def shard_tree(tree, shardings):
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Per-process host arrays -> global jax.Arrays sharded over the batch axes.

  Each process passes its own slice of the global batch (process-sharded data);
  on one process that is the whole batch.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, local)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
  """Mesh + logical rules for the activation constraints inside the model."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
