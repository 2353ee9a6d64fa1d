r"""DPO step time: ours vs TRL's DPOTrainer on the same tiny Llama, the same
token ids, the same machine, in the same run; and our DPO step relative to
our SFT step on the same tokens.

    .venv/bin/python experiments/bench/dpo_step.py [--pairs 8 --seq 128 --vocab 256]

One tiny Llama (d 128, 2 layers) is initialised by aya_jax and exported with
`hf.save` to a temporary HF directory next to a word-level tokenizer whose
word "t<i>" is token i; TRL gets both as local paths (it rebuilds its live
reference from the path) and tokenises the same ids we feed ours (checked).
Every contender's steps are interleaved (one step of each after every timed
TRL step, in rotating order), so all of them see the same machine load; rows
give the median (and min) ms/step over --iters steps after --warmup:
  ours DPO (cached ref / live ref)   our jitted DPO step, AdamW, fp32
  ours SFT (same tokens)             our SFT step on the 2 * pairs rows
  TRL DPOTrainer (precomputed / live ref)
                                     `trainer.train(max_steps=warmup+iters)`,
                                     fp32, no gradient checkpointing; a
                                     callback times on_step_begin ->
                                     on_step_end (forward, backward, clip,
                                     AdamW); a note gives the trainer's time
                                     between steps (batch collation etc.)
  torch DPO (cached ref)             a hand-written DPO step on the same HF
                                     model (the floor TRL's torch work sits on)
Target: our cached-reference DPO step <= 1.2x our SFT step on the same tokens.
--threads 1 (default) runs both libraries on one compute thread: on a shared,
loaded 2-core machine torch's 2 OpenMP threads spin on a busy core and get
10-20x slower (XLA less so); --threads 0 keeps each library's default.
No network: HF_HUB_OFFLINE etc. are set, report_to=[].
"""

import argparse
import os
import sys
import tempfile
import time


def parse_args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--pairs", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--threads", type=int, default=1,
                  help="compute threads for both: torch.set_num_threads, and for 1 XLA's "
                       "--xla_cpu_multi_thread_eigen=false; 0 = each library's default")
  ap.add_argument("--no_trl", action="store_true", help="skip the TRL rows")
  return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before jax is imported
  import offline  # experiments/bench/offline.py, beside this file
  offline.isolate(ARGS.threads)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from aya_jax import axes, sharding  # noqa: E402
from aya_jax.models import hf, tiny  # noqa: E402
from aya_jax.train import common, dpo, steps  # noqa: E402

PAD, BOS, EOS, UNK, FIRST_WORD = 0, 1, 2, 3, 4
LR, BETA = 1e-4, 0.1


class Interleaved:
  """Steps of several contenders, one of each per `tick`, in rotating order, so
  that they share the same load over time (this machine is shared)."""

  def __init__(self, fns: dict, warmup: int):
    self.fns, self.ms, self.n = fns, {k: [] for k in fns}, 0
    for fn in fns.values():
      for _ in range(warmup):
        fn()

  def tick(self):
    names = list(self.fns)
    k = self.n % len(names)
    for name in names[k:] + names[:k]:
      t = time.perf_counter()
      self.fns[name]()
      self.ms[name].append(1e3 * (time.perf_counter() - t))
    self.n += 1


