"""Each pipeline step's headline figure, shown on its 'done' line: the final
training loss, the arbitrage routing, the arbiter's accuracy, the online
rounds' mean reward, the best win rate. A figure that cannot be read is left
out (the step itself succeeded; its files say the rest)."""

from __future__ import annotations

import json
import os
from typing import Optional


def _json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _rows(path: str) -> list:
  """The JSON lines of a JSONL file; [] when it cannot be read."""
  try:
    with open(path, encoding="utf-8") as f:
      return [json.loads(l) for l in f if l.strip()]
  except (OSError, ValueError):
    return []


def _last_with(path: str, key: str) -> Optional[dict]:
  """The last row of a JSONL file that has `key` (eval rows have no loss)."""
  return next((r for r in reversed(_rows(path)) if isinstance(r, dict) and key in r), None)


def world(directory: str) -> str:
  """'teachers score 0.49-0.58 on their own languages (verifier)'."""
  report = _json(os.path.join(directory, "world_report.json"))
  families = report.get("families") if isinstance(report, dict) else None
  own = [f["own"] for f in families.values()] if isinstance(families, dict) else []
  if not own:
    return ""
  return f"teachers score {min(own):.2f}-{max(own):.2f} on their own languages (verifier)"


def merged(n_models: int) -> str:
  return f"{n_models} models, linear, equal weights"


def final_loss(directory: str) -> str:
  """'loss 0.0709': the last logged training loss of a stage's metrics.jsonl."""
  last = _last_with(os.path.join(directory, "metrics.jsonl"), "loss")
  return f"loss {last['loss']:.4g}" if last else ""


def reward_model(directory: str) -> str:
  """'valid accuracy 0.867, loss 0.31'."""
  accuracy = _json(os.path.join(directory, "reward_eval.json"))
  figure = accuracy.get("valid", {}).get("all", {}).get("accuracy") \
      if isinstance(accuracy, dict) else None
  parts = [f"valid accuracy {figure:.3f}"] if figure is not None else []
  loss = final_loss(directory)
  return ", ".join(parts + ([loss] if loss else []))


def arbitrage(directory: str) -> str:
  """'1400 of 1400 prompts routed, 1363 pairs'."""
  report = _json(os.path.join(directory, "report.json"))
  if not isinstance(report, dict) or "n_prompts" not in report:
    return ""
  return f"{report.get('n_sft', 0)} of {report['n_prompts']} prompts routed, " \
         f"{report.get('n_pairs', 0)} pairs"


def online(directory: str) -> str:
  """'mean reward 2.51 -> 2.84 after 3 iterations': the arbiter's mean score of
  the policy's samples at the start (round 0) and after the last iteration."""
  rounds = [r for r in _rows(os.path.join(directory, "report.jsonl"))
            if isinstance(r, dict) and "mean_score" in r and "round" in r]
  if not rounds:
    return ""
  return f"mean reward {rounds[0]['mean_score']:.3g} -> {rounds[-1]['mean_score']:.3g} " \
         f"after {rounds[-1]['round']} iterations"


def evaluation(outputs: dict) -> str:
  """'best online_2: win rate 0.59 vs sft_single'."""
  results = outputs.get("results") or {}
  rates = {name: r["per_language"]["all"]["win_rate"] for name, r in results.items()
           if "all" in r.get("per_language", {}) and name != outputs.get("baseline")}
  if not rates:
    return ""
  best = max(rates, key=rates.get)
  return f"best {best}: win rate {rates[best]:.2f} vs {outputs.get('baseline')}"
