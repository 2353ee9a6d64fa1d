r"""The whole Aya Expanse recipe on the embedded synthetic world (stage 'pipeline').

    python -m aya_jax.main --config=configs/pipeline.py --workdir=runs/pipeline
    python -m aya_jax.main --config=configs/pipeline.py:smoke --workdir=runs/smoke

The steps (aya_jax.recipe.steps), each a directory of the workdir and each
still a stage of its own; the block of this config that sets each is named.
A block is that stage's own config (aya_jax/recipe/blocks.py): `dpo` is
configs/dpo.py's config less what the pipeline sets (tokenizer, start model,
mesh, seed, data files), so `--config.dpo.dpo.beta=0.2` is the dpo stage's
`--config.dpo.beta=0.2`; `--config.sft.loop.num_steps=100` moves
optim.total_steps with it.

  world         tokenizer, base model, a teacher per language family, a weak
                English-only model (`world`; aya_jax.world.bootstrap)
  reward_model  the arbiter: a reward model on verifier-labelled pairs (gold
                vs English / verbose / wrong answers; with reward_model.samples,
                the pool's own answers to other prompts, labelled by the
                verifier)
  arbitrage     every teacher answers (sampling.n samples), the arbiter scores,
                reward routing -> sft.jsonl + pairs_offline.jsonl, plus
                translation-contrast pairs (strong in-language vs weak English
                answer, translated)
  sft_single    baseline: SFT on one teacher's answers (`sft`;
                arbitrage.baseline_teacher, "" = the first)
  sft_mixed     SFT on all arbitraged data, one model (the ablation; and the
                family models' warm start with sft_family.warm_start='mixed')
  sft_<family>  SFT on the family's arbitraged data (each family has English),
                from the base or (sft_family.warm_start='mixed') from sft_mixed
  sft_merged    linear merge of the family SFT models
  dpo_<family>  offline DPO of sft_merged on the family's pairs (best/worst
                arbitrage pairs + translation-contrast pairs)
  dpo_merged    linear merge of the family DPO models
  online        online DPO from dpo_merged: sample online.k, rank with the
                arbiter (online.reward='verifier': the world's verifier, the
                oracle reward), best/worst, DPO; online.iterations rounds (each
                round per family then merged when per_family)
  rloo          ablation: RLOO instead of online DPO, same rounds and scorer
  grpo, dr_grpo ablations (off by default): GRPO / Dr. GRPO, the same way
  copg          ablation (off by default): online CoPG (every pair of the k answers)
  copg_<family>, copg_merged (ablations.copg_offline, off by default): offline CoPG
                on the dpo steps' pairs and block, with the arbiter's scores and its
                own beta (ablations.copg_beta, in score units: a pair settles at a
                log-ratio margin of score gap / beta; the arbiter's gaps are ~10)
  srpo_<family>, srpo_merged (ablations.srpo, off by default): offline SRPO on the
                same pairs and block; evaluated as is and after each of
                ablations.srpo_revisions self-revisions (srpo_rev<n>)
  eval          every stage against sft_single on held-out test prompts under
                the world's verifier (never used for training, routing or
                tuning)
  report        report.json, report.md (a verdict per claim of the recipe,
                with its paired 95% bootstrap interval), report.png; the table
                on stdout

Re-running skips finished steps (`pipeline_state.json` keeps each step's spec
hash: its block plus the hashes of the steps and input paths it reads); a
changed block re-runs that step and those after it that read it; a killed run
resumes at the step (and the checkpoint inside it) where it stopped; the
choice fields are checked before the first step.

Real inputs: set `inputs.base` and the other `inputs` fields (below, each with
what it is) to run the same pipeline on local models and prompt files: then
there is no world and no reward_model step, translation contrast runs only
with inputs.translator (a prompted teacher) and inputs.weak, and eval judges
inputs.eval_prompts with a reward model (inputs.judge, default the arbiter)
instead of the verifier. configs/aya_expanse_8b.py:pipeline is the worked
example.

Variants: '' (the default: what `make demo` runs, 15-20 minutes on 2 idle CPU
cores), 'smoke' (tiny sizes, a couple of minutes, for CI) and 'gains' (3
languages in 2 families, about 6 minutes: tests/gains_test.py asserts its
held-out gains).
"""

import ml_collections

from aya_jax import sharding
from aya_jax.arbitrage import stage as arbitrage
from aya_jax.models import lora
from aya_jax.recipe import blocks
from aya_jax.train import dpo, online, reward_model, sft
from aya_jax.world import bootstrap as world
from aya_jax.world import evaluate


