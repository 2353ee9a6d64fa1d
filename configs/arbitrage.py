r"""Multilingual data arbitrage: teachers answer, a scorer routes.

Embedded default (no files, no models): 40 synthetic-world prompts per
language, two synthetic teachers (`eu` strong on en/fr/es/de, `asia` strong on
hi/ar/zh, both weak elsewhere; 2 samples each), the world's Verifier as
scorer, reward-based routing plus a learned router:

    python -m aya_jax.main --config=configs/arbitrage.py --workdir=runs/arb

Produces runs/arb/sft.jsonl (best answer per prompt), pairs_offline.jsonl
(best vs worst, gap >= routing.min_gap), report.json / report.md (per
language: teacher wins, mean score per teacher, mean routed score, pairs,
router agreement; problems per record) and router.npz. Expected: `eu` wins
most en/fr/es/de prompts, `asia` most hi/ar/zh; router hold-out agreement
well above chance; compute_saved 0.5.

Real teachers (HF directories) and a trained reward model:

    --config.synthetic.teachers= --config.prompts=prompts.jsonl \
    --config.teachers.teacher_a.model=/m/a --config.teachers.teacher_b.model=/m/b \
    --config.scorer.kind=reward_model --config.scorer.path=runs/rm/params \
    --config.scorer.tokenizer=/tok

Other modes: --config.mode=fixed --config.routing.table='fr:eu,zh:asia' ;
--config.mode=learned --config.router.path=runs/arb/router.npz.

Translation-contrast pairs as well (chosen: `eu`'s in-language answer;
rejected: `asia`'s English answer, translated word by word by the world's
lexicon, or by a teacher with --config.contrast.translator=prompted):

    --config.contrast.enabled=True --config.contrast.strong=eu --config.contrast.weak=asia

writes runs/arb/pairs_contrast.jsonl (source "translation_contrast", both
sides scored) next to pairs_offline.jsonl and a contrast section in the report.
Rerunning after a kill generates and scores only what is missing.
"""

import ml_collections


def _teacher(model: str = "") -> ml_collections.ConfigDict:
  ref = ml_collections.FieldReference
  return ml_collections.ConfigDict(dict(
      model=model, tokenizer="", n=ref(None, field_type=int),
      max_new_tokens=ref(None, field_type=int), temperature=ref(None, field_type=float),
      top_k=ref(None, field_type=int), top_p=ref(None, field_type=float)))


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.stage = "arbitrage"
  c.seed = 0
  c.mode = "reward"          # reward | fixed | learned
  c.prompts = ""             # prompts JSONL {"id", "language", "messages"}; "" = synthetic
  # model teachers (aya_jax.teachers); a teacher with model "" is left out
  c.batch_size = 16
  c.mesh_shape = (-1, 1, 1)
  c.sharding = "fsdp"
  c.sampling = ml_collections.ConfigDict(dict(
      temperature=0.7, top_k=0, top_p=0.95, n=2, max_new_tokens=256))
  c.teachers = ml_collections.ConfigDict(dict(teacher_a=_teacher(), teacher_b=_teacher()))
  # embedded synthetic world: prompts and teachers ('name:lang=p,...,*=p;...')
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.n_per_language = 40
  c.synthetic.languages = ()
  c.synthetic.n = 2
  c.synthetic.teachers = ("eu:en=0.9,fr=0.9,es=0.9,de=0.9,*=0.2;"
                          "asia:hi=0.9,ar=0.9,zh=0.9,*=0.2")
  c.scorer = ml_collections.ConfigDict()
  c.scorer.kind = "verifier"  # verifier | reward_model
  c.scorer.path = ""          # reward model params/ or HF directory
  c.scorer.tokenizer = ""
  c.scorer.batch_size = 32
  c.scorer.max_len = 0        # 0 = the model's max_seq_len
  c.scorer.chunk = 256        # records per scoring call (appended after each)
  c.routing = ml_collections.ConfigDict()
  c.routing.min_gap = 0.1     # skip pairs whose best - worst score is smaller
  c.routing.table = ""        # fixed mode: 'fr:teacher_a,de:teacher_b'
  c.routing.default = ""      # fixed mode: teacher for languages not in the table
  c.router = ml_collections.ConfigDict()
  c.router.train = True       # reward mode: fit the learned router, report agreement
  c.router.path = ""          # learned mode: router.npz
  c.router.holdout_fraction = 0.2
  c.router.dim = 1024
  c.router.steps = 300
  # translation-contrast pairs -> pairs_contrast.jsonl (preference.run_contrast)
  c.contrast = ml_collections.ConfigDict()
  c.contrast.enabled = False
  c.contrast.strong = "eu"          # teacher whose in-language answer is chosen
  c.contrast.weak = "asia"          # teacher whose English answer, translated, is rejected
  c.contrast.translator = "lexicon"  # lexicon (the world's) | prompted (a teacher)
  c.contrast.translator_teacher = ""  # prompted: the translating teacher ("" = strong)
  c.contrast.untranslated_rate = 0.1  # lexicon: chance a word stays in English
  c.contrast.min_gap = 0.0          # drop scored pairs with chosen - rejected < min_gap
  c.lock()
  return c
