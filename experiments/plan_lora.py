r"""The dry-run planner over Aya Expanse 8B and 32B, SFT and DPO, full fine-tuning and LoRA,
on 1, 8 and 64 devices: per-device GB and whether it fits on each accelerator.

    .venv/bin/python experiments/plan_lora.py [--rank 16 --layers 1 --out plan_lora.json]

Each plan is `train.planner.plan` of configs/aya_expanse_8b.py (bf16, remat full, vocab
and attention chunks) with model.preset set, mesh (1, n, 1) under 'fsdp', one sequence (SFT)
or one pair (DPO) of 8192 tokens per device, and the `lora` block at --rank (0 = full
fine-tuning). --layers k compiles k- and 2k-layer slices and extrapolates (the planner's
dry_run_layers); params and optimizer bytes are exact either way. No device is needed: 64
fake CPU devices, nothing is allocated.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=64").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, ROOT)

ACCELERATORS = ("h100", "h200", "v5p", "v5e")


def config_for(model: str, n: int, rank: int, layers: int):
  from aya_jax import config_files
  c = config_files.get_config(os.path.join(ROOT, "configs", "aya_expanse_8b.py"))
  c.dry_run = True
  c.model.init = ""
  c.model.preset = model
  c.mesh.shape, c.mesh.rules = (1, n, 1), "fsdp"
  c.sft.batch_size, c.dpo.batch_size = n, n
  c.lora.rank, c.lora.alpha = rank, 2.0 * rank
  c.plan.dry_run_layers = layers
  c.plan.accelerators = ACCELERATORS
  return c


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--layers", type=int, default=1)
  ap.add_argument("--models", default="aya_expanse_8b,aya_expanse_32b")
  ap.add_argument("--devices", default="1,8,64")
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  from aya_jax.train import planner
  rows = []
  for model in a.models.split(","):
    for n in (int(x) for x in a.devices.split(",")):
      for rank in (0, a.rank):
        r = planner.plan(config_for(model, n, rank, a.layers))
        for kind, s in r["steps"].items():
          fits = {p["accelerator"]: p["fits"] for p in s["predictions"]}
          rows.append(dict(model=model, devices=n, lora=rank, step=kind,
                           params=s["params"], frozen=s.get("frozen", 0),
                           opt_state=s["opt_state"], temp=s["temp"], peak=s["peak_bytes"],
                           fits=fits))
          print(json.dumps(rows[-1]), flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(rows, f, indent=1)
  gb = lambda x: f"{x / 1e9:.1f}"
  print("\n| model | devices | step | training | trained + frozen params | optimizer | "
        "temporaries | peak GB/device | " + " | ".join(ACCELERATORS) + " |")
  print("|---|---:|---|---|---:|---:|---:|---:|" + "---|" * len(ACCELERATORS))
  for r in rows:
    how = f"LoRA r{r['lora']}" if r["lora"] else "full"
    print(f"| {r['model']} | {r['devices']} | {r['step']} | {how} | "
          f"{gb(r['params'])} + {gb(r['frozen'])} | {gb(r['opt_state'])} | {gb(r['temp'])} | "
          f"{gb(r['peak'])} | " + " | ".join("yes" if r["fits"][x] else "no"
                                          for x in ACCELERATORS) + " |")


if __name__ == "__main__":
  main()