def get_config(arg=None):
  variant = arg or "default"
  if variant not in ("default", "smoke", "gains"):
    raise ValueError(f"configs/pipeline.py:{variant}: variants are '' (default), 'smoke' "
                     "and 'gains'")
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"
  c.seed = 0  # every step's seed
  c.mesh = sharding.mesh_block()  # training, sampling and scoring
  # the stages' model settings (compute dtype, rematerialisation, vocab-chunked
  # loss, flash-style attention tiles)
  c.model = ml_collections.ConfigDict(dict(dtype="float32", remat="none", vocab_chunk=0,
                                           attention_chunk=0))
  # rank > 0: every training step trains LoRA adapters on a frozen base (a step's own
  # block, e.g. --config.dpo.lora.rank, wins); see docs/lora.md
  c.lora = lora.lora_block()
  # Real inputs (aya_jax/recipe/inputs.py checks them): all empty = the embedded
  # world. With inputs.base set, the world and reward_model steps are skipped and
  # these local paths are used (nothing is downloaded); a missing path fails at
  # the start with the field's name; a changed path re-runs only the steps that
  # read it. See configs/aya_expanse_8b.py:pipeline.
  c.inputs = ml_collections.ConfigDict(dict(
      # the student: an HF dir (config.json + safetensors) or an aya_jax params/
      # dir; every SFT starts from it
      base="",
      tokenizer="",         # its HF tokenizer dir with a chat template ("" = base's)
      # 'name:path;name:path' (HF or params/ dirs); a teacher renders with its own
      # directory's tokenizer when it has one, else `tokenizer`
      teachers="",
      # 'name:dir;...': a teacher's tokenizer dir (with a chat template) instead of its own
      teacher_tokenizers="",
      # optional weak model: joins the pool with one sample and is the rejected
      # side of translation contrast
      weak="",
      # a teacher's name: translation contrast on (with arbitrage.contrast.enabled
      # and `weak`), that teacher answering in language and translating (prompted)
      translator="",
      families="",          # 'name:l1,l2;name:...' (give every family English)
      languages=(),         # () = the families' languages; prompts in others are dropped
      # the arbiter: aya_jax params/ with a value head, or an HF
      # ...ForSequenceClassification dir, or 'verifier' (the world's, on its tasks)
      reward_model="",
      reward_tokenizer="",  # "" = the reward model dir's tokenizer, else `tokenizer`
      judge="",             # the eval judge, a reward model or 'verifier' ("" = the arbiter)
      # JSONL file(s), one prompt per line (any layout records.read_prompts takes):
      # what arbitrage routes and online rounds sample on; ('world',) = the world's tasks
      # (world.tasks) as natural prompts in the languages, its train split
      prompts=(),
      # held-out JSONL (m-ArenaHard layout): what eval judges; 'world' = the world's
      # test split (eval.n_per_language per language)
      eval_prompts=""))
  c.world = world.default_config()
  c.world.export_hf = False
  # 7 languages in 4 scripts and 3 families; the tasks a CPU-sized model learns
  # in minutes (teachers reach ~0.5 verifier score on their own family).
  c.world.languages = ("en", "fr", "de", "ru", "tr", "ar", "zh")
  c.world.tasks = ("next_day", "prev_day", "translate")
  c.world.pretrain.steps = 300
  c.world.teacher.update(dict(steps=500, lr=3e-3))
  c.world.report.n_per_language = 24
  # the arbiter (the reward_model stage): gold answers against corrupted ones,
  # and (`samples`, the pipeline's own) the world models' answers to other
  # training prompts labelled by the verifier
  c.reward_model = blocks.training_block(
      reward_model.default_config(), 1000, 1e-3, 32, 48,
      owned=("synthetic.languages", "synthetic.tasks"),
      samples=ml_collections.ConfigDict(dict(
          n_per_language=250, k=2, temperature=1.0, max_new_tokens=32, batch_size=64,
          max_pairs_per_prompt=4, min_gap=0.25)))
  c.reward_model.synthetic.update(dict(n_per_language=150, kinds=("english", "verbose",
                                                                  "wrong")))
  # the arbitrage stage: every teacher k (sampling.n) samples of the world's
  # synthetic.n_per_language train prompts per language, scored by the arbiter
  # (in batches of scorer.batch_size: the arbiter's everywhere), routed;
  # baseline_teacher ("" = the first) is the pipeline's: sft_single's teacher
  c.arbitrage = blocks.block(arbitrage.default_config(), owned=blocks.ARBITRAGE_OWNED,
                             baseline_teacher="")
  c.arbitrage.sampling.update(dict(n=2, temperature=0.7, top_p=1.0, max_new_tokens=32))
  c.arbitrage.update(dict(batch_size=64))
  c.arbitrage.synthetic.n_per_language = 200
  c.arbitrage.scorer.batch_size = 16
  c.arbitrage.contrast.enabled = True
  c.sft = blocks.training_block(sft.default_config(), 300, 2e-3, 16, 96)
  # the family models continue from sft_mixed, a shared multilingual warm start
  # (merged models need a shared trajectory; the world's base knows no task);
  # warm_start='base' trains them from the base model like the other SFT runs
  c.sft_family = blocks.training_block(sft.default_config(), 150, 2e-3, 16, 96,
                                       warm_start="mixed")
  c.dpo = blocks.training_block(dpo.default_config(), 60, 5e-4, 16, 96)
  c.dpo.dpo.update(dict(beta=0.1, rpo_alpha=0.5))
  # the online stage (iterative DPO; the ablation steps run the same block as theirs);
  # per_family (the pipeline's): each round per family, then merged. Conservative
  # on purpose: at lr 3e-4 / beta 0.1 the policy games the learned arbiter (its
  # reward rises, the verifier's score on validation prompts falls)
  c.online = blocks.training_block(
      online.default_config(), 30, 1e-4, 16, 96, per_family=False, reward="arbiter",
      owned=("data.prompts", "dpo.reference_init", "online.algorithm", "online.families",
             "online.scorer"))
  c.online.online.update(dict(iterations=3, k=4, betas=(0.3,), max_new_tokens=32,
                              temperature=1.0))
  c.online.dpo.rpo_alpha = 0.5
  # the same online rounds with another objective (train/policy_gradient.py), each a stage
  c.ablations = ml_collections.ConfigDict(dict(mixed=True, rloo=True, grpo=False,
                                               dr_grpo=False, copg=False, copg_offline=False,
                                               copg_beta=1.0, srpo=False,
                                               srpo_revisions=(1, 3)))
  # the eval stage: greedy answers to the world's n_per_language held-out test
  # prompts per language, every model against sft_single
  c.eval = blocks.block(evaluate.default_config(), owned=blocks.EVAL_OWNED)
  c.eval.update(dict(n_per_language=24, max_new_tokens=32, batch_size=64, n_boot=1000))
  if variant == "gains":  # the slow test's run: 3 languages in 2 families, fewer steps
    c.world.languages = ("en", "fr", "zh")
    c.world.families = "european:en,fr;asian_semitic:en,zh"
    c.world.pretrain.update(dict(steps=200))
    c.world.teacher.update(dict(steps=250))
    c.world.report.update(dict(n_per_language=16))
    blocks.reschedule(c.reward_model, 350)
    c.reward_model.samples.update(dict(n_per_language=150))
    c.arbitrage.synthetic.n_per_language = 120
    blocks.reschedule(c.sft, 150)
    blocks.reschedule(c.sft_family, 80)
    blocks.reschedule(c.dpo, 30)
    blocks.reschedule(c.online, 15)
    c.online.online.iterations = 2
    c.eval.update(dict(n_per_language=40))
    c.ablations.rloo = False
  if variant == "smoke":
    c.world.languages = ("en", "fr", "ru")
    c.world.model.update(dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                              d_ff=64))
    c.world.pretrain.update(dict(steps=30, n_per_language=60))
    c.world.teacher.update(dict(steps=20, n_per_language=40))
    c.world.weak.update(dict(steps=10, n_per_language=20))
    c.world.report.update(dict(n_per_language=4, max_new_tokens=12))
    c.world.data.update(dict(seq_len=64, batch_size=8))
    blocks.reschedule(c.reward_model, 10)
    c.reward_model.synthetic.n_per_language = 8
    c.reward_model.data.update(dict(seq_len=64, batch_size=8))
    c.reward_model.samples.update(dict(n_per_language=4, k=1, max_new_tokens=12))
    c.arbitrage.synthetic.n_per_language = 6
    c.arbitrage.sampling.max_new_tokens = 12
    for block in (c.sft, c.sft_family, c.dpo, c.online):
      blocks.reschedule(block, 6)
      block.data.update(dict(seq_len=64, batch_size=8))
    c.online.online.update(dict(iterations=2, k=2, max_new_tokens=12))
    c.eval.update(dict(n_per_language=4, max_new_tokens=12, n_boot=200))
  return c
