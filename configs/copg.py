r"""CoPG ("Contrastive Policy Gradient", Flet-Berliac et al. 2024) on scored preference
pairs: the dpo stage with dpo.loss_type='copg' (configs/dpo.py's settings otherwise).

    python -m aya_jax.main --config=configs/copg.py --workdir=runs/copg \
      --config.tokenizer=/path/to/tokenizer_dir \
      --config.model.init=runs/sft/params \
      --config.data.train='("runs/arbitrage/pairs_offline.jsonl",)'

Every pair needs chosen_score and rejected_score (the arbitrage pairs carry the
arbiter's; --config.data.skip_invalid=True drops unscored ones). Per pair the loss
regresses beta x the DPO log-ratio margin onto the score gap, so a pair scored 1 vs 0
settles at rewards/margins = 1 instead of growing without bound (tests/dpo_test.py).
Online, every pair of a round's k answers:

    python -m aya_jax.main --config=configs/online_dpo.py --workdir=runs/online_copg \
      --config.online.algorithm=copg --config.online.kl_coef=0.05 ...
"""

from aya_jax import config_files


def get_config(arg=None):
  c = config_files.sibling(__file__, "dpo.py", arg)
  c.dpo.loss_type = "copg"
  c.dpo.rpo_alpha = 0.0  # the paper's loss alone
  return c
