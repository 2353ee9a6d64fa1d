r"""Online preference optimisation: iterative DPO (Aya Expanse: 3 rounds) and
RLOO ("Back to Basics", Ahmadian et al. 2024).

    python -m aya_jax.main --config=configs/online_dpo.py --workdir=runs/online

Iteration i (workdir/iter_<i>/), from the current policy pi_i:
  1. sample k answers per prompt (`sampling.generate`, n=k, the prompt is
     prefilled once) -> samples.jsonl (CompletionRecords, with scores);
  2. score them with the Scorer (any object with `score(records) ->
     np.ndarray`: the synthetic Verifier, a reward model);
  3. dpo:  best vs worst answer per prompt (skipping gaps <= min_gap and
           empty answers) -> pairs.jsonl -> `dpo.train_dpo` with
           betas[i]; the reference is pi_i (reset_reference) or pi_0;
     rloo: reward = score - kl_coef * (log pi_i(y) - log pi_ref(y)) with
           both log-probs recomputed by the training forward pass (not the
           sampler's), leave-one-out advantages over the k samples,
           REINFORCE on the summed log-prob of the sampled tokens;
  4. params -> iter_<i>/params/;
  5. optional merge (online.merge.method, off by default): the policy for the
     next iteration becomes `merging.merge` of named models: 'policy' (this
     iteration's trained params), 'previous' (the policy the iteration
     started from), 'initial' (pi_0) or a params/ or HF directory; e.g.
     linear with models=('policy', 'previous'), weights=(0.5, 0.5). The
     merged params -> iter_<i>/merged/, and the report gets `merge`.
Every step is resumable: a finished iteration is not trained again (its
params are loaded; its samples are re-drawn, same seed, same samples, for
the report), and an interrupted one resumes from iter_<i>/checkpoints.
RLOO's KL is always to pi_0 (with a reset reference it would be 0). A last round samples the final policy.

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
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from aya_jax import axes, checkpoint, losses, merging, sharding
from aya_jax.data import formatting, pipeline
from aya_jax.data import preference_pipeline as pp
from aya_jax.data import records as records_lib
from aya_jax.sampling import methods, sampler
from aya_jax.train import dpo, sft, steps
from aya_jax.train import loop as loop_lib


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
  c.kl_coef = 0.05           # RLOO: beta of the sequence KL penalty
  c.scorer = "verifier"      # verifier (the synthetic world's)
  c.merge = merge_block()
  return c


def merge_block() -> ml_collections.ConfigDict:
  """online.merge: after each iteration the policy becomes a merge (see `merge_policy`)."""
  c = ml_collections.ConfigDict()
  c.method = ""              # '' = off; a merging.METHODS name: linear, slerp, ties, ...
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


def read_prompts(paths) -> list:
  """[(id, language, prompt messages)] from SFT, preference or completion JSONL."""
  out = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      first = json.loads(next(line for line in f if line.strip()))
    kind = "sft" if "messages" in first else ("preference" if "chosen" in first else "completion")
    for r in records_lib.read_jsonl(path, kind):
      prompt = r.messages[:-1] if kind == "sft" else r.prompt
      out.append((r.id, r.language, tuple(prompt)))
  return out


def make_scorer(config):
  if config.online.scorer == "verifier":
    from aya_jax.data import synthetic
    return synthetic.Verifier()
  raise ValueError(f"online.scorer={config.online.scorer!r}: 'verifier', or pass scorer= to run()")


class ArrayIterator:
  """Shuffled epochs over equal-length arrays -> batches; checkpointable."""

  def __init__(self, arrays: dict, batch_size: int, seed: int):
    self.arrays, self.batch, self.seed, self.position = arrays, batch_size, seed, 0
    self.n = len(next(iter(arrays.values())))

  def __next__(self):
    g = np.arange(self.position, self.position + self.batch)
    rows = np.asarray([np.random.default_rng([self.seed, e]).permutation(self.n)[i]
                       for e, i in zip(g // self.n, g % self.n)])
    self.position += self.batch
    pc, pi = jax.process_count(), jax.process_index()
    rows = rows[pi * self.batch // pc:(pi + 1) * self.batch // pc]
    return {k: v[rows] for k, v in self.arrays.items()}

  def get_state(self):
    return {"position": int(self.position)}

  def set_state(self, state):
    self.position = int(state["position"])


# ---------------------------------------------------------------- sampling


def sample_round(cfg, params, tok, prompts, scorer, oc, rng, mesh, preset, tag):
  """k samples per prompt, scored. Returns (CompletionRecords, scores [P, k],
  SampleResult fields: token ids per row, lengths, stopped)."""
  stop = formatting.end_of_turn_ids(tok)
  method = methods.from_config(oc.temperature, 0, oc.top_p)
  prompt_ids = [formatting.tokenize_prompt(tok, p) for _, _, p in prompts]
  rows, lengths, stopped = [], [], []
  for s in range(0, len(prompts), oc.sample_batch):
    res = sampler.generate(cfg, params, prompt_ids[s:s + oc.sample_batch],
                           jax.random.fold_in(rng, s), method, oc.max_new_tokens, stop, oc.k,
                           mesh=mesh, sharding_preset=preset)
    rows += [res.completion(r) for r in range(res.tokens.shape[0])]
    lengths.append(res.lengths)
    stopped.append(res.stopped)
  texts = [formatting.decode_completion(tok, ids, stop) for ids in rows]
  recs, scores = [], np.zeros(len(texts), np.float32)
  for i, text in enumerate(texts):
    pid, lang, prompt = prompts[i // oc.k]
    if text.strip():  # an empty answer cannot be a record; it scores 0
      recs.append(records_lib.CompletionRecord(
          id=f"{pid}#{tag}s{i % oc.k}", language=lang, prompt=prompt, completion=text,
          teacher=tag, score=None))
  if recs:
    valid = np.asarray([bool(t.strip()) for t in texts])
    scores[valid] = np.asarray(scorer.score(recs), np.float32)
  recs = [records_lib.CompletionRecord(**{**r.to_dict(), "score": float(s)})
          for r, s in zip(recs, scores[[bool(t.strip()) for t in texts]])]
  return (recs, texts, scores.reshape(len(prompts), oc.k), prompt_ids, rows,
          np.concatenate(lengths), np.concatenate(stopped))


def best_worst_pairs(prompts, texts, scores_pk, min_gap: float, tag: str) -> list:
  """PreferenceRecords: the best vs the worst non-empty answer per prompt."""
  out, k = [], scores_pk.shape[1]
  for p, (pid, lang, prompt) in enumerate(prompts):
    cand = [j for j in range(k) if texts[p * k + j].strip()]
    if len(cand) < 2:
      continue
    best = max(cand, key=lambda j: scores_pk[p, j])
    worst = min(cand, key=lambda j: scores_pk[p, j])
    if scores_pk[p, best] - scores_pk[p, worst] <= min_gap:
      continue
    out.append(records_lib.PreferenceRecord(
        id=f"{pid}#{tag}", language=lang, prompt=prompt, chosen=texts[p * k + best],
        rejected=texts[p * k + worst], chosen_score=float(scores_pk[p, best]),
        rejected_score=float(scores_pk[p, worst]), source=f"online_{tag}"))
  return out


def round_report(prompts, scores_pk, lengths, stopped, prev_scores=None) -> dict:
  langs = np.repeat([lang for _, lang, _ in prompts], scores_pk.shape[1])
  flat = scores_pk.reshape(-1)
  rep = {"mean_score": float(flat.mean()), "mean_length": float(np.mean(lengths)),
         "frac_no_stop": float(1.0 - np.mean(stopped))}
  for lang in sorted(set(langs)):
    rep[f"mean_score/{lang}"] = float(flat[langs == lang].mean())
  if prev_scores is not None:
    prev = prev_scores.reshape(-1)
    win = (flat > prev) + 0.5 * (flat == prev)
    rep["win_rate_vs_prev"] = float(win.mean())
    for lang in sorted(set(langs)):
      rep[f"win_rate_vs_prev/{lang}"] = float(win[langs == lang].mean())
  return rep


# -------------------------------------------------------------------- RLOO


def row_logps_fn(cfg, vocab_chunk=0):
  """(params, batch [B, L]) -> summed log-probs over loss_mask [B]."""
  token_logps = steps.token_logps_fn(cfg, vocab_chunk)

  def fn(params, mb):
    return losses.sequence_logps(token_logps(params, mb), mb["loss_mask"])[0]

  return fn


def rloo_loss_fn(cfg, vocab_chunk=0):
  logps = row_logps_fn(cfg, vocab_chunk)

  def loss_fn(params, mb, normalizer, rng):
    del rng
    s = logps(params, mb)
    w = mb["sample_mask"].astype(jnp.float32)
    loss = losses.reinforce_loss(s, mb["advantage"], w, normalizer)
    return loss, dict(n_samples=jnp.sum(w), logps=jax.lax.stop_gradient(jnp.sum(w * s)) /
                      jnp.maximum(normalizer, 1.0))

  return loss_fn


def sample_rows(prompt_ids, completions, k, seq_len, pad_id) -> dict:
  """Pipeline rows prompt + sampled ids (loss on the sampled ids), [P*k, L]."""
  rows = []
  for i, ids in enumerate(completions):
    p = np.asarray(prompt_ids[i // k], np.int32)
    toks = np.concatenate([p, np.asarray(ids, np.int32)])[:seq_len]
    mask = np.concatenate([np.zeros(len(p), np.int32), np.ones(len(ids), np.int32)])[:seq_len]
    rows.append([pp._Row(toks, mask)])  # pylint: disable=protected-access
  return pipeline.build_batch(rows, seq_len, pad_id)


def train_rloo(config, d, cfg, params, ref_params, rows, scores_pk, mesh, rules):
  oc, n = config.online, scores_pk.size
  fn = jax.jit(row_logps_fn(cfg, config.model.vocab_chunk))
  bs = config.data.batch_size
  pol, ref = np.zeros(n, np.float32), np.zeros(n, np.float32)
  with sharding.activation_rules(mesh, rules):
    for s in range(0, n, bs):
      idx = np.arange(s, s + bs) % n  # the last batch wraps around
      gb = sharding.global_batch({k: v[idx] for k, v in rows.items()}, mesh)
      pol[idx], ref[idx] = jax.device_get(fn(params, gb)), jax.device_get(fn(ref_params, gb))
  rewards = losses.rloo_rewards(scores_pk.reshape(-1), pol, ref, oc.kl_coef)
  adv = np.asarray(losses.rloo_advantages(rewards.reshape(scores_pk.shape))).reshape(-1)
  data = dict(rows, advantage=adv.astype(np.float32), sample_mask=np.ones(n, np.int32))
  loss_fn = rloo_loss_fn(cfg, config.model.vocab_chunk)
  st, step = sft.make_trainer(config, cfg, params, loss_fn, mesh, rules,
                              normalizer_fn=lambda b: jnp.sum(b["sample_mask"].astype(jnp.float32)))
  example = {k: v[:bs // jax.process_count()] for k, v in data.items()}
  step = sft.jit_for(step, st, example, mesh)
  with sharding.activation_rules(mesh, rules):
    st = loop_lib.train_loop(st, step, ArrayIterator(data, bs, config.seed), config.loop, d, mesh)
  return st.params, {"mean_kl": float(np.mean(pol - ref)), "mean_reward": float(np.mean(rewards))}


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
  """`merging.merge(mc.method, ...)` of the models online.merge names, looked up
  in `named` ({'policy', 'previous', 'initial', or a path: params})."""
  missing = [n for n in merge_names(mc) if named.get(n) is None]
  if missing:
    raise ValueError(f"online.merge: no params for {missing}")
  weights = tuple(mc.weights)
  if weights and len(weights) != len(mc.models):
    raise ValueError(f"online.merge.weights {weights} needs one weight per model in "
                     f"online.merge.models {tuple(mc.models)}")
  merged = merging.merge(
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
  if not config.tokenizer or not config.data.prompts:
    raise ValueError("config.tokenizer and config.data.prompts are required")
  scorer = scorer if scorer is not None else make_scorer(config)
  tok = formatting.load_tokenizer(config.tokenizer)
  mesh, rules = sharding.make_mesh(config.mesh.shape), axes.rules(config.mesh.rules)
  cfg, params = sft.setup_model(config.model, len(tok), mesh, rules, config.seed,
                                pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                                eos_ids=formatting.end_of_turn_ids(tok))
  pshard = sharding.param_shardings(cfg, mesh, rules)
  mc = oc.merge
  keep_init = oc.algorithm == "rloo" or not oc.reset_reference or "initial" in merge_names(mc)
  init = jax.tree.map(jnp.copy, params) if keep_init else None
  extra_models = load_merge_inputs(mc, pshard)
  prompts = read_prompts(list(config.data.prompts))
  pad_id = cfg.pad_id if cfg.pad_id is not None else 0
  reports, prev = [], None
  for i in range(oc.iterations + 1):  # the last round only samples
    d = os.path.join(workdir, f"iter_{i}")
    os.makedirs(d, exist_ok=True)
    rng = jax.random.fold_in(jax.random.key(config.seed), i)
    recs, texts, scores, prompt_ids, comp, lengths, stopped = sample_round(
        cfg, params, tok, prompts, scorer, oc, rng, mesh, config.mesh.rules, f"it{i}")
    if jax.process_index() == 0 and recs:
      records_lib.write_jsonl(os.path.join(d, "samples.jsonl"), recs)
    rep = {"round": i, **round_report(prompts, scores, lengths, stopped, prev)}
    prev = scores
    if i == oc.iterations:
      reports.append(rep)
      break
    done = os.path.join(d, "params")
    ref = init  # used by RLOO and by DPO without reset_reference, which keep pi_0
    # pi_i for the merge, copied: training donates the params' buffers
    start = jax.tree.map(jnp.copy, params) if "previous" in merge_names(mc) else None
    if checkpoint.is_params_dir(done):  # finished before: reuse, do not retrain
      _, params = checkpoint.load_model(done, pshard)
    elif oc.algorithm == "dpo":
      pairs = best_worst_pairs(prompts, texts, scores, oc.min_gap, f"it{i}")
      rep["n_pairs"] = len(pairs)
      if pairs:
        if jax.process_index() == 0:
          records_lib.write_jsonl(os.path.join(d, "pairs.jsonl"), pairs)
        tok_pairs, _ = pp.tokenize_pairs(pairs, tok, config.data.seq_len, skip_invalid=True)
        params, _ = dpo.train_dpo(_iteration_config(config, i), d, cfg, params, tok_pairs,
                                  mesh, rules, ref_params=None if oc.reset_reference else ref)
      else:
        logging.warning("iteration %d: no pairs (all ties?); policy unchanged", i)
      checkpoint.save_params(done, cfg, params)
    else:
      rows = sample_rows(prompt_ids, comp, oc.k, config.data.seq_len, pad_id)
      params, extra = train_rloo(config, d, cfg, params, ref, rows, scores, mesh, rules)
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
    with open(os.path.join(workdir, "report.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in reports)
  return sft.finish(workdir, cfg, params, config.export_hf), reports
