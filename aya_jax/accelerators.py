"""Published per-chip figures of the accelerators this code plans for and
reports MFU on: the one table (the train loop's MFU, the dry-run planner).

tflops: dense bf16 peak TFLOP/s; hbm_gb: HBM per chip; hbm_gbps: HBM
bandwidth; link_gbps: the interconnect per chip that FSDP traffic crosses
(TPU: ICI; GPUs: NVLink inside a node, with link_gbps_multinode for one
400 Gb/s NIC per GPU across nodes of node_size chips). `kinds` are the
substrings of `jax.Device.device_kind` (lower case) that name the chip
(the longest match wins).
"""

from __future__ import annotations

from typing import Optional

ACCELERATORS = {
    "v5p": dict(tflops=459.0, hbm_gb=95.0, hbm_gbps=2765.0, link_gbps=600.0,
                kinds=("v5p", "tpu v5")),
    "v5e": dict(tflops=197.0, hbm_gb=16.0, hbm_gbps=819.0, link_gbps=200.0,
                kinds=("v5e", "v5 lite", "v5litepod")),
    "v4": dict(tflops=275.0, hbm_gb=32.0, hbm_gbps=1228.0, link_gbps=300.0, kinds=("v4",)),
    "v6e": dict(tflops=918.0, hbm_gb=32.0, hbm_gbps=1640.0, link_gbps=400.0,
                kinds=("v6e", "v6 lite")),
    "h100": dict(tflops=989.0, hbm_gb=80.0, hbm_gbps=3350.0, link_gbps=900.0,
                 link_gbps_multinode=50.0, node_size=8, kinds=("h100",)),
    "h200": dict(tflops=989.0, hbm_gb=141.0, hbm_gbps=4800.0, link_gbps=900.0,
                 link_gbps_multinode=50.0, node_size=8, kinds=("h200",)),
    "a100": dict(tflops=312.0, hbm_gb=80.0, hbm_gbps=2039.0, link_gbps=600.0,
                 link_gbps_multinode=25.0, node_size=8, kinds=("a100",)),
}


def of_device_kind(kind: str) -> Optional[str]:
  """The ACCELERATORS name of a `device_kind` ("NVIDIA H100 80GB HBM3" -> "h100");
  None for a chip not in the table (a CPU)."""
  kind = kind.lower()
  # the longest matching name wins: "tpu v5 lite" is a v5e, "tpu v5" a v5p
  matches = [(len(k), name) for name, a in ACCELERATORS.items() for k in a["kinds"] if k in kind]
  return max(matches)[1] if matches else None


def peak_tflops(device=None) -> float:
  """Dense bf16 peak TFLOP/s of one device (default: the first); 0.0 when unknown."""
  import jax
  name = of_device_kind((device or jax.devices()[0]).device_kind)
  return ACCELERATORS[name]["tflops"] if name else 0.0
