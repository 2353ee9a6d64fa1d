"""The step cache: a finished step is skipped, a changed one reruns; recorded paths are
relative (a copied or moved workdir reads its own files); missing outputs and a torn state
file make a step stale; only process 0 writes."""

import json
import os
import shutil

import jax
import pytest

from aya_jax import artifacts
from aya_jax.data import atomic


def test_runner_skips_a_finished_step_and_reruns_a_changed_one(tmp_path):
  r = artifacts.Runner(str(tmp_path))
  calls = []
  fn = lambda d: calls.append(d) or {"x": len(calls)}
  assert r.step("a", {"k": 1}, fn)[0] == {"x": 1}
  r2 = artifacts.Runner(str(tmp_path))  # a new process reads pipeline_state.json
  assert r2.step("a", {"k": 1}, fn)[0] == {"x": 1} and len(calls) == 1
  assert r2.step("a", {"k": 2}, fn)[0] == {"x": 2} and r2.ran == ["a"]


def test_runner_on_other_processes_runs_steps_but_leaves_the_workdir_to_process_0(
    tmp_path, monkeypatch):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "leftover").write_text("another spec's")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  r = artifacts.Runner(str(tmp_path))
  assert r.step("a", {"k": 1}, lambda d: {"dir": d})[0] == {"dir": str(tmp_path / "a")}
  # process 0 cleans, marks and records; process 1 only runs the step (and keeps its state)
  assert (tmp_path / "a" / "leftover").exists() and not (tmp_path / "a" / ".spec").exists()
  assert not (tmp_path / artifacts.STATE).exists() and r.ran == ["a"]
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  r0 = artifacts.Runner(str(tmp_path))
  r0.step("a", {"k": 1}, lambda d: {"n": len(os.listdir(d))})
  assert not (tmp_path / "a" / "leftover").exists() and (tmp_path / artifacts.STATE).exists()


def _make(d, *names):
  for name in names:
    os.makedirs(os.path.dirname(os.path.join(d, name)), exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
      f.write(d)
  return {"params": os.path.join(d, "params"), "files": [os.path.join(d, n) for n in names],
          "note": "not a path", "none": ""}


def test_state_paths_are_relative_so_a_copy_reads_its_own_files(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  r = artifacts.Runner(a)
  out, _ = r.step("sft", {"k": 1}, lambda d: _make(d, "params/w", "data.jsonl"))
  stored = json.load(open(os.path.join(a, artifacts.STATE)))["sft"]["outputs"]
  assert stored == {"params": "./sft/params", "files": ["./sft/params/w", "./sft/data.jsonl"],
                    "note": "not a path", "none": ""}
  shutil.copytree(a, b)  # cp -a runs/a runs/b
  with open(os.path.join(b, "sft", "params", "w"), "w") as f:
    f.write("b's own")
  calls = []
  rb = artifacts.Runner(b)
  out_b, _ = rb.step("sft", {"k": 1}, lambda d: calls.append(d))
  assert calls == [] and out_b == {"params": os.path.join(b, "sft", "params"), "note": "not a path",
                                   "files": [os.path.join(b, "sft", "params", "w"),
                                             os.path.join(b, "sft", "data.jsonl")], "none": ""}
  # a changed value in b trains from b's files, never a's
  seen = []
  rb.step("dpo", {"k": 2}, lambda d: seen.append(open(os.path.join(out_b["params"], "w")).read()))
  assert seen == ["b's own"]


def test_a_moved_workdir_finds_its_recorded_files(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  artifacts.Runner(a).step("arbitrage", {"k": 1}, lambda d: dict(
      pairs=_make(d, "pairs_offline.jsonl")["files"][0], contrast=""))
  shutil.move(a, b)  # mv runs/a runs/b, then a changed DPO value
  arb, _ = artifacts.Runner(b).step("arbitrage", {"k": 1}, lambda d: pytest.fail("ran again"))
  assert arb["pairs"] == os.path.join(b, "arbitrage", "pairs_offline.jsonl")
  assert os.path.exists(arb["pairs"])


def test_a_step_whose_outputs_are_missing_runs_again(tmp_path, caplog):
  work = str(tmp_path / "w")
  calls = []
  fn = lambda d: calls.append(d) or _make(d, "params/w")  # noqa: E731
  artifacts.Runner(work).step("sft_merged", {"k": 1}, fn)
  shutil.rmtree(os.path.join(work, "sft_merged", "params"))
  r = artifacts.Runner(work)
  with caplog.at_level("WARNING"):
    out, _ = r.step("sft_merged", {"k": 1}, fn)
  assert len(calls) == 2 and r.ran == ["sft_merged"] and os.path.exists(out["files"][0])
  missing = os.path.join(work, "sft_merged", "params")
  assert f"sft_merged is recorded as done but its recorded output {missing} is missing" \
      in caplog.text
  # a state file from before paths were relative, copied: not trusted either
  state = json.load(open(os.path.join(work, artifacts.STATE)))
  state["sft_merged"]["outputs"]["params"] = "/elsewhere/runs/a/sft_merged/params"
  atomic.write_json(os.path.join(work, artifacts.STATE), state)
  artifacts.Runner(work).step("sft_merged", {"k": 1}, fn)
  assert len(calls) == 3


def test_a_torn_state_file_is_stale_and_steps_resume_in_place(tmp_path, caplog):
  work = str(tmp_path / "w")
  artifacts.Runner(work).step("sft", {"k": 1}, lambda d: _make(d, "params/w", "ckpt"))
  path = os.path.join(work, artifacts.STATE)
  with open(path, "r+") as f:
    f.truncate(30)
  with caplog.at_level("WARNING"):
    r = artifacts.Runner(work)
  assert r.state == {} and f"{path}: unreadable pipeline state" in caplog.text
  # the step runs again in its own directory: same spec, so its files stay (resume)
  left = []
  r.step("sft", {"k": 1}, lambda d: left.append(sorted(os.listdir(d))) or {})
  assert left == [[".spec", "ckpt", "params"]]
  assert json.load(open(path))["sft"]["outputs"] == {}
