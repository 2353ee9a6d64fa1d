r"""Offline DPO on preference pairs (e.g. the arbitrage's pairs_offline.jsonl).

    python -m aya_jax.main --config=configs/dpo.py --workdir=runs/dpo \
      --config.tokenizer=/path/to/tokenizer_dir \
      --config.model.init=runs/sft/params \
      --config.data.train='("/path/pairs_offline.jsonl",)' \
      --config.data.eval='("/path/pairs_valid.jsonl",)'

Reference = the initial policy (model.init), its log-probs cached once in
runs/dpo/ref_logps/ (reused by a re-run or a resume). Writes
runs/dpo/params/, metrics.jsonl (TRL names: rewards/accuracies, ...),
metrics_language.jsonl and eval_metrics.json. Expected on a toy set: held-out
rewards/accuracies > 0.9 and a growing chosen - rejected log-prob margin.
Variants: --config.dpo.loss_type=ipo|hinge|robust|sigmoid_norm,
--config.dpo.rpo_alpha=1.0, --config.dpo.reference=live
--config.dpo.sync_every=64 (TR-DPO), --config.model.vocab_chunk=8192.
"""

from aya_jax.train import dpo


def get_config(arg=None):
  del arg
  c = dpo.default_config()
  c.optim.lr = 5e-5  # tiny models; Aya-scale (8B) runs use ~5e-7
  c.optim.warmup_steps = 10
  c.optim.total_steps = 200
  c.optim.schedule = "linear"
  c.loop.num_steps = 200
  c.dpo.beta = 0.1
  return c
