r"""Dry-run planner: will this model train on that mesh, and how fast?

    python -m aya_jax.main --config=configs/aya_expanse_8b.py --config.dry_run=True \
      --workdir=runs/plan_8b

Nothing is allocated. For the configured model (e.g. Aya Expanse 8B: Cohere,
256k vocabulary, 8k context) and mesh (e.g. (1, 64, 1) = 64-way FSDP):

1. params are `jax.eval_shape`d and given their shardings
   (`sharding.param_shardings`); the train state's shardings are those the
   training code gives it (`train.state.create_state`, compiled abstractly),
   so the plan follows the code;
2. the SFT step (`steps.make_train_step` + `steps.sft_loss_fn`) and the DPO
   step (+ `dpo.dpo_loss_fn`, cached reference log-probs) are lowered and
   compiled for a fake mesh of CPU devices of the configured size;
3. per device it reports params and optimizer-state bytes (exact, from the
   shard shapes), batch bytes and compiled temporaries (activations,
   gradients, collectives' buffers: `compiled.memory_analysis()`);
4. FLOPs per step: the analytic 6N count (`ModelConfig.train_flops_per_token`,
   the MFU convention), the matmul FLOPs actually in the step (counted in
   the jaxpr, scans multiplied by their length, remat recompute included),
   and XLA's `cost_analysis()` (which counts a loop body once: shown as is);
5. for named accelerators (v5p, v5e, H100: published bf16 peak, HBM
   capacity and bandwidth, interconnect) a roofline step time
   max(compute, HBM traffic, FSDP/DP gradient and weight traffic) assuming
   perfect overlap, the MFU that implies, and whether the bytes fit in HBM.

Fake devices: the process needs `n` CPU devices before JAX starts its
backend. When the running process has fewer (main.py has already started
it), the planner re-runs itself in a child process (`python -m
aya_jax.train.planner CONFIG_JSON OUT_JSON`) with `jax_num_cpu_devices = n` and
JAX_PLATFORMS=cpu, and prints the child's report.

`plan.dry_run_layers = k` > 0 compiles slices of k and 2k layers instead of
the full depth and extrapolates every compiled byte count linearly to
n_layers (layers are scanned, so compile time barely depends on depth: the
full depth, k = 0, is the default and exact).

Caveats: XLA:CPU's buffer assignment and fusion differ from TPU/GPU (bf16
ops may be widened to f32 on CPU); temporaries are an estimate within tens
of percent, params and optimizer bytes are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aya_jax.accelerators import ACCELERATORS
from aya_jax.data import atomic

GB = 1e9
_CHILD_ENV = "AYA_PLANNER_CHILD"


def plan_block() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_devices = 0          # 0: the product of mesh.shape (which then may not hold -1)
  c.dry_run_layers = 0       # k > 0: compile k and 2k layers, extrapolate to n_layers
  c.steps = ("sft", "dpo")
  c.accelerators = ("v5p", "v5e", "h100")
  c.opt_state = "as_trained"  # as_trained (what train.state does) | sharded (like params)
  c.hbm_fraction = 0.9       # usable share of HBM (runtime, fragmentation)
  return c


# --------------------------------------------------------------- abstract state


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_params(cfg, mesh, rules):
  from aya_jax import sharding
  boxed = jax.eval_shape(sharding._boxed_init(cfg), jax.random.key(0))
  return _abstract(nn.meta.unbox(boxed), sharding.tree_shardings(boxed, mesh, rules))


def abstract_state(tx, params, mode: str = "as_trained"):
  """(abstract TrainState, its shardings), as `state.create_state` makes it (with LoRA
  adapters, the base goes to `frozen`: no optimizer state).

  Optimizer leaves that mirror a param take its sharding ('sharded' is kept
  as an alias of 'as_trained', which now does the same)."""
  from aya_jax.models import lora
  from aya_jax.train import state as state_lib
  params, frozen = lora.split(params)
  psh = jax.tree.map(lambda x: x.sharding, params)

  def init(p):
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

  shapes = jax.eval_shape(init, params)
  if mode not in ("as_trained", "sharded"):
    raise ValueError(f"plan.opt_state={mode!r}: expected 'as_trained' or 'sharded'")
  # create_state shards the optimizer state like the params (both modes agree)
  shardings = state_lib.state_shardings_for(tx, params, psh)
  fsh = jax.tree.map(lambda x: x.sharding, frozen)
  return (_abstract(shapes, shardings).replace(frozen=frozen), shardings.replace(frozen=fsh))


def device_bytes(tree) -> int:
  """Bytes of `tree` (abstract, sharded) on its fullest device."""
  per = {}
  for x in jax.tree.leaves(tree):
    shard = int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
    for d in x.sharding.device_set:
      per[d.id] = per.get(d.id, 0) + shard
  return max(per.values()) if per else 0


# ----------------------------------------------------------------- FLOPs


def matmul_flops(jaxpr) -> float:
  """2 * M * N * K over every dot_general, recursing into sub-jaxprs (scan
  bodies times their length, the larger branch of a cond, loops once)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      k = int(np.prod([eqn.invars[0].aval.shape[i] for i in lc]))
      total += 2.0 * int(np.prod(eqn.outvars[0].aval.shape)) * k
      continue
    subs = []
    for v in eqn.params.values():
      for item in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(item, jax.extend.core.ClosedJaxpr):
          subs.append(item.jaxpr)
        elif isinstance(item, jax.extend.core.Jaxpr):
          subs.append(item)
    counts = [matmul_flops(s) for s in subs]
    if name == "cond":
      total += max(counts, default=0.0)
    else:
      total += sum(counts) * (eqn.params.get("length", 1) if name == "scan" else 1)
  return total


