"""What a run shows: a quiet console (the steps, warnings, the table), the whole log in
workdir/logs/, and a failure as the last lines naming its step and log file."""

import io
import os
import re
import subprocess
import sys

import pytest
from absl import logging

from aya_jax import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO_LINE = re.compile(r"^I\d{4} \d\d:\d\d:\d\d")  # absl's INFO prefix
STEPS = ("world", "reward_model", "arbitrage", "sft_single", "sft_mixed", "sft_merged",
         "dpo_merged", "online", "rloo", "eval")


def _main(*args, env=None):
  return subprocess.run([sys.executable, "-m", "aya_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_smoke_pipeline_console_is_short_and_the_logs_are_whole(tmp_path):
  run = _main("--config=configs/pipeline.py:smoke", f"--workdir={tmp_path}")
  assert run.returncode == 0, run.stderr[-2000:]
  lines = (run.stdout + run.stderr).splitlines()
  assert len(lines) < 60, "\n".join(lines)
  assert not [l for l in lines if INFO_LINE.match(l)]
  done = {m[1]: m[2] for m in (re.fullmatch(r"\[pipeline\] (\S+) done in \d+s(?:: (.+))?", l)
                               for l in lines) if m}
  assert set(STEPS) <= set(done), "\n".join(lines)
  # each with its headline figure
  assert re.fullmatch(r"loss \S+", done["sft_single"]), done
  assert re.fullmatch(r"valid accuracy \S+, loss \S+", done["reward_model"]), done
  assert re.fullmatch(r"\d+ of \d+ prompts routed, \d+ pairs", done["arbitrage"]), done
  assert re.fullmatch(r"mean reward \S+ -> \S+ after 2 iterations", done["online"]), done
  assert re.fullmatch(r"best \w+: win rate \S+ vs sft_single", done["eval"]), done
  assert any(l.startswith("| stage |") for l in lines) and "| rloo |" in run.stdout
  logs = tmp_path / "logs"
  for step in STEPS:
    assert (logs / f"{step}.log").stat().st_size > 0, step
  pipeline_log = (logs / "pipeline.log").read_text()
  assert sum(bool(INFO_LINE.match(l)) for l in pipeline_log.splitlines()) > 100
  assert "CheckpointManager" in (logs / "sft_single.log").read_text()  # Orbax: in the log


def test_a_failing_stage_ends_the_console_with_its_error_and_log_file(tmp_path):
  config = ["--config=configs/merge.py", f"--workdir={tmp_path}",
            "--config.merge.models=('/nonexistent/a', '/nonexistent/b')"]
  run = _main(*config)
  assert run.returncode == 1
  last = run.stderr.strip().splitlines()[-1]
  log = tmp_path / "logs" / "merge.log"
  assert last.startswith("error: ") and "/nonexistent/a" in last and f"traceback: {log}" in last
  assert "Traceback (most recent call last)" in log.read_text()
  assert not [l for l in run.stderr.splitlines() if INFO_LINE.match(l)]
  # --verbosity brings the INFO lines back to the console
  verbose = _main(*config, "--verbosity=0")
  assert [l for l in verbose.stderr.splitlines() if INFO_LINE.match(l)]


def test_step_logs_and_the_failing_step_in_process(tmp_path):
  path = console.setup(str(tmp_path), "pipeline")
  try:
    with pytest.raises(ValueError):
      with console.step_log(str(tmp_path / "logs"), "dpo_x"):
        logging.info("inside the step")
        raise ValueError("boom")
    stream = io.StringIO()
    text = console.report_failure(ValueError("boom"), stream)
    assert text == f"error in step dpo_x: ValueError: boom (traceback: {path})"
    assert stream.getvalue().strip() == text
  finally:
    console.close()
  assert "inside the step" in (tmp_path / "logs" / "dpo_x.log").read_text()
  assert "inside the step" in open(path).read()  # the run's log holds every step's lines
  assert console.failing_step() is None  # closed: the next run starts clean


# ------------------------------------------------------------------------ progress


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_off_a_terminal_a_status_line_every_interval_with_rate_and_eta():
  clock, stream = _Clock(), io.StringIO()
  progress = console.Progress(300, "sft_single", unit="step", initial=60, stream=stream,
                              clock=clock, status_seconds=30)
  clock.now += 20
  progress.update(40, loss=0.5)  # 20 s: under the interval, nothing yet
  assert stream.getvalue() == ""
  clock.now += 20
  progress.update(40, loss=0.25)  # 140: 80 steps in 40 s, 2 steps/s, 160 left: 80 s
  assert stream.getvalue() == ("  sft_single: 140/300 step (47%), 2 step/s, 40s elapsed, "
                               "ETA 1m20s, loss 0.25\n")
  clock.now += 10
  progress.update(20)  # 10 s after the last line: quiet
  clock.now += 3700
  progress.update(140)  # 300, the last unit: the step's 'done' line says the rest
  assert stream.getvalue().count("\n") == 1
  assert console.Progress(5, "x", stream=io.StringIO(), status_seconds=0).mode == "off"


def test_on_a_terminal_a_tqdm_bar():
  stream = _Terminal()
  with console.Progress(10, "teacher european", unit="sample", stream=stream) as progress:
    assert progress.mode == "bar"
    for _ in range(10):
      progress.update(1, loss=None)  # None figures are left out
    shown = str(progress.bar)  # what the bar draws (tqdm redraws at most 10 times a second)
    assert shown.startswith("teacher european: 100%") and "10/10" in shown
    assert "sample/s" in shown and "loss" not in shown
  assert stream.getvalue().startswith("\rteacher european:   0%")
  assert progress.bar is None  # closed


def test_the_status_interval_comes_from_setup(tmp_path):
  console.setup(str(tmp_path), "x", status_seconds=7)
  try:
    assert console.Progress(3, "x", stream=io.StringIO()).every == 7
    with pytest.raises(ValueError, match="status_seconds=-1"):
      console.setup(str(tmp_path), "x", status_seconds=-1)
  finally:
    console.close()
