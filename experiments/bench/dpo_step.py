r"""DPO step time: ours (cached / live reference) vs our SFT step on the same
tokens vs a plain torch DPO step (HF transformers model, cached reference
log-probs, AdamW) on the same model and data, same machine, same run.

    .venv/bin/python experiments/bench/dpo_step.py [--pairs 8 --seq 128 --vocab 256]

Prints a table of ms/step (median of --iters after --warmup) and ratios.
Target: our cached-reference DPO step <= 1.2x our SFT step on the same
tokens (2 * pairs rows of seq tokens). TRL 1.16's DPOTrainer runs the same
torch computation (plus its data collation); it is not timed here.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from aya_jax import axes, sharding  # noqa: E402
from aya_jax.models import hf, tiny  # noqa: E402
from aya_jax.train import dpo, sft, steps  # noqa: E402


def _time(fn, warmup, iters):
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return 1e3 * float(np.median(ts))


def _batch(rng, pairs, seq, vocab):
  tokens = rng.integers(3, vocab, (pairs, 2, seq)).astype(np.int32)
  tokens[:, 1, :seq // 2] = tokens[:, 0, :seq // 2]  # shared prompt
  mask = np.zeros((pairs, 2, seq), np.int32)
  mask[:, :, seq // 2:-1] = 1
  targets = np.concatenate([tokens[..., 1:], np.zeros((pairs, 2, 1), np.int32)], -1)
  return dict(tokens=tokens, targets=targets, loss_mask=mask,
              segment_ids=np.ones_like(tokens), positions=np.broadcast_to(
                  np.arange(seq, dtype=np.int32), tokens.shape).copy(),
              pair_mask=np.ones(pairs, np.int32), language=np.zeros(pairs, np.int32),
              ref_logps=rng.normal(-100, 5, (pairs, 2)).astype(np.float32))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--pairs", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--iters", type=int, default=10)
  a = ap.parse_args()
  cfg = tiny("llama", vocab_size=a.vocab, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32,
             d_ff=256, n_layers=2, max_seq_len=max(256, a.seq))
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = axes.rules("fsdp")
  config = dpo.default_config()
  config.optim.lr, config.optim.warmup_steps = 1e-4, 0
  batch_np = _batch(np.random.default_rng(0), a.pairs, a.seq, a.vocab)
  params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, rules)
  host_params = jax.device_get(params)
  rng = jax.random.key(1)
  rows = {}
  with sharding.activation_rules(mesh, rules):
    for name, ref in (("ours DPO (cached ref)", None), ("ours DPO (live ref)", "live")):
      p = jax.tree.map(jnp.asarray, host_params)
      b = dict(batch_np) if ref is None else {k: v for k, v in batch_np.items()
                                              if k != "ref_logps"}
      st, step = dpo.make_dpo_step(config, cfg, p, mesh, ("en",), b,
                                   None if ref is None else jax.tree.map(jnp.copy, p))
      gb = sharding.global_batch(b, mesh)
      box = [st]

      def run_dpo(step=step, gb=gb, box=box):
        box[0], m = step(box[0], gb, rng)
        jax.block_until_ready(m["loss"])
      rows[name] = _time(run_dpo, a.warmup, a.iters)
    # our SFT step on the same tokens: 2 * pairs rows
    flat = {k: batch_np[k].reshape(2 * a.pairs, a.seq) for k in steps_keys()}
    p = jax.tree.map(jnp.asarray, host_params)
    st, fn = sft.make_trainer(config, cfg, p, steps.sft_loss_fn(cfg), mesh, rules)
    step = sft.jit_for(fn, st, flat, mesh)
    gb = sharding.global_batch(flat, mesh)
    box = [st]

    def run_sft():
      box[0], m = step(box[0], gb, rng)
      jax.block_until_ready(m["loss"])
    rows["ours SFT (same tokens)"] = _time(run_sft, a.warmup, a.iters)
  rows["torch DPO (cached ref)"] = torch_dpo(cfg, host_params, batch_np, a)
  base = rows["ours SFT (same tokens)"]
  ours = rows["ours DPO (cached ref)"]
  print(f"\nDPO step, {a.pairs} pairs x 2 x {a.seq} tokens, vocab {a.vocab}, "
        f"{jax.devices()[0].platform}, {os.cpu_count()} cpus")
  print(f"{'step':28s} {'ms/step':>9s} {'vs our SFT':>11s} {'vs ours DPO':>12s}")
  for name, ms in rows.items():
    print(f"{name:28s} {ms:9.1f} {ms / base:10.2f}x {ms / ours:11.2f}x")


def steps_keys():
  return ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def torch_dpo(cfg, host_params, batch_np, a):
  import torch
  import torch.nn.functional as F
  import transformers
  torch.set_num_threads(os.cpu_count())
  with tempfile.TemporaryDirectory() as d:
    hf.save(cfg, host_params, d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  tokens = torch.tensor(batch_np["tokens"].reshape(2 * a.pairs, a.seq), dtype=torch.long)
  targets = torch.tensor(batch_np["targets"].reshape(2 * a.pairs, a.seq), dtype=torch.long)
  mask = torch.tensor(batch_np["loss_mask"].reshape(2 * a.pairs, a.seq), dtype=torch.float32)
  ref = torch.tensor(batch_np["ref_logps"])

  def step():
    logits = model(input_ids=tokens).logits
    logp = torch.gather(F.log_softmax(logits.float(), -1), 2, targets[..., None])[..., 0]
    seq = (logp * mask).sum(-1).view(a.pairs, 2)
    delta = (seq[:, 0] - ref[:, 0]) - (seq[:, 1] - ref[:, 1])
    loss = -F.logsigmoid(0.1 * delta).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  return _time(step, a.warmup, a.iters)


if __name__ == "__main__":
  main()
