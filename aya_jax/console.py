"""What a run shows: warnings and the stages' own lines on the console, the whole log
in the workdir.

`setup(workdir, name, verbose)` (the entry point calls it) writes every log record
(absl INFO included, and third-party chatter: Orbax, grain, transformers) to
`workdir/logs/<name>.log` and keeps the console to WARNING and above; `verbose`
(absl's `--verbosity` given on the command line) brings INFO back to the console.
`step_log(log_dir, name)` adds `log_dir/<name>.log` for the duration of one
pipeline step. `report_failure` prints a failed run's error as the last console
lines, naming the step and the log file that holds the traceback.

`Progress(total, desc, unit)` shows how far a loop has got (training steps, sampling
and scoring batches): a tqdm bar with rate and ETA when the console is a terminal or a
notebook (tqdm's notebook flavour there), else a status line every `status_seconds`
(CI logs; `--status_seconds` on the command line, 0 = none); nothing on processes
other than 0.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
import time
import traceback
from typing import Optional

from absl import logging

LOG_DIR = "logs"
_FORMAT = "%(levelname).1s%(asctime)s %(name)s %(filename)s:%(lineno)d] %(message)s"
# the run's log file (and its handler); the step that is running; the innermost step
# an error left
_state = {"file": None, "handler": None, "step": None, "failed": None}
STATUS_SECONDS = 60.0  # the default interval of the status lines off a terminal
_progress = {"status_seconds": STATUS_SECONDS}


def _file_handler(path: str) -> std_logging.Handler:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = std_logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(std_logging.DEBUG)
  handler.setFormatter(std_logging.Formatter(_FORMAT, "%m%d %H:%M:%S"))
  return handler


def quiet(verbose: bool = False):
  """The console at WARNING and above (INFO too when `verbose`)."""
  logging.get_absl_handler().setLevel(std_logging.NOTSET if verbose else std_logging.WARNING)


def setup(workdir: str, name: str, verbose: bool = False,
          status_seconds: float = STATUS_SECONDS) -> str:
  """Logs of the run to workdir/logs/<name>.log; the console at WARNING unless `verbose`;
  progress status lines (off a terminal) every `status_seconds`. Returns the log file's
  path."""
  close()
  if status_seconds < 0:
    raise ValueError(f"status_seconds={status_seconds}: 0 (no status lines) or more")
  _progress["status_seconds"] = float(status_seconds)
  path = os.path.join(os.path.abspath(workdir), LOG_DIR, f"{name}.log")
  handler = _file_handler(path)
  root = std_logging.getLogger()
  root.addHandler(handler)
  root.setLevel(min(root.level or std_logging.INFO, std_logging.INFO))
  quiet(verbose)
  _state.update(file=path, handler=handler, failed=None)
  return path


def close():
  """Stops writing the run's log file and gives the console its INFO lines back."""
  if _state["handler"] is not None:
    std_logging.getLogger().removeHandler(_state["handler"])
    _state["handler"].close()
  _state.update(file=None, handler=None, step=None, failed=None)
  quiet(verbose=True)


@contextlib.contextmanager
def step_log(log_dir: Optional[str], name: str):
  """Adds log_dir/<name>.log (a step name may hold '/') while a step runs."""
  if not log_dir:
    yield None
    return
  path = os.path.join(log_dir, f"{name}.log")
  handler = _file_handler(path)
  root = std_logging.getLogger()
  root.addHandler(handler)
  before, _state["step"] = _state["step"], name
  try:
    yield path
  except BaseException:
    _state["failed"] = _state["failed"] or name
    raise
  finally:
    root.removeHandler(handler)
    handler.close()
    _state["step"] = before


def failing_step() -> Optional[str]:
  """The pipeline step that was running when an error got out (None outside steps)."""
  return _state["failed"] or _state["step"]


def report_failure(error: BaseException, stream=None) -> str:
  """The traceback to the log; the error, its step and the log file as the last lines on
  the console. Returns what was printed."""
  logging.error("".join(traceback.format_exception(type(error), error, error.__traceback__)))
  where = f" in step {failing_step()}" if failing_step() else ""
  log = f" (traceback: {_state['file']})" if _state["file"] else ""
  text = f"error{where}: {type(error).__name__}: {error}{log}"
  print(text, file=stream or sys.stderr, flush=True)
  return text


# ------------------------------------------------------------------------ progress


def _in_notebook() -> bool:
  """Running in a Jupyter/Colab kernel (tqdm's notebook bar applies)."""
  ipython = sys.modules.get("IPython")
  shell = ipython.get_ipython() if ipython is not None else None
  return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _lead() -> bool:
  if "jax" not in sys.modules:
    return True
  return sys.modules["jax"].process_index() == 0


def _duration(seconds) -> str:
  """5s, 3m05s, 1h02m."""
  if seconds is None:
    return "?"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _number(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
  """How far `total` units of work named `desc` have got: a tqdm bar (rate, ETA) on a
  terminal or in a notebook, a status line every `status_seconds` elsewhere (see the
  module doc). `update(n, **figures)` counts n more units; the figures (a loss) are
  shown beside the count."""

  def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0,
               stream=None, clock=time.monotonic, status_seconds: Optional[float] = None):
    self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
    self.stream, self.clock = stream or sys.stderr, clock
    self.every = _progress["status_seconds"] if status_seconds is None else status_seconds
    self.figures, self.bar = "", None
    self._t0 = self._last = clock()
    self._n0 = self.n
    isatty = getattr(self.stream, "isatty", None)
    if not _lead():
      self.mode = "off"
    elif _in_notebook() or (isatty is not None and isatty()):
      self.mode = "bar"
      from tqdm import auto as tqdm_auto
      self.bar = tqdm_auto.tqdm(total=self.total, desc=desc, unit=unit, initial=self.n,
                                 file=self.stream, leave=False, dynamic_ncols=True)
    else:
      self.mode = "status" if self.every > 0 else "off"

  def update(self, n: int = 1, **figures):
    self.n += n
    figures = {k: v for k, v in figures.items() if v is not None}
    if figures:
      self.figures = " ".join(f"{k} {_number(v)}" for k, v in figures.items())
    if self.bar is not None:
      if figures:
        self.bar.set_postfix_str(self.figures, refresh=False)
      self.bar.update(n)
    elif self.mode == "status" and self.n < self.total:
      now = self.clock()
      if now - self._last >= self.every:
        self._last = now
        print(self.status_line(now), file=self.stream, flush=True)

  def status_line(self, now: Optional[float] = None) -> str:
    """'  desc: n/total unit (pct%), rate unit/s, elapsed, ETA ...[, figures]'."""
    elapsed = (self.clock() if now is None else now) - self._t0
    rate = (self.n - self._n0) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.n) / rate if rate > 0 else None
    pct = 100.0 * self.n / self.total if self.total else 100.0
    line = (f"  {self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%), "
            f"{rate:.3g} {self.unit}/s, {_duration(elapsed)} elapsed, ETA {_duration(eta)}")
    return line + (f", {self.figures}" if self.figures else "")

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