def _pair_tokens(rng, pairs, seq, vocab):
  """[pairs, 2, seq]: a shared prompt (seq // 2 ids), then chosen / rejected
  answers that end with EOS (as TRL appends it)."""
  tokens = rng.integers(FIRST_WORD, vocab, (pairs, 2, seq)).astype(np.int32)
  tokens[:, 1, :seq // 2] = tokens[:, 0, :seq // 2]
  tokens[:, :, -1] = EOS
  return tokens


def _batch(rng, tokens):
  """Our DPO batch: the loss covers the answer tokens (the targets of
  positions seq//2 - 1 .. seq - 2), the tokens TRL's completion mask covers."""
  pairs, _, seq = tokens.shape
  mask = np.zeros_like(tokens)
  mask[:, :, seq // 2 - 1:seq - 1] = 1
  targets = np.concatenate([tokens[..., 1:], np.zeros((pairs, 2, 1), np.int32)], -1)
  return dict(tokens=tokens, targets=targets, loss_mask=mask,
              segment_ids=np.ones_like(tokens), positions=np.broadcast_to(
                  np.arange(seq, dtype=np.int32), tokens.shape).copy(),
              pair_mask=np.ones(pairs, np.int32), language=np.zeros(pairs, np.int32),
              ref_logps=rng.normal(-100, 5, (pairs, 2)).astype(np.float32))


def ours(cfg, host_params, batch_np, a, mesh):
  """{name: one step} of our DPO (cached / live reference) and SFT steps."""
  rules = axes.rules("fsdp")
  config = dpo.default_config()
  config.optim.lr, config.optim.warmup_steps = LR, 0
  config.dpo.beta = BETA
  rng = jax.random.key(1)

  def stepper(step, st, gb):
    box = [st]

    def run():
      box[0], m = step(box[0], gb, rng)
      jax.block_until_ready(m["loss"])
    return run

  fns = {}
  for name, live in (("ours DPO (cached ref)", False), ("ours DPO (live ref)", True)):
    p = jax.tree.map(jnp.asarray, host_params)
    b = {k: v for k, v in batch_np.items() if not (live and k == "ref_logps")}
    st, step = dpo.make_dpo_step(config, cfg, p, mesh, ("en",), b,
                                 jax.tree.map(jnp.copy, p) if live else None)
    fns[name] = stepper(step, st, sharding.global_batch(b, mesh))
  keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
  flat = {k: batch_np[k].reshape(2 * a.pairs, a.seq) for k in keys}
  st, fn = common.make_trainer(config, cfg, jax.tree.map(jnp.asarray, host_params),
                            steps.sft_loss_fn(cfg), mesh, rules)
  fns["ours SFT (same tokens)"] = stepper(common.jit_for(fn, st, flat, mesh), st,
                                          sharding.global_batch(flat, mesh))
  return fns


def save_word_tokenizer(vocab, path):
  """A word-level tokenizer: '<pad>' 0, '<bos>' 1, '<eos>' 2, '<unk>' 3, 't<i>' i."""
  import tokenizers
  import transformers
  words = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": UNK,
           **{f"t{i}": i for i in range(FIRST_WORD, vocab)}}
  t = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
  t.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>",
                                             bos_token="<bos>", eos_token="<eos>",
                                             unk_token="<unk>")
  tok.save_pretrained(path)
  return tok


def _text(ids):
  return "".join(f" t{i}" if i >= FIRST_WORD else " <eos>" for i in ids)


def trl_dpo(model_dir, tok, tokens, a, precompute, others: Interleaved):
  """ms of TRL DPOTrainer's steps after warm-up: on_step_begin -> on_step_end
  ('step') and the trainer's work between steps ('between': batch collation,
  bookkeeping). After each timed step one step of every other contender runs."""
  import datasets
  import torch
  import transformers
  import trl

  class StepTimer(transformers.TrainerCallback):
    def __init__(self):
      self.begin, self.end, self.after = [], [], []

    def on_step_begin(self, args, state, control, **kw):
      self.begin.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
      self.end.append(time.perf_counter())
      if len(self.end) > a.warmup:
        others.tick()
      self.after.append(time.perf_counter())

  n_steps, half = a.warmup + a.iters, a.seq // 2
  rows = [dict(prompt=_text(t[0, :half]).lstrip(), chosen=_text(t[0, half:]),
               rejected=_text(t[1, half:])) for t in tokens]
  data = datasets.Dataset.from_list(rows * n_steps)
  timer = StepTimer()
  with tempfile.TemporaryDirectory() as out:
    args = trl.DPOConfig(
        output_dir=out, per_device_train_batch_size=a.pairs, max_steps=n_steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=a.seq,
        precompute_ref_log_probs=precompute, gradient_checkpointing=False, bf16=False,
        fp16=False, use_cpu=True, report_to=[], logging_steps=10 ** 6, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
        model_init_kwargs={"dtype": torch.float32})
    trainer = trl.DPOTrainer(model=model_dir, args=args, train_dataset=data,
                             processing_class=tok, callbacks=[timer])
    ex = trainer.train_dataset[0]
    got = np.asarray(ex["prompt_ids"] + ex["chosen_ids"])
    if not np.array_equal(got, tokens[0, 0]) or ex["rejected_ids"] != list(tokens[0, 1, half:]):
      raise AssertionError(f"TRL tokenised other ids: {got[:8]}... vs {tokens[0, 0, :8]}...")
    trainer.train()
  begin, end, after = (np.asarray(x) for x in (timer.begin, timer.end, timer.after))
  w = a.warmup
  return 1e3 * (end - begin)[w:], 1e3 * (begin[1:] - after[:-1])[w:]


