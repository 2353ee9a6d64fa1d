"""The training core: exact resume, NaN guard, preemption, accumulation, params I/O."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax import axes, checkpoint, optim, sharding
from aya_jax.metrics import read_metrics
from aya_jax.models import init_params, tiny
from aya_jax.train import loop as loop_lib
from aya_jax.train import state as state_lib
from aya_jax.train import steps
from conftest import read_tensorboard_scalars

CFG = tiny("llama", vocab_size=64, d_model=32, head_dim=8, n_heads=2, n_kv_heads=1, d_ff=64)


class ListIterator:
  """A checkpointable iterator over fixed random batches (grain-like state)."""

  def __init__(self, n=50, b=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    self.batches = []
    for _ in range(n):
      toks = rng.integers(3, 64, (b, length + 1)).astype(np.int32)
      self.batches.append(dict(tokens=toks[:, :-1], targets=toks[:, 1:],
                               loss_mask=np.ones((b, length), np.int32),
                               segment_ids=np.ones((b, length), np.int32),
                               positions=np.tile(np.arange(length, dtype=np.int32), (b, 1))))
    self.i = 0

  def __next__(self):
    out = self.batches[self.i % len(self.batches)]
    self.i += 1
    return out

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def _setup(loss_fn=None, grad_accum=1, lr=3e-3, mesh_shape=(1, 1, 1)):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  rules = axes.rules("fsdp")
  ocfg = optim.default_optim_config()
  ocfg.lr, ocfg.warmup_steps, ocfg.total_steps = lr, 2, 8
  params = sharding.init_params_sharded(CFG, jax.random.key(0), mesh, rules)
  tx = optim.make_optimizer(ocfg, params)
  st = state_lib.create_state(params, tx, jax.tree.map(lambda x: x.sharding, params))
  fn = steps.make_train_step(loss_fn or steps.sft_loss_fn(CFG), tx, steps.loss_token_count,
                             grad_accum, optim.make_schedule(ocfg))
  bsh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, 2), next(ListIterator(1)))
  return st, steps.jit_step(fn, state_lib.state_shardings(st), bsh, mesh), mesh


def _loop_cfg(n=8):
  c = loop_lib.default_loop_config()
  c.num_steps, c.log_every, c.checkpoint_every = n, 2, 4
  return c


def test_killed_run_resumes_to_the_same_params(tmp_path):
  st, fn, mesh = _setup()
  full = loop_lib.train_loop(st, fn, ListIterator(n=2), _loop_cfg(), str(tmp_path / "a"), mesh)
  st, fn, mesh = _setup()
  with pytest.raises(loop_lib.Preempted):
    loop_lib.train_loop(st, fn, ListIterator(n=2), _loop_cfg(), str(tmp_path / "b"), mesh,
                        stop_after=3)
  st, fn, mesh = _setup()  # a fresh process: new state, new iterator
  resumed = loop_lib.train_loop(st, fn, ListIterator(n=2), _loop_cfg(), str(tmp_path / "b"),
                                mesh)
  assert int(resumed.step) == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               full.params, resumed.params)
  logged = read_metrics(str(tmp_path / "a"))
  assert [m["step"] for m in logged] == [2, 4, 6, 8]
  assert logged[-1]["loss"] < logged[0]["loss"] - 0.1  # two batches, memorised
  # the same values as TensorBoard events (process 0's workdir/tensorboard)
  events = read_tensorboard_scalars(tmp_path / "a" / "tensorboard")
  assert events["loss"] == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in logged]


def test_sigterm_checkpoints_and_stops(tmp_path):
  st, fn, mesh = _setup()

  def on_log(step, scalars):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(loop_lib.Preempted, match="step 2"):
    loop_lib.train_loop(st, fn, ListIterator(), _loop_cfg(), str(tmp_path), mesh, on_log=on_log)
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 2


def test_nonfinite_steps_are_skipped_then_fail(tmp_path):
  base = steps.sft_loss_fn(CFG)

  def nan_loss(params, mb, normalizer, rng):
    loss, aux = base(params, mb, normalizer, rng)
    return loss * jnp.nan, aux

  st, fn, mesh = _setup(nan_loss)
  before = jax.device_get(st.params)
  batch = sharding.global_batch(next(ListIterator()), mesh)
  st, m = fn(st, batch, jax.random.key(0))
  assert int(m["nonfinite"]) == 1
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(st.params))
  st, fn, mesh = _setup(nan_loss)
  with pytest.raises(FloatingPointError, match="step 4"):
    loop_lib.train_loop(st, fn, ListIterator(), _loop_cfg(), str(tmp_path), mesh)


def test_params_dir_round_trip_and_load_model(tmp_path):
  params = init_params(CFG, jax.random.key(3))
  checkpoint.save_params(str(tmp_path / "params"), CFG, params)
  cfg, loaded = checkpoint.load_model(str(tmp_path / "params"))
  assert cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, params, loaded)
  mesh = sharding.make_mesh((2, 4, 1))
  sh = sharding.param_shardings(CFG, mesh, axes.rules("fsdp"))
  _, placed = checkpoint.load_params(str(tmp_path / "params"), sh)
  assert placed["embedder"]["embedding"].sharding == sh["embedder"]["embedding"]
  with pytest.raises(FileNotFoundError, match="neither an aya_jax params"):
    checkpoint.load_model(str(tmp_path))


def test_params_saved_from_a_mesh_load_on_one_device(tmp_path):
  mesh = sharding.make_mesh((1, 8, 1))
  params = sharding.init_params_sharded(CFG, jax.random.key(5), mesh, axes.rules("fsdp"))
  checkpoint.save_params(str(tmp_path / "p"), CFG, params)
  _, loaded = checkpoint.load_model(str(tmp_path / "p"))
  leaf = loaded["layers"]["attn"]["q"]["kernel"]
  assert len(leaf.sharding.device_set) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, loaded)


# ---------------------------------------------- faults: NaN lr, skipped steps, lock, config


def test_nonfinite_learning_rate_is_rejected_at_config_time():
  for bad in (float("nan"), float("inf"), 0.0, -1e-3):
    ocfg = optim.default_optim_config()
    ocfg.lr = bad
    with pytest.raises(ValueError, match="optim.lr"):
      optim.make_optimizer(ocfg, {"w": jnp.zeros(3)})


def test_nonfinite_update_with_finite_loss_is_skipped():
  """Adam with eps=0 on a zero gradient gives 0/0 = NaN updates while the loss
  and the gradient norm are finite: the step must be skipped all the same."""
  ocfg = optim.default_optim_config()
  ocfg.eps, ocfg.max_grad_norm = 0.0, 0.0
  params = {"w": jnp.ones((3,))}
  tx = optim.make_optimizer(ocfg, params)
  st = state_lib.create_state(params, tx)
  const = lambda p, mb, n, rng: (jnp.sum(p["w"] * 0.0) + 1.0, {})  # zero gradient
  fn = jax.jit(steps.make_train_step(const, tx, lambda b: 1.0))
  st, m = fn(st, {"x": jnp.zeros((2, 1))}, jax.random.key(0))
  assert int(m["nonfinite"]) == 1 and np.isfinite(float(m["loss"]))
  np.testing.assert_array_equal(np.asarray(st.params["w"]), np.ones(3))


def test_logged_lr_is_the_rate_the_optimizer_applied(tmp_path):
  """A skipped step advances state.step but not the optimizer: the logged lr
  must follow the optimizer's own count (warmup 2, cosine to step 8)."""
  base = steps.sft_loss_fn(CFG)

  def nan_on_step_1(params, mb, normalizer, rng):
    loss, aux = base(params, mb, normalizer, rng)
    return jnp.where(mb["tokens"][0, 0] == -1, jnp.nan, loss), aux

  st, fn, mesh = _setup(nan_on_step_1)
  it = ListIterator(n=4)
  it.batches[1] = dict(it.batches[1], tokens=it.batches[1]["tokens"].copy())
  it.batches[1]["tokens"][0, 0] = -1
  ocfg = optim.default_optim_config()
  ocfg.lr, ocfg.warmup_steps, ocfg.total_steps = 3e-3, 2, 8
  schedule = optim.make_schedule(ocfg)
  lrs, applied = [], 0
  for i in range(4):
    st, m = fn(st, sharding.global_batch(next(it), mesh), jax.random.key(i))
    lrs.append(float(m["lr"]))
    assert float(m["lr"]) == pytest.approx(float(schedule(applied)))
    applied += 1 - int(m["nonfinite"])
  assert applied == 3 and lrs[1] == lrs[2]  # step 2 re-uses the rate step 1 did not apply
  assert int(optim.updates_applied(st.opt_state)) == 3 and int(st.step) == 4


