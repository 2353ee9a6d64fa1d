"""What a run shows: warnings and the stages' own lines on the console, the whole log
in the workdir.

`setup(workdir, name, verbose)` (the entry point calls it) writes every log record
(absl INFO included, and third-party chatter: Orbax, grain, transformers) to
`workdir/logs/<name>.log` and keeps the console to WARNING and above; `verbose`
(absl's `--verbosity` given on the command line) brings INFO back to the console.
`step_log(log_dir, name)` adds `log_dir/<name>.log` for the duration of one
pipeline step. `report_failure` prints a failed run's error as the last console
lines, naming the step and the log file that holds the traceback.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
import traceback
from typing import Optional

from absl import logging

LOG_DIR = "logs"
_FORMAT = "%(levelname).1s%(asctime)s %(name)s %(filename)s:%(lineno)d] %(message)s"
# the run's log file (and its handler); the step that is running; the innermost step
# an error left
_state = {"file": None, "handler": None, "step": None, "failed": None}


def _file_handler(path: str) -> std_logging.Handler:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = std_logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(std_logging.DEBUG)
  handler.setFormatter(std_logging.Formatter(_FORMAT, "%m%d %H:%M:%S"))
  return handler


def quiet(verbose: bool = False):
  """The console at WARNING and above (INFO too when `verbose`)."""
  logging.get_absl_handler().setLevel(std_logging.NOTSET if verbose else std_logging.WARNING)


def setup(workdir: str, name: str, verbose: bool = False) -> str:
  """Logs of the run to workdir/logs/<name>.log; the console at WARNING unless `verbose`.
  Returns the log file's path."""
  close()
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
