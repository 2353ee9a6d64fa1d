"""The one training loop: resume, metrics, NaN guard, checkpoints, preemption.

    state = train_loop(state, step_fn, batches, loop_cfg, workdir, mesh)

- Resume: when workdir/checkpoints holds a checkpoint, the state and the data
  iterator state are restored from the latest one and training continues at
  its step; the per-step rng is fold_in(key(seed), step), so a resumed run
  gives the same result as an uninterrupted one.
- Metrics: averaged over `log_every` steps, written to workdir/metrics.jsonl
  (process 0), with steps/s and tokens/s. They stay on the device between
  log steps: the loop never waits for a step to finish except at a log step,
  an eval, a checkpoint and the end (one fetch of everything since the last).
- NaN guard: the step skips non-finite updates; more than `max_nonfinite`
  in a row raises FloatingPointError naming the step, found at the next
  fetch and always before a checkpoint is written (the last checkpoint is
  intact).
- Checkpoints every `checkpoint_every` steps and at the end, never of
  non-finite params (FloatingPointError instead); SIGTERM (a preempted VM, a
  killed job) saves a checkpoint at the next step boundary and stops with
  `Preempted` (on several processes at the next log or checkpoint step, the same step
  for all: any process's SIGTERM stops them all); a second SIGTERM exits at once (a
  run stuck outside a step).
- One run per workdir (`resume.WorkdirLock`), and a resume must have the
  training config of the run that wrote the checkpoints (`resume.check_config`,
  given `run_config`).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from aya_jax import accelerators, console
from aya_jax import metrics as metrics_lib
from aya_jax import sharding
from aya_jax.checkpoint import Checkpointer
from aya_jax.train import resume, steps


class Preempted(RuntimeError):
  """Raised after the preemption checkpoint is written."""


def default_loop_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_steps = 100
  c.log_every = 10
  c.checkpoint_every = 50
  c.keep_checkpoints = 2
  c.max_nonfinite = 3
  c.seed = 0
  c.eval_every = 0              # 0: evaluate only at the end (when an eval_fn is given)
  c.peak_tflops_per_device = 0.0  # for MFU; 0: from the device kind when known
  c.flops_per_token = 0.0       # set by the stage (models.config.train_flops_per_token)
  c.allow_config_change = False  # resume checkpoints written under another training config
  return c


class _SignalFlag:
  def __init__(self):
    self.raised = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handler(self, signum, frame):
    if self.raised:  # the first one was not acted on: stuck outside a step
      raise SystemExit("second SIGTERM: exiting without a checkpoint (the last one is intact)")
    logging.warning("SIGTERM: checkpointing at the next step boundary (a second SIGTERM "
                    "exits at once)")
    self.raised = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train_loop(state, step_fn: Callable, batches: Iterator, cfg, workdir: str, mesh,
               stop_after: Optional[int] = None, on_log: Optional[Callable] = None,
               eval_fn: Optional[Callable] = None, run_config=None):
  """Runs step_fn until cfg.num_steps; returns the final state (see the module
  doc). `run_config`: the stage's whole config, checked on resume."""
  with resume.WorkdirLock(workdir):
    return _train_loop(state, step_fn, batches, cfg, workdir, mesh, stop_after, on_log,
                       eval_fn, run_config)


