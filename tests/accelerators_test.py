"""aya_jax.accelerators: device kinds as JAX reports them map to the table."""

import types

import pytest

from aya_jax import accelerators


@pytest.mark.parametrize("kind,name", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("TPU v5 lite", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"),
    ("TPU v4", "v4"), ("TPU v6 lite", "v6e"), ("cpu", None),
])
def test_device_kind_names_the_chip(kind, name):
  assert accelerators.of_device_kind(kind) == name


def test_peak_tflops_of_a_device_and_zero_when_unknown():
  assert accelerators.peak_tflops(types.SimpleNamespace(device_kind="NVIDIA H100 PCIe")) == 989.0
  assert accelerators.peak_tflops(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197.0
  assert accelerators.peak_tflops(types.SimpleNamespace(device_kind="cpu")) == 0.0


def test_every_entry_has_the_planner_fields_and_distinct_kinds():
  kinds = [k for a in accelerators.ACCELERATORS.values() for k in a["kinds"]]
  assert len(kinds) == len(set(kinds))
  for name, a in accelerators.ACCELERATORS.items():
    assert {"tflops", "hbm_gb", "hbm_gbps", "link_gbps"} <= set(a), name
    assert ("link_gbps_multinode" in a) == ("node_size" in a), name
