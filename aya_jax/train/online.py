r"""Online preference optimisation: iterative DPO (Aya Expanse: 3 rounds), CoPG, RLOO
("Back to Basics", Ahmadian et al. 2024), GRPO and Dr. GRPO.

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
     copg: every pair of distinct non-empty answers per prompt, with their scores ->
           pairs.jsonl -> `dpo.train_dpo` with loss_type 'copg' (CoPG, Flet-Berliac et
           al. 2024; `losses.dpo_loss`): beta = kl_coef, the fixed reference, no NLL term;
           on-policy its gradient is proportional to RLOO's with the KL in the reward;
     rloo, grpo, dr_grpo: `train.policy_gradient`: RLOO's reward = score -
           kl_coef * KL to the fixed reference with leave-one-out advantages over
           the k samples; GRPO's group-normalised advantages (Dr. GRPO: centred
           only) with kl_coef * the per-token KL in the loss; the clipped ratio
           when the rollout serves several updates;
  4. params -> iter_<i>/params/; with online.families, steps 1-4 run once per
     family on its languages' prompts, each from pi_i (iter_<i>/<family>/),
     and the family policies are merged linearly with equal weights into
     iter_<i>/params/ (Aya Expanse's per-family rounds);
  5. optional merge (online.merge.method, off by default): the policy for the
     next iteration becomes `merging.pytree.merge` (train/policy_merge.py) of
     named models: 'policy' (this
     iteration's trained params), 'previous' (the policy the iteration
     started from), 'initial' (pi_0) or a params/ or HF directory; e.g.
     linear with models=('policy', 'previous'), weights=(0.5, 0.5). The
     merged params -> iter_<i>/merged/, and the report gets `merge`.
Iteration i samples with the key of seed + i and trains with seed + i, so a
caller running one iteration per call draws the same samples. Every step is
resumable: a finished iteration is not trained again (its params are loaded; its
samples are read back from iter_<i>/sampling/, for the report), an interrupted
sampling pass resumes at its first unfinished batch, and interrupted training
from iter_<i>/checkpoints. `online.prompts_per_language` caps each round's prompts
(drawn with seed + i; `train/rounds.py` holds a round's sampling, pairs and report).
The fixed reference (the policy gradients' KL, DPO without reset_reference) is
`dpo.reference_init` when set, else pi_0 (`model.init`): a pipeline that runs
one iteration per call sets it to the policy its online stage started from,
so round after round the KL is to the same model. A last round samples the
final policy (unless online.final_pass is off).

workdir/report.jsonl, one line per round: mean score (overall and per
language), win rate vs the previous round under the scorer (per prompt and
sample index, ties count 1/2), and the reward-hacking guard: mean answer
length in tokens and the fraction of answers that did not stop with an end
of turn.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from aya_jax import axes, checkpoint, sharding
from aya_jax.data import atomic, formatting
from aya_jax.data import pairs as pp
from aya_jax.data import records as records_lib
from aya_jax.merging import pytree
from aya_jax.models import lora
from aya_jax.train import common, dpo, policy_gradient, policy_merge, rounds

# trained on preference pairs by train/dpo.py; the others by train/policy_gradient.py
PAIR_ALGORITHMS = ("dpo", "copg")
ALGORITHMS = PAIR_ALGORITHMS + policy_gradient.ALGORITHMS


def online_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "dpo"        # dpo | copg | rloo | grpo | dr_grpo (ALGORITHMS)
  c.iterations = 3
  c.k = 4                    # samples per prompt
  c.betas = (0.1,)           # DPO beta per iteration (the last one repeats)
  c.reset_reference = True   # reference = the previous iteration's policy
  c.min_gap = 0.0            # keep a pair only if best - worst > min_gap
  c.temperature = 1.0
  c.top_p = 1.0
  c.max_new_tokens = 64
  c.sample_batch = 64        # prompts per generate call (a killed pass resumes after the
                             # last finished one)
  c.prompts_per_language = 0  # prompts each round samples per language, drawn with the
                              # round's seed (seed + i); 0 = every prompt
  c.final_pass = True        # sample the final policy once more for the report
  c.kl_coef = 0.05           # rloo / grpo / dr_grpo / copg: beta of the KL to
                             # dpo.reference_init (RLOO, CoPG: in the reward, per sequence;
                             # GRPO: in the loss, per token)
  c.clip_eps = 0.2           # clipped ratio when a rollout serves several updates;
                             # RLOO with 0 = plain REINFORCE (one update per rollout)
  c.empty_score = config_dict.placeholder(float)  # None: the lowest score of its group
  c.scorer = "verifier"      # verifier (the synthetic world's)
  # 'name:l1,l2;name:...': every iteration trains one policy per family on its
  # languages' prompts, all from the current policy, then merges them linearly
  # with equal weights (Aya Expanse's per-family rounds); "" = one policy
  c.families = ""
  c.merge = policy_merge.merge_block()
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


# --------------------------------------------------------------------- run


def _iteration_config(config, i):
  """Iteration i's training config: betas[i] (the last repeats) and seed + i."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    betas = tuple(config.online.betas)
    c.dpo.beta = float(betas[min(i, len(betas) - 1)])
    if config.online.algorithm == "copg":  # the KL's beta; the paper's loss, no NLL term
      c.dpo.update(dict(loss_type="copg", beta=float(config.online.kl_coef), rpo_alpha=0.0,
                        average_logps=False))
    c.dpo.ref_cache_dir = ""
    c.seed = config.seed + i
  return c


