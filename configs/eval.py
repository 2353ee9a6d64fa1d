r"""Per-language win rates of checkpoints under the verifier (m-ArenaHard style).

    python -m aya_jax.main --config=configs/eval.py --workdir=runs/eval \
      --config.models='european=runs/world/teachers/european/params,weak=runs/world/weak/params' \
      --config.tokenizer=runs/world/tokenizer

Models are aya_jax params/ or HF directories ('name=path,...'); every model
is compared with `baseline` (default: the last one). Prompts: the world's
held-out test split (n_per_language per language), or any JSONL with a
`language` per line via --config.prompts=FILE. Writes eval.json and eval.md
(win rate of A over B, 95% bootstrap interval, W/T/L and mean verifier
score per language). Expected on the world demo: a family teacher beats the
weak English-only model on its own languages (win rate > 0.5).
"""

from aya_jax.world import evaluate


def get_config(arg=None):
  del arg
  return evaluate.default_config()
