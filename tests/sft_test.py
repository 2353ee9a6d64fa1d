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
  c.export_hf, c.export_hf_dtype = True, "float32"  # parity: the exact weights
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


# ------------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def hf_base(sft_data, tmp_path_factory):
  """A briefly trained tiny Llama exported as a HF directory: the base of the LoRA runs."""
  data, tok = sft_data
  d = tmp_path_factory.mktemp("base")
  c = _small(_config(), data, tok, steps=10)
  c.export_hf, c.export_hf_dtype = True, "float32"  # parity: the exact weights
  main.run_stage(c, str(d))
  return str(d / "hf")


def _lora(c, base, steps=40):
  c.model.init, c.lora.rank, c.lora.alpha = base, 4, 8.0
  c.optim.lr, c.optim.total_steps, c.loop.num_steps = 3e-2, steps, steps
  return c


def _arrays_paths(params_dir, sub="arrays"):
  import orbax.checkpoint as ocp
  meta = ocp.StandardCheckpointer().metadata(os.path.join(params_dir, sub))
  return sorted(jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(
      getattr(meta, "item_metadata", meta))[0])


def test_lora_sft_saves_adapters_naming_the_base_and_exports(sft_data, hf_base, tmp_path):
  import shutil

  import torch
  import transformers
  from peft import PeftModel
  from aya_jax.models import lora
  data, tok = sft_data
  base = str(tmp_path / "base")
  shutil.copytree(hf_base, base)
  c = _lora(_small(_config(), data, tok), base)
  c.export_hf, c.export_hf_dtype = True, "float32"  # parity: the exact weights
  main.run_stage(c, str(tmp_path / "run"))
  logged = read_metrics(str(tmp_path / "run"))
  assert logged[-1]["loss"] < logged[0]["loss"] - 0.2, logged
  params_dir = str(tmp_path / "run" / "params")
  # only the adapters are saved, with the base's path and hash
  assert all(p.startswith("['lora']") for p in _arrays_paths(params_dir))
  assert json.load(open(os.path.join(params_dir, "base.json")))["path"] == base
  raw_cfg, own = checkpoint.load_params(params_dir)
  assert raw_cfg.lora.rank == 4
  _, base_params = checkpoint.load_model(base)
  prompt = np.asarray([[5, 9, 14, 3, 22, 7, 31]])
  adapted = np.asarray(forward(raw_cfg, {**base_params, **own}, prompt))
  # load_model gives the merged model, the same function
  cfg, merged = checkpoint.load_model(params_dir)
  assert cfg.lora is None and lora.KEY not in merged
  np.testing.assert_allclose(np.asarray(forward(cfg, merged, prompt)), adapted, atol=1e-5)
  # hf/: the merged model in transformers; peft/: the adapter in peft on the base
  with torch.no_grad():
    t = torch.tensor(prompt)
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "run" / "hf"))(t).logits.numpy()
    with_peft = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base),
        str(tmp_path / "run" / "peft")).eval()(t).logits.numpy()
  np.testing.assert_allclose(merged_hf, adapted, atol=1e-4)
  np.testing.assert_allclose(with_peft, adapted, atol=1e-4)
  # a changed base is refused, naming it; a moved one too
  with open(os.path.join(base, "config.json"), "a") as f:
    f.write("\n")
  with pytest.raises(ValueError, match=f"trained on another {base}"):
    checkpoint.load_model(params_dir)
  shutil.rmtree(base)
  with pytest.raises(FileNotFoundError, match="not there"):
    checkpoint.load_model(params_dir)


def _lora_trainer(sft_data, base, workdir, stop_after=None):
  """A LoRA SFT run of 20 steps through the one loop (stoppable like a killed job)."""
  from aya_jax import axes, sharding
  from aya_jax.data import pipeline
  from aya_jax.train import common, loop, steps
  data, tok_dir = sft_data
  c = _lora(_small(_config(), data, tok_dir, steps=20), base, steps=20)
  tok = formatting.load_tokenizer(tok_dir)
  mesh, rules = sharding.make_mesh((2, 4, 1)), axes.rules("fsdp")
  cfg, params = common.setup_model(c.model, len(tok), mesh, rules, 0, c.lora)
  st, fn = common.make_trainer(c, cfg, params, steps.sft_loss_fn(cfg), mesh, rules)
  batches, _ = pipeline.make_sft_iterator([data], tok, seq_len=48, global_batch_size=8, seed=0,
                                            num_epochs=None)
  example = {k: np.zeros((8, 48), np.int32) for k in pipeline.KEYS}
  step = common.jit_for(fn, st, example, mesh)
  with sharding.activation_rules(mesh, rules):
    st = loop.train_loop(st, step, batches, c.loop, workdir, mesh, stop_after=stop_after)
  return jax.device_get(st.model_params())


def test_lora_sft_resumes_exactly_without_the_base_in_checkpoints(sft_data, hf_base, tmp_path):
  from aya_jax.train import loop
  full = _lora_trainer(sft_data, hf_base, str(tmp_path / "full"))
  with pytest.raises(loop.Preempted):
    _lora_trainer(sft_data, hf_base, str(tmp_path / "killed"), stop_after=7)
  # the train checkpoint holds the adapters and their optimizer state, not the base
  paths = _arrays_paths(str(tmp_path / "killed" / "checkpoints" / "7"), "state")
  assert any("lora" in p for p in paths)
  assert not any("embedder" in p or "['kernel']" in p for p in paths), paths
  resumed = _lora_trainer(sft_data, hf_base, str(tmp_path / "killed"))
  jax.tree.map(np.testing.assert_array_equal, full, resumed)


def test_molora_sft_checkpoint_keeps_the_experts(sft_data, hf_base, tmp_path):
  """MoLoRA trains like LoRA; its checkpoint loads as the base with the experts (no merged
  form), and a merge or a new adapter on top of it is refused, naming why."""
  from aya_jax.models import lora
  data, tok = sft_data
  c = _lora(_small(_config(), data, tok), hf_base, steps=20)
  c.lora.experts = 3
  main.run_stage(c, str(tmp_path / "molora"))
  logged = read_metrics(str(tmp_path / "molora"))
  assert logged[-1]["loss"] < logged[0]["loss"] - 0.1, logged
  params_dir = str(tmp_path / "molora" / "params")
  cfg, params = checkpoint.load_model(params_dir)
  assert cfg.lora.experts == 3 and checkpoint.peek_config(params_dir) == cfg
  router = lora.adapted_paths(params)["layers/attn/q"]["router"]
  assert router.shape == (2, 48, 3)
  raw_cfg, own = checkpoint.load_params(params_dir)
  _, base = checkpoint.load_model(hf_base)
  prompt = np.asarray([[5, 9, 14, 3, 22, 7, 31]])
  np.testing.assert_allclose(np.asarray(forward(cfg, params, prompt)),
                             np.asarray(forward(raw_cfg, {**base, **own}, prompt)), atol=1e-6)
  with pytest.raises(ValueError, match="MoLoRA"):
    checkpoint.open_reader(params_dir)  # a streaming merge reads merged weights
  c2 = _lora(_small(_config(), data, tok), params_dir, steps=2)
  with pytest.raises(ValueError, match="MoLoRA"):
    main.run_stage(c2, str(tmp_path / "again"))
