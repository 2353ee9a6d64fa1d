r"""SFT train-step throughput: aya_jax vs Hugging Face transformers + torch.

Same model config (Llama family), batch, sequence length and optimizer
(AdamW, fp32) on the same machine in the same run; prints tokens/s, achieved
TFLOP/s (6N + attention FLOPs per token), MFU when the device's peak is known,
and the ratio ours / peer.

    python experiments/bench/train_step.py            # default: d=256, 4 layers
    python experiments/bench/train_step.py --d_model=1024 --n_layers=8 --vocab=32000

Also times the same step driven by the one train loop (`train_loop`, metrics
logged every --log_every steps): the loop's own tokens/s, median over its log
windows after the first (which holds the compilation). The gap to the bare
step is what the loop costs (host syncs, data, metrics).
"""

from __future__ import annotations

import time

from absl import app, flags

flags.DEFINE_integer("d_model", 256, "")
flags.DEFINE_integer("n_layers", 4, "")
flags.DEFINE_integer("vocab", 8192, "")
flags.DEFINE_integer("batch", 8, "")
flags.DEFINE_integer("seq", 256, "")
flags.DEFINE_integer("steps", 10, "")
flags.DEFINE_string("dtype", "float32", "compute dtype for ours (float32 | bfloat16)")
flags.DEFINE_integer("log_every", 10, "the loop's metric window (steps)")
flags.DEFINE_integer("loop_windows", 5, "log windows timed through the loop (plus one warm-up)")
FLAGS = flags.FLAGS


def _setup(cfg, batch, seq):
  import jax
  import numpy as np
  import optax
  from aya_jax import axes, sharding
  from aya_jax.train import state as state_lib
  from aya_jax.train import steps as steps_lib
  mesh = sharding.make_mesh((-1, 1, 1))
  params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, axes.rules("fsdp"))
  tx = optax.adamw(1e-4)
  st = state_lib.create_state(params, tx, jax.tree.map(lambda x: x.sharding, params))
  toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  b = dict(tokens=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((batch, seq), np.int32),
           segment_ids=np.ones((batch, seq), np.int32),
           positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)))
  gb = sharding.global_batch(b, mesh)
  fn = steps_lib.make_train_step(steps_lib.sft_loss_fn(cfg), tx, steps_lib.loss_token_count)
  fn = steps_lib.jit_step(fn, state_lib.state_shardings(st),
                          jax.tree.map(lambda x: x.sharding, gb), mesh)
  return st, fn, b, mesh


def ours(cfg, batch, seq, steps):
  import jax
  from aya_jax import sharding
  st, fn, b, mesh = _setup(cfg, batch, seq)
  gb = sharding.global_batch(b, mesh)
  t0 = time.perf_counter()
  st, m = fn(st, gb, jax.random.key(0))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(steps):
    st, m = fn(st, gb, jax.random.key(i))
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / steps, compile_s


def through_loop(cfg, batch, seq, log_every, windows):
  """tokens/s the train loop reports: median over its log windows after the first."""
  import tempfile
  import numpy as np
  from aya_jax.metrics import read_metrics
  from aya_jax.train import loop as loop_lib
  st, fn, b, mesh = _setup(cfg, batch, seq)

  class Repeat:
    def __next__(self):
      return b

  lc = loop_lib.default_loop_config()
  lc.num_steps, lc.log_every = log_every * (windows + 1), log_every
  lc.checkpoint_every = lc.num_steps  # one checkpoint, after the last window is logged
  with tempfile.TemporaryDirectory() as workdir:
    loop_lib.train_loop(st, fn, Repeat(), lc, workdir, mesh)
    rates = [m["tokens_per_s"] for m in read_metrics(f"{workdir}/metrics.jsonl")]
  return float(np.median(rates[1:]))


def peer(cfg, batch, seq, steps):
  import torch
  import transformers
  from aya_jax.models import hf_config
  torch.manual_seed(0)
  hcfg = transformers.LlamaConfig(**{k: v for k, v in hf_config.config_to_hf(cfg).items()
                                     if k not in ("architectures", "model_type")})
  model = transformers.LlamaForCausalLM(hcfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  toks = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
  inp, tgt = toks[:, :-1], toks[:, 1:]

  def step():
    logits = model(inp).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             tgt.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  step()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - t0) / steps


def main(argv):
  del argv
  import jax
  from aya_jax.accelerators import peak_tflops
  from aya_jax.models.config import tiny
  d = FLAGS.d_model
  cfg = tiny("llama", vocab_size=FLAGS.vocab, d_model=d, n_layers=FLAGS.n_layers,
             n_heads=max(1, d // 64), n_kv_heads=max(1, d // 128), head_dim=64,
             d_ff=int(8 * d / 3) // 64 * 64, max_seq_len=FLAGS.seq, dtype=FLAGS.dtype)
  tokens = FLAGS.batch * FLAGS.seq
  flops = cfg.train_flops_per_token(FLAGS.seq) * tokens
  ours_s, compile_s = ours(cfg, FLAGS.batch, FLAGS.seq, FLAGS.steps)
  loop_tps = through_loop(cfg, FLAGS.batch, FLAGS.seq, FLAGS.log_every, FLAGS.loop_windows)
  peer_s = peer(cfg, FLAGS.batch, FLAGS.seq, FLAGS.steps)
  peak = peak_tflops() * 1e12 * jax.device_count()
  dev = jax.devices()[0].device_kind
  print(f"\nSFT step, Llama d={d} L={cfg.n_layers} vocab={cfg.vocab_size} "
        f"({cfg.n_params / 1e6:.1f}M params), batch {FLAGS.batch}x{FLAGS.seq}, AdamW, "
        f"{FLAGS.dtype}; device: {dev} x{jax.device_count()}; our compile {compile_s:.1f}s")
  print("| | aya_jax | transformers+torch | ratio (ours/peer) |")
  print("|---|---|---|---|")
  print(f"| step time (ms) | {ours_s * 1e3:.1f} | {peer_s * 1e3:.1f} | {ours_s / peer_s:.2f} |")
  print(f"| tokens/s | {tokens / ours_s:.0f} | {tokens / peer_s:.0f} | {peer_s / ours_s:.2f} |")
  print(f"| tokens/s through train_loop (log every {FLAGS.log_every}) | {loop_tps:.0f} | – | – |")
  print(f"| TFLOP/s | {flops / ours_s / 1e12:.3f} | {flops / peer_s / 1e12:.3f} | "
        f"{peer_s / ours_s:.2f} |")
  if peak:
    print(f"| MFU | {flops / ours_s / peak:.1%} | {flops / peer_s / peak:.1%} | "
          f"{peer_s / ours_s:.2f} |")


if __name__ == "__main__":
  app.run(main)