# ------------------------------------------------------------------ steps


def _tx_and_step(config, cfg, params, kind: str):
  """(optimizer, step) of `kind` for the trained part of `params` (LoRA: the adapters;
  its DPO reference is the base with the adapters off, not cached log-probs)."""
  from aya_jax import optim
  from aya_jax.models import lora
  from aya_jax.train import dpo, steps
  block = config.sft if kind == "sft" else config.dpo
  ocfg = optim.optim_config_from(config.optim.to_dict())
  with ocfg.unlocked():
    ocfg.grad_accum = 1
  tx = optim.make_optimizer(ocfg, lora.split(params)[0])
  schedule = optim.make_schedule(ocfg)
  chunk = config.model.vocab_chunk
  if kind == "sft":
    fn = steps.make_train_step(steps.sft_loss_fn(cfg, chunk), tx, steps.loss_token_count,
                               block.grad_accum, schedule)
  else:
    dcfg = dpo.dpo_block()
    for key in ("beta", "loss_type", "label_smoothing", "average_logps", "rpo_alpha"):
      if key in block:
        dcfg[key] = block[key]
    ref = dpo.ADAPTERS_OFF if cfg.lora is not None else None
    loss = dpo.dpo_loss_fn(cfg, dcfg, tuple(config.languages), chunk, ref)
    fn = steps.make_train_step(loss, tx, dpo.pair_normalizer, block.grad_accum, schedule)
  return tx, fn


def _abstract_batch(kind: str, rows: int, seq_len: int, mesh, cached_reference=True,
                    scored=False):
  from aya_jax import sharding
  keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
  shapes = {k: ((rows, seq_len) if kind == "sft" else (rows, 2, seq_len), jnp.int32)
            for k in keys}
  if kind == "dpo":
    shapes.update(pair_mask=((rows,), jnp.int32), language=((rows,), jnp.int32))
    if scored:  # CoPG reads each pair's score margin
      shapes["score_margin"] = ((rows,), jnp.float32)
    if cached_reference:
      shapes["ref_logps"] = ((rows, 2), jnp.float32)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


