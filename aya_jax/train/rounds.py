"""One online round's data: k samples per prompt from the policy, scored (`sample_round`,
resumable by batch), the prompts a round draws (`round_prompts`, `family_prompts`), the
best/worst pairs of online DPO (`best_worst_pairs`) and the round's report line
(`round_report`). The loop over rounds is `train/online.py`.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from aya_jax.data import formatting
from aya_jax.data import records as records_lib
from aya_jax.sampling import methods, passes


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


def sample_round(cfg, params, tok, prompts, scorer, oc, rng, mesh, preset, tag,
                 cache_dir: str = "") -> Round:
  """k samples per prompt from `params`, scored (empty answers are not sent to the
  scorer); with `cache_dir`, a killed pass resumes at its first unfinished batch
  (`sampling.passes`)."""
  stop = formatting.end_of_turn_ids(tok)
  method = methods.from_config(oc.temperature, 0, oc.top_p)
  prompt_ids = [formatting.tokenize_prompt(tok, p.messages) for p in prompts]
  rows, lengths, stopped = passes.generate_batches(
      cfg, params, prompt_ids, rng, method, oc.max_new_tokens, stop, oc.k, oc.sample_batch,
      mesh=mesh, rules=preset, cache_dir=cache_dir, label=f"sampling {tag}")
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
  return Round(recs, texts, scores, usable, empty, prompt_ids, rows, lengths, stopped)


def round_prompts(prompts: list, per_language: int, seed: int) -> list:
  """`per_language` prompts of each language drawn with `seed` (in their order), or every
  prompt when per_language is 0 (online.prompts_per_language)."""
  if not per_language:
    return prompts
  rng, keep = np.random.default_rng(seed), set()
  for lang in sorted({p.language for p in prompts}):
    idx = [i for i, p in enumerate(prompts) if p.language == lang]
    keep.update(idx[j] for j in rng.choice(len(idx), min(per_language, len(idx)), replace=False))
  return [p for i, p in enumerate(prompts) if i in keep]


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


def all_pairs(prompts, texts, scores_pk, tag: str, usable=None) -> list:
  """PreferenceRecords: every pair of distinct non-empty answers per usable prompt, the
  higher score as chosen (CoPG's k-sample loss; ties kept: their log-ratios are pulled
  together). Ids '<prompt id>#<tag>#<i>-<j>'."""
  out, k = [], scores_pk.shape[1]
  for p, prompt in enumerate(prompts):
    if usable is not None and not usable[p]:
      continue
    cand = [j for j in range(k) if texts[p * k + j].strip()]
    for a, i in enumerate(cand):
      for j in cand[a + 1:]:
        if texts[p * k + i] == texts[p * k + j]:  # the same answer twice: zero loss
          continue
        hi, lo = (i, j) if scores_pk[p, i] >= scores_pk[p, j] else (j, i)
        out.append(records_lib.PreferenceRecord(
            id=f"{prompt.id}#{tag}#{i}-{j}", language=prompt.language,
            prompt=prompt.messages, chosen=texts[p * k + hi], rejected=texts[p * k + lo],
            chosen_score=float(scores_pk[p, hi]), rejected_score=float(scores_pk[p, lo]),
            source=f"online_{tag}"))
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


def family_prompts(spec: str, prompts: list) -> dict:
  """{family: its prompts} of online.families ('name:l1,l2;...'); {"": prompts} when ""."""
  if not spec:
    return {"": prompts}
  out = {}
  for part in [p for p in spec.split(";") if p.strip()]:
    if ":" not in part:
      raise ValueError(f"online.families: {part!r} is not 'name:lang,lang'")
    name, langs = (x.strip() for x in part.split(":", 1))
    keep = {x.strip() for x in langs.split(",") if x.strip()}
    out[name] = [p for p in prompts if p.language in keep]
    if not out[name]:
      raise ValueError(f"online.families: family {name} ({sorted(keep)}) has no prompts")
  return out
