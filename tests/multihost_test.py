"""Two processes x 2 CPU devices (gloo, 127.0.0.1) == one process x 4 devices.

One launch per topology runs, in each worker:
- SFT: 3 steps of a fixed tiny model on fixed batches over a (1, 4, 1) FSDP mesh, each
  process feeding its half of the global batch (`sharding.global_batch`); params written
  cooperatively (`checkpoint.save_params`, Orbax), also after step 0 and step 1;
- sampling: `sampler.generate` with the trained (globally sharded) params, the batch of
  ragged prompts sharded over the 4-device mesh, temperature sampling, 2 samples each;
- RLOO: one round (`train.policy_gradient.train`) on fixed samples, the trained params as the
  policy and the step-0 params as the reference;
- merge: the merge stage's call on every process, `merge_stream.merge_checkpoints` of the
  step-1 and final params with DARE-TIES against the step-0 params (the cooperatively
  written checkpoints), into one shared params/ dir;
- arbitrage scoring (`arbitrage.stage.score_completions`) on every process, run twice:
  process 0 writes, each completion is scored once in scored.jsonl;
- preemption (2 processes only): process 1 alone gets SIGTERM; both stop at the same step
  and the resumed run ends with an uninterrupted run's params.
The test compares losses, params, generated tokens (every process's and the single run's)
and the merged params. Slow (~1-2 min on 2 cores): marked.

    python tests/multihost_test.py WORKER_ID NUM_PROCESSES PORT OUT_DIR
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

STEPS, ROWS, SEQ, NEW_TOKENS = 3, 8, 16, 8


def _worker(pid: int, nproc: int, port: int, out: str):
  import jax
  if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid)
  from aya_jax import axes, checkpoint, optim, sharding
  from aya_jax.models import config as model_config
  from aya_jax.sampling import methods, sampler
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
      if i < 2:  # inputs of the merge below
        checkpoint.save_params(os.path.join(out, f"params_{i}"), cfg, st.params)
      gb = sharding.global_batch({k: v[lo:lo + local] for k, v in b.items()}, mesh)
      st, m = step(st, gb, jax.random.fold_in(jax.random.key(1), i))
      losses.append(float(jax.device_get(m["loss"])))
  checkpoint.save_params(os.path.join(out, "params"), cfg, st.params)
  from aya_jax.train import common  # the stages' end: params/ and the HF export (bf16)
  common.finish(os.path.join(out, "finished"), cfg, st.params, export_hf=True)
  if jax.process_index() == 0:
    with open(os.path.join(out, "losses.json"), "w") as f:
      json.dump(losses, f)

  # sampling: every process passes the same prompts and key, gets every row
  prompts = [rs.randint(3, cfg.vocab_size, (n,)).astype(np.int32) for n in (3, 7, 5, 9, 4, 6)]
  res = sampler.generate(cfg, st.params, prompts, jax.random.key(2), methods.from_config(1.0),
                         max_new_tokens=NEW_TOKENS, n=2, mesh=mesh)
  np.savez(os.path.join(out, f"samples_{jax.process_index()}.npz"), tokens=res.tokens,
           lengths=res.lengths, logprobs=res.logprobs)

  _rloo(out, cfg, st.params, mesh, rules, rs)
  _merge(out, os.path.join(out, "merged"))  # what the 'merge' stage runs on every host
  _score(out)
  if nproc > 1:
    _preempt(out, cfg, mesh, rules, batches, bsh)


class _Batches:
  """This process's half of the fixed batches, in turn; checkpointable."""

  def __init__(self, batches):
    import jax
    self.batches, self.position = batches, 0
    local = ROWS // jax.process_count()
    self.lo, self.n = jax.process_index() * local, local

  def __next__(self):
    b = self.batches[self.position % len(self.batches)]
    self.position += 1
    return {k: v[self.lo:self.lo + self.n] for k, v in b.items()}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