def compile_step(config, cfg, mesh, rules, kind: str) -> dict:
  """Lowers and compiles one train step for `cfg` on `mesh`; its numbers."""
  from aya_jax import sharding
  block = config.sft if kind == "sft" else config.dpo
  params = abstract_params(cfg, mesh, rules)
  tx, fn = _tx_and_step(config, cfg, params, kind)
  state, ssh = abstract_state(tx, params, config.plan.opt_state)
  batch = _abstract_batch(kind, block.batch_size, block.seq_len, mesh, cfg.lora is None,
                          block.get("loss_type") == "copg")
  rep = sharding.replicated(mesh)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  bsh = jax.tree.map(lambda x: x.sharding, batch)
  t0 = time.time()
  with sharding.activation_rules(mesh, rules):
    jitted = jax.jit(fn, in_shardings=(ssh, bsh, rep), out_shardings=(ssh, rep),
                     donate_argnums=0)
    jaxpr = jax.make_jaxpr(fn)(state, batch, rng)
    compiled = jitted.lower(state, batch, rng).compile()
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(
      params=device_bytes(state.params), opt_state=device_bytes(state.opt_state),
      frozen=device_bytes(state.frozen), batch=device_bytes(batch),
      argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
      temp=mem.temp_size_in_bytes, xla_flops=float(cost.get("flops", 0.0)),
      xla_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      matmul_flops=matmul_flops(jaxpr.jaxpr), compile_s=seconds)


def _extrapolate(a: dict, b: dict, k: int, n: int) -> dict:
  """a at k layers, b at 2k: every number linear in depth, taken to n."""
  return {key: a[key] + (b[key] - a[key]) / k * (n - k) for key in a}


