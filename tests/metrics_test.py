"""Tests for aya_jax.metrics.

Reference: the values written, read back from metrics.jsonl; means
computed by hand.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax import metrics
from conftest import read_tensorboard_scalars


def test_write_and_read_back(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricWriter(str(workdir)) as w:
    w.write(1, {"loss": jnp.float32(2.5), "lr": 1e-4})
    w.write(2, {"loss": np.array([1.25]), "grad_norm": float("nan")})
    # flushed per write: readable before close
    assert len(metrics.read_metrics(str(workdir))) == 2
  rows = metrics.read_metrics(str(workdir / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["loss"] == 2.5 and rows[0]["lr"] == 1e-4
  assert rows[1]["loss"] == 1.25 and math.isnan(rows[1]["grad_norm"])
  assert all(isinstance(r["time"], float) for r in rows)
  assert set(rows[0]) == {"step", "time", "loss", "lr"}
  # a second writer (resumed run) appends
  with metrics.MetricWriter(str(workdir)) as w:
    w.write(3, {"loss": 1.0})
  assert [r["step"] for r in metrics.read_metrics(str(workdir))] == [1, 2, 3]


def test_non_zero_process_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  workdir = tmp_path / "run"
  w = metrics.MetricWriter(str(workdir), also_tensorboard=True)
  w.write(1, {"loss": 1.0})
  w.close()
  assert not workdir.exists()


def test_rejects_non_scalars_and_reserved_names(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as w:
    with pytest.raises(ValueError, match="'loss' is not a scalar"):
      w.write(1, {"loss": np.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
      w.write(1, {"step": 3})


def test_malformed_metrics_line_names_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 1}) + "\n{oops\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
    metrics.read_metrics(str(path))


def test_tensorboard_events_hold_the_jsonl_values(tmp_path):
  with metrics.MetricWriter(str(tmp_path), also_tensorboard=True) as w:
    w.write(5, {"loss": 0.5, "lr": 1e-3})
    w.write(10, {"loss": 0.25, "lr": 5e-4})
  assert metrics.read_metrics(str(tmp_path))[0]["loss"] == 0.5
  got = read_tensorboard_scalars(tmp_path / "tensorboard")
  assert got == {"loss": [(5, 0.5), (10, 0.25)],
                 "lr": [(5, pytest.approx(1e-3)), (10, pytest.approx(5e-4))]}


def test_mean_accumulator():
  acc = metrics.MeanAccumulator()
  acc.add({"loss": jnp.float32(1.0), "acc": jnp.float32(0.5)})
  acc.add({"loss": jnp.float32(2.0)})
  acc.add({"loss": jnp.asarray(6.0), "acc": np.float32(0.25)})
  assert len(acc) == 3
  out = acc.result()
  assert out == {"loss": 3.0, "acc": 0.375}
  assert all(type(v) is float for v in out.values())
  assert len(acc) == 0 and acc.result() == {}
