r"""The whole Aya Expanse recipe on the embedded synthetic world (stage 'pipeline').

    python -m aya_jax.main --config=configs/pipeline.py --workdir=runs/pipeline
    python -m aya_jax.main --config=configs/pipeline.py:smoke --workdir=runs/smoke

world bootstrap -> reward model (verifier-labelled pairs) -> arbitrage (reward
routing with the learned reward model as arbiter) + translation-contrast pairs
-> SFT per language family (+ single-teacher and mixed-data ablations) ->
linear merge -> offline DPO per family -> merge -> online DPO rounds (RLOO
ablation) -> evaluation of every stage against single-teacher SFT on held-out
test prompts under the verifier. Writes report.md / report.json / report.png
in the workdir and prints the table. Re-running skips finished steps; a
changed block re-runs that step and those after it.

Variants: '' (the default: what `make demo` runs, about 15 minutes on 2 CPU
cores) and 'smoke' (tiny sizes, a couple of minutes, for CI).
"""

import ml_collections

from aya_jax import world


def _train(steps, lr, batch_size, seq_len, **extra):
  return ml_collections.ConfigDict(dict(steps=steps, lr=lr, batch_size=batch_size,
                                        seq_len=seq_len, **extra))


def get_config(arg=None):
  variant = arg or "default"
  if variant not in ("default", "smoke"):
    raise ValueError(f"configs/pipeline.py:{variant}: variants are '' (default) and 'smoke'")
  c = ml_collections.ConfigDict()
  c.stage = "pipeline"
  c.seed = 0
  c.mesh_shape = (-1, 1, 1)
  c.world = world.default_config()
  c.world.export_hf = False
  # 7 languages in 4 scripts and 3 families; the tasks a CPU-sized model learns
  # in minutes (teachers reach ~0.5 verifier score on their own family).
  c.world.languages = ("en", "fr", "de", "ru", "tr", "ar", "zh")
  c.world.tasks = ("next_day", "prev_day", "translate")
  c.world.pretrain.steps = 300
  c.world.teacher.update(dict(steps=500, lr=3e-3))
  c.world.report.n_per_language = 24
  c.reward_model = _train(500, 1e-3, 32, 96, n_per_language=150,
                          kinds=("english", "verbose", "wrong"))
  c.arbitrage = ml_collections.ConfigDict(dict(
      n_per_language=200, k=2, temperature=0.7, max_new_tokens=32, batch_size=64,
      min_gap=0.1, contrast=True, baseline_teacher=""))
  c.sft = _train(300, 2e-3, 16, 96)
  c.dpo = _train(60, 5e-4, 16, 96, beta=0.1, rpo_alpha=0.5)
  c.online = _train(30, 3e-4, 16, 96, iterations=3, k=4, beta=0.1, rpo_alpha=0.5,
                    max_new_tokens=32, temperature=1.0, per_family=False)
  c.ablations = ml_collections.ConfigDict(dict(mixed=True, rloo=True))
  c.eval = ml_collections.ConfigDict(dict(n_per_language=24, max_new_tokens=32, batch_size=64,
                                          n_boot=1000))
  if variant == "smoke":
    c.world.languages = ("en", "fr", "ru")
    c.world.model.update(dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                              d_ff=64))
    c.world.pretrain.update(dict(steps=30, n_per_language=60))
    c.world.teacher.update(dict(steps=20, n_per_language=40))
    c.world.weak.update(dict(steps=10, n_per_language=20))
    c.world.report.update(dict(n_per_language=4, max_new_tokens=12))
    c.world.data.update(dict(seq_len=64, batch_size=8))
    c.reward_model.update(dict(steps=10, n_per_language=8, seq_len=64, batch_size=8))
    c.arbitrage.update(dict(n_per_language=6, max_new_tokens=12))
    for block in (c.sft, c.dpo, c.online):
      block.update(dict(steps=6, seq_len=64, batch_size=8))
    c.online.update(dict(iterations=2, k=2, max_new_tokens=12))
    c.eval.update(dict(n_per_language=4, max_new_tokens=12, n_boot=200))
  return c
