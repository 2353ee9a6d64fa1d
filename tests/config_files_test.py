"""Config files loaded by path: the `file.py:arg` syntax, sibling configs, the CLI's hints."""

import os
import subprocess
import sys

import pytest

from aya_jax import config_files

ROOT = os.path.join(os.path.dirname(__file__), "..")
PIPELINE = os.path.join(ROOT, "configs", "pipeline.py")


def test_path_arg_syntax_equals_calling_get_config_with_the_arg():
  smoke = config_files.get_config(PIPELINE + ":smoke")
  want = config_files.load_module(PIPELINE).get_config("smoke")
  assert smoke.to_dict() == want.to_dict()
  # the argument reached the config: smoke is the small variant
  assert smoke.to_dict() != config_files.get_config(PIPELINE).to_dict()


def test_sibling_config_demo_is_the_default_pipeline():
  demo = config_files.get_config(os.path.join(ROOT, "configs", "demo.py"))
  assert demo.to_dict() == config_files.sibling(PIPELINE, "pipeline.py").to_dict()


def test_32b_config_builds_on_the_8b_one():
  c8 = config_files.get_config(os.path.join(ROOT, "configs", "aya_expanse_8b.py"))
  c32 = config_files.get_config(os.path.join(ROOT, "configs", "aya_expanse_32b.py"))
  assert c32.model.preset == "aya_expanse_32b" and c8.model.preset != c32.model.preset
  assert c32.sft.batch_size == 256
  # its pipeline variant is the 8B pipeline with the 32B inputs, batch sizes and mesh
  p8 = config_files.get_config(os.path.join(ROOT, "configs", "aya_expanse_8b.py:pipeline"))
  p32 = config_files.get_config(os.path.join(ROOT, "configs", "aya_expanse_32b.py:pipeline"))
  assert p32.stage == p8.stage == "pipeline"
  assert p32.inputs.base == "/data/models/aya-expanse-32b" != p8.inputs.base
  assert (p32.sft.data.batch_size, p32.dpo.data.batch_size, tuple(p32.mesh.shape)) == \
      (256, 256, (1, 256, 1))
  assert p32.inputs.teachers == p8.inputs.teachers and p32.online.to_dict() == p8.online.to_dict()
  # every training block trains with the plan's AdamW (not the optimiser defaults)
  for block in (p8.sft, p8.sft_family, p8.dpo, p8.online, p32.sft, p32.dpo):
    assert (block.optim.weight_decay, block.optim.b2) == (0.01, 0.95)
  assert (p8.sft.optim.lr, p8.dpo.optim.lr) == (1e-5, 5e-7)
  # Aya's 23 languages, each in a family (English in all three)
  families = [set(f.split(":")[1].split(",")) for f in p8.inputs.families.split(";")]
  assert len(p8.inputs.languages) == 23 and set().union(*families) == set(p8.inputs.languages)
  assert sum(len(f) for f in families) == 23 + 2 and all("en" in f for f in families)
  with pytest.raises(ValueError, match="variants are"):
    config_files.get_config(os.path.join(ROOT, "configs", "aya_expanse_32b.py:typo"))


def test_missing_file_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_files.get_config(str(tmp_path / "nope.py"))


@pytest.mark.parametrize("flag", [["--config=configs/nope.py:smoke"],
                                  ["--config", "configs/nope.py"]])
def test_cli_names_a_config_file_that_does_not_exist_in_one_line(tmp_path, flag):
  out = subprocess.run([sys.executable, "-m", "aya_jax.main", *flag, f"--workdir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 1 and out.stdout == ""
  want = (f"error: --config={flag[-1].split('=')[-1]}: config file configs/nope.py does not "
          f"exist (looked for {os.path.abspath(os.path.join(ROOT, 'configs', 'nope.py'))})\n")
  assert out.stderr == want


def test_cli_hint_lists_the_valid_fields_of_a_misspelt_override():
  from aya_jax import main  # defines absl flags: imported once per process, here only
  hint = main._valid_keys_hint([f"--config={PIPELINE}:smoke", "--config.sft.loop.num_stepz=3"])
  assert "--config.sft.loop.num_stepz: config.sft.loop has no field 'num_stepz'" in hint
  assert "num_steps" in hint.split("valid fields:")[1]
