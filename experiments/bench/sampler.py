r"""Greedy generation throughput: aya_jax sampler vs transformers `generate`.

Same random Llama model (converted through aya_jax.models.hf), same prompts,
greedy, fixed number of new tokens (no stop id), same machine, same run.
Prints generated tokens/s for each batch size, the ratio, and the fraction of
tokens that agree (near-ties in a random model may differ in fp32).

    python experiments/bench/sampler.py
    python experiments/bench/sampler.py --d_model=512 --n_layers=8 --batches=1,16,128
"""

from __future__ import annotations

import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("d_model", 256, "")
flags.DEFINE_integer("n_layers", 4, "")
flags.DEFINE_integer("vocab", 4096, "")
flags.DEFINE_integer("prompt_len", 32, "")
flags.DEFINE_integer("new_tokens", 64, "")
flags.DEFINE_list("batches", ["1", "8", "64"], "")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import numpy as np
  import torch
  import transformers
  from aya_jax.models import hf, init_params
  from aya_jax.models.config import tiny
  from aya_jax.sampling import sampler
  d = FLAGS.d_model
  cfg = tiny("llama", vocab_size=FLAGS.vocab, d_model=d, n_layers=FLAGS.n_layers,
             n_heads=max(1, d // 64), n_kv_heads=max(1, d // 128), head_dim=64,
             d_ff=int(8 * d / 3) // 64 * 64, max_seq_len=1024, eos_ids=(), bos_id=1)
  params = jax.device_get(init_params(cfg, jax.random.key(0)))
  with tempfile.TemporaryDirectory() as tmp:
    hf.save(cfg, params, tmp)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
  rng = np.random.default_rng(0)
  print(f"\nGreedy decode, Llama d={d} L={cfg.n_layers} vocab={cfg.vocab_size}, prompt "
        f"{FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens; {jax.devices()[0].device_kind}")
  print("| batch | aya_jax tok/s | transformers tok/s | ratio | tokens agreeing |")
  print("|---|---|---|---|---|")
  for b in map(int, FLAGS.batches):
    prompts = rng.integers(3, cfg.vocab_size, (b, FLAGS.prompt_len)).astype(np.int32)
    kw = dict(max_new_tokens=FLAGS.new_tokens, stop_ids=(), pad_id=0)
    sampler.generate(cfg, params, list(prompts), jax.random.key(0), **kw)  # compile
    t0 = time.perf_counter()
    ours = sampler.generate(cfg, params, list(prompts), jax.random.key(0), **kw)
    ours_s = time.perf_counter() - t0
    with torch.no_grad():
      t0 = time.perf_counter()
      ref = model.generate(torch.tensor(prompts, dtype=torch.long), do_sample=False,
                           max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens,
                           pad_token_id=0)
      peer_s = time.perf_counter() - t0
    agree = float((ours.tokens == ref[:, FLAGS.prompt_len:].numpy()).mean())
    n = b * FLAGS.new_tokens
    print(f"| {b} | {n / ours_s:.0f} | {n / peer_s:.0f} | {peer_s / ours_s:.1f}x | {agree:.3f} |")


if __name__ == "__main__":
  app.run(main)
