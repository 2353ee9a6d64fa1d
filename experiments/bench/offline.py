"""Set before jax or transformers is imported: no network for the HF libraries, and with
`threads == 1` one compute thread for XLA on CPU (torch's is set by each contender)."""

import os


def isolate(threads: int) -> None:
  for key, value in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                         WANDB_DISABLED="true", WANDB_MODE="disabled",
                         TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1").items():
    os.environ.setdefault(key, value)
  if threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
