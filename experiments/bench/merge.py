"""Merge benchmark: aya_jax.merging.stream vs mergekit 0.1.5 on the same random Llama checkpoints.

  .venv/bin/python experiments/bench/merge.py [--size small|medium] [--models 3] [--root DIR]

Writes N random bf16 HF Llama checkpoints (and a base for TIES; kept in --root and reused),
then for linear and ties runs each merge in a fresh process (ours: streaming
merge_checkpoints -> params/, and -> params/ + HF; mergekit: run_merge -> HF), timing the
merge call with modules imported, and prints wall time, peak RSS, the speedups and the
disk-read floor: bytes read / read bandwidth, the best of 3 plain reads of the input files
(page cache warm, as in the merges).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = {  # d_model, n_layers, d_ff, vocab, heads, kv heads
    "small": (1024, 8, 2816, 32000, 16, 4),    # ~0.15B params, ~0.3 GB bf16 each
    "medium": (1536, 16, 4096, 32000, 16, 4),  # ~0.5B params, ~1 GB bf16 each
}

_CHILD = r"""
import resource, sys, time, json
which, method, root, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
models = [f"{root}/m{i}" for i in range(1, n + 1)]
mp = [dict(weight=1.0 / n, density=0.5) if method == "ties" else dict(weight=1.0 / n)
      for _ in models]
if which.startswith("ours"):
  import jax, orbax.checkpoint, tensorstore
  from aya_jax.merging import stream as merge_stream
  jax.devices()
  t = time.perf_counter()
  merge_stream.merge_checkpoints(
      models, method, None, f"{root}/out_{which}_{method}",
      base=f"{root}/m0" if method == "ties" else None,
      out_hf=f"{root}/hf_{which}_{method}" if which == "ours+hf" else None,
      model_merge_parameters=mp)
else:
  from mergekit.config import MergeConfiguration
  from mergekit.merge import MergeOptions, run_merge
  d = dict(merge_method=method, dtype="bfloat16",
           models=[dict(model=m, parameters=p) for m, p in zip(models, mp)])
  if method == "ties":
    d["base_model"] = f"{root}/m0"
  t = time.perf_counter()
  run_merge(MergeConfiguration.model_validate(d), f"{root}/mk_{method}",
            MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
print(json.dumps(dict(wall=time.perf_counter() - t,
                      rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def make_inputs(root, size, n):
  """Random bf16 HF Llama dirs root/m0 (base) .. root/mN; existing ones of this size stay."""
  from aya_jax.models import config, hf, hf_config
  d, layers, ff, vocab, heads, kv = SIZES[size]
  cfg = config.tiny("llama", d_model=d, n_layers=layers, d_ff=ff, vocab_size=vocab,
                    n_heads=heads, n_kv_heads=kv, head_dim=d // heads)
  for i in range(n + 1):
    path = f"{root}/m{i}"
    if os.path.exists(f"{path}/config.json") and hf_config.read_config(path) == cfg:
      continue
    rng = np.random.default_rng(i)
    p = {}
    for leaf, _, _, shape, is_layer in hf.entries(cfg):
      node = p
      for k in leaf[:-1]:
        node = node.setdefault(k, {})
      node[leaf[-1]] = (rng.standard_normal(((layers,) if is_layer else ()) + shape,
                                            dtype=np.float32) * 0.02)
    hf.save(cfg, p, path, dtype="bfloat16")
    del p
  return cfg


def read_seconds(files, repeats=3):
  """Best time of `repeats` plain reads of the files (64 MiB at a time)."""
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for f in files:
      with open(f, "rb") as h:
        while h.read(64 << 20):
          pass
    best = min(best, time.perf_counter() - t)
  return best


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="small", choices=sorted(SIZES))
  ap.add_argument("--models", type=int, default=3)
  ap.add_argument("--root", default="")
  ap.add_argument("--methods", default="linear,ties")
  args = ap.parse_args()
  root = args.root or tempfile.mkdtemp(prefix="merge_")
  cfg = make_inputs(root, args.size, args.models)
  print(f"{args.models} models (+ base for ties), {cfg.n_params / 1e9:.2f}B params each, bf16, "
        f"in {root}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
  rows = []
  for method in args.methods.split(","):
    ins = [f"{root}/m{i}/model.safetensors"
           for i in range(0 if method == "ties" else 1, args.models + 1)]
    nbytes = sum(os.path.getsize(f) for f in ins)
    floor = read_seconds(ins)
    res = {}
    for which in ("ours", "ours+hf", "mergekit"):
      out = subprocess.run([sys.executable, "-c", _CHILD, which, method, root,
                            str(args.models)], capture_output=True, text=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
      if out.returncode:
        print(out.stderr[-3000:])
        raise SystemExit(f"{which} {method} failed")
      res[which] = json.loads(out.stdout.strip().splitlines()[-1])
      print(method, which, res[which], f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows.append((method, nbytes, floor, res))
  print("\n| method | read GB | disk floor s | ours s (peak RSS GB) | ours+hf s (RSS GB) | "
        "mergekit s (RSS GB) | speedup: ours, ours+hf | ours / floor |")
  print("|---|---|---|---|---|---|---|---|")
  for method, nbytes, floor, r in rows:
    o, oh, mk = r["ours"], r["ours+hf"], r["mergekit"]
    print(f"| {method} | {nbytes / 1e9:.2f} | {floor:.2f} | {o['wall']:.2f} ({o['rss'] / 1e9:.2f})"
          f" | {oh['wall']:.2f} ({oh['rss'] / 1e9:.2f}) | {mk['wall']:.2f} ({mk['rss'] / 1e9:.2f})"
          f" | {mk['wall'] / o['wall']:.1f}x, {mk['wall'] / oh['wall']:.1f}x"
          f" | {o['wall'] / floor:.1f}x |")


if __name__ == "__main__":
  main()
