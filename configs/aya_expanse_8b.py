r"""Aya Expanse 8B post-training at scale: the real inputs, and a dry-run plan.

Plan (no weights allocated; compiles the SFT and DPO steps for a fake
64-device CPU mesh and prints per-device memory, FLOPs, predicted step time
and MFU on v5p / v5e / H100, and whether it fits; ~1-2 min on 2 CPU cores):

    python -m aya_jax.main --config=configs/aya_expanse_8b.py --workdir=runs/plan_8b \
      --config.dry_run=True

Writes runs/plan_8b/plan.md and plan.json. Try --config.mesh.shape='(1,32,2)'
--config.mesh.rules=fsdp_tp, --config.sft.seq_len=4096,
--config.plan.opt_state=sharded, --config.plan.dry_run_layers=2 (compile 2-
and 4-layer slices and extrapolate), --config.model.remat=dots,
--config.model.attention_chunk=0 (dense [heads, T, T] attention: 8B DPO then
needs 92.5 GB per device instead of 29.7 GB).

The real run, the whole recipe on these paths (variant 'pipeline': stage
'pipeline', configs/pipeline.py with `inputs` set; every host of the slice
runs the same command, see experiments/launch/):

    python -m aya_jax.main --config=configs/aya_expanse_8b.py:pipeline \
      --workdir=/data/runs/aya_8b

  arbitrage: both teachers answer /data/prompts/train.jsonl (k=2), the reward
      model scores, reward routing -> sft.jsonl, pairs_offline.jsonl (and the
      first teacher's answers: the single-teacher baseline)
  sft: the base on the baseline data, on all the data, and per language family
      (lr 1e-5) -> linear merge -> offline DPO per family -> merge
  online: 3 rounds of online DPO (4 samples per prompt, ranked by the reward model)
  eval: every stage vs single-teacher SFT on /data/prompts/eval.jsonl
      (m-ArenaHard layout), judged by the reward model -> report.md/json/png

Resumable like every pipeline run (a re-run skips finished steps; a changed
path or block re-runs what reads it). Translation contrast is off (it needs
--config.inputs.weak and --config.inputs.translator=<teacher>); the RLOO
ablation is off (--config.ablations.rloo=True). Each stage also runs alone
(configs/generate.py, arbitrage.py, sft.py, merge.py, dpo.py, online_dpo.py)
with this file's paths and sft/optim/mesh values.
"""

import os

import ml_collections

from aya_jax import config_files, optim, sharding
from aya_jax.models import lora
from aya_jax.recipe import blocks
from aya_jax.train import common, dpo
from aya_jax.train import planner

# Aya Expanse's 23 languages, in three families that each keep English
LANGUAGES = ("ar", "cs", "de", "el", "en", "es", "fa", "fr", "he", "hi", "id", "it", "ja", "ko",
             "nl", "pl", "pt", "ro", "ru", "tr", "uk", "vi", "zh")
FAMILIES = ("european:en,fr,es,de,it,pt,nl,ro,el;slavic_turkic:en,ru,uk,pl,cs,tr;"
            "asian_semitic:en,ar,he,fa,hi,ja,ko,zh,id,vi")
# what the training blocks take from the plan's optimiser besides the schedule
OPTIMISER = ("b1", "b2", "eps", "weight_decay", "max_grad_norm")


def get_config(arg=None):
  if arg == "pipeline":
    return pipeline_config(get_config())
  if arg:
    raise ValueError(f"configs/aya_expanse_8b.py:{arg}: variants are '' (the dry-run planner) "
                     "and 'pipeline' (the whole recipe on the real inputs)")
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
  c.languages = LANGUAGES
  # --- model: the planner uses model.init's config.json when it exists, else the preset
  c.model = common.model_block()
  c.model.init = c.base
  c.model.preset = "aya_expanse_8b"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.vocab_chunk = 16384      # never materialise [tokens, 256k] logits
  c.model.attention_chunk = 512    # nor [heads, 8k, 8k] attention scores (flash-style tiles)
  # --- steps
  c.sft = ml_collections.ConfigDict(dict(seq_len=8192, batch_size=64, grad_accum=1))
  c.dpo = dpo.dpo_block()
  c.dpo.seq_len = 8192             # prompt + answer per row; a pair is 2 rows
  c.dpo.batch_size = 64            # pairs per step
  c.dpo.grad_accum = 1
  c.lora = lora.lora_block()        # --config.lora.rank=16: plan (and train) with LoRA
  c.optim = optim.default_optim_config()
  c.optim.lr = 1e-5
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.95
  # --- mesh: a v5p-128 slice (64 chips) or 8 nodes of 8 H100
  c.mesh = sharding.mesh_block()
  c.mesh.shape = (1, 64, 1)
  c.mesh.rules = "fsdp"
  c.distributed = common.distributed_block()
  c.plan = planner.plan_block()
  return c


def pipeline_config(plan):
  """configs/pipeline.py with `plan`'s paths, model settings and mesh, at 8B sizes."""
  c = config_files.sibling(__file__, "pipeline.py")
  c.seed = plan.seed
  c.inputs.update(dict(
      base=plan.base, tokenizer=plan.tokenizer, reward_model=plan.reward_model,
      teachers=";".join(f"{os.path.basename(t)}:{t}" for t in plan.teachers),
      families=FAMILIES, languages=plan.languages, prompts=plan.prompts,
      eval_prompts="/data/prompts/eval.jsonl"))  # held out, m-ArenaHard layout
  c.mesh.shape, c.mesh.rules = plan.mesh.shape, plan.mesh.rules
  c.lora.update(plan.lora)  # --config.lora.rank=16: every training step with LoRA
  c.distributed = plan.distributed  # multi-host: explicit, or from the environment
  c.model.update({k: plan.model[k] for k in c.model})  # bf16, remat, chunked vocab/attention
  # samples of 8B teachers on real prompts: long answers, large batches
  c.arbitrage.sampling.update(dict(n=2, temperature=0.7, max_new_tokens=2048))
  c.arbitrage.batch_size = 256
  c.arbitrage.routing.min_gap = 0.1  # in reward-model units
  c.arbitrage.contrast.enabled = False
  # each block is its stage's own config (aya_jax/recipe/blocks.py)
  for block in (c.sft, c.sft_family):
    blocks.reschedule(block, 2000, plan.optim.lr, plan.sft.batch_size, plan.sft.seq_len)
    block.loop.checkpoint_every = 200
  # Aya Expanse trains the family models in parallel from the (already capable) base
  c.sft_family.warm_start = "base"
  blocks.reschedule(c.dpo, 500, 5e-7, plan.dpo.batch_size, plan.dpo.seq_len)
  c.dpo.loop.checkpoint_every = 100
  c.dpo.dpo.update(dict(beta=0.1, rpo_alpha=0.0))
  blocks.reschedule(c.online, 200, 5e-7, 64, 4096)
  c.online.loop.checkpoint_every = 100
  c.online.online.update(dict(iterations=3, k=4, betas=(0.1,), max_new_tokens=1024,
                              temperature=1.0))
  c.online.dpo.rpo_alpha = 0.0
  c.ablations.update(dict(mixed=True, rloo=False))
  for block in (c.sft, c.sft_family, c.dpo, c.online):  # AdamW as planned (decay, b2 0.95)
    block.optim.update({k: plan.optim[k] for k in OPTIMISER})
  c.eval.update(dict(max_new_tokens=1024, batch_size=64, n_boot=1000))
  return c
