"""The Colab notebooks: valid nbformat 4 JSON, an install first cell, and
every code cell compiles (IPython `!`/`%` lines skipped). They are not
executed here (the quickstart trains models for minutes)."""

import glob
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "*.ipynb")))


def _source(cell) -> str:
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def test_the_three_notebooks_exist():
  assert [os.path.basename(p) for p in NOTEBOOKS] == [
      "01_quickstart.ipynb", "02_hf_model_sample_and_score.ipynb", "03_merge.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_valid_and_compiles(path):
  with open(path) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python"
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code, path
  first = _source(code[0])
  assert "pip" in first and "install" in first and "-e" in first, "first code cell installs"
  for i, cell in enumerate(code):
    assert cell["outputs"] == [] and cell["execution_count"] is None
    src = "\n".join(l for l in _source(cell).splitlines()
                    if not l.lstrip().startswith(("!", "%")))
    compile(src, f"{os.path.basename(path)}[code cell {i}]", "exec")
  # they only import aya_jax (plus the standard library, jax and numpy)
  imports = {name.strip().split(".")[0].split()[0]
             for c in code for l in _source(c).splitlines()
             if l.startswith(("import ", "from "))
             for name in (l.split()[1:2] if l.startswith("from ") else l[7:].split(","))}
  assert imports <= {"aya_jax", "jax", "numpy", "os", "subprocess", "sys", "glob",
                     "importlib"}, imports
