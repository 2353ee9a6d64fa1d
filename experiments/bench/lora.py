r"""LoRA steps: ours (SFT, DPO with the base as its reference) against our full steps and
against TRL + PEFT on the same work: tokens/s and peak memory, in one run.

    .venv/bin/python experiments/bench/lora.py [--rows 2 --seq 128 --rank 16 --iters 5]

The model is SmolLM2-135M-shaped (Llama: d_model 576, 30 layers, 9 heads, 3 kv heads,
head_dim 64, d_ff 1536, vocab 49152, tied embeddings), random, fp32, initialised by aya_jax
and exported with `hf.save` beside a word-level tokenizer whose word "t<i>" is token i, so
TRL + PEFT train the very same weights on the very same token ids (checked).
Contenders, each in its own process (so that its peak memory is its own), one after the
other on the same machine:
  ours SFT full / ours SFT LoRA      our jitted step, AdamW; `--rows` sequences of `--seq`
  ours DPO full (live ref)           a reference copy of the weights beside the policy
  ours DPO LoRA (base as ref)        the reference is the base with the adapters off
  TRL SFT + PEFT LoRA                SFTTrainer(peft_config=...), prompt-completion rows
  TRL DPO + PEFT LoRA                DPOTrainer(peft_config=...): PEFT's adapters-off ref
LoRA: rank `--rank`, alpha 2 * rank, every attention and MLP projection, dropout 0.
Each contender runs `--warmup` steps (compilation, first calls), then `--iters` timed steps;
the row gives the median ms/step, tokens/s (the batch's tokens over the median step) and
peak RSS (the process's high-water mark, libraries and model included) and its rise over
the RSS before the first step. `--threads 1` (default) gives both libraries one compute
thread. No network: HF_HUB_OFFLINE etc. are set, report_to=[].
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONTENDERS = ("ours SFT full", "ours SFT LoRA", "ours DPO full (live ref)",
              "ours DPO LoRA (base as ref)", "TRL SFT + PEFT LoRA", "TRL DPO + PEFT LoRA")


def parse_args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=2, help="SFT sequences / DPO pairs per step")
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--only", default="", help="comma-separated contender numbers (0-5)")
  ap.add_argument("--contender", default="", help=argparse.SUPPRESS)
  ap.add_argument("--model_dir", default="", help=argparse.SUPPRESS)
  return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before jax is imported
  import offline  # experiments/bench/offline.py, beside this file
  offline.isolate(ARGS.threads)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

SMOLLM2 = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
               d_ff=1536, tie_embeddings=True, max_seq_len=2048, bos_id=1, eos_ids=(2,),
               pad_id=0, rope_theta=100000.0, norm_eps=1e-5)
LR, BETA = 1e-4, 0.1


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return 0.0


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _data(a):
  import numpy as np
  import dpo_step
  rng = np.random.default_rng(0)
  tokens = dpo_step._pair_tokens(rng, a.rows, a.seq, SMOLLM2["vocab_size"])
  return tokens, dpo_step._batch(rng, tokens)


def _lora_block(a):
  from aya_jax.models import lora
  b = lora.lora_block()
  b.rank, b.alpha = a.rank, 2.0 * a.rank
  return b


# ------------------------------------------------------------------------- ours


def ours(a, name):
  """(step(), tokens per step) of one of our contenders; the model loaded from the HF dir."""
  import jax
  import jax.numpy as jnp
  from aya_jax import axes, sharding
  from aya_jax.models import lora
  from aya_jax.train import common, dpo, steps
  mesh, rules = sharding.make_mesh((1, 1, 1), jax.devices()[:1]), axes.rules("fsdp")
  config = dpo.default_config()
  config.model.init = a.model_dir
  config.optim.lr, config.optim.warmup_steps = LR, 0
  config.dpo.beta, config.dpo.reference = BETA, "live"
  if "LoRA" in name:
    config.lora = _lora_block(a)
  cfg, params = common.setup_model(config.model, SMOLLM2["vocab_size"], mesh, rules, 0,
                                   config.lora)
  tokens, batch = _data(a)
  rng = jax.random.key(1)
  if "SFT" in name:
    keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    flat = {k: batch[k][:, 0] for k in keys}  # the chosen rows: a.rows sequences
    st, fn = common.make_trainer(config, cfg, params, steps.sft_loss_fn(cfg), mesh, rules)
    step, gb, n_tok = common.jit_for(fn, st, flat, mesh), sharding.global_batch(flat, mesh), \
        a.rows * a.seq
  else:
    b = {k: v for k, v in batch.items() if k != "ref_logps"}
    ref = None if lora.has_adapters(params) else jax.tree.map(jnp.copy, params)
    if ref is None:
      ref = dpo.ADAPTERS_OFF
    st, step = dpo.make_dpo_step(config, cfg, params, mesh, ("en",), b, ref)
    gb, n_tok = sharding.global_batch(b, mesh), 2 * a.rows * a.seq
  box = [st]

  def run():
    box[0], m = step(box[0], gb, rng)
    jax.block_until_ready(m["loss"])
  with sharding.activation_rules(mesh, rules):
    return _time(run, a), n_tok


# -------------------------------------------------------------------- TRL + PEFT


def trl(a, name):
  """Median ms/step of TRL's SFTTrainer / DPOTrainer with a PEFT LoRA config, timed from
  on_step_begin to on_step_end, after a.warmup steps."""
  import datasets
  import numpy as np
  import peft
  import torch
  import transformers
  import trl as trl_lib
  import dpo_step
  tokens, _ = _data(a)
  tok = transformers.AutoTokenizer.from_pretrained(a.model_dir)
  half, n_steps = a.seq // 2, a.warmup + a.iters
  stamps = []

  class StepTimer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      stamps.append([time.perf_counter()])

    def on_step_end(self, args, state, control, **kw):
      stamps[-1].append(time.perf_counter())
      if len(stamps) == a.warmup:
        stamps.append(["rss", _rss_mb()])

  lcfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"], task_type="CAUSAL_LM")
  common = dict(per_device_train_batch_size=a.rows, max_steps=n_steps, learning_rate=LR,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, max_length=a.seq, gradient_checkpointing=False, bf16=False,
                fp16=False, use_cpu=True, report_to=[], logging_steps=10 ** 6,
                save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
                model_init_kwargs={"dtype": torch.float32})
  rss0 = _rss_mb()
  with tempfile.TemporaryDirectory() as out:
    if "SFT" in name:
      rows = [dict(prompt=dpo_step._text(t[0, :half]).lstrip(),
                   completion=dpo_step._text(t[0, half:])) for t in tokens]
      args = trl_lib.SFTConfig(output_dir=out, packing=False, completion_only_loss=True,
                               **common)
      trainer = trl_lib.SFTTrainer(model=a.model_dir, args=args, processing_class=tok,
                                   train_dataset=datasets.Dataset.from_list(rows * n_steps),
                                   peft_config=lcfg, callbacks=[StepTimer()])
      ids = trainer.train_dataset[0]["input_ids"]
      want, n_tok = tokens[0, 0], a.rows * a.seq
    else:
      rows = [dict(prompt=dpo_step._text(t[0, :half]).lstrip(), chosen=dpo_step._text(t[0, half:]),
                   rejected=dpo_step._text(t[1, half:])) for t in tokens]
      args = trl_lib.DPOConfig(output_dir=out, beta=BETA, loss_type=["sigmoid"],
                               precompute_ref_log_probs=False, **common)
      trainer = trl_lib.DPOTrainer(model=a.model_dir, args=args, processing_class=tok,
                                   train_dataset=datasets.Dataset.from_list(rows * n_steps),
                                   peft_config=lcfg, callbacks=[StepTimer()])
      ex = trainer.train_dataset[0]
      ids, want, n_tok = ex["prompt_ids"] + ex["chosen_ids"], tokens[0, 0], 2 * a.rows * a.seq
    if not np.array_equal(np.asarray(ids)[:len(want)], want):
      raise AssertionError(f"TRL tokenised other ids: {ids[:8]}... vs {want[:8]}...")
    trainer.train()
  rss_before = next(s[1] for s in stamps if s[0] == "rss")
  ms = [1e3 * (s[1] - s[0]) for s in stamps if s[0] != "rss"][a.warmup:]
  return dict(ms=ms, rss_before_mb=min(rss0, rss_before)), n_tok


def _time(run, a):
  rss0 = _rss_mb()
  for _ in range(a.warmup):
    run()
  ms = []
  for _ in range(a.iters):
    t = time.perf_counter()
    run()
    ms.append(1e3 * (time.perf_counter() - t))
  return dict(ms=ms, rss_before_mb=rss0)


def contender(a):
  if a.threads:
    import torch
    torch.set_num_threads(a.threads)
  fn = ours if a.contender.startswith("ours") else trl
  res, n_tok = fn(a, a.contender)
  res.update(tokens=n_tok, peak_mb=_peak_mb())
  print("RESULT " + json.dumps(res), flush=True)


def main(a):
  import numpy as np
  import jax
  from aya_jax import axes, sharding
  from aya_jax.models import hf
  from aya_jax.models import config as mc
  import dpo_step
  picks = [CONTENDERS[int(i)] for i in a.only.split(",")] if a.only else list(CONTENDERS)
  results = {}
  with tempfile.TemporaryDirectory() as model_dir:
    cfg = mc.ModelConfig(family="llama", **SMOLLM2)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    params = jax.device_get(sharding.init_params_sharded(cfg, jax.random.key(0), mesh,
                                                         axes.rules("fsdp")))
    hf.save(cfg, params, model_dir)
    del params
    dpo_step.save_word_tokenizer(SMOLLM2["vocab_size"], model_dir)
    for name in picks:
      argv = [sys.executable, __file__, "--contender", name, "--model_dir", model_dir] + [
          f"--{k}={getattr(a, k)}" for k in ("rows", "seq", "rank", "warmup", "iters",
                                             "threads")]
      out = subprocess.run(argv, capture_output=True, text=True)
      line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
      if out.returncode or not line:
        print(out.stdout[-3000:], out.stderr[-3000:])
        raise SystemExit(f"{name} failed")
      results[name] = json.loads(line[-1][len("RESULT "):])
      print(f"{name}: {np.median(results[name]['ms']):.0f} ms/step", flush=True)
  print(f"\nLoRA steps, SmolLM2-135M-shaped (random, fp32), {a.rows} rows x {a.seq} tokens "
        f"(DPO: {a.rows} pairs), rank {a.rank}; cpu, {os.cpu_count()} cpus, threads "
        f"{a.threads or 'default'}, load {os.getloadavg()[0]:.1f}; median of {a.iters} steps "
        f"after {a.warmup}")
  print("| contender | ms/step | tokens/s | peak RSS MB | rise MB |")
  print("|---|---:|---:|---:|---:|")
  med = {}
  for name, r in results.items():
    med[name] = float(np.median(r["ms"]))
    print(f"| {name} | {med[name]:.0f} | {r['tokens'] / med[name] * 1e3:.0f} | "
          f"{r['peak_mb']:.0f} | {r['peak_mb'] - r['rss_before_mb']:.0f} |")
  for mine, theirs in (("ours SFT LoRA", "TRL SFT + PEFT LoRA"),
                       ("ours DPO LoRA (base as ref)", "TRL DPO + PEFT LoRA"),
                       ("ours SFT LoRA", "ours SFT full"),
                       ("ours DPO LoRA (base as ref)", "ours DPO full (live ref)")):
    if mine in med and theirs in med:
      print(f"{theirs} / {mine}: {med[theirs] / med[mine]:.2f}x time, "
            f"{results[theirs]['peak_mb'] / results[mine]['peak_mb']:.2f}x peak RSS")
  if "ours SFT LoRA" in results and "ours DPO LoRA (base as ref)" in results:
    s, d = results["ours SFT LoRA"], results["ours DPO LoRA (base as ref)"]
    print(f"ours: LoRA DPO rise {d['peak_mb'] - d['rss_before_mb']:.0f} MB vs LoRA SFT rise "
          f"{s['peak_mb'] - s['rss_before_mb']:.0f} MB (DPO has 2x the tokens: twice the "
          "activations, no second copy of the weights)")


if __name__ == "__main__":
  if ARGS.contender:
    contender(ARGS)
  else:
    main(ARGS)
