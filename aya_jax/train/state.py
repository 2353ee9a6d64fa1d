"""TrainState and its sharded creation (eval_shape -> shardings -> jit init)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from aya_jax.models import lora


@flax.struct.dataclass
class TrainState:
  """`params` are what trains; `frozen` (None, or a LoRA model's base) is the rest of the
  model's params tree: no gradient, no optimizer state, not in train checkpoints."""
  step: jax.Array
  params: Any
  opt_state: Any
  frozen: Any = None

  def model_params(self):
    """The whole params tree of the model (trained and frozen parts)."""
    return lora.combine(self.params, self.frozen)


def create_state(params, tx: optax.GradientTransformation, param_shardings=None, frozen=None):
  """A TrainState around existing (trainable) params. With shardings, every optimizer-state
  leaf that mirrors a param (Adam's mu and nu) gets that param's sharding, so
  the optimizer state is sharded like the params (ZeRO); counters and other
  non-param leaves are replicated. `frozen` is kept as it is (not donated)."""
  def init(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  if param_shardings is None:
    st = jax.jit(init)(params)
  else:
    sh = state_shardings_for(tx, params, param_shardings)
    st = jax.jit(init, in_shardings=(param_shardings,),
                 out_shardings=sh.replace(frozen=None), donate_argnums=0)(params)
  return st.replace(frozen=frozen)


def state_shardings_for(tx: optax.GradientTransformation, params, param_shardings):
  """TrainState shardings: params as given, optimizer state mirroring them."""
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  rep = NamedSharding(mesh, P())
  by_path = {_dict_keys(path): (np.shape(x), sh) for (path, x), sh in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))}
  longest = max(len(k) for k in by_path)

  def pick(path, leaf):
    keys = _dict_keys(path)
    for n in range(min(len(keys), longest), 0, -1):  # the param path is a key-path suffix
      hit = by_path.get(keys[-n:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return rep

  abstract = jax.eval_shape(tx.init, params)
  opt = jax.tree_util.tree_map_with_path(pick, abstract)
  return TrainState(step=rep, params=param_shardings, opt_state=opt)


def _dict_keys(path) -> tuple:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(state: TrainState):
  """Shardings of a live state (what the step is jitted with)."""
  return jax.tree.map(lambda x: x.sharding, state)

