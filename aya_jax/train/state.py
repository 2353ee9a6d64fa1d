"""TrainState and its sharded creation (eval_shape -> shardings -> jit init)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def create_state(params, tx: optax.GradientTransformation, param_shardings=None):
  """A TrainState around existing params; the optimizer state is created on the
  devices of its params (same shardings, no full copy on one device)."""
  def init(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  if param_shardings is None:
    return jax.jit(init)(params)
  return jax.jit(init, in_shardings=(param_shardings,), donate_argnums=0)(params)


def state_shardings(state: TrainState):
  """Shardings of a live state (what the step is jitted with)."""
  return jax.tree.map(lambda x: x.sharding, state)


def replicated_like(tree, mesh):
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
