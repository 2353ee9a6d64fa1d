r"""Which teacher answers a prompt, and how routing went: the fixed table, the
learned router, and the arbitrage report.

- Fixed routing: a language -> teacher table (`parse_table`, `fixed_routes`).
- Learned routing: `LearnedRouter`, a multinomial logistic regression (numpy)
  from prompt features (hashed words and character trigrams of the user turns
  plus a one-hot language) to the teacher that reward routing picked, so that
  only one teacher generates at inference. `evaluate_router` fits it outside a
  hashed hold-out and reports agreement with reward routing (train, hold-out,
  per language), the hold-out score it would get and the compute it saves.
- Report: `build_report` (JSON) and `markdown` (a table): per language, teacher
  wins, mean score per teacher, mean routed score, pairs, router agreement;
  nothing is pooled across languages (scores compare only within one).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import re
import zlib
from typing import Optional, Sequence

import numpy as np

from aya_jax.data import atomic
from aya_jax.data import records

# ------------------------------------------------------------------- fixed


def parse_table(spec: str) -> dict:
  """'fr:a,de:b' -> {'fr': 'a', 'de': 'b'}."""
  return {k.strip(): v.strip() for k, v in (x.split(":") for x in spec.split(",") if x.strip())}


def fixed_routes(prompts, table: dict, default: str = "") -> tuple[dict, list]:
  """({prompt id: teacher}, problems) from a language -> teacher table."""
  routes, problems = {}, []
  for p in prompts:
    t = table.get(p.language, default)
    if t:
      routes[p.id] = t
    else:
      problems.append(dict(id=p.id, problem=f"no teacher for language {p.language!r}"))
  return routes, problems


# ----------------------------------------------------------------- learned


def features(p, dim: int, languages: Sequence[str]) -> np.ndarray:
  """Hashed bag of words and character trigrams of the user turns (L2-normalised),
  then a one-hot language id."""
  x = np.zeros(dim + len(languages), np.float32)
  text = " ".join(m["content"] for m in p.messages if m["role"] == "user").lower()
  grams = re.findall(r"\w+", text) + [text[i:i + 3] for i in range(max(0, len(text) - 2))]
  for g in grams:
    x[zlib.crc32(g.encode()) % dim] += 1.0
  x /= max(float(np.linalg.norm(x)), 1e-6)
  if p.language in languages:
    x[dim + list(languages).index(p.language)] = 1.0
  return x


class LearnedRouter:
  """Multinomial logistic regression (full-batch gradient descent with L2)
  from prompt features to the teacher that reward routing picked."""

  def __init__(self, teachers, languages, dim: int = 1024, w=None, b=None):
    self.teachers, self.languages, self.dim = list(teachers), list(languages), dim
    d = dim + len(self.languages)
    self.w = np.zeros((d, len(self.teachers)), np.float32) if w is None else w
    self.b = np.zeros((len(self.teachers),), np.float32) if b is None else b

  def featurize(self, prompts) -> np.ndarray:
    return np.stack([features(p, self.dim, self.languages) for p in prompts])

  def fit(self, prompts, labels, steps: int = 300, lr: float = 2.0, l2: float = 1e-4):
    x = self.featurize(prompts)
    y = np.eye(len(self.teachers), dtype=np.float32)[[self.teachers.index(l) for l in labels]]
    for _ in range(steps):
      z = x @ self.w + self.b
      pr = np.exp(z - z.max(1, keepdims=True))
      pr /= pr.sum(1, keepdims=True)
      g = (pr - y) / len(x)
      self.w -= lr * (x.T @ g + l2 * self.w)
      self.b -= lr * g.sum(0)
    return self

  def predict(self, prompts) -> list:
    if not prompts:
      return []
    z = self.featurize(prompts) @ self.w + self.b
    return [self.teachers[i] for i in np.argmax(z, 1)]  # ties: the earlier teacher

  def save(self, path: str):
    """router.npz, written atomically (learned mode reads it back)."""
    buf = io.BytesIO()
    np.savez(buf, w=self.w, b=self.b, meta=json.dumps(dict(
        teachers=self.teachers, languages=self.languages, dim=self.dim)))
    atomic.write_bytes(path, buf.getvalue())

  @classmethod
  def load(cls, path: str) -> "LearnedRouter":
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    return cls(meta["teachers"], meta["languages"], meta["dim"], z["w"], z["b"])


def in_holdout(pid: str, fraction: float) -> bool:
  return int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def _winner(decision) -> str:
  return records.parse_completion_id(decision.best.id)[1]


def evaluate_router(decisions, teachers, scored, holdout_fraction: float = 0.2,
                    dim: int = 1024, steps: int = 300,
                    n_samples: Optional[dict] = None) -> tuple[LearnedRouter, dict]:
  """Trains on the decisions (arbitrage.Decision) outside a hashed hold-out,
  reports agreement with reward routing (hold-out and train, per language),
  the mean hold-out score the router would get (its teacher's best sample)
  against reward routing's, and the compute saved; returns a router refit on
  everything."""
  langs = sorted({d.prompt.language for d in decisions})
  test = [d for d in decisions if in_holdout(d.prompt.id, holdout_fraction)]
  train = [d for d in decisions if not in_holdout(d.prompt.id, holdout_fraction)] or decisions
  fit = lambda ds: LearnedRouter(teachers, langs, dim).fit(  # noqa: E731
      [d.prompt for d in ds], [_winner(d) for d in ds], steps)
  router = fit(train)
  best_of = collections.defaultdict(lambda: -np.inf)
  for c in scored:
    pid, t, _ = records.parse_completion_id(c.id)
    best_of[pid, t] = max(best_of[pid, t], c.score)
  out = dict(n_train=len(train), n_holdout=len(test), per_language={})
  for name, ds in (("train", train), ("holdout", test)):
    pred = router.predict([d.prompt for d in ds])
    out[f"{name}_agreement"] = float(np.mean([p == _winner(d) for p, d in zip(pred, ds)])) \
        if ds else None
    if name == "holdout" and ds:
      out["holdout_routed_score"] = float(np.mean([best_of[d.prompt.id, p]
                                                   for p, d in zip(pred, ds)]))
      out["holdout_best_score"] = float(np.mean([d.best.score for d in ds]))
      for lang in langs:
        m = [(p, d) for p, d in zip(pred, ds) if d.prompt.language == lang]
        if m:
          out["per_language"][lang] = float(np.mean([p == _winner(d) for p, d in m]))
  n = n_samples or {t: 1 for t in teachers}
  pred = router.predict([d.prompt for d in decisions])
  out["compute_saved"] = float(1.0 - np.mean([n[p] for p in pred]) / sum(n.values()))
  return fit(decisions), out


# ------------------------------------------------------------------ report


def build_report(prompts, scored, decisions, pairs, skipped, teachers, mode: str,
                 problems, router_eval=None, compute=None, contrast=None) -> dict:
  """Per-language numbers (module docstring); nothing pooled across languages."""
  per = {}
  for lang in sorted({p.language for p in prompts}):
    ds = [d for d in decisions if d.prompt.language == lang]
    ids = {d.prompt.id for d in ds}
    sc = [c for c in scored if c.language == lang]
    wins = collections.Counter(_winner(d) for d in ds)
    mean = {t: float(np.mean([c.score for c in sc if c.teacher == t]))
            for t in teachers if any(c.teacher == t for c in sc)}
    per[lang] = dict(
        n_prompts=sum(p.language == lang for p in prompts), n_routed=len(ds),
        wins={t: int(wins.get(t, 0)) for t in teachers}, mean_score=mean,
        mean_routed_score=float(np.mean([d.best.score for d in ds])) if ds else None,
        sft_written=len(ds) - sum(k["id"] in ids for k in skipped if _sft(k)),
        pairs_written=sum(p.language == lang for p in pairs),
        pairs_skipped=sum(k["id"] in ids for k in skipped if not _sft(k)))
    if router_eval and lang in router_eval.get("per_language", {}):
      per[lang]["router_agreement"] = router_eval["per_language"][lang]
    if contrast and lang in contrast.get("per_language", {}):
      per[lang]["contrast_pairs"] = contrast["per_language"][lang]
  kinds = collections.Counter(p["problem"].split(":")[0] for p in problems)
  return dict(mode=mode, teachers=list(teachers), n_prompts=len(prompts),
              n_sft=len(decisions) - sum(map(_sft, skipped)), n_pairs=len(pairs),
              languages=per, router=router_eval,
              compute=compute or {}, problems=problems, problem_counts=dict(kinds),
              skipped_pairs=skipped, contrast=contrast)


def _sft(skipped: dict) -> bool:  # an SFT record dropped (below min_score), not a pair
  return skipped.get("record") == "sft"


def _fmt(v) -> str:
  return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
  t = report["teachers"]
  contrast = report.get("contrast")
  head = ["language", "prompts"] + [f"wins {x}" for x in t] + [f"mean {x}" for x in t] + [
      "routed mean", "pairs", "router agreement"] + (["contrast pairs"] if contrast else [])
  lines = [f"# Arbitrage report ({report['mode']} routing)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for lang, r in report["languages"].items():
    row = [lang, r["n_prompts"]] + [r["wins"][x] for x in t] + [
        r["mean_score"].get(x) for x in t] + [r["mean_routed_score"], r["pairs_written"],
                                              r.get("router_agreement")]
    row += [r.get("contrast_pairs", 0)] if contrast else []
    lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
  if report["router"]:
    lines += ["", "Learned router: " + ", ".join(
        f"{k}={_fmt(v)}" for k, v in report["router"].items() if k != "per_language")]
  if contrast:
    lines += ["", f"Translation contrast ({contrast['strong']} native vs {contrast['weak']} "
              f"translated by {contrast['translator']}): {contrast['n_pairs']} pairs, "
              f"{len(contrast['problems'])} items without a pair"]
  if report["problems"]:
    lines += ["", f"Problems ({len(report['problems'])}): " + ", ".join(
        f"{k}: {v}" for k, v in report["problem_counts"].items())]
  return "\n".join(lines) + "\n"
