r"""Online preference optimisation: iterative DPO (Aya Expanse: 3 rounds) and
RLOO ("Back to Basics", Ahmadian et al. 2024).

    python -m aya_jax.main --config=configs/online_dpo.py --workdir=runs/online

Iteration i (workdir/iter_<i>/), from the current policy pi_i:
  1. sample k answers per prompt (`sampling.generate`, n=k, the prompt is
     prefilled once) -> samples.jsonl (CompletionRecords, with scores);
  2. score them with the Scorer (any object with `score(records) ->
     np.ndarray`: the synthetic Verifier, a reward model). An empty answer
     is not scored: it gets `online.empty_score`, or by default the lowest
     score of the non-empty answers to its prompt (never more than a real
     answer, whatever the scorer's scale). A prompt with a score the scorer
     could not give (NaN: a reward model whose max length the prompt fills)
     or with no answer at all is dropped from training and counted in the
     report (`n_dropped_prompts`);
  3. dpo:  best vs worst non-empty answer per prompt (skipping gaps <=
           min_gap) -> pairs.jsonl -> `dpo.train_dpo` with betas[i]; the
           reference is pi_i (reset_reference) or the fixed reference;
     rloo: `train.rloo`: reward = score - kl_coef * KL to the fixed
           reference, leave-one-out advantages over the k samples, the
           clipped ratio when the rollout serves several updates;
  4. params -> iter_<i>/params/;
  5. optional merge (online.merge.method, off by default): the policy for the
     next iteration becomes `merging.pytree.merge` of named models: 'policy' (this
     iteration's trained params), 'previous' (the policy the iteration
     started from), 'initial' (pi_0) or a params/ or HF directory; e.g.
     linear with models=('policy', 'previous'), weights=(0.5, 0.5). The
     merged params -> iter_<i>/merged/, and the report gets `merge`.
Every step is resumable: a finished iteration is not trained again (its
params are loaded; its samples are re-drawn, same seed, same samples, for
the report), and an interrupted one resumes from iter_<i>/checkpoints.
The fixed reference (RLOO's KL, DPO without reset_reference) is
`dpo.reference_init` when set, else pi_0 (`model.init`): a pipeline that runs
one iteration per call sets it to the policy its online stage started from,
so round after round the KL is to the same model. A last round samples the
final policy.

workdir/report.jsonl, one line per round: mean score (overall and per
language), win rate vs the previous round under the scorer (per prompt and
sample index, ties count 1/2), and the reward-hacking guard: mean answer
length in tokens and the fraction of answers that did not stop with an end
of turn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from aya_jax import axes, checkpoint, sharding
from aya_jax.data import atomic, formatting
from aya_jax.data import pairs as pp
from aya_jax.data import records as records_lib
from aya_jax.merging import pytree
from aya_jax.sampling import methods, sampler
from aya_jax.train import common, dpo, rloo


def online_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "dpo"        # dpo | rloo
  c.iterations = 3
  c.k = 4                    # samples per prompt
  c.betas = (0.1,)           # DPO beta per iteration (the last one repeats)
  c.reset_reference = True   # reference = the previous iteration's policy
  c.min_gap = 0.0            # keep a pair only if best - worst > min_gap
  c.temperature = 1.0
  c.top_p = 1.0
  c.max_new_tokens = 64
  c.sample_batch = 64        # prompts per generate call
  c.kl_coef = 0.05           # RLOO: beta of the sequence KL penalty (to dpo.reference_init)
  c.clip_eps = 0.2           # RLOO: clipped ratio when a rollout serves several updates;
                             # 0 = plain REINFORCE (one update per rollout)
  c.empty_score = config_dict.placeholder(float)  # None: the lowest score of its group
  c.scorer = "verifier"      # verifier (the synthetic world's)
  c.merge = merge_block()
  return c


def merge_block() -> ml_collections.ConfigDict:
  """online.merge: after each iteration the policy becomes a merge (see `merge_policy`)."""
  c = ml_collections.ConfigDict()
  c.method = ""              # '' = off; a merging.methods.METHODS name: linear, slerp, ties, ...
  c.models = ("policy", "previous")  # policy | previous | initial | a params/ or HF dir
  c.weights = (0.5, 0.5)     # one per model; () for methods without weights (slerp)
  c.base = ""                # the base of task_arithmetic, ties, slerp, ...: a name as above
  c.parameters = ""          # JSON of the method's shared parameters, e.g. '{"t": 0.3}'
  return c


def default_config() -> ml_collections.ConfigDict:
  c = dpo.default_config()
  c.stage = "online_dpo"
  c.data.prompts = ()        # JSONL: SFT records (last assistant turn dropped) or
                             # preference / completion records (their prompt)
  c.online = online_block()
  return c


# -------------------------------------------------------------------- data


def make_scorer(config):
  if config.online.scorer == "verifier":
    from aya_jax.world import verifier
    return verifier.Verifier()
  raise ValueError(f"online.scorer={config.online.scorer!r}: 'verifier', or pass scorer= to run()")


# ---------------------------------------------------------------- sampling


@dataclasses.dataclass
class Round:
  """One round's samples: k per prompt, rows in prompt-major order."""
  records: list             # CompletionRecords of the non-empty answers
  texts: list               # [P*k] decoded answers ('' when empty)
  scores: np.ndarray        # [P, k] for training (`group_scores`)
  usable: np.ndarray        # [P] bool: every answer scored
  empty: np.ndarray         # [P*k] bool
  prompt_ids: list          # [P] token ids of the rendered prompts
  completions: list         # [P*k] sampled token ids
  lengths: np.ndarray       # [P*k]
  stopped: np.ndarray       # [P*k] bool: ended with an end of turn


