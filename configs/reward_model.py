r"""Reward model (Bradley-Terry) on preference pairs.

Embedded default (no files needed): verifier-labelled pairs of the synthetic
world (gold answer vs the same answer in English / a verbose answer), a tiny
Llama with a value head, 300 steps on CPU:

    python -m aya_jax.main --config=configs/reward_model.py --workdir=runs/rm

Writes runs/rm/params/ (value-head model; HF ...ForSequenceClassification with
--config.export_hf=True), runs/rm/reward_metrics.jsonl (loss, accuracy, mean
margin, per language) and runs/rm/reward_eval.json; held-out pair accuracy
should be near 1.0 on this separable toy set. Own data:

    --config.data.train='("pairs.jsonl",)' --config.data.eval='("valid.jsonl",)' \
    --config.tokenizer=/path/tok --config.model.init=/path/to/sft/params
"""

from aya_jax.train import reward_model


def get_config(arg=None):
  del arg
  c = reward_model.default_config()
  c.synthetic.n_per_language = 48
  c.data.seq_len = 96
  c.data.batch_size = 16
  c.model.preset = "tiny_llama"
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.optim.total_steps = 300
  c.loop.num_steps = 300
  c.loop.log_every = 25
  c.loop.checkpoint_every = 100
  return c