def plan_step(config, cfg, mesh, rules, kind: str) -> dict:
  k = int(config.plan.dry_run_layers)
  if k <= 0 or k >= cfg.n_layers:
    out = compile_step(config, cfg, mesh, rules, kind)
  else:
    a = compile_step(config, cfg.replace(n_layers=k), mesh, rules, kind)
    b = compile_step(config, cfg.replace(n_layers=2 * k), mesh, rules, kind)
    out = _extrapolate(a, b, k, cfg.n_layers)
    out["compile_s"] = a["compile_s"] + b["compile_s"]
    # exact, not extrapolated: the full model's abstract state
    full_p = abstract_params(cfg, mesh, rules)
    tx, _ = _tx_and_step(config, cfg, full_p, kind)
    state, _ = abstract_state(tx, full_p, config.plan.opt_state)
    out.update(params=device_bytes(state.params), opt_state=device_bytes(state.opt_state),
               frozen=device_bytes(state.frozen))
  block = config.sft if kind == "sft" else config.dpo
  rows = block.batch_size * (1 if kind == "sft" else 2)
  tokens = rows * block.seq_len
  out.update(kind=kind, tokens=tokens, seq_len=block.seq_len, batch_size=block.batch_size,
             analytic_flops=cfg.train_flops_per_token(block.seq_len) * tokens)
  out["peak_bytes"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


# ------------------------------------------------------------- predictions


def predict(step: dict, n_devices: int, accel: str, hbm_fraction: float,
            param_bytes_global: float, grad_traffic_factor: float) -> dict:
  a = ACCELERATORS[accel]
  link = a["link_gbps"]
  if n_devices > a.get("node_size", 10 ** 9):
    link = a["link_gbps_multinode"]
  t_compute = step["matmul_flops"] / n_devices / (a["tflops"] * 1e12)
  t_hbm = step["xla_bytes_accessed"] / (a["hbm_gbps"] * GB)
  t_comm = (grad_traffic_factor * param_bytes_global * (n_devices - 1) / n_devices
            / (link * GB)) if n_devices > 1 else 0.0
  t = max(t_compute, t_hbm, t_comm)
  bound = ("compute", "HBM", "interconnect")[int(np.argmax([t_compute, t_hbm, t_comm]))]
  mfu = step["analytic_flops"] / (n_devices * a["tflops"] * 1e12 * t) if t else 0.0
  capacity = a["hbm_gb"] * GB * hbm_fraction
  return dict(accelerator=accel, step_s=t, bound=bound, mfu=mfu,
              tokens_per_s=step["tokens"] / t if t else 0.0,
              fits=step["peak_bytes"] <= capacity, capacity=capacity)


def plan(config) -> dict:
  """The plan (needs the mesh's devices in this process)."""
  from aya_jax import axes, checkpoint, sharding
  from aya_jax.models import config as model_config
  from aya_jax.models import lora
  from aya_jax.train import common
  shape = tuple(config.mesh.shape)
  mesh = sharding.make_mesh(shape, jax.devices()[:num_devices(config)])
  rules = axes.rules(config.mesh.rules)
  m = config.model
  over = common.execution(m)
  if m.init and os.path.exists(m.init):
    cfg = checkpoint.peek_config(m.init).replace(**over)
  else:
    cfg = model_config.preset(m.preset, **over)
  cfg = cfg.replace(lora=lora.from_block(config.get("lora")))
  n = mesh.devices.size
  # what the gradients and the FSDP all-gathers move: the weights the step reads
  params_global = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                      for x in jax.tree.leaves(abstract_params(cfg, mesh, rules)))
  # weights all-gathered in forward and backward, gradients reduce-scattered
  # (FSDP) or all-reduced (2x, data parallel); nothing when params live whole
  sharded = mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1
  factor = 3.0 if sharded else 2.0
  result = dict(model=dict(cfg.to_dict(), n_params=cfg.n_params), mesh=dict(mesh.shape),
                n_devices=n, rules=config.mesh.rules, opt_state_mode=config.plan.opt_state,
                dry_run_layers=int(config.plan.dry_run_layers), steps={})
  for kind in config.plan.steps:
    step = plan_step(config, cfg, mesh, rules, kind)
    step["predictions"] = [predict(step, n, a, config.plan.hbm_fraction, params_global, factor)
                           for a in config.plan.accelerators]
    result["steps"][kind] = step
  return result


def num_devices(config) -> int:
  shape = tuple(config.mesh.shape)
  if config.plan.num_devices:
    return int(config.plan.num_devices)
  if -1 in shape:
    raise ValueError(f"mesh.shape={shape} holds -1: set plan.num_devices for a dry run")
  return int(np.prod(shape))


# ------------------------------------------------------------------ report


def _gb(x):
  return f"{x / GB:8.2f}"


def _lora_text(m: dict) -> str:
  ad = m.get("lora")
  if not ad:
    return ""
  kind = f"MoLoRA, {ad['experts']} experts" if ad["experts"] else "LoRA"
  return f", {kind} rank {ad['rank']} (adapters train, the base is frozen)"


