r"""The 'merge' stage (configs/merge.py): a MergeSpec run over checkpoints, its weights
optionally searched first.

    python -m aya_jax.main --config=configs/merge.py --workdir=runs/merge \
      --config.merge.models="('runs/sft_eu/params','runs/sft_asia/params')"

With `merge.search.budget` > 0 the per-model weights (and, with
`search.density`, the densities) are searched before the merge
(`search.search_weights`): every candidate merge answers the prompts of
`search.prompts` greedily and is scored by `search.scorer` (the world's
verifier, or a reward model directory); the objective is the mean score, an
empty answer scoring `search.empty_score`. The search holds the input models
in host memory (models that fit it); the merge itself then streams, with the
best weights, and merge_spec.json records them and the search
(`search.jsonl` in the workdir lists every candidate).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from aya_jax import checkpoint, evaluation, reward
from aya_jax.data import atomic, records
from aya_jax.merging import search, stream
from aya_jax.merging import spec as merge_spec


def search_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      budget=0,               # candidate merges to evaluate; 0 = no search
      optimizer="differential_evolution",  # or 'random' (Dirichlet weights)
      density=False,          # also search one density per model (ties, dare_*, breadcrumbs*)
      prompts="",             # JSONL the candidates answer (any layout records.read_prompts takes)
      n_prompts=0,            # the first n of them; 0 = all
      tokenizer="",           # the models' tokenizer dir ("" = the first model's)
      scorer="verifier",      # 'verifier' (the world's) or a reward model dir
      scorer_tokenizer="",    # "" = the reward model dir's
      max_new_tokens=32,
      batch_size=32,
      empty_score=0.0,        # the score of an empty answer
  ))


def merge_from_spec(spec: merge_spec.MergeSpec, out: str, out_hf: Optional[str] = None) -> str:
  return stream.merge_checkpoints(spec.models, spec.method, spec.parameters, out,
                                  base=spec.base, out_hf=out_hf,
                                  model_merge_parameters=spec.model_parameters,
                                  include=spec.include, seed=spec.seed, dtype=spec.dtype)


def _scorer(block):
  if block.scorer == "verifier":
    from aya_jax.world import verifier
    return verifier.verifier_scorer()
  return reward.RewardModelScorer.load(block.scorer, block.scorer_tokenizer or None)


def answer_score(block, prompts, tokenizer: str, scorer):
  """score(cfg, params) -> the mean score of the model's greedy answers to `prompts`."""

  def score(cfg, params) -> float:
    model = evaluation.Model("candidate", model=(cfg, params), tokenizer=tokenizer,
                             max_new_tokens=block.max_new_tokens, batch_size=block.batch_size)
    answers = model.answer(prompts)
    recs, idx = evaluation.completion_records(prompts, answers, "candidate")
    out = np.full(len(prompts), float(block.empty_score))
    if recs:
      out[idx] = np.asarray(scorer.score(recs), np.float64)
    return float(np.mean(out))

  return score


def searched_spec(spec: merge_spec.MergeSpec, block, workdir: str):
  """`spec` with the weights (and densities) the search found best, and a summary."""
  if not block.prompts:
    raise ValueError("config.merge.search.prompts is empty: the search scores the answers "
                     "of each candidate merge to these prompts")
  prompts = records.read_prompts(block.prompts)
  prompts = prompts[:block.n_prompts] if block.n_prompts else prompts
  tokenizer = block.tokenizer or spec.models[0]
  loaded = [checkpoint.load_model(path) for path in spec.models]
  cfg = loaded[0][0]
  base = jax.device_get(checkpoint.load_model(spec.base)[1]) if spec.base else None
  score = answer_score(block, prompts, tokenizer, _scorer(block))
  log_path = os.path.join(workdir, "search.jsonl")
  if os.path.exists(log_path):
    os.remove(log_path)  # this search's candidates only
  result = search.search_weights(
      [jax.device_get(p) for _, p in loaded], lambda params: score(cfg, params),
      method=spec.method, base=base, parameters=spec.parameters or None, budget=block.budget,
      optimizer=block.optimizer, seed=spec.seed, search_density=block.density,
      log_path=log_path, cfg=cfg)
  model_parameters = [dict(m, weight=w) for m, w in zip(spec.model_parameters, result.weights)]
  if result.densities:
    model_parameters = [dict(m, density=d) for m, d in zip(model_parameters, result.densities)]
  summary = dict(weights=result.weights, densities=result.densities, score=result.score,
                 n_candidates=len(result.history), prompts=block.prompts,
                 n_prompts=len(prompts), scorer=block.scorer)
  logging.info("merge search: %s", summary)
  return dataclasses.replace(spec, model_parameters=model_parameters), summary


def run(config, workdir: str):
  """Writes workdir/params (and workdir/hf), then workdir/merge_spec.json. Each output is
  replaced whole and only by a merge that succeeded: a failing one leaves a previous merge
  and its spec as they were."""
  spec = merge_spec.spec_from_config(config.merge)
  block = config.merge.get("search")
  found = None
  if block is not None and block.budget > 0:
    os.makedirs(workdir, exist_ok=True)
    spec, found = searched_spec(spec, block, workdir)
  out = os.path.join(workdir, "params")
  out_hf = os.path.join(workdir, "hf") if config.merge.out_hf else None
  logging.info("merge %s of %s (base %s) -> %s", spec.method, spec.models, spec.base, out)
  merge_from_spec(spec, out, out_hf)
  if jax.process_index() == 0:  # one writer (merge_from_spec syncs the processes)
    record = dataclasses.asdict(spec)
    if found is not None:
      record["search"] = found
    atomic.write_json(os.path.join(workdir, "merge_spec.json"), record, indent=1)
  return out
