"""Merge-weight search: derivative-free search for the merge weights (and, for the
sparsifying methods, densities) of N checkpoints that maximise a score of the merged
params ("If You Can't Use Them, Recycle Them"; evolutionary model merging).

The objective is any function `score(params) -> float` (higher is better): a per-language
evaluation, minus a validation loss, ... The optimiser is scipy's differential evolution
(scipy comes with jax) or Dirichlet random search; the budget is a number of objective
evaluations. Weights are normalised to sum to 1 and weights under `prune_below` are set to
0 (the checkpoint is dropped), so the result names the checkpoints that matter.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from aya_jax.merging import methods
from aya_jax.merging import pytree


@dataclasses.dataclass
class SearchResult:
  weights: list          # normalised, pruned: one per model
  densities: Optional[list]
  score: float
  params: object         # the merged params of the best candidate
  history: list          # every candidate: {'eval', 'weights', 'densities', 'score'}
  nonzero: list          # indices of the models with non-zero weight


class _BudgetSpent(Exception):
  pass


@jax.jit
def _linear(weights, trees):
  """sum_i w_i x_i, fp32 accumulation; weights already sum to 1."""
  return jax.tree.map(
      lambda *xs: sum(w * x.astype(jnp.float32) for w, x in zip(weights, xs)).astype(xs[0].dtype),
      *trees)


def search_weights(models: Sequence, score: Callable[[object], float], *,
                   method: str = "linear", base=None, parameters: Optional[dict] = None,
                   budget: int = 64, optimizer: str = "differential_evolution", seed: int = 0,
                   weight_bounds=(0.0, 1.0), search_density: bool = False,
                   density_bounds=(0.1, 1.0), prune_below: float = 0.05,
                   log_path: Optional[str] = None, cfg=None) -> SearchResult:
  """Best merge weights of `models` (params pytrees) for `score`; see the module docstring.

  method: any methods.METHODS entry that takes per-model weights (linear, task_arithmetic,
  ties, dare_*, breadcrumbs*); `base` for those that need one. search_density adds one
  density per model (ties, dare, breadcrumbs). log_path: JSONL of every candidate.
  """
  n = len(models)
  if n < 2:
    raise ValueError(f"search_weights needs at least 2 models; got {n}")
  if "weight" not in methods.METHODS[method][4]:
    raise ValueError(f"{method} has no per-model weights to search")
  if search_density and "density" not in methods.METHODS[method][4]:
    raise ValueError(f"{method} has no density to search")
  if budget < 1:
    raise ValueError(f"budget={budget}: need at least one evaluation")
  history, cache = [], {}
  best = dict(score=-np.inf)
  log_file = open(log_path, "a") if log_path else None

  def decode(x):
    w = np.clip(np.asarray(x[:n], np.float64), 0.0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)
    w = np.where(w < prune_below, 0.0, w)
    w = w / w.sum() if w.sum() > 0 else np.eye(n)[int(np.argmax(x[:n]))]
    dens = [round(float(d), 6) for d in x[n:]] if search_density else None
    return [round(float(v), 6) for v in w], dens

  def evaluate(x):
    weights, dens = decode(x)
    key = (tuple(weights), tuple(dens or ()))
    if key in cache:
      return -cache[key]
    if len(history) >= budget:
      raise _BudgetSpent
    if method == "linear" and not parameters:
      merged = _linear(jnp.asarray(weights, jnp.float32), list(models))
    else:
      mp = [dict(weight=w, **({"density": d} if dens else {}))
            for w, d in zip(weights, dens or [None] * n)]
      merged = pytree.merge(method, models, base=base, parameters=parameters,
                             model_parameters=mp, seed=seed, cfg=cfg)
    value = float(score(merged))
    cache[key] = value
    entry = {"eval": len(history), "weights": weights, "densities": dens, "score": value}
    history.append(entry)
    logging.info("merge search %s", entry)
    if log_file:
      log_file.write(json.dumps(entry) + "\n")
      log_file.flush()
    if value > best["score"]:
      best.update(score=value, weights=weights, densities=dens, params=merged)
    return -value

  bounds = [tuple(weight_bounds)] * n + ([tuple(density_bounds)] * n if search_density else [])
  try:
    if optimizer == "differential_evolution":
      from scipy.optimize import differential_evolution
      dim = len(bounds)
      popsize = max(2, min(15, budget // (4 * dim)))  # scipy: population = popsize * dim
      maxiter = max(1, budget // (popsize * dim))
      differential_evolution(evaluate, bounds, popsize=popsize, maxiter=maxiter, seed=seed,
                             polish=False, init="latinhypercube", tol=0.0)
    elif optimizer == "random":
      rng = np.random.default_rng(seed)
      for _ in range(budget * 4):  # duplicates (after pruning) do not count
        w = rng.dirichlet(np.ones(n)) * (weight_bounds[1] - weight_bounds[0]) + weight_bounds[0]
        d = rng.uniform(*density_bounds, n) if search_density else []
        evaluate(np.concatenate([w, d]))
    else:
      raise ValueError(f"optimizer={optimizer!r}; use differential_evolution | random")
  except _BudgetSpent:
    pass
  finally:
    if log_file:
      log_file.close()
  nonzero = [i for i, w in enumerate(best["weights"]) if w > 0]
  logging.info("merge search best %.6g weights %s nonzero %s", best["score"], best["weights"],
               nonzero)
  return SearchResult(weights=best["weights"], densities=best["densities"],
                      score=best["score"], params=best["params"], history=history,
                      nonzero=nonzero)
