"""The SFT stage end to end: JSONL -> packed batches -> training -> params/ and HF export."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from aya_jax import checkpoint, main
from aya_jax.data import formatting
from aya_jax.metrics import read_metrics
from aya_jax.models import forward

import importlib.util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _config():
  spec = importlib.util.spec_from_file_location("sft_cfg", os.path.join(ROOT, "configs/sft.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
  d = tmp_path_factory.mktemp("sft")
  rows = []
  for i in range(40):
    a = WORDS[i % 10]
    rows.append({"id": f"ex{i}", "language": "en", "messages": [
        {"role": "user", "content": f"what comes after {a}?"},
        {"role": "assistant", "content": WORDS[(i + 1) % 10]}]})
  path = d / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  corpus = [m["content"] for r in rows for m in r["messages"]] * 3
  tok_dir = d / "tok"
  formatting.train_tokenizer(corpus, str(tok_dir), vocab_size=300)
  return str(path), str(tok_dir)


def _small(c, data, tok, steps=30):
  c.tokenizer = tok
  c.data.train = (data,)
  c.data.seq_len, c.data.batch_size = 48, 8
  c.model.preset = "tiny_llama"
  c.optim.lr, c.optim.warmup_steps, c.optim.total_steps = 1e-2, 3, steps
  c.loop.num_steps, c.loop.log_every, c.loop.checkpoint_every = steps, 10, 15
  c.mesh.shape = (2, 4, 1)
  return c


def test_sft_stage_learns_and_exports(sft_data, tmp_path):
  data, tok = sft_data
  c = _small(_config(), data, tok)
  c.export_hf = True
  main.run_stage(c, str(tmp_path))
  logged = read_metrics(str(tmp_path))
  assert logged[0]["loss"] > 2 * logged[-1]["loss"], logged
  cfg, params = checkpoint.load_model(str(tmp_path / "params"))
  # the trained model answers the memorised fact greedily
  t = formatting.load_tokenizer(tok)
  prompt = formatting.tokenize_prompt(t, [{"role": "user", "content": "what comes after four?"}])
  logits = forward(cfg, params, np.asarray(prompt)[None])
  assert t.decode([int(np.argmax(logits[0, -1]))]).strip().startswith("f")  # 'five'
  # the HF export loads in transformers with the same logits
  import torch
  import transformers
  m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
  with torch.no_grad():
    ref = m(torch.tensor(np.asarray(prompt)[None], dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_cli_rejects_typo_and_names_valid_fields(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "aya_jax.main", "--config=configs/sft.py",
       f"--workdir={tmp_path}", "--config.optim.lrr=3"], cwd=ROOT, capture_output=True,
      text=True)
  assert out.returncode != 0
  assert "lrr" in out.stderr and "warmup_steps" in out.stderr


def test_cli_unknown_stage_lists_known(sft_data, tmp_path):
  c = _config()
  with c.unlocked():
    c.stage = "nope"
  with pytest.raises(ValueError, match="known: .*sft"):
    main.run_stage(c, str(tmp_path))


def test_missing_tokenizer_is_a_clear_error(tmp_path):
  c = _config()
  c.data.train = ("x.jsonl",)
  with pytest.raises(ValueError, match="config.tokenizer"):
    main.run_stage(c, str(tmp_path))
