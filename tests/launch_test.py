"""experiments/launch/slurm_gpu.sbatch in its dry mode: the command and environment it
would run with, checked against what JAX and XLA make of them (JAX's own SLURM detection;
XLA's flag parser, which aborts on a flag it does not know)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "experiments", "launch", "slurm_gpu.sbatch")
SLURM = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[001-008]", SLURM_NTASKS="8",
             SLURM_PROCID="3", SLURM_LOCALID="0", SLURM_GPUS_ON_NODE="8",
             SLURM_JOB_NAME="aya_jax")


def _dry_run(*args, **env):
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_", "JAX_"))}
  out = subprocess.run(["bash", SBATCH, *args], env=dict(base, AYA_JAX_DRY_RUN="1", **env),
                       capture_output=True, text=True, check=True, cwd=ROOT).stdout
  lines = out.strip().splitlines()
  return dict(l.split("=", 1) for l in lines[:-1]), lines[-1]


def test_one_task_per_node_gets_every_gpu_of_its_node(monkeypatch):
  env, cmd = _dry_run("--config=configs/sft.py", "--config.mesh.shape=(1,-1,1)", **SLURM)
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  assert cmd.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 ")
  assert "-m aya_jax.main --workdir=" + os.path.join(ROOT, "runs", "aya_jax-4242") in cmd
  assert cmd.rstrip().endswith(r"--config=configs/sft.py --config.mesh.shape=\(1\,-1\,1\)")
  # what jax.distributed.initialize() then makes of it (jax/_src/distributed.py reads
  # JAX_LOCAL_DEVICE_IDS first; the SLURM detection fills only what is still unset)
  from jax._src import clusters
  for k, v in SLURM.items():
    monkeypatch.setenv(k, v)
  detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
  ids = [int(x) for x in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
  address, n, pid, local = detect(None, None, None, ids, None, None)
  assert (n, pid, local) == (8, 3, list(range(8))) and address.startswith("gpu001:")
  assert detect(None, None, None, None, None, None)[3] == [0]  # without it: one GPU per node


def test_a_partial_node_and_overrides():
  env, _ = _dry_run(**dict(SLURM, SLURM_GPUS_ON_NODE="4"))
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  env, _ = _dry_run(**dict(SLURM, JAX_LOCAL_DEVICE_IDS="0,1", XLA_FLAGS="--xla_dump_to=/tmp/x"))
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1" and env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"


def test_its_xla_flags_are_flags_xla_knows():
  """XLA parses XLA_FLAGS at start and aborts on an unknown one (a typo would kill every
  node at start-up): the script's flags start a JAX process; a bogus one does not."""
  env, _ = _dry_run(**SLURM)
  code = "import jax; jax.devices()"
  run = lambda flags: subprocess.run([sys.executable, "-c", code], capture_output=True,
                                     text=True, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                         XLA_FLAGS=flags))
  assert run(env["XLA_FLAGS"]).returncode == 0, run(env["XLA_FLAGS"]).stderr[-2000:]
  bad = run(env["XLA_FLAGS"] + " --xla_gpu_no_such_flag=true")
  assert bad.returncode != 0 and "Unknown flag" in bad.stderr


def test_the_batch_header_asks_for_requeue_and_an_early_sigterm():
  head = [l for l in open(SBATCH) if l.startswith("#SBATCH")]
  assert "#SBATCH --signal=B:TERM@300\n" in head and "#SBATCH --requeue\n" in head
  assert "#SBATCH --ntasks-per-node=1\n" in head