def test_nonfinite_params_are_never_checkpointed(tmp_path):
  st, fn, mesh = _setup()
  st = st.replace(params=jax.tree.map(lambda x: x * jnp.nan, st.params))  # e.g. a NaN init
  cfg = _loop_cfg()
  cfg.max_nonfinite = 100  # past the NaN guard: the checkpoint itself must refuse
  with pytest.raises(FloatingPointError, match="step 4: the params hold non-finite values"):
    loop_lib.train_loop(st, fn, ListIterator(), cfg, str(tmp_path), mesh)
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() is None


def test_second_sigterm_exits_at_once():
  with loop_lib._SignalFlag() as flag:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.raised
    with pytest.raises(SystemExit, match="second SIGTERM"):
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(1000):  # the handler runs between bytecodes
        pass


def test_num_steps_zero_is_an_error(tmp_path):
  st, fn, mesh = _setup()
  with pytest.raises(ValueError, match="num_steps=0"):
    loop_lib.train_loop(st, fn, ListIterator(), _loop_cfg(0), str(tmp_path), mesh)


def test_workdir_lock_refuses_a_second_run(tmp_path):
  from aya_jax.train import resume
  with resume.WorkdirLock(str(tmp_path)):
    st, fn, mesh = _setup()
    with pytest.raises(resume.WorkdirInUse, match=f"pid {os.getpid()}"):
      loop_lib.train_loop(st, fn, ListIterator(), _loop_cfg(), str(tmp_path), mesh)
  st, fn, mesh = _setup()  # released: the run goes ahead
  assert int(loop_lib.train_loop(st, fn, ListIterator(), _loop_cfg(2), str(tmp_path),
                                 mesh).step) == 2