def _train_policy(config, directory, cfg, params, tok, prompts, rd, reference, mesh, rules,
                  iteration: int, base_path: str = ""):
  """One iteration's training of `params` on its round `rd` -> (params, report extras);
  params/ of `directory` written (reused when it is there: a finished iteration). With LoRA
  on a `base_path` that is still the base in memory, params/ holds the adapters."""
  oc, extra = config.online, {}
  done = os.path.join(directory, "params")
  if checkpoint.is_params_dir(done):  # finished before: reuse, do not retrain
    return _load_trained(done, params), extra
  it_config = _iteration_config(config, iteration)
  if oc.algorithm in PAIR_ALGORITHMS:
    if oc.algorithm == "dpo":
      pairs = rounds.best_worst_pairs(prompts, rd.texts, rd.scores, oc.min_gap,
                                      f"it{iteration}", rd.usable)
    else:  # copg: every pair of the k answers, against the fixed reference
      pairs = rounds.all_pairs(prompts, rd.texts, rd.scores, f"it{iteration}", rd.usable)
    extra["n_pairs"] = len(pairs)
    if pairs:
      if jax.process_index() == 0:
        records_lib.write_jsonl(os.path.join(directory, "pairs.jsonl"), pairs)
      tok_pairs, _ = pp.tokenize_pairs(pairs, tok, config.data.seq_len, skip_invalid=True)
      fixed = oc.algorithm == "copg" or not oc.reset_reference
      params, _ = dpo.train_dpo(it_config, directory, cfg, params, tok_pairs, mesh, rules,
                                ref_params=reference if fixed else None)
    else:
      logging.warning("iteration %d: no pairs (all ties?); policy unchanged", iteration)
  else:
    pad_id = cfg.pad_id if cfg.pad_id is not None else 0
    rows = policy_gradient.sample_rows(rd.prompt_ids, rd.completions, oc.k, config.data.seq_len,
                                       pad_id)
    params, more = policy_gradient.train(it_config, directory, cfg, params, reference, rows,
                                         rd.scores, rd.usable, mesh, rules)
    extra.update(more)
  if cfg.lora is not None and base_path:  # the adapters, naming the base
    checkpoint.save_adapters(done, cfg, params, base_path)
  else:
    checkpoint.save_params(done, cfg, params)
  return params, extra


def _load_trained(done, params):
  """A finished iteration's params/ in `params`' shardings (LoRA: its adapters on the
  base in memory)."""
  trainable, frozen = lora.split(params)
  if frozen is None:
    return checkpoint.load_model(done, jax.tree.map(lambda x: x.sharding, params))[1]
  if not checkpoint.is_adapter_dir(done):  # the whole tree (a base merged in memory)
    return checkpoint.load_params(done, jax.tree.map(lambda x: x.sharding, params))[1]
  _, own = checkpoint.load_params(done, jax.tree.map(lambda x: x.sharding, trainable))
  return lora.combine(own, frozen)


def _fold(cfg, params, mesh, rules, seed):
  """LoRA after a merge of whole policies: the merged weights are the new base, with fresh
  adapters on it (without LoRA: params as they are)."""
  if cfg.lora is None:
    return params
  return sharding.add_adapters_sharded(cfg, params, jax.random.key(seed), mesh, rules)


def _dense(cfg, params):
  """A policy's weights as one tree (LoRA: its adapters merged in), on the host."""
  return lora.merge(cfg, jax.device_get(params))[1] if cfg.lora is not None else params


