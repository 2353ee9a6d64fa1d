r"""Aya Expanse 8B post-training at scale: the real inputs, and a dry-run plan.

Plan (no weights allocated; compiles the SFT and DPO steps for a fake
64-device CPU mesh and prints per-device memory, FLOPs, predicted step time
and MFU on v5p / v5e / H100, and whether it fits; ~1-2 min on 2 CPU cores):

    python -m aya_jax.main --config=configs/aya_expanse_8b.py --workdir=runs/plan_8b \
      --config.dry_run=True

Writes runs/plan_8b/plan.md and plan.json. Try --config.mesh.shape='(1,32,2)'
--config.mesh.rules=fsdp_tp, --config.sft.seq_len=4096,
--config.plan.opt_state=sharded, --config.plan.dry_run_layers=2 (compile 2-
and 4-layer slices and extrapolate), --config.model.remat=dots.

The real run (same paths, one stage at a time; every host of the slice runs
the same command, see experiments/launch/):

  1. generate:  every teacher in `teachers` answers `prompts`
       (configs/generate.py with --config.teachers / --config.prompts)
  2. arbitrage: the reward model `reward_model` scores, routes -> sft.jsonl,
       pairs_offline.jsonl (configs/arbitrage.py)
  3. sft:       configs/sft.py --config.model.init=<base> --config.tokenizer=<base>
       --config.data.train=<sft.jsonl> with this file's sft/optim/mesh values
  4. merge, dpo (configs/dpo.py, pairs_offline.jsonl), merge, online_dpo.
"""

import ml_collections

from aya_jax import optim, planner
from aya_jax.train import dpo, sft


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.stage = "plan"
  c.dry_run = False
  c.seed = 0
  # --- the real pipeline's inputs (local paths; nothing is downloaded)
  c.base = "/data/models/aya-expanse-8b"          # HF dir (config.json + safetensors)
  c.tokenizer = "/data/models/aya-expanse-8b"     # HF tokenizer dir with chat template
  c.teachers = ("/data/models/teacher_a", "/data/models/teacher_b")  # local HF dirs
  c.reward_model = "/data/models/reward_model"    # aya_jax params/ or HF dir (value head)
  c.prompts = ("/data/prompts/train.jsonl",)      # {"id", "language", "messages"} per line
  c.languages = ("ar", "de", "en", "es", "fr", "hi", "ja", "ru", "tr", "zh")
  # --- model: the planner uses model.init's config.json when it exists, else the preset
  c.model = sft.model_block()
  c.model.init = c.base
  c.model.preset = "aya_expanse_8b"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.vocab_chunk = 16384      # never materialise [tokens, 256k] logits
  # --- steps
  c.sft = ml_collections.ConfigDict(dict(seq_len=8192, batch_size=64, grad_accum=1))
  c.dpo = dpo.dpo_block()
  c.dpo.seq_len = 8192             # prompt + answer per row; a pair is 2 rows
  c.dpo.batch_size = 64            # pairs per step
  c.dpo.grad_accum = 1
  c.optim = optim.default_optim_config()
  c.optim.lr = 1e-5
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.95
  # --- mesh: a v5p-128 slice (64 chips) or 8 nodes of 8 H100
  c.mesh = sft.mesh_block()
  c.mesh.shape = (1, 64, 1)
  c.mesh.rules = "fsdp"
  c.distributed = sft.distributed_block()
  c.plan = planner.plan_block()
  return c
