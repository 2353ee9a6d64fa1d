r"""SRPO ("Self-Improving Robust Preference Optimization", Choi et al. 2024) on preference
pairs: the dpo stage with dpo.loss_type='srpo' (configs/dpo.py's settings otherwise).

    python -m aya_jax.main --config=configs/srpo.py --workdir=runs/srpo \
      --config.tokenizer=/path/to/tokenizer_dir \
      --config.model.init=runs/sft/params \
      --config.data.train='("runs/arbitrage/pairs_offline.jsonl",)'

One model learns to answer and to revise: each pair trains 5 rows (both answers, the
rejected answer revised into the chosen and into itself, the chosen into itself; the
revision prompt is the conversation, the draft and dpo.revision_request). seq_len must
hold a revision row whole (prompt + draft + request + answer). At inference,
`evaluation.Model(..., revisions=n)` revises its own answer n times; the pipeline's
--config.ablations.srpo=True evaluates 0 and ablations.srpo_revisions revisions.
"""

from aya_jax import config_files


def get_config(arg=None):
  c = config_files.sibling(__file__, "dpo.py", arg)
  c.dpo.loss_type = "srpo"
  c.dpo.rpo_alpha = 0.0
  c.dpo.srpo_alpha = 0.5
  return c
