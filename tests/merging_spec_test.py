"""Merge specs: YAML errors name the file and line; a missing YAML file is named."""

import os
import re
import sys

import numpy as np
import pytest

from aya_jax.merging import spec as merge_spec
from aya_jax.merging import stage as merge_stage


A = np.float32


def test_yaml_errors_name_the_file_and_line(tmp_path):
  yml = tmp_path / "bad.yml"
  yml.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 0.5\n"
                 "base_model: b\n")  # the flow mapping on line 4 is never closed
  with pytest.raises(ValueError, match=rf"^{re.escape(str(yml))}:5:\d+: merge YAML is not "
                     "valid YAML: while parsing a flow mapping"):
    merge_spec.spec_from_yaml(str(yml))
  yml.write_text("merge_method: nope\nmodels: [a]\n")
  with pytest.raises(ValueError, match=rf"^{re.escape(str(yml))}: unknown merge_method 'nope'"):
    merge_spec.spec_from_yaml(str(yml))
  with pytest.raises(ValueError, match=r"^<merge YAML text>:2:7: merge YAML is not valid"):
    merge_spec.spec_from_yaml("merge_method: [linear\nmodels: a\n")
  # a path that does not exist is named, not parsed as YAML text (which gave a string)
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import merge as merge_config
  config = merge_config.get_config()
  for missing in ("/nonexistent.yml", str(tmp_path / "merges/ties"), "ties.yaml"):
    config.merge.yaml = missing
    with pytest.raises(FileNotFoundError, match=f"merge YAML file '{re.escape(missing)}' does "
                       "not exist"):
      merge_stage.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
