"""The SFT stage end to end: JSONL -> packed batches -> training -> params/ and HF export."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from aya_jax import checkpoint, config_files, main
from aya_jax.data import formatting
from aya_jax.metrics import read_metrics
from aya_jax.models import forward


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _config():
  mod = config_files.load_module(os.path.join(ROOT, "configs/sft.py"))
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
  c = _small(_config(), data, tok, steps=60)
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


def _cli(workdir, data, tok, extra=()):
  return [sys.executable, "-m", "aya_jax.main", "--config=configs/sft.py", f"--workdir={workdir}",
          f"--config.tokenizer={tok}", f"--config.data.train=('{data}',)",
          "--config.data.seq_len=48", "--config.data.batch_size=8",
          "--config.model.preset=tiny_llama", "--config.optim.total_steps=40",
          "--config.loop.num_steps=40", "--config.loop.checkpoint_every=10",
          "--config.loop.log_every=5", "--config.loop.eval_every=0", *extra]


@pytest.mark.slow
def test_hard_kill_between_checkpoints_resumes_to_the_same_params(sft_data, tmp_path):
  import time
  data, tok = sft_data
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  ref = tmp_path / "ref"
  subprocess.run(_cli(ref, data, tok), cwd=ROOT, env=env, check=True, capture_output=True)
  run = tmp_path / "run"
  proc = subprocess.Popen(_cli(run, data, tok), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  marker = run / "checkpoints" / "10" / "commit_success.txt"
  deadline = time.time() + 240
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)  # a few steps past the checkpoint, before the next one
  proc.kill()  # SIGKILL: no handler runs
  proc.wait()
  steps_done = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps_done < 40, "the run finished before it was killed; the test proves nothing"
  subprocess.run(_cli(run, data, tok), cwd=ROOT, env=env, check=True, capture_output=True)
  _, p_ref = checkpoint.load_model(str(ref / "params"))
  _, p_run = checkpoint.load_model(str(run / "params"))
  jax.tree.map(np.testing.assert_array_equal, p_ref, p_run)
  # the same data order: the logged losses after the resume point are identical
  log_ref = {m["step"]: m["loss"] for m in read_metrics(str(ref)) if "loss" in m}
  log_run = {m["step"]: m["loss"] for m in read_metrics(str(run)) if "loss" in m}
  for s in range(20, 41, 5):
    assert log_ref[s] == log_run[s]


def test_packed_and_padded_batches_give_the_same_per_example_loss(sft_data):
  from aya_jax.data import pipeline
  from aya_jax.models import init_params, tiny
  data, tok_dir = sft_data
  tok = formatting.load_tokenizer(tok_dir)
  cfg = tiny("llama", vocab_size=len(tok))
  params = init_params(cfg, jax.random.key(0))
  totals = []
  for pack in (True, False):
    it, _ = pipeline.make_sft_iterator(data, tok, seq_len=64, global_batch_size=8, seed=3,
                                       pack=pack, num_epochs=1)
    nll = 0.0
    for b in it:
      logits = forward(cfg, params, b["tokens"], b["positions"], b["segment_ids"])
      logp = jax.nn.log_softmax(logits)
      picked = np.take_along_axis(np.asarray(logp), b["targets"][..., None], -1)[..., 0]
      nll += float(-(picked * b["loss_mask"]).sum())
    totals.append(nll)
  np.testing.assert_allclose(totals[0], totals[1], rtol=1e-5)


def test_model_smaller_than_tokenizer_is_rejected(sft_data, tmp_path):
  from aya_jax.models import init_params, tiny
  data, tok = sft_data
  small = tiny("llama", vocab_size=50)
  checkpoint.save_params(str(tmp_path / "small"), small, init_params(small, jax.random.key(0)))
  c = _small(_config(), data, tok, steps=2)
  c.model.init = str(tmp_path / "small")
  with pytest.raises(ValueError, match="vocab 50 but the tokenizer"):
    main.run_stage(c, str(tmp_path / "w"))


def test_params_restore_into_a_different_mesh(tmp_path):
  from aya_jax import axes, sharding
  from aya_jax.models import tiny
  cfg = tiny("qwen2", n_heads=4, n_kv_heads=2, vocab_size=96)
  mesh_a = sharding.make_mesh((1, 8, 1))
  params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh_a, axes.rules("fsdp"))
  checkpoint.save_params(str(tmp_path / "p"), cfg, params)
  mesh_b = sharding.make_mesh((2, 2, 2))
  sh_b = sharding.param_shardings(cfg, mesh_b, axes.rules("fsdp_tp"))
  _, restored = checkpoint.load_params(str(tmp_path / "p"), sh_b)
  q = restored["layers"]["attn"]["q"]["kernel"]
  assert q.sharding == sh_b["layers"]["attn"]["q"]["kernel"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, restored)


def test_model_block_execution_fields_reach_the_model(tmp_path):
  from aya_jax import axes, sharding
  from aya_jax.train import common
  mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  m = common.model_block()
  m.update(dict(preset="tiny_llama", remat="full", attention_chunk=4))
  cfg, params = common.setup_model(m, 256, mesh, axes.rules("fsdp"), 0)
  assert (cfg.remat, cfg.attention_chunk, cfg.vocab_size) == ("full", 4, 256)
  path = checkpoint.save_params(str(tmp_path / "params"), cfg, params)
  m.update(dict(init=path, remat="none", attention_chunk=8))
  cfg2, _ = common.setup_model(m, 256, mesh, axes.rules("fsdp"), 0)
  assert (cfg2.remat, cfg2.attention_chunk) == ("none", 8)