def torch_dpo(model_dir, batch_np, a):
  """One step of a hand-written torch DPO step (cached reference) on the HF model."""
  import torch
  import torch.nn.functional as F
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
  tokens = torch.tensor(batch_np["tokens"].reshape(2 * a.pairs, a.seq), dtype=torch.long)
  targets = torch.tensor(batch_np["targets"].reshape(2 * a.pairs, a.seq), dtype=torch.long)
  mask = torch.tensor(batch_np["loss_mask"].reshape(2 * a.pairs, a.seq), dtype=torch.float32)
  ref = torch.tensor(batch_np["ref_logps"])

  def step():
    logits = model(input_ids=tokens).logits
    logp = torch.gather(F.log_softmax(logits.float(), -1), 2, targets[..., None])[..., 0]
    seq = (logp * mask).sum(-1).view(a.pairs, 2)
    delta = (seq[:, 0] - ref[:, 0]) - (seq[:, 1] - ref[:, 1])
    loss = -F.logsigmoid(BETA * delta).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  return step


def main(a):
  cfg = tiny("llama", vocab_size=a.vocab, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32,
             d_ff=256, n_layers=2, max_seq_len=max(256, a.seq), bos_id=BOS, eos_ids=(EOS,),
             pad_id=PAD)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  host_params = jax.device_get(sharding.init_params_sharded(cfg, jax.random.key(0), mesh,
                                                            axes.rules("fsdp")))
  rng = np.random.default_rng(0)
  tokens = _pair_tokens(rng, a.pairs, a.seq, a.vocab)
  batch_np = _batch(rng, tokens)
  import torch
  if a.threads:
    torch.set_num_threads(a.threads)
  notes = []
  with tempfile.TemporaryDirectory() as model_dir, \
       sharding.activation_rules(mesh, axes.rules("fsdp")):
    hf.save(cfg, host_params, model_dir)
    tok = save_word_tokenizer(a.vocab, model_dir)
    fns = ours(cfg, host_params, batch_np, a, mesh)
    fns["torch DPO (cached ref)"] = torch_dpo(model_dir, batch_np, a)
    others = Interleaved(fns, a.warmup)
    ms = others.ms
    if a.no_trl:
      for _ in range(a.iters):
        others.tick()
    for name, precompute in () if a.no_trl else (("precomputed ref", True), ("live ref", False)):
      ms[f"TRL DPOTrainer ({name})"], between = trl_dpo(model_dir, tok, tokens, a, precompute,
                                                        others)
      notes.append(f"TRL ({name}): between steps (batch collation, bookkeeping) "
                   f"{np.median(between):.1f} ms")
  med = {k: float(np.median(v)) for k, v in ms.items()}
  base, mine = med["ours SFT (same tokens)"], med["ours DPO (cached ref)"]
  print(f"\nDPO step, {a.pairs} pairs x 2 x {a.seq} tokens, vocab {a.vocab}, "
        f"{jax.devices()[0].platform}, {os.cpu_count()} cpus, threads {a.threads or 'default'}, "
        f"load {os.getloadavg()[0]:.1f}; median (min) of {len(ms['ours SFT (same tokens)'])} "
        "interleaved steps")
  print(f"| {'step':33s} | {'ms/step':>15s} | {'/ our SFT':>9s} | {'/ our DPO':>9s} |")
  print(f"|{'-' * 35}|{'-' * 16}:|{'-' * 10}:|{'-' * 10}:|")
  for name in sorted(med, key=lambda k: (not k.startswith("ours"), "torch" in k, k)):
    cell = f"{med[name]:.1f} ({min(ms[name]):.1f})"
    print(f"| {name:33s} | {cell:>15s} | {med[name] / base:8.2f}x | {med[name] / mine:8.2f}x |")
  for ref, own in (("precomputed ref", "cached ref"), ("live ref", "live ref")):
    if f"TRL DPOTrainer ({ref})" in med:
      print(f"TRL DPOTrainer ({ref}) / ours DPO ({own}): "
            f"{med[f'TRL DPOTrainer ({ref})'] / med[f'ours DPO ({own})']:.2f}x")
  print("\n".join(notes))
  print(f"our DPO (cached ref) / our SFT on the same tokens: {mine / base:.2f}x "
        f"(target <= 1.2x)")


if __name__ == "__main__":
  main(ARGS)
