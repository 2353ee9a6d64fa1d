"""Two processes x 2 CPU devices (gloo, 127.0.0.1) == one process x 4 devices.

Each worker runs 3 SFT steps of a fixed tiny model on fixed batches over a
(1, 4, 1) FSDP mesh, each process feeding its half of the global batch
(`sharding.global_batch`), and writes the final params cooperatively
(`checkpoint.save_params`, Orbax). The test restores both params/ dirs and
compares them leaf by leaf, and the logged losses. Slow (~1 min): marked.

    python tests/multihost_test.py WORKER_ID NUM_PROCESSES PORT OUT_DIR
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

STEPS, ROWS, SEQ = 3, 8, 16


def _worker(pid: int, nproc: int, port: int, out: str):
  import jax
  if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid)
  from aya_jax import axes, checkpoint, optim, sharding
  from aya_jax.models import config as model_config
  from aya_jax.train import state as state_lib
  from aya_jax.train import steps
  assert jax.device_count() == 4, jax.devices()
  cfg = model_config.tiny("cohere")
  mesh, rules = sharding.make_mesh((1, 4, 1)), axes.rules("fsdp")
  params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, rules)
  ocfg = optim.default_optim_config()
  ocfg.lr, ocfg.weight_decay = 1e-2, 0.01
  tx = optim.make_optimizer(ocfg, params)
  st = state_lib.create_state(params, tx, jax.tree.map(lambda x: x.sharding, params))
  fn = steps.make_train_step(steps.sft_loss_fn(cfg), tx, steps.loss_token_count)
  rs = np.random.RandomState(0)
  batches = [dict(tokens=rs.randint(3, cfg.vocab_size, (ROWS, SEQ)).astype(np.int32),
                  targets=rs.randint(3, cfg.vocab_size, (ROWS, SEQ)).astype(np.int32),
                  loss_mask=(rs.rand(ROWS, SEQ) < 0.8).astype(np.int32),
                  segment_ids=np.ones((ROWS, SEQ), np.int32),
                  positions=np.tile(np.arange(SEQ, dtype=np.int32), (ROWS, 1)))
             for _ in range(STEPS)]
  local = ROWS // jax.process_count()
  lo = jax.process_index() * local
  bsh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batches[0])
  step = steps.jit_step(fn, state_lib.state_shardings(st), bsh, mesh)
  losses = []
  with sharding.activation_rules(mesh, rules):
    for i, b in enumerate(batches):
      gb = sharding.global_batch({k: v[lo:lo + local] for k, v in b.items()}, mesh)
      st, m = step(st, gb, jax.random.fold_in(jax.random.key(1), i))
      losses.append(float(jax.device_get(m["loss"])))
  checkpoint.save_params(os.path.join(out, "params"), cfg, st.params)
  if jax.process_index() == 0:
    with open(os.path.join(out, "losses.json"), "w") as f:
      json.dump(losses, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(nproc: int, out: str):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // nproc}")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(nproc), str(port), out],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(nproc)]
  logs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  import jax
  from aya_jax import checkpoint
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  _launch(2, multi)
  _launch(1, single)
  with open(os.path.join(multi, "losses.json")) as f, \
       open(os.path.join(single, "losses.json")) as g:
    np.testing.assert_allclose(json.load(f), json.load(g), rtol=1e-5)
  _, pm = checkpoint.load_params(os.path.join(multi, "params"))
  _, ps = checkpoint.load_params(os.path.join(single, "params"))
  flat_m = jax.tree_util.tree_flatten_with_path(pm)[0]
  flat_s = jax.tree.leaves(ps)
  assert len(flat_m) == len(flat_s) > 5
  for (path, a), b in zip(flat_m, flat_s):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