def test_resume_with_another_training_config_is_refused(tmp_path):
  """A run killed at step 3 under lr 3e-3; a second command with lr 1e-2 on
  the same workdir must not silently continue from the first run's state."""
  from aya_jax.train import resume, sft
  d = str(tmp_path)
  config = sft.default_config()
  config.optim.lr = 3e-3
  st, fn, mesh = _setup()
  with pytest.raises(loop_lib.Preempted):
    loop_lib.train_loop(st, fn, ListIterator(), _loop_cfg(), d, mesh, stop_after=3,
                        run_config=config)
  other = sft.default_config()
  other.optim.lr = 1e-2
  st, fn, mesh = _setup()
  with pytest.raises(resume.ConfigChanged, match=r"optim.lr: 0.003 -> 0.01"):
    loop_lib.train_loop(st, fn, ListIterator(), _loop_cfg(), d, mesh, run_config=other)
  # fields that do not change what is trained may change (more steps, another mesh)
  longer = sft.default_config()
  longer.optim.lr, longer.loop.num_steps, longer.mesh.shape = 3e-3, 8, (1, 1, 1)
  resume.check_config(d, longer, has_checkpoint=True)
  # the documented override resumes anyway
  other.loop.allow_config_change = True
  st, fn, mesh = _setup()
  out = loop_lib.train_loop(st, fn, ListIterator(), _loop_cfg(), d, mesh, run_config=other)
  assert int(out.step) == 8