def _preempt(out, cfg, mesh, rules, batches, bsh):
  """Process 1 alone gets SIGTERM during step 1: both processes stop at step 2 (the first
  log step) with one checkpoint; resumed, they end with an uninterrupted run's params."""
  import signal
  import jax
  from aya_jax import checkpoint, optim, sharding
  from aya_jax.train import loop as loop_lib
  from aya_jax.train import state as state_lib
  from aya_jax.train import steps

  def fresh():
    params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, rules)
    tx = optim.make_optimizer(optim.default_optim_config(), params)
    st = state_lib.create_state(params, tx, jax.tree.map(lambda x: x.sharding, params))
    train_step = steps.make_train_step(steps.sft_loss_fn(cfg), tx, steps.loss_token_count)
    step = steps.jit_step(train_step, state_lib.state_shardings(st), bsh, mesh)
    return st, step

  lc = loop_lib.default_loop_config()
  lc.num_steps, lc.log_every, lc.checkpoint_every = 6, 2, 100
  calls = []

  def step_once_then_sigterm(state, batch, rng):
    calls.append(1)
    if len(calls) == 1 and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return step(state, batch, rng)

  def run(name, step_fn, st):
    with sharding.activation_rules(mesh, rules):
      return loop_lib.train_loop(st, step_fn, _Batches(batches), lc, os.path.join(out, name),
                                 mesh)

  st, step = fresh()
  whole = run("whole", step, st)
  st, step = fresh()
  stopped = None
  try:
    run("preempted", step_once_then_sigterm, st)
  except loop_lib.Preempted as e:
    stopped = str(e)
  st, step = fresh()
  resumed = run("preempted", step, st)
  checkpoint.save_params(os.path.join(out, "whole_params"), cfg, whole.params)
  checkpoint.save_params(os.path.join(out, "resumed_params"), cfg, resumed.params)
  latest = checkpoint.Checkpointer(os.path.join(out, "preempted")).latest_step()
  with open(os.path.join(out, f"preempt_{jax.process_index()}.json"), "w") as f:
    json.dump(dict(stopped=stopped, latest=latest, steps=int(resumed.step)), f)


def _score(out: str):
  """Arbitrage's scoring on every process (a scorer may be sharded), twice (the second
  finds everything scored): one writer, each completion scored once in scored.jsonl."""
  import jax
  from aya_jax import artifacts, reward
  from aya_jax.arbitrage import stage
  from aya_jax.data import records
  comps = [records.CompletionRecord(id=f"p{i}#t#0", language="en", completion="x" * (i + 1),
                                    prompt=({"role": "user", "content": "q"},), teacher="t")
           for i in range(5)]
  path, scored = os.path.join(out, "completions.jsonl"), os.path.join(out, "scored.jsonl")
  if jax.process_index() == 0:
    records.write_jsonl(path, comps)
  artifacts.sync("completions written")
  scorer = reward.FunctionScorer(lambda recs: [float(len(r.completion)) for r in recs])
  for _ in range(2):
    got, _ = stage.score_completions(path, scored, scorer, chunk=2)
    assert [r.score for r in got] == [1.0, 2.0, 3.0, 4.0, 5.0], got


def _rloo(out, cfg, policy, mesh, rules, rs):
  """One RLOO round (online.algorithm='rloo') on fixed samples: the policy is the
  SFT result, the reference its step-0 params; every process holds every row."""
  import jax
  from aya_jax import checkpoint, sharding
  from aya_jax.train import online, policy_gradient
  config = online.default_config()
  config.data.seq_len, config.data.batch_size = SEQ, 4
  config.optim.lr, config.optim.warmup_steps, config.optim.total_steps = 1e-3, 0, 3
  config.loop.num_steps, config.loop.checkpoint_every, config.loop.log_every = 3, 100, 1
  config.online.kl_coef, config.online.k, config.online.algorithm = 0.1, 2, "rloo"
  prompts = [rs.randint(3, cfg.vocab_size, (n,)).astype(np.int32) for n in (3, 5, 4)]
  completions = [rs.randint(3, cfg.vocab_size, (n,)).astype(np.int32) for n in (4, 2, 6, 3, 5, 1)]
  rows = policy_gradient.sample_rows(prompts, completions, 2, SEQ, 0)
  scores = rs.rand(3, 2).astype(np.float32)
  _, ref = checkpoint.load_model(os.path.join(out, "params_0"),
                                 sharding.param_shardings(cfg, mesh, rules))
  params, rep = policy_gradient.train(config, os.path.join(out, "rloo"), cfg, policy, ref,
                                      rows, scores, np.ones(3, bool), mesh, rules)
  checkpoint.save_params(os.path.join(out, "rloo_params"), cfg, params)
  with open(os.path.join(out, f"rloo_{jax.process_index()}.json"), "w") as f:
    json.dump(rep, f)


