r"""Aya Expanse 32B post-training at scale: the real inputs, and a dry-run plan.

Plan (no weights allocated; compiles the SFT and DPO steps for a fake
256-device CPU mesh and prints per-device memory, FLOPs, predicted step time
and MFU on v5p / v5e / H100, and whether it fits):

    python -m aya_jax.main --config=configs/aya_expanse_32b.py --workdir=runs/plan_32b \
      --config.dry_run=True

Writes runs/plan_32b/plan.md and plan.json. Try --config.mesh.shape='(1,64,4)'.

The whole recipe on the real inputs at 32B (configs/aya_expanse_8b.py:pipeline
with this file's base, batch sizes and mesh):

    python -m aya_jax.main --config=configs/aya_expanse_32b.py:pipeline \
      --workdir=/data/runs/aya_32b

Everything else is as in configs/aya_expanse_8b.py, whose fields this config reuses.
"""

import os

from aya_jax import config_files


def get_config(arg=None):
  if arg not in (None, "", "pipeline"):
    raise ValueError(f"configs/aya_expanse_32b.py:{arg}: variants are '' (the dry-run planner) "
                     "and 'pipeline' (the whole recipe on the real inputs)")
  b8 = config_files.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "aya_expanse_8b.py"))
  c = b8.get_config()
  c.base = c.tokenizer = c.model.init = "/data/models/aya-expanse-32b"
  c.model.preset = "aya_expanse_32b"
  c.sft.batch_size = 256
  c.dpo.batch_size = 256           # pairs per step
  c.mesh.shape = (1, 256, 1)       # a v5p-512 slice (256 chips) or 32 nodes of 8 H100
  return b8.pipeline_config(c) if arg == "pipeline" else c
