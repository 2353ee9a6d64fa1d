r"""The one entry point: `python -m aya_jax.main --config=configs/X.py --workdir=DIR`.

The config names its stage (`config.stage`); STAGES maps a stage name to the
module whose `run(config, workdir)` runs it. Any config field can be
overridden from the command line (`--config.optim.lr=3e-4`); the config is
locked, so a misspelt field fails and lists the valid ones.

Several processes (a TPU pod slice, a multi-node GPU job) are initialised
with `jax.distributed.initialize()` when the config's `distributed` block or
the environment asks for it (see `maybe_initialize_distributed`).
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from aya_jax import config_files, console

# stage name -> module with run(config, workdir). Only stages that exist.
STAGES = {
    "sft": "aya_jax.train.sft",
    "generate": "aya_jax.arbitrage.teachers",
    "merge": "aya_jax.merging.stage",
    "reward_model": "aya_jax.train.reward_model",
    "arbitrage": "aya_jax.arbitrage.stage",
    "dpo": "aya_jax.train.dpo",
    "online_dpo": "aya_jax.train.online",  # RLOO: --config.online.algorithm=rloo
    "world": "aya_jax.world.bootstrap",
    "eval": "aya_jax.world.evaluate",
    "pipeline": "aya_jax.recipe.pipeline",
    "plan": "aya_jax.train.planner",  # configs/aya_expanse_8b.py --config.dry_run=True
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every artifact of the run.")
_STATUS_SECONDS = flags.DEFINE_float(
    "status_seconds", console.STATUS_SECONDS,
    "Off a terminal (CI logs), a progress status line every this many seconds (0: none); "
    "on a terminal or in a notebook a progress bar instead.", lower_bound=0)

_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed(config) -> bool:
  """Calls jax.distributed.initialize() when several processes are asked for.

  Explicit: config.distributed.{coordinator_address, num_processes, process_id}
  (num_processes > 1). Implicit: a coordinator address in the environment,
  SLURM with several tasks, or a multi-host TPU slice (TPU_WORKER_HOSTNAMES
  lists several hosts); JAX then reads the rest from the environment.
  """
  import jax
  dist = config.get("distributed", None) if hasattr(config, "get") else None
  if dist is not None and int(dist.get("num_processes", 1)) > 1:
    jax.distributed.initialize(
        coordinator_address=dist.coordinator_address, num_processes=int(dist.num_processes),
        process_id=int(dist.process_id))
    return True
  env = os.environ
  implicit = (any(env.get(k) for k in _MULTI_PROCESS_ENV)
              or int(env.get("SLURM_NTASKS", "1")) > 1
              or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if implicit:
    jax.distributed.initialize()
    return True
  return False


def run_stage(config, workdir: str):
  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not a stage; known: {sorted(STAGES)}")
  module = importlib.import_module(STAGES[stage])
  return module.run(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<experiment>.py is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  # the whole log to workdir/logs/<stage>.log; the console keeps warnings and the
  # stages' own lines unless --verbosity is given
  verbose = flags.FLAGS["verbosity"].present
  console.quiet(verbose)
  maybe_initialize_distributed(config)
  import jax
  if jax.process_index() == 0:
    console.setup(_WORKDIR.value, config.stage, verbose, _STATUS_SECONDS.value)
  logging.info("aya_jax stage=%s process %d/%d devices=%d", config.stage, jax.process_index(),
               jax.process_count(), jax.device_count())
  try:
    run_stage(config, _WORKDIR.value)
  except Exception as e:  # pylint: disable=broad-except
    console.report_failure(e)
    sys.exit(1)


def _config_arg(argv):
  """The value of `--config=X` or `--config X` in argv; None without one."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _valid_keys_hint(argv) -> str:
  """For a failed `--config.a.b=` override: the fields that do exist."""
  import sys
  config_path = _config_arg(argv)
  if config_path is None:
    return ""
  try:
    config = config_files.get_config(config_path)
  except Exception:  # the config itself is broken: its own error says why
    return ""
  hints = []
  for a in argv:
    if not a.startswith("--config.") or "=" not in a:
      continue
    path = a[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for i, key in enumerate(path):
      if hasattr(node, "keys") and key in node.keys():
        node = node[key]
        continue
      if hasattr(node, "keys"):
        where = ".".join(["config"] + path[:i])
        hints.append(f"--config.{'.'.join(path)}: {where} has no field {key!r}; valid fields: "
                     f"{', '.join(sorted(node.keys()))}")
      break
  del sys
  return "\n".join(hints)


def _parse_flags(argv):
  spec = _config_arg(argv)
  if spec:  # else absl loads it lazily and fails on first use with two tracebacks
    try:
      config_files.check_file(spec)
    except FileNotFoundError as e:
      raise SystemExit(f"error: --config={spec}: {e}") from None
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    hint = _valid_keys_hint(argv)
    raise SystemExit(f"error: {e}\n{hint}".rstrip()) from None


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
