r"""absl sweeps: one config, several sets of `--config.x=` overrides, one run each.

    python experiments/sweep.py --config=configs/sft.py --workdir=runs/sweep_lr \
      --sweep='optim.lr=1e-3,optim.warmup_steps=10;optim.lr=3e-3;optim.lr=1e-2'
    python experiments/sweep.py ... --grid='optim.lr=1e-3|3e-3,data.batch_size=8|16'
    python experiments/sweep.py ... --sweep_file=experiments/my_sweep.py  # SWEEP = [dict, ...]
    python experiments/sweep.py ... --dry     # only print the commands (a cluster's launcher)

Each set runs `python -m aya_jax.main --config=... --workdir=WORKDIR/<name>
--config.k=v ...` in sequence (name: the overrides, e.g. `optim.lr=3e-3`);
a failed run is recorded and the sweep goes on. Afterwards the last line of
each run's metrics.jsonl is gathered into WORKDIR/sweep.jsonl and
WORKDIR/sweep.md, keyed by the overrides. Extra flags after `--` are passed to
every run unchanged.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", None, "configs/X.py[:arg]", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "root of the runs", required=True)
_SWEEP = flags.DEFINE_string("sweep", "", "sets separated by ';', overrides by ','")
_GRID = flags.DEFINE_string("grid", "", "k=v1|v2,k2=w1|w2: the product of the values")
_FILE = flags.DEFINE_string("sweep_file", "", "a Python file defining SWEEP = [dict, ...]")
_DRY = flags.DEFINE_bool("dry", False, "print the commands, run nothing")


def parse_sweep(text: str) -> list[dict]:
  sets = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    sets.append(dict(kv.strip().split("=", 1) for kv in part.split(",") if kv.strip()))
  return sets


def parse_grid(text: str) -> list[dict]:
  axes = [(k.strip(), v.split("|")) for k, v in
          (kv.split("=", 1) for kv in text.split(",") if kv.strip())]
  return [dict(zip([k for k, _ in axes], values))
          for values in itertools.product(*[v for _, v in axes])]


def run_name(overrides: dict) -> str:
  name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"
  return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name)


def commands(config: str, workdir: str, sets: list[dict], extra=()) -> list[tuple]:
  out = []
  for overrides in sets:
    wd = os.path.join(workdir, run_name(overrides))
    cmd = [sys.executable, "-m", "aya_jax.main", f"--config={config}", f"--workdir={wd}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()] + list(extra)
    out.append((overrides, wd, cmd))
  return out


def last_metrics(wd: str) -> dict:
  path = os.path.join(wd, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  return json.loads(lines[-1]) if lines else {}


def gather(workdir: str, rows: list[dict]):
  with open(os.path.join(workdir, "sweep.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  keys = sorted({k for r in rows for k in r["overrides"]})
  metrics = sorted({k for r in rows for k in r["metrics"] if isinstance(r["metrics"][k],
                                                                        (int, float))})
  lines = ["| " + " | ".join(keys + ["status"] + metrics) + " |",
           "|" + "---|" * (len(keys) + 1 + len(metrics))]
  for r in rows:
    cells = [str(r["overrides"].get(k, "")) for k in keys] + [r["status"]]
    cells += [f"{r['metrics'][m]:.4g}" if m in r["metrics"] else "" for m in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv):
  extra = argv[1:]
  sets = parse_sweep(_SWEEP.value) + (parse_grid(_GRID.value) if _GRID.value else [])
  if _FILE.value:
    sets += [{k: str(v) for k, v in s.items()} for s in runpy.run_path(_FILE.value)["SWEEP"]]
  if not sets:
    raise app.UsageError("give --sweep, --grid or --sweep_file")
  cmds = commands(_CONFIG.value, _WORKDIR.value, sets, extra)
  if _DRY.value:
    for _, _, cmd in cmds:
      print(shlex.join(cmd))
    return
  os.makedirs(_WORKDIR.value, exist_ok=True)
  rows = []
  for overrides, wd, cmd in cmds:
    print("+", shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    rows.append(dict(overrides=overrides, workdir=wd, status="ok" if rc == 0 else f"rc={rc}",
                     metrics=last_metrics(wd)))
  gather(_WORKDIR.value, rows)


if __name__ == "__main__":
  app.run(main)
