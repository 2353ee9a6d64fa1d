r"""What `make demo` runs: the whole pipeline on the embedded synthetic world.

    python -m aya_jax.main --config=configs/demo.py --workdir=runs/demo

Same as configs/pipeline.py (default variant); see its docstring. Expected:
15 minutes on 2 idle CPU cores (899 s measured for a fresh `make demo`; 27
minutes on busy ones); runs/demo/report.md, report.json and report.png with
per-language win rates of every stage against single-teacher SFT on held-out
prompts, and a verdict per stage (seed 0: the table in README.md, docs/results.md).
"""

from aya_jax import config_files


def get_config(arg=None):
  return config_files.sibling(__file__, "pipeline.py", arg)