def _merge(run: str, out: str):
  """DARE-TIES of a run's step-1 and final params against its step-0 params."""
  from aya_jax.merging import stream as merge_stream
  merge_stream.merge_checkpoints(
      [os.path.join(run, "params_1"), os.path.join(run, "params")], "dare_ties",
      dict(density=0.5), out=out, base=os.path.join(run, "params_0"),
      model_merge_parameters=[dict(weight=1.0), dict(weight=0.5)], seed=3)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(nproc: int, out: str, timeout: int = 400):
  """Runs the workers; on a failure or a hang, every log in the assertion message."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // nproc}")
  port = _free_port()
  logs = [os.path.join(out, f"worker_{i}.log") for i in range(nproc)]
  os.makedirs(out)
  procs = []
  for i in range(nproc):
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-X", "faulthandler", __file__, str(i), str(nproc), str(port), out],
          env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    for p in procs:
      p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()  # a peer that died leaves the others in a collective
      p.wait()
  texts = [open(path).read() for path in logs]
  failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  assert not failed, f"workers (index, returncode) {failed} of {nproc}:\n" + "\n".join(
      f"--- worker {i}\n{t[-3000:]}" for i, t in enumerate(texts))


def _assert_same_params(path_a: str, path_b: str, **tol):
  import jax
  from aya_jax import checkpoint
  _, pa = checkpoint.load_params(path_a)
  _, pb = checkpoint.load_params(path_b)
  flat_a = jax.tree_util.tree_flatten_with_path(pa)[0]
  flat_b = jax.tree.leaves(pb)
  assert len(flat_a) == len(flat_b) > 5
  for (path, a), b in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=f"{path_a}: "
                               f"{jax.tree_util.keystr(path)}", **tol)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  _launch(2, multi)
  _launch(1, single)
  # SFT: losses and trained params
  with open(os.path.join(multi, "losses.json")) as f, \
       open(os.path.join(single, "losses.json")) as g:
    np.testing.assert_allclose(json.load(f), json.load(g), rtol=1e-5)
  _assert_same_params(os.path.join(multi, "params"), os.path.join(single, "params"),
                      rtol=1e-5, atol=1e-6)
  # HF export on 2 processes (it used to gather the params to one host and fail): the
  # trained params rounded to bf16, written once
  import jax
  import ml_dtypes
  from aya_jax import checkpoint
  _, exported = checkpoint.load_model(os.path.join(multi, "finished", "hf"))
  _, trained = checkpoint.load_model(os.path.join(multi, "params"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b).astype(ml_dtypes.bfloat16).astype(np.float32)),
      exported, trained)
  # sampling: both processes got every row, the single run's tokens
  runs = [np.load(os.path.join(multi, f"samples_{i}.npz")) for i in range(2)]
  runs.append(np.load(os.path.join(single, "samples_0.npz")))
  assert runs[0]["tokens"].shape == (12, NEW_TOKENS)
  for r in runs[1:]:
    np.testing.assert_array_equal(r["tokens"], runs[0]["tokens"])
    np.testing.assert_array_equal(r["lengths"], runs[0]["lengths"])
    np.testing.assert_allclose(r["logprobs"], runs[0]["logprobs"], rtol=1e-4, atol=1e-5)
  assert len({tuple(t) for t in runs[0]["tokens"]}) > 6  # sampled, not one row repeated
  # RLOO: the same KL, rewards and trained params on 2 processes as on 1
  reps = [json.load(open(os.path.join(multi, f"rloo_{i}.json"))) for i in range(2)]
  one = json.load(open(os.path.join(single, "rloo_0.json")))
  assert reps[0] == reps[1] and one["mean_kl"] != 0.0
  for key in ("mean_kl", "mean_reward"):
    assert reps[0][key] == pytest.approx(one[key], rel=1e-4, abs=1e-5)
  _assert_same_params(os.path.join(multi, "rloo_params"), os.path.join(single, "rloo_params"),
                      rtol=1e-4, atol=1e-5)
  # merge: written once by the two processes, exactly the merge of the same inputs in
  # this one process; close to the single run's (its inputs differ in float rounding)
  here = str(tmp_path / "merged_here")
  _merge(multi, here)
  _assert_same_params(os.path.join(multi, "merged"), here, rtol=0, atol=0)
  _assert_same_params(os.path.join(multi, "merged"), os.path.join(single, "merged"),
                      rtol=1e-4, atol=1e-5)
  # arbitrage scores: one writer, each completion once (the strict reader refuses duplicates)
  from aya_jax.data import records
  for run in (multi, single):
    got = records.read_jsonl(os.path.join(run, "scored.jsonl"), "completion")
    assert [r.id for r in got] == [f"p{i}#t#0" for i in range(5)]
  # preemption: one process's SIGTERM stops both at the same step; the resumed run ends
  # where an uninterrupted one does
  for i in range(2):
    got = json.load(open(os.path.join(multi, f"preempt_{i}.json")))
    assert got["stopped"] == "stopped at step 2; resume by running the same command", got
    assert got["steps"] == 6 and got["latest"] == 6
  _assert_same_params(os.path.join(multi, "whole_params"), os.path.join(multi, "resumed_params"),
                      rtol=0, atol=0)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
