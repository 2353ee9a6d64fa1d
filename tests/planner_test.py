"""The dry-run planner against arrays actually allocated (8 fake CPU devices).

Reference for bytes: the live TrainState that `train.state.create_state`
builds from `sharding.init_params_sharded` (sum of addressable shard bytes on
each device). Reference for FLOPs: `ModelConfig.train_flops_per_token`
(6N + causal attention); the step's matmuls must match it within 12% (the
model computes the full T x T attention and the analytic count halves it).
"""

import jax
import ml_collections
import pytest

from aya_jax import axes, optim, sharding
from aya_jax.models import config as model_config
from aya_jax.train import common
from aya_jax.train import planner
from aya_jax.train import state as state_lib

CFG = dict(d_model=64, d_ff=256, vocab_size=301, n_layers=4, n_heads=4, n_kv_heads=2,
           head_dim=16)


def _config(mesh_shape=(1, 4, 2), rules="fsdp_tp", opt_state="as_trained", layers=0):
  c = ml_collections.ConfigDict()
  c.stage, c.dry_run = "plan", True
  c.languages = ("en", "fr")
  c.model = common.model_block()
  c.model.preset = "tiny_cohere"
  c.sft = ml_collections.ConfigDict(dict(seq_len=32, batch_size=8, grad_accum=1))
  c.dpo = ml_collections.ConfigDict(dict(seq_len=32, batch_size=8, grad_accum=1, beta=0.1))
  c.optim = optim.default_optim_config()
  c.optim.weight_decay = 0.01
  c.mesh = sharding.mesh_block()
  c.mesh.shape, c.mesh.rules = mesh_shape, rules
  c.plan = planner.plan_block()
  c.plan.opt_state, c.plan.dry_run_layers = opt_state, layers
  return c


def _live_state_bytes(cfg, mesh, rules, config):
  params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, rules)
  tx = optim.make_optimizer(config.optim, params)
  st = state_lib.create_state(params, tx, jax.tree.map(lambda x: x.sharding, params))

  def per_device(tree):
    out = {}
    for x in jax.tree.leaves(tree):
      for s in x.addressable_shards:
        out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
    return max(out.values())
  return per_device(st.params), per_device(st.opt_state)


@pytest.mark.parametrize("mesh_shape,rules", [((1, 4, 2), "fsdp_tp"), ((2, 4, 1), "fsdp")])
def test_state_bytes_equal_allocated_arrays(mesh_shape, rules):
  config = _config(mesh_shape, rules)
  cfg = model_config.preset("tiny_cohere", **CFG)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:8])
  r = axes.rules(rules)
  p = planner.abstract_params(cfg, mesh, r)
  tx = optim.make_optimizer(config.optim, p)
  st, _ = planner.abstract_state(tx, p, "as_trained")
  live_params, live_opt = _live_state_bytes(cfg, mesh, r, config)
  assert planner.device_bytes(st.params) == live_params
  assert planner.device_bytes(st.opt_state) == live_opt
  # and the compiled step's arguments are exactly state + batch
  step = planner.compile_step(config, cfg, mesh, r, "sft")
  assert step["params"] == live_params and step["opt_state"] == live_opt
  assert step["argument"] == live_params + live_opt + step["batch"] + 4  # + the step counter


def test_sharded_opt_state_mirrors_params():
  config = _config()
  cfg = model_config.preset("tiny_cohere", **CFG)
  mesh = sharding.make_mesh((1, 4, 2), jax.devices()[:8])
  p = planner.abstract_params(cfg, mesh, axes.rules("fsdp_tp"))
  st, _ = planner.abstract_state(optim.make_optimizer(config.optim, p), p, "sharded")
  # Adam: mu and nu, each the params' size, f32, plus two scalar counters
  assert planner.device_bytes(st.opt_state) == 2 * planner.device_bytes(st.params) + 8