def _train_loop(state, step_fn, batches, cfg, workdir, mesh, stop_after, on_log, eval_fn,
                run_config):
  """Runs step_fn until cfg.num_steps; returns the final state.

  `batches` yields dicts of per-process numpy arrays and may have
  get_state()/set_state() (grain iterators do): it is checkpointed too.
  `stop_after` stops (with a checkpoint) after that many steps of this call,
  which is how tests simulate a killed run. `eval_fn(state) -> dict` runs
  every `cfg.eval_every` steps and at the end; its metrics are logged with an
  `eval_` prefix.
  """
  if cfg.num_steps < 1:
    raise ValueError(f"loop.num_steps={cfg.num_steps}: at least one step is needed")
  ckpt = Checkpointer(workdir, cfg.keep_checkpoints)
  if run_config is not None:
    resume.check_config(workdir, run_config, ckpt.latest_step() is not None)
  finite = jax.jit(steps.all_finite)
  start = 0
  if ckpt.latest_step() is not None:
    restored, data_state = ckpt.restore(state.replace(frozen=None))  # a LoRA base is not
    state = restored.replace(frozen=state.frozen)                      # in checkpoints
    start = int(state.step)
    if data_state and hasattr(batches, "set_state"):
      batches.set_state(data_state)
    logging.info("resumed at step %d", start)
  writer = metrics_lib.MetricWriter(workdir, also_tensorboard=True)
  peak = (cfg.peak_tflops_per_device or accelerators.peak_tflops()) * 1e12 * jax.device_count()
  progress = console.Progress(cfg.num_steps, os.path.basename(os.path.normpath(workdir)),
                              unit="step", initial=start)
  acc = metrics_lib.MeanAccumulator()
  guard = _NonFiniteGuard(cfg.max_nonfinite, ckpt.directory)
  base_rng = jax.random.key(cfg.seed)
  t0, tokens, last_loss = time.time(), 0, None
  step = start
  data_state = lambda: batches.get_state() if hasattr(batches, "get_state") else None
  with _SignalFlag() as flag:
    while step < cfg.num_steps:
      batch = sharding.global_batch(next(batches), mesh)
      state, m = step_fn(state, batch, jax.random.fold_in(base_rng, step))
      step += 1
      tokens += int(batch["tokens"].size)
      acc.add(m)  # device arrays: no host sync here
      guard.add(step, m)
      if step % cfg.log_every == 0 or step == cfg.num_steps:
        guard.check()
        dt = max(time.time() - t0, 1e-9)
        scalars = _finalise(acc.result())
        last_loss = scalars.get("loss", last_loss)
        scalars.update(steps_per_s=len_or(cfg.log_every, step) / dt, tokens_per_s=tokens / dt)
        if peak and cfg.flops_per_token:
          scalars["mfu"] = tokens / dt * cfg.flops_per_token / peak
        writer.write(step, scalars)
        if on_log:
          on_log(step, scalars)
        logging.info("step %d %s", step, {k: round(v, 4) for k, v in scalars.items()})
        t0, tokens = time.time(), 0
      progress.update(1, loss=last_loss)
      done = step == cfg.num_steps
      if eval_fn is not None and (done or (cfg.eval_every and step % cfg.eval_every == 0)):
        guard.check()
        ev = {f"eval_{k}": v for k, v in eval_fn(state).items()}
        writer.write(step, ev)
        logging.info("step %d eval %s", step, ev)
      stopping = _stop_requested(flag.raised, step, cfg) or (
          stop_after is not None and step - start >= stop_after)
      if done or stopping or step % cfg.checkpoint_every == 0:
        guard.check()
        if not finite(state.params):  # a checkpoint is only ever of usable weights
          raise FloatingPointError(
              f"step {step}: the params hold non-finite values; not checkpointed (the last "
              f"checkpoint in {ckpt.directory}, if any, is intact)")
        ckpt.save(step, state.replace(frozen=None), data_state())
      if stopping and not done:
        progress.close()
        writer.close()
        ckpt.close()
        raise Preempted(f"stopped at step {step}; resume by running the same command")
  progress.close()
  writer.close()
  ckpt.close()
  return state


def _stop_requested(raised: bool, step: int, cfg) -> bool:
  """Whether to stop after `step` for a SIGTERM. One process: as soon as it came. Several:
  all stop at the same step (checkpoints are written by all of them together), decided at
  the log and checkpoint steps by whether any process got one (a host sync there anyway)."""
  if jax.process_count() == 1:
    return raised
  if step % cfg.log_every and step % cfg.checkpoint_every:
    return False
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(raised))).any())


class _NonFiniteGuard:
  """Counts steps whose update was skipped as non-finite, in order, from the
  step metrics kept on the device; `check` fetches the flags since the last
  check and raises when more than `max_run` came in a row."""

  def __init__(self, max_run: int, checkpoint_dir: str):
    self.max_run, self.checkpoint_dir = max_run, checkpoint_dir
    self.run, self.pending = 0, []

  def add(self, step: int, metrics: dict):
    self.pending.append((step, metrics["nonfinite"], metrics["loss"], metrics["grad_norm"]))

  def check(self):
    pending, self.pending = jax.device_get(self.pending), []
    for step, nonfinite, loss, grad_norm in pending:
      self.run = self.run + 1 if nonfinite else 0
      if self.run > self.max_run:
        raise FloatingPointError(
            f"step {step}: loss or gradient non-finite for {self.run} steps in a row "
            f"(loss={loss}, grad_norm={grad_norm}); last checkpoint is intact in "
            f"{self.checkpoint_dir}")


def len_or(every, step):
  return every if step % every == 0 else step % every


def _finalise(avg: dict) -> dict:
  """Ratios from summed statistics (accuracy, per-token nll) where present."""
  out = dict(avg)
  if "n_tokens" in avg and avg["n_tokens"]:
    if "n_correct" in avg:
      out["accuracy"] = avg["n_correct"] / avg["n_tokens"]
    if "nll_sum" in avg:
      out["nll_per_token"] = avg["nll_sum"] / avg["n_tokens"]
  return out
