r"""SFT on chat records.

Embedded default (the synthetic world: its tokenizer, train and valid splits
are built in the workdir; a tiny Cohere-architecture model from scratch;
about a minute on a laptop CPU):

    python -m aya_jax.main --config=configs/sft.py --workdir=runs/sft

Your own data and model:

    python -m aya_jax.main --config=configs/sft.py --workdir=runs/sft \
      --config.tokenizer=/path/to/tokenizer_dir \
      --config.data.train='("/path/sft.jsonl",)' \
      --config.model.init=/path/to/hf_or_params_dir \
      --config.mesh.shape='(1,-1,1)' --config.model.dtype=bfloat16

Writes runs/sft/params/ (and runs/sft/hf/ with --config.export_hf=True);
metrics in runs/sft/metrics.jsonl (train loss falls from ~7.3 to under 1.5,
eval_loss is logged at the end). Re-running the same command after a kill
resumes from the last checkpoint with the same result.
"""

from aya_jax.train import sft


def get_config(arg=None):
  del arg
  c = sft.default_config()
  c.model.preset = "world_cohere"
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.optim.total_steps = 300
  c.optim.weight_decay = 0.01
  c.loop.num_steps = 300
  c.loop.log_every = 25
  c.loop.checkpoint_every = 100
  c.loop.eval_every = 100
  return c
