"""The Colab notebooks, checked and executed.

Static (fast): valid nbformat 4 JSON, an install first cell, a cell tagged 'parameters',
every code cell compiles (IPython `!`/`%` lines skipped), imports only aya_jax, jax, numpy
and the standard library.

Executed (slow, ~1.5 min on 2 cores: 01 ~70 s, 02 and 03 ~10 s each): all three top to
bottom with nbclient on a kernel of this Python, on CPU, sharing one tiny quickstart run:
01 runs the pipeline (the smoke sizes with 2 languages, no ablations, one online round)
into a workdir, 02 samples the teacher it exported as a HF dir and scores the answers with
its reward model, 03 merges its SFT models and scores every model per language. The test's
settings go into a cell inserted after each notebook's 'parameters' cell (papermill's
convention); the install cell skips pip because aya_jax is importable here. Real defaults
(what a Colab user runs) stay in the notebooks.
"""

import ast
import glob
import json
import os
import re
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
# configs/pipeline.py:smoke, smaller: one language family, no ablations, one online round
TINY_PIPELINE = {"world.languages": ("en", "fr"), "world.export_hf": True,
                 "ablations.mixed": False, "ablations.rloo": False, "online.online.iterations": 1}
RESULT = "__aya_test_result__"  # the line a probe cell prints, then JSON


def _source(cell) -> str:
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def _parameters_cell(nb) -> int:
  found = [i for i, c in enumerate(nb["cells"])
           if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(found) == 1, f"one cell tagged 'parameters', found {len(found)}"
  return found[0]


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
  assert nb["cells"][_parameters_cell(nb)]["cell_type"] == "code"
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
                     "importlib", "json"}, imports


# ---------------------------------------------------------------------------- executed


def _run(name: str, params: dict, probe: str, kernel: str) -> tuple[str, dict]:
  """Executes colab/<name> with `params` set after its parameters cell and `probe` (an
  expression of the notebook's variables) printed as JSON by an appended cell; returns
  (all stdout, the probe's value)."""
  import nbclient
  import nbformat
  nb = nbformat.read(os.path.join(REPO, "colab", name), as_version=4)
  i = _parameters_cell(nb)
  declared = {t.id for node in ast.parse(_source(nb.cells[i])).body
              if isinstance(node, ast.Assign) for t in node.targets}
  assert set(params) <= declared, f"{name}: {sorted(set(params) - declared)} not parameters"
  nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
      "# injected by tests/notebooks_test.py\n" +
      "".join(f"{k} = {v!r}\n" for k, v in params.items())))
  nb.cells.append(nbformat.v4.new_code_cell(
      f"import json\nprint({RESULT!r}, json.dumps({probe}))"))
  nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel,
                          resources={"metadata": {"path": REPO}}).execute()
  out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                for o in c.outputs if o.get("output_type") == "stream")
  assert RESULT in out, out[-2000:]
  return out, json.loads(out.split(RESULT, 1)[1].strip().splitlines()[0])


def _kernel(tmp_path, monkeypatch) -> str:
  """A kernelspec running ipykernel on this interpreter (the venv), 1 CPU device."""
  name = "aya-jax-test"
  spec = tmp_path / "jupyter" / "kernels" / name
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps(dict(
      argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      display_name=name, language="python")))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # conftest's 8 fake devices: not here
  return name


@pytest.mark.slow
def test_notebooks_run_top_to_bottom(tmp_path, monkeypatch):
  kernel = _kernel(tmp_path, monkeypatch)
  work = str(tmp_path / "quickstart")

  # 01: the pipeline, its report printed
  out, res = _run("01_quickstart.ipynb", dict(WORKDIR=work, OVERRIDES=TINY_PIPELINE),
                  "json.load(open(os.path.join(WORKDIR, 'report.json')))", kernel)
  assert res["languages"] == ["en", "fr"]
  assert {"sft_single", "sft_merged", "dpo_merged"} <= set(res["stages"])
  assert "# Pipeline report" in out and "| sft_merged |" in out
  # the console of a run: each step with its figure, progress bars (tqdm in a kernel),
  # the whole log in the workdir
  assert re.search(r"\[pipeline\] sft_single done in \d+s: loss ", out), out[-3000:]
  assert re.search(r"sft_single: +\d+%\|", out), out[-3000:]
  assert "CheckpointManager" in open(os.path.join(work, "logs", "pipeline.log")).read()

  # 02: the world's European teacher as a HF dir, scored by the quickstart's reward model
  hf_dir = os.path.join(work, "world", "teachers", "european", "hf")
  out, res = _run("02_hf_model_sample_and_score.ipynb", dict(
      HF_DIR=hf_dir, OUT_DIR=str(tmp_path / "roundtrip"), MAX_NEW_TOKENS=8,
      REWARD_MODEL=os.path.join(work, "reward_model", "params"),
      REWARD_TOKENIZER=os.path.join(work, "world", "tokenizer")),
      "dict(answers=len(answers), scores=[float(s) for s in scores], "
      "tokens=int(out.lengths.max()), scorer=type(scorer).__name__)", kernel)
  assert "round trip equal: True" in out
  assert res["answers"] == 2 and 1 <= res["tokens"] <= 8
  assert res["scorer"] == "RewardModelScorer"
  assert len(res["scores"]) == 2 and np.isfinite(res["scores"]).all()

  # 03: merges of the quickstart's SFT models, every model scored per language
  merge_out = str(tmp_path / "merges")
  out, res = _run("03_merge.ipynb", dict(WORKDIR=work, OUT=merge_out, N_PER_LANGUAGE=2,
                                         MAX_NEW_TOKENS=8),
                  "dict(inputs=inputs, scores=scores)", kernel)
  names = sorted(res["inputs"])  # sft_single, sft_european (and sft_mixed, its warm start)
  assert {"sft_single", "sft_european"} <= set(names) and "sft_merged" not in names
  assert sorted(res["scores"]) == sorted(names + ["merge_linear", "merge_ties"])
  for s in res["scores"].values():
    assert sorted(s) == ["en", "fr"] and all(0.0 <= v <= 1.0 for v in s.values())
  # the linear merge is the mean of the SFT models
  import jax
  from aya_jax import checkpoint
  trees = [checkpoint.load_params(p)[1] for p in res["inputs"].values()]
  _, linear = checkpoint.load_params(os.path.join(merge_out, "linear", "params"))
  for m, *xs in zip(*(jax.tree.leaves(t) for t in [linear] + trees)):
    np.testing.assert_allclose(np.asarray(m), np.mean([np.asarray(x) for x in xs], 0),
                               rtol=1e-6, atol=1e-6)