def group_scores(raw_pk: np.ndarray, empty_pk: np.ndarray, empty_score=None):
  """(scores [P, k], usable [P]) from the scorer's raw scores (NaN where it
  could not score) and the empty-answer mask. An empty answer scores
  `empty_score`, or None: the lowest score of the non-empty answers to its
  prompt. A prompt is unusable when the scorer failed on one of its answers
  or when it has no score at all (every answer empty, no empty_score)."""
  raw = np.where(empty_pk, np.nan, np.asarray(raw_pk, np.float64))
  failed = np.isnan(raw) & ~empty_pk
  if empty_score is not None:
    fill = np.full(raw.shape[0], float(empty_score))
  else:
    with warnings.catch_warnings():  # all-empty rows: no minimum (NaN), unusable below
      warnings.simplefilter("ignore", RuntimeWarning)
      fill = np.nanmin(raw, axis=1)
  scores = np.where(empty_pk, fill[:, None], raw)
  usable = ~failed.any(1) & np.isfinite(scores).all(1)
  return scores.astype(np.float32), usable


def sample_round(cfg, params, tok, prompts, scorer, oc, rng, mesh, preset, tag) -> Round:
  """k samples per prompt from `params`, scored (empty answers are not sent
  to the scorer)."""
  stop = formatting.end_of_turn_ids(tok)
  method = methods.from_config(oc.temperature, 0, oc.top_p)
  prompt_ids = [formatting.tokenize_prompt(tok, p.messages) for p in prompts]
  rows, lengths, stopped = [], [], []
  for s in range(0, len(prompts), oc.sample_batch):
    res = sampler.generate(cfg, params, prompt_ids[s:s + oc.sample_batch],
                           jax.random.fold_in(rng, s), method, oc.max_new_tokens, stop, oc.k,
                           mesh=mesh, rules=preset)
    rows += [res.completion(r) for r in range(res.tokens.shape[0])]
    lengths.append(res.lengths)
    stopped.append(res.stopped)
  texts = [formatting.decode_completion(tok, ids, stop) for ids in rows]
  empty = np.asarray([not t.strip() for t in texts])
  recs = []
  for i, text in enumerate(texts):
    prompt = prompts[i // oc.k]
    if not empty[i]:  # an empty answer cannot be a record
      recs.append(records_lib.CompletionRecord(
          id=f"{prompt.id}#{tag}s{i % oc.k}", language=prompt.language, prompt=prompt.messages,
          completion=text,
          teacher=tag, score=None))
  raw = np.full(len(texts), np.nan, np.float32)
  if recs:
    raw[~empty] = np.asarray(scorer.score(recs), np.float32)
  scores, usable = group_scores(raw.reshape(len(prompts), oc.k),
                                empty.reshape(len(prompts), oc.k), oc.empty_score)
  recs = [records_lib.CompletionRecord(**{**r.to_dict(),
                                          "score": float(v) if np.isfinite(v) else None})
          for r, v in zip(recs, raw[~empty])]
  return Round(recs, texts, scores, usable, empty, prompt_ids, rows, np.concatenate(lengths),
               np.concatenate(stopped))


def best_worst_pairs(prompts, texts, scores_pk, min_gap: float, tag: str,
                     usable=None) -> list:
  """PreferenceRecords: the best vs the worst non-empty answer per usable prompt."""
  out, k = [], scores_pk.shape[1]
  for p, prompt in enumerate(prompts):
    cand = [j for j in range(k) if texts[p * k + j].strip()]
    if len(cand) < 2 or (usable is not None and not usable[p]):
      continue
    best = max(cand, key=lambda j: scores_pk[p, j])
    worst = min(cand, key=lambda j: scores_pk[p, j])
    if (scores_pk[p, best] - scores_pk[p, worst] <= min_gap
        or texts[p * k + best] == texts[p * k + worst]):  # one answer scored twice: no pair
      continue
    out.append(records_lib.PreferenceRecord(
        id=f"{prompt.id}#{tag}", language=prompt.language, prompt=prompt.messages,
        chosen=texts[p * k + best],
        rejected=texts[p * k + worst], chosen_score=float(scores_pk[p, best]),
        rejected_score=float(scores_pk[p, worst]), source=f"online_{tag}"))
  return out


def round_report(prompts, scores_pk, lengths, stopped, prev_scores=None, usable=None,
                 empty=None) -> dict:
  """Mean score (overall, per language) over the usable prompts, win rate vs
  the previous round's scores (prompts usable in both), mean length, the
  fraction without an end of turn, empty answers and dropped prompts."""
  k = scores_pk.shape[1]
  ok = np.ones(len(prompts), bool) if usable is None else np.asarray(usable, bool)
  rows = np.repeat(ok, k)
  langs = np.repeat([p.language for p in prompts], k)
  flat = scores_pk.reshape(-1)
  mean = lambda sel: float(flat[sel].mean()) if sel.any() else float("nan")
  rep = {"mean_score": mean(rows), "mean_length": float(np.mean(lengths)),
         "frac_no_stop": float(1.0 - np.mean(stopped)),
         "frac_empty": float(np.mean(empty)) if empty is not None else 0.0,
         "n_dropped_prompts": int((~ok).sum())}
  for lang in sorted(set(langs)):
    rep[f"mean_score/{lang}"] = mean(rows & (langs == lang))
  if prev_scores is not None:
    prev = prev_scores.reshape(-1)
    both = rows & np.isfinite(prev)
    win = (flat > prev) + 0.5 * (flat == prev)
    rep["win_rate_vs_prev"] = float(win[both].mean()) if both.any() else float("nan")
    for lang in sorted(set(langs)):
      sel = both & (langs == lang)
      rep[f"win_rate_vs_prev/{lang}"] = float(win[sel].mean()) if sel.any() else float("nan")
  return rep


# ------------------------------------------------------------------- merge

MERGE_NAMES = ("policy", "previous", "initial")


def merge_names(mc) -> tuple:
  """The models (and base) a merge step reads; () when merging is off."""
  return (tuple(mc.models) + ((mc.base,) if mc.base else ())) if mc.method else ()


def load_merge_inputs(mc, shardings) -> dict:
  """{path: params} of the checkpoint directories among online.merge's models and base."""
  out = {}
  for name in merge_names(mc):
    if name in MERGE_NAMES or name in out:
      continue
    if not checkpoint.is_model_dir(name):
      raise ValueError(f"online.merge: {name!r} is not one of {MERGE_NAMES} nor a params/ or "
                       "HF directory")
    out[name] = checkpoint.load_model(name, shardings)[1]
  return out


def merge_policy(mc, named: dict, cfg, shardings=None, seed=0):
  """`pytree.merge(mc.method, ...)` of the models online.merge names, looked up
  in `named` ({'policy', 'previous', 'initial', or a path: params})."""
  missing = [n for n in merge_names(mc) if named.get(n) is None]
  if missing:
    raise ValueError(f"online.merge: no params for {missing}")
  weights = tuple(mc.weights)
  if weights and len(weights) != len(mc.models):
    raise ValueError(f"online.merge.weights {weights} needs one weight per model in "
                     f"online.merge.models {tuple(mc.models)}")
  merged = pytree.merge(
      mc.method, [named[n] for n in mc.models], base=named[mc.base] if mc.base else None,
      parameters=json.loads(mc.parameters) if mc.parameters else None,
      model_parameters=[{"weight": float(w)} for w in weights] if weights else None,
      seed=seed, cfg=cfg)
  return merged if shardings is None else jax.device_put(merged, shardings)


def merge_description(mc) -> str:
  ws = tuple(mc.weights) or ("",) * len(mc.models)
  parts = ", ".join(f"{n} {w}".strip() for n, w in zip(mc.models, ws))
  return f"{mc.method}({parts}{', base ' + mc.base if mc.base else ''})"


# --------------------------------------------------------------------- run


def _iteration_config(config, i):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    betas = tuple(config.online.betas)
    c.dpo.beta = float(betas[min(i, len(betas) - 1)])
    c.dpo.ref_cache_dir = ""
  return c


def run(config, workdir: str, scorer=None):
  os.makedirs(workdir, exist_ok=True)
  oc = config.online
  if oc.algorithm not in ("dpo", "rloo"):
    raise ValueError(f"online.algorithm={oc.algorithm!r}: expected 'dpo' or 'rloo'")
  if oc.k < 2:
    raise ValueError(f"online.k={oc.k}: ranking answers needs at least 2 samples per prompt")
  if not config.tokenizer or not config.data.prompts:
    raise ValueError("config.tokenizer and config.data.prompts are required")
  scorer = scorer if scorer is not None else make_scorer(config)
  tok = formatting.load_tokenizer(config.tokenizer)
  mesh, rules = sharding.make_mesh(config.mesh.shape), axes.rules(config.mesh.rules)
  cfg, params = common.setup_model(config.model, len(tok), mesh, rules, config.seed,
                                pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                                eos_ids=formatting.end_of_turn_ids(tok))
  pshard = sharding.param_shardings(cfg, mesh, rules)
  mc = oc.merge
  # copies: training donates the params' buffers
  fixed_ref = oc.algorithm == "rloo" or not oc.reset_reference
  keep_init = "initial" in merge_names(mc) or (fixed_ref and not config.dpo.reference_init)
  init = jax.tree.map(jnp.copy, params) if keep_init else None
  reference = None  # RLOO's KL and DPO without reset_reference: one model for every round
  if fixed_ref:
    reference = (checkpoint.load_model(config.dpo.reference_init, pshard,
                                       language_model=True)[1]
                 if config.dpo.reference_init else init)
  extra_models = load_merge_inputs(mc, pshard)
  prompts = [p for path in config.data.prompts for p in records_lib.read_prompts(path)]
  pad_id = cfg.pad_id if cfg.pad_id is not None else 0
  reports, prev = [], None
  for i in range(oc.iterations + 1):  # the last round only samples
    d = os.path.join(workdir, f"iter_{i}")
    os.makedirs(d, exist_ok=True)
    rng = jax.random.fold_in(jax.random.key(config.seed), i)
    rd = sample_round(cfg, params, tok, prompts, scorer, oc, rng, mesh, config.mesh.rules,
                      f"it{i}")
    if jax.process_index() == 0 and rd.records:
      records_lib.write_jsonl(os.path.join(d, "samples.jsonl"), rd.records)
    rep = {"round": i, **round_report(prompts, rd.scores, rd.lengths, rd.stopped, prev,
                                      rd.usable, rd.empty)}
    prev = np.where(rd.usable[:, None], rd.scores, np.nan)
    if i == oc.iterations:
      reports.append(rep)
      break
    done = os.path.join(d, "params")
    # pi_i for the merge, copied: training donates the params' buffers
    start = jax.tree.map(jnp.copy, params) if "previous" in merge_names(mc) else None
    if checkpoint.is_params_dir(done):  # finished before: reuse, do not retrain
      _, params = checkpoint.load_model(done, pshard)
    elif oc.algorithm == "dpo":
      pairs = best_worst_pairs(prompts, rd.texts, rd.scores, oc.min_gap, f"it{i}", rd.usable)
      rep["n_pairs"] = len(pairs)
      if pairs:
        if jax.process_index() == 0:
          records_lib.write_jsonl(os.path.join(d, "pairs.jsonl"), pairs)
        tok_pairs, _ = pp.tokenize_pairs(pairs, tok, config.data.seq_len, skip_invalid=True)
        params, _ = dpo.train_dpo(_iteration_config(config, i), d, cfg, params, tok_pairs,
                                  mesh, rules, ref_params=None if oc.reset_reference else reference)
      else:
        logging.warning("iteration %d: no pairs (all ties?); policy unchanged", i)
      checkpoint.save_params(done, cfg, params)
    else:
      rows = rloo.sample_rows(rd.prompt_ids, rd.completions, oc.k, config.data.seq_len, pad_id)
      params, extra = rloo.train_rloo(config, d, cfg, params, reference, rows, rd.scores,
                                      rd.usable, mesh, rules)
      rep.update(extra)
      checkpoint.save_params(done, cfg, params)
    if mc.method:
      named = dict(extra_models, policy=params, previous=start, initial=init)
      params = merge_policy(mc, named, cfg, pshard, seed=config.seed + i)
      checkpoint.save_params(os.path.join(d, "merged"), cfg, params)
      rep["merge"] = merge_description(mc)
    reports.append(rep)
    logging.info("online round %d: %s", i, rep)
  if jax.process_index() == 0:
    atomic.write_text(os.path.join(workdir, "report.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in reports))
  return common.finish(workdir, cfg, params, config.export_hf), reports
