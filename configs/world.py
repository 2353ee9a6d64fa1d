r"""The synthetic world's models: tokenizer, base, teacher pool, weak model.

    python -m aya_jax.main --config=configs/world.py --workdir=runs/world

Builds (or reuses, when already built with the same config) in runs/world:
tokenizer/, base/params, teachers/<family>/params (+ hf/), weak/params and
world_report.{json,md}: each model's mean verifier score per language on the
validation split. Expected: every teacher scores higher on its own family's
languages than on the others; the weak model is weak everywhere but English.
`--config=configs/world.py:tiny` is the small world the tests use.
"""

from aya_jax.world import bootstrap as world


def get_config(arg=None):
  c = world.default_config()
  if arg == "tiny":
    c.languages = ("en", "fr", "ru")
    c.tasks = ("next_day", "prev_day", "translate")
    c.model.update(dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32,
                        d_ff=128))
    c.data.seq_len = 64
    c.pretrain.update(dict(steps=60, lr=3e-3, n_per_language=100))
    c.teacher.update(dict(steps=150, lr=3e-3, n_per_language=100))
    c.weak.update(dict(steps=30, lr=3e-3, n_per_language=60))
    c.report.n_per_language = 30
    c.export_hf = False
  elif arg:
    raise ValueError(f"configs/world.py: unknown argument {arg!r} (expected 'tiny' or none)")
  return c
