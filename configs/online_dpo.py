r"""Online iterative DPO (Aya Expanse: 3 rounds), or another objective on the same rounds
with --config.online.algorithm=copg|rloo|grpo|dr_grpo (train/online.py).

    python -m aya_jax.main --config=configs/online_dpo.py --workdir=runs/online \
      --config.tokenizer=/path/to/tokenizer_dir \
      --config.model.init=runs/dpo/params \
      --config.data.prompts='("/path/prompts.jsonl",)'

Each round samples k=4 answers per prompt from the current policy, scores
them (online.scorer: the synthetic world's verifier by default; in Python,
`online.run(config, workdir, scorer=any_scorer)`), trains DPO on best vs
worst (runs/online/iter_<i>/{samples,pairs}.jsonl, params/), and
runs/online/report.jsonl gives per round the mean score, the win rate vs the
previous round (per language), mean answer length and the fraction of
answers without an end of turn. Expected: mean score rises round by round.

Merge between iterations (off by default): with
  --config.online.merge.method=linear \
  --config.online.merge.models='("policy", "previous")' \
  --config.online.merge.weights='(0.5, 0.5)'
each iteration's trained policy is averaged with the policy it started from
before the next iteration samples (runs/online/iter_<i>/merged/). Models are
'policy', 'previous', 'initial' (model.init) or params/ / HF directories; any
merging method works (online.merge.base, online.merge.parameters as JSON).
"""

from aya_jax.train import online


def get_config(arg=None):
  del arg
  c = online.default_config()
  c.online.iterations = 3
  c.online.k = 4
  c.online.betas = (0.1, 0.1, 0.1)
  c.online.temperature = 1.0
  c.optim.lr = 5e-5  # tiny models; Aya-scale runs use ~5e-7
  c.optim.warmup_steps = 5
  c.optim.total_steps = 50
  c.loop.num_steps = 50  # per iteration
  c.dpo.reference = "cached"
  return c