def test_flops_match_analytic_and_depth_extrapolation():
  config = _config(layers=0)
  cfg = model_config.preset("tiny_cohere", **CFG)
  mesh = sharding.make_mesh((1, 4, 2), jax.devices()[:8])
  r = axes.rules("fsdp_tp")
  full = planner.plan_step(config, cfg, mesh, r, "sft")
  assert full["matmul_flops"] == pytest.approx(full["analytic_flops"], rel=0.12)
  dpo = planner.plan_step(config, cfg, mesh, r, "dpo")
  assert dpo["tokens"] == 2 * full["tokens"]
  assert dpo["matmul_flops"] == pytest.approx(dpo["analytic_flops"], rel=0.12)
  config.plan.dry_run_layers = 1  # compile 1 and 2 layers, extrapolate to 4
  ext = planner.plan_step(config, cfg, mesh, r, "sft")
  assert ext["params"] == full["params"] and ext["opt_state"] == full["opt_state"]
  assert ext["matmul_flops"] == pytest.approx(full["matmul_flops"], rel=1e-6)
  assert ext["argument"] == pytest.approx(full["argument"], rel=0.01)


def test_report_says_whether_it_fits():
  config = _config()
  mesh = sharding.make_mesh((1, 4, 2), jax.devices()[:8])
  with config.unlocked():
    config.model.preset = "tiny_cohere"
  result = planner.plan(config)
  text = planner.format_report(result)
  assert "| v5p |" in text and "Verdict" in text and "v5e: fits" in text
  s = result["steps"]["sft"]
  v5e = next(p for p in s["predictions"] if p["accelerator"] == "v5e")
  t = s["matmul_flops"] / 8 / 197e12
  assert v5e["step_s"] >= t and 0 < v5e["mfu"] <= 1
  del mesh


def test_attention_chunk_reaches_the_model_and_cuts_temporaries():
  """model.attention_chunk goes into the planned ModelConfig; at T = 1024 the
  dense [heads, T, T] scores dominate the step's temporaries, the tiles do not."""
  temps = {}
  for chunk in (0, 128):
    config = _config(mesh_shape=(1, 8, 1), rules="fsdp")
    config.sft.seq_len, config.sft.batch_size = 1024, 8
    config.plan.steps = ("sft",)
    config.model.attention_chunk = chunk
    result = planner.plan(config)
    assert result["model"]["attention_chunk"] == chunk
    temps[chunk] = result["steps"]["sft"]["temp"]
  scores = 3 * 1024 * 1024 * 4  # one row's float32 [heads, T, T] on each device
  assert temps[0] > scores and temps[128] < temps[0] - scores, temps


def test_lora_plan_keeps_optimizer_state_for_the_adapters_only():
  """With the lora block the base is frozen (its bytes under 'frozen', no moments) and the
  DPO step has no reference copy: its arguments are the state and the batch (no cached
  log-probs); against the same step's live allocation."""
  from aya_jax.models import lora
  config = _config(mesh_shape=(2, 4, 1), rules="fsdp")
  config.lora = lora.lora_block()
  config.lora.rank = 2
  result = planner.plan(config)
  full = planner.plan(_config(mesh_shape=(2, 4, 1), rules="fsdp"))
  for kind in ("sft", "dpo"):
    s, f = result["steps"][kind], full["steps"][kind]
    assert s["frozen"] == f["params"]  # the whole base, sharded as in full fine-tuning
    assert 0 < s["params"] < f["params"] / 2  # rank 2 of a 32-wide toy
    assert s["opt_state"] == 2 * s["params"] + 8  # Adam's moments of the adapters only
    # the state (the toy's peak is its activations, which adapters add to; 8B: docs/lora.md)
    held = lambda r: r["params"] + r["frozen"] + r["opt_state"]
    assert held(s) < held(f)
  cfg = model_config.preset("tiny_cohere", lora=lora.from_block(config.lora))
  mesh = sharding.make_mesh((2, 4, 1), jax.devices()[:8])
  params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, axes.rules("fsdp"))
  adapters = params[lora.KEY]
  per = {}
  for x in jax.tree.leaves(adapters):
    for sh in x.addressable_shards:
      per[sh.device.id] = per.get(sh.device.id, 0) + sh.data.nbytes
  assert result["steps"]["sft"]["params"] == max(per.values())
  dpo = result["steps"]["dpo"]
  assert dpo["argument"] == dpo["params"] + dpo["frozen"] + dpo["opt_state"] + dpo["batch"] + 4
  assert "LoRA rank 2" in planner.format_report(result)