def format_report(r: dict) -> str:
  m = r["model"]
  lines = [f"# Dry-run plan: {m['family']} d_model={m['d_model']} layers={m['n_layers']} "
           f"vocab={m['vocab_size']} ({m['n_params'] / 1e9:.2f}B params), dtype={m['dtype']} "
           f"remat={m['remat']} attention_chunk={m.get('attention_chunk', 0)}" + _lora_text(m),
           f"mesh {r['mesh']} = {r['n_devices']} devices, rules '{r['rules']}', "
           f"optimizer state '{r['opt_state_mode']}'" +
           (f", compiled {r['dry_run_layers']}- and {2 * r['dry_run_layers']}-layer slices "
            "extrapolated" if r["dry_run_layers"] else ", full depth compiled"), ""]
  for kind, s in r["steps"].items():
    unit = "sequences" if kind == "sft" else "pairs"
    lines += [f"## {kind.upper()} step: {s['batch_size']} {unit} x {s['seq_len']} tokens "
              f"= {s['tokens']} tokens/step (compile {s['compile_s']:.1f} s)", "",
              "| per device            |       GB |", "|---|---:|",
              f"| params (trained)      | {_gb(s['params'])} |",
              f"| base (frozen, LoRA)   | {_gb(s.get('frozen', 0))} |",
              f"| optimizer state       | {_gb(s['opt_state'])} |",
              f"| batch                 | {_gb(s['batch'])} |",
              f"| temporaries (XLA)     | {_gb(s['temp'])} |",
              f"| peak (args+out-alias+temp) | {_gb(s['peak_bytes'])} |", "",
              f"FLOPs/step: analytic 6N+attn {s['analytic_flops']:.3e}; matmuls in the step "
              f"{s['matmul_flops']:.3e} ({s['matmul_flops'] / s['analytic_flops']:.2f}x, remat "
              f"recompute and full T x T attention included); XLA cost_analysis per device "
              f"{s['xla_flops']:.3e} (loop bodies counted once)", "",
              "| accelerator | step s | bound | MFU | tokens/s | HBM GB (usable) | fits |",
              "|---|---:|---|---:|---:|---:|---|"]
    for p in s["predictions"]:
      lines.append(f"| {p['accelerator']} | {p['step_s']:.2f} | {p['bound']} | "
                   f"{100 * p['mfu']:.0f}% | {p['tokens_per_s']:,.0f} | "
                   f"{p['capacity'] / GB:.0f} | {'YES' if p['fits'] else 'NO'} |")
    lines.append("")
  verdicts = []
  for a in r["steps"][next(iter(r["steps"]))]["predictions"]:
    ok = all(next(p for p in s["predictions"] if p["accelerator"] == a["accelerator"])["fits"]
             for s in r["steps"].values())
    verdicts.append(f"{a['accelerator']}: {'fits' if ok else 'does NOT fit'}")
  lines.append("Verdict (every step, per device): " + "; ".join(verdicts))
  return "\n".join(lines)


# -------------------------------------------------------------------- stage


def _child(config_json: str, out_json: str):
  with open(config_json) as f:
    config = ml_collections.ConfigDict(json.load(f))
  result = plan(config)
  atomic.write_json(out_json, result, indent=1, default=str)


def run(config, workdir: str) -> dict:
  if not config.get("dry_run", False):
    raise ValueError(
        f"config.stage='{config.stage}' only plans (--config.dry_run=True); the real run is "
        "the stages in the config's docstring, each with this config's paths")
  os.makedirs(workdir, exist_ok=True)
  n = num_devices(config)
  out = os.path.join(workdir, "plan.json")
  if jax.device_count() >= n and jax.default_backend() == "cpu":
    result = plan(config)
    atomic.write_json(out, result, indent=1, default=str)
  else:
    if os.environ.get(_CHILD_ENV):
      raise RuntimeError(f"planner child has {jax.device_count()} devices, needs {n}")
    cfg_json = os.path.join(workdir, "plan_config.json")
    atomic.write_text(cfg_json, config.to_json_best_effort())
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n}").strip()
    subprocess.run([sys.executable, "-m", "aya_jax.train.planner", cfg_json, out], env=env,
                   check=True)
    with open(out) as f:
      result = json.load(f)
  report = format_report(result)
  atomic.write_text(os.path.join(workdir, "plan.md"), report + "\n")
  print(report, flush=True)
  return result


if __name__ == "__main__":
  with open(sys.argv[1]) as _f:
    _c = json.load(_f)
  # before anything touches a device: the fake CPU mesh of the plan
  jax.config.update("jax_num_cpu_devices",
                    int(_c["plan"]["num_devices"] or np.prod(_c["mesh"]["shape"])))
  _child(sys.argv[1], sys.argv[2])
