r"""SFT on chat records.

    python -m aya_jax.main --config=configs/sft.py --workdir=runs/sft \
      --config.tokenizer=/path/to/tokenizer_dir \
      --config.data.train='("/path/sft.jsonl",)' \
      --config.model.init=/path/to/hf_or_params_dir

Writes runs/sft/params/ (and runs/sft/hf/ with --config.export_hf=True);
metrics in runs/sft/metrics.jsonl. Re-running the same command after a kill
resumes from the last checkpoint with the same result.
"""

from aya_jax.train import sft


def get_config(arg=None):
  del arg
  c = sft.default_config()
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 20
  c.optim.total_steps = 200
  c.loop.num_steps = 200
  return c