def run(config, workdir: str, scorer=None):
  os.makedirs(workdir, exist_ok=True)
  oc = config.online
  if oc.algorithm not in ALGORITHMS:
    raise ValueError(f"online.algorithm={oc.algorithm!r}: expected one of {ALGORITHMS}")
  if oc.k < 2:
    raise ValueError(f"online.k={oc.k}: ranking answers needs at least 2 samples per prompt")
  if not config.tokenizer or not config.data.prompts:
    raise ValueError("config.tokenizer and config.data.prompts are required")
  scorer = scorer if scorer is not None else make_scorer(config)
  tok = formatting.load_tokenizer(config.tokenizer)
  mesh, rules = sharding.make_mesh(config.mesh.shape), axes.rules(config.mesh.rules)
  cfg, params = common.setup_model(config.model, len(tok), mesh, rules, config.seed,
                                   config.lora, pad_id=tok.pad_token_id,
                                   bos_id=tok.bos_token_id,
                                   eos_ids=formatting.end_of_turn_ids(tok))
  pshard = sharding.param_shardings(cfg.replace(lora=None), mesh, rules)  # whole policies
  # LoRA: params/ name the base while it is model.init; a merge of policies replaces it
  base_path = config.model.init if cfg.lora is not None else ""
  mc = oc.merge
  # copies: training donates the params' buffers
  fixed_ref = oc.algorithm != "dpo" or not oc.reset_reference  # copg: fixed as well
  keep_init = ("initial" in policy_merge.merge_names(mc)
               or (fixed_ref and not config.dpo.reference_init))
  init = lora.copy_trained(params) if keep_init else None
  reference = None  # the policy gradients' KL, DPO without reset_reference: one for all rounds
  if fixed_ref:
    reference = (checkpoint.load_model(config.dpo.reference_init, pshard,
                                       language_model=True)[1]
                 if config.dpo.reference_init else init)
  extra_models = policy_merge.load_merge_inputs(mc, pshard)
  prompts = [p for path in config.data.prompts for p in records_lib.read_prompts(path)]
  rounds.family_prompts(oc.families, prompts)  # checked before the first round
  reports, prev = [], {}  # prev: the last round's scores by prompt id (usable prompts)
  # the last round only samples (the final policy, for the report), unless final_pass is off
  for i in range(oc.iterations + int(bool(oc.final_pass))):
    d = os.path.join(workdir, f"iter_{i}")
    os.makedirs(d, exist_ok=True)
    # iteration i draws from seed + i: a pipeline running one iteration per call
    # (seed + i, iteration 0) draws the same samples
    rng = jax.random.fold_in(jax.random.key(config.seed + i), 0)
    last = i == oc.iterations
    rep, start, trained = {"round": i}, None, []
    # pi_i for the merge, copied: training donates the params' buffers
    if not last and "previous" in policy_merge.merge_names(mc):
      start = lora.copy_trained(params)
    sampled = rounds.round_prompts(prompts, oc.prompts_per_language, config.seed + i)
    groups = rounds.family_prompts(oc.families, sampled)
    for name, group in ({"": sampled} if last else groups).items():
      gd = os.path.join(d, name) if name else d
      os.makedirs(gd, exist_ok=True)
      rd = rounds.sample_round(cfg, params, tok, group, scorer, oc, rng, mesh,
                               config.mesh.rules, f"it{i}",
                               cache_dir=os.path.join(gd, "sampling"))
      if jax.process_index() == 0 and rd.records:
        records_lib.write_jsonl(os.path.join(gd, "samples.jsonl"), rd.records)
      before = (np.stack([prev.get(p.id, np.full(oc.k, np.nan)) for p in group])
                if prev and not name else None)
      group_rep = rounds.round_report(group, rd.scores, rd.lengths, rd.stopped, before,
                                      rd.usable, rd.empty)
      if not name:
        rep.update(group_rep)
        prev = {p.id: rd.scores[j] for j, p in enumerate(group) if rd.usable[j]}
      else:
        rep.setdefault("families", {})[name] = group_rep
      if last:
        break
      # every family trains from pi_i: a copy for each but the last (donated buffers)
      policy = params if len(trained) == len(groups) - 1 else lora.copy_trained(params)
      policy, extra = _train_policy(config, gd, cfg, policy, tok, group, rd, reference, mesh,
                                    rules, i, base_path)
      (rep if not name else rep["families"][name]).update(extra)
      trained.append(policy)
    if last:
      reports.append(rep)
      break
    params = trained[0]
    if len(trained) > 1:  # the family policies, merged linearly with equal weights
      merged = pytree.merge("linear", [_dense(cfg, p) for p in trained],
                            parameters={"normalize": True},
                            model_parameters=[{"weight": 1.0} for _ in trained])
      params = _fold(cfg, jax.device_put(merged, pshard), mesh, rules, config.seed + i)
      base_path = ""
      checkpoint.save_params(os.path.join(d, "params"), cfg, params)
    if mc.method:
      named = dict(extra_models, policy=params, previous=start, initial=init)
      named = {k: None if v is None else _dense(cfg, v) for k, v in named.items()}
      params = policy_merge.merge_policy(mc, named, cfg.replace(lora=None), pshard,
                                         seed=config.seed + i)
      params = _fold(cfg, params, mesh, rules, config.seed + i)
      base_path = ""
      checkpoint.save_params(os.path.join(d, "merged"), cfg, params)
      rep["merge"] = policy_merge.merge_description(mc)
    reports.append(rep)
    logging.info("online round %d: %s", i, rep)
  if jax.process_index() == 0:
    atomic.write_text(os.path.join(workdir, "report.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in reports))
  return common.finish(workdir, cfg, params, config.export_hf, base=base_path,
                       export_dtype=config.export_hf_dtype), reports
