"""Pure step functions `(state, batch, rng) -> (state, metrics)`.

`make_train_step(loss_fn, tx, ...)` is the one step every objective shares
(SFT, reward model, DPO): it splits the global batch into `grad_accum`
micro-batches and scans over them, summing gradients of losses that are
already normalised by the WHOLE batch's count (so accumulation is exact), then
applies the optimizer. A non-finite loss or gradient norm skips the update
(the state is kept) and reports `nonfinite=1`; so does a non-finite update or
new parameter (a NaN learning rate). The loop decides when to stop. The
logged `lr` is the rate the update used (the optimizer's count, which skipped
steps do not advance), not `schedule(state.step)`.

`loss_fn(params, microbatch, normalizer, rng) -> (loss, sums)` where `sums`
are additive statistics (token counts, correct counts, nll sums...).
`normalizer_fn(batch)` gives the normaliser of the whole batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from aya_jax import losses, optim
from aya_jax.models import lora
from aya_jax.models.config import ModelConfig
from aya_jax.models.transformer import Transformer, unembed_matrix
from aya_jax.train.state import TrainState


def _split(batch, n):
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into grad_accum={n}")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree.map(split, batch)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    normalizer_fn: Callable, grad_accum: int = 1,
                    schedule: Callable | None = None):
  # the gradient is of the trained part only; a LoRA base comes in frozen
  grad_fn = jax.value_and_grad(
      lambda p, frozen, *a: loss_fn(lora.combine(p, frozen), *a), has_aux=True)

  def step(state: TrainState, batch, rng):
    normalizer = normalizer_fn(batch)
    micro = _split(batch, grad_accum)

    def body(carry, xs):
      grads, loss, sums = carry
      mb, i = xs
      (l, s), g = grad_fn(state.params, state.frozen, mb, normalizer, jax.random.fold_in(rng, i))
      grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
      sums = jax.tree.map(jnp.add, sums, s)
      return (grads, loss + l, sums), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    first = jax.tree.map(lambda x: x[0], micro)
    sums0 = jax.tree.map(jnp.zeros_like,
                         jax.eval_shape(loss_fn, state.model_params(), first, normalizer, rng)[1])
    (grads, loss, sums), _ = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32), sums0), (micro, jnp.arange(grad_accum)))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # a finite gradient can still give a non-finite update (a NaN learning rate,
    # an overflowing moment) or parameters: the step is skipped all the same
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(updates)) & all_finite(params))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = dict(loss=loss, grad_norm=grad_norm, nonfinite=1 - finite.astype(jnp.int32),
                   **sums)
    if schedule is not None:  # the rate this update used: the optimizer's own count
      metrics["lr"] = schedule(optim.updates_applied(state.opt_state))
    return new_state, metrics

  return step


def all_finite(tree) -> jax.Array:
  """True when every element of every leaf is finite (a scalar bool)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def dropout_rngs(cfg: ModelConfig, rng) -> dict:
  """The `rngs` of a training forward: LoRA dropout's, when there is any."""
  if rng is None or cfg.lora is None or not cfg.lora.dropout:
    return {}
  return {"dropout": rng}


def sft_loss_fn(cfg: ModelConfig, vocab_chunk: int = 0, z_loss_coef: float = 0.0):
  """Masked next-token cross-entropy; `vocab_chunk` > 0 never builds full logits."""
  model = Transformer(cfg)

  def loss_fn(params, mb, normalizer, rng):
    args = (mb["tokens"], mb["positions"], mb["segment_ids"])
    rngs = dropout_rngs(cfg, rng)
    if vocab_chunk:
      hidden, _ = model.apply(lora.variables(params), *args, return_hidden=True, rngs=rngs)
      loss, aux = losses.chunked_sft_loss(
          hidden, unembed_matrix(cfg, params), mb["targets"], mb["loss_mask"], normalizer,
          vocab_chunk, cfg.logit_scale, cfg.final_softcap)
      return loss, dict(n_tokens=aux["n_tokens"], nll_sum=aux["nll_sum"])
    logits, _ = model.apply(lora.variables(params), *args, rngs=rngs)
    loss, aux = losses.sft_loss(logits, mb["targets"], mb["loss_mask"], normalizer, z_loss_coef)
    return loss, dict(n_tokens=aux["n_tokens"], nll_sum=aux["nll_sum"],
                      n_correct=aux["n_correct"])

  return loss_fn


def token_logps_fn(cfg: ModelConfig, vocab_chunk: int = 0):
  """(params, rows, rng=None) -> log-prob [B, T] of rows['targets'] given rows['tokens'],
  'positions', 'segment_ids'; `vocab_chunk` > 0 never builds full logits; `rng`: LoRA
  dropout (training)."""
  model = Transformer(cfg)

  def fn(params, rows, rng=None):
    args = (rows["tokens"], rows["positions"], rows["segment_ids"])
    rngs = dropout_rngs(cfg, rng)
    if vocab_chunk:
      hidden, _ = model.apply(lora.variables(params), *args, return_hidden=True, rngs=rngs)
      return losses.chunked_token_logprobs(hidden, unembed_matrix(cfg, params), rows["targets"],
                                           vocab_chunk, cfg.logit_scale, cfg.final_softcap)
    logits, _ = model.apply(lora.variables(params), *args, rngs=rngs)
    return losses.token_logprobs(logits, rows["targets"])

  return fn


def loss_token_count(batch):
  return jnp.sum(batch["loss_mask"].astype(jnp.float32))


def jit_step(step, state_shardings, batch_shardings, mesh, ref_shardings=None):
  """`step(state, batch, rng[, ref])` jitted once with explicit shardings and the state
  donated; a frozen LoRA base (`state.frozen`) is passed beside it, never donated (the
  caller may hold it: the reference with adapters off, the next round's start).
  `ref_shardings`: the step takes a live reference's params as a 4th argument."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  rep = NamedSharding(mesh, P())
  frozen_sh = state_shardings.frozen
  ssh = state_shardings.replace(frozen=None)
  extra = () if ref_shardings is None else (ref_shardings,)

  def inner(state, frozen, batch, rng, *ref):
    new, metrics = step(state.replace(frozen=frozen), batch, rng, *ref)
    return new.replace(frozen=None), metrics

  jitted = jax.jit(inner, in_shardings=(ssh, frozen_sh, batch_shardings, rep) + extra,
                   out_shardings=(ssh, rep), donate_argnums=0)

  def call(state, batch, rng, *ref):
    new, metrics = jitted(state.replace(frozen=None), state.frozen, batch, rng, *ref)
    return new.replace(frozen=state.frozen), metrics

  return call
