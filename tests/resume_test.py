"""Safe resumes: one run per workdir (a lock naming its holder) and the same training
config (fields compared relative to the workdir; cadence and mesh may change)."""

import json
import os

import pytest

from aya_jax.train import resume, sft


def test_second_lock_on_a_workdir_names_the_holder_and_release_frees_it(tmp_path):
  with resume.WorkdirLock(str(tmp_path)):
    assert open(tmp_path / ".lock").read() == str(os.getpid())
    with pytest.raises(resume.WorkdirInUse, match=f"{tmp_path}.*pid {os.getpid()}"):
      with resume.WorkdirLock(str(tmp_path)):
        pass
  with resume.WorkdirLock(str(tmp_path)):  # released: taken again
    pass


def test_check_config_records_then_refuses_a_changed_training_field(tmp_path):
  d = str(tmp_path)
  config = sft.default_config()
  config.optim.lr = 3e-3
  resume.check_config(d, config, has_checkpoint=False)  # a fresh run records its fields
  recorded = json.load(open(tmp_path / resume.CONFIG_FILE))
  assert recorded == resume.training_fields(config, d) and recorded["optim.lr"] == 3e-3
  other = sft.default_config()
  other.optim.lr = 1e-2
  with pytest.raises(resume.ConfigChanged, match=r"1 field\(s\) differ: optim.lr: 0.003 -> 0.01"):
    resume.check_config(d, other, has_checkpoint=True)
  resume.check_config(d, other, has_checkpoint=False)  # no checkpoint: nothing to protect
  assert json.load(open(tmp_path / resume.CONFIG_FILE))["optim.lr"] == 1e-2
  # cadence and mesh (RESUME_SAFE) may change; the override resumes anyway and re-records
  other.loop.num_steps, other.mesh.shape = 8, (1, 1, 1)
  resume.check_config(d, other, has_checkpoint=True)
  config.loop.allow_config_change = True
  resume.check_config(d, config, has_checkpoint=True)
  assert json.load(open(tmp_path / resume.CONFIG_FILE))["optim.lr"] == 3e-3
  (tmp_path / resume.CONFIG_FILE).write_text("{not json")
  with pytest.raises(resume.ConfigChanged, match="unreadable"):
    resume.check_config(d, other, has_checkpoint=True)


def test_training_fields_are_relative_to_the_workdir(tmp_path):
  """A workdir moved together with its inputs resumes: absolute paths are
  compared relative to it."""
  a, b = sft.default_config(), sft.default_config()
  a.tokenizer, a.data.train = str(tmp_path / "a" / "tok"), (str(tmp_path / "a" / "x.jsonl"),)
  b.tokenizer, b.data.train = str(tmp_path / "b" / "tok"), (str(tmp_path / "b" / "x.jsonl"),)
  fa = resume.training_fields(a, str(tmp_path / "a" / "sft"))
  assert fa == resume.training_fields(b, str(tmp_path / "b" / "sft"))
  assert fa["tokenizer"] == "../tok" and "loop.num_steps" not in fa and "optim.lr" in fa
