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

from aya_jax.arbitrage import stage as arbitrage


def get_config(arg=None):
  del arg
  return arbitrage.default_config()
