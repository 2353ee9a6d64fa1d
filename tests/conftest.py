"""Shared test set-up: 8 fake CPU devices (set before jax is imported)."""

import os
import shutil
import tempfile

# The 8 fake devices run their programs on one shared host thread pool (8 threads by default
# on this 2-core machine). A device blocked in a collective holds a pool thread until all 8 devices
# arrive; when a program has independent collectives (an FSDP all-gather beside a gradient
# all-reduce) the blocked threads can exhaust the pool and the last devices never arrive: XLA
# aborts the process (SIGABRT) after its rendezvous timeout. XLA's CPU client sizes the pool from
# NPROC when it is set; 64 threads cover 8 devices with several collectives in flight each.
os.environ.setdefault("NPROC", "64")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           # late (busy cores) is not hung: wait longer than XLA's 40 s
                           " --xla_cpu_collective_timeout_seconds=300"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=300").strip()
# Programs that several tests (and the pipelines they run as subprocesses) compile alike
# are compiled once per run: XLA's persistent compilation cache, in a directory of this run
# (set here in the xdist controller, inherited by its workers and their subprocesses;
# removed at the end). Measured: a quarter less suite time on 2 cores.
_XLA_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "aya_jax_test_xla_cache", str(os.getpid())))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
_OWNS_XLA_CACHE = _XLA_CACHE.endswith(os.sep + str(os.getpid()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



def pytest_unconfigure(config):
  if _OWNS_XLA_CACHE and not hasattr(config, "workerinput"):  # the run's own cache
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)

# Fixtures of other test modules go below this line.



def random_params(cfg, seed: int = 0, std: float = 0.1) -> dict:
  """Params of cfg's shapes, normal(0, std) from numpy: no init compile (the
  tests that only need some model, not init_params' distribution)."""
  import jax
  import numpy as np
  from aya_jax.models import init_params
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * std).astype(s.dtype), shapes)

def close_to_float32(a, b):
  """Equal to float32 rounding: 1e-5 relative to the array's largest entry."""
  import numpy as np
  b = np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))


# --- hf_tiny_dirs: tiny random Hugging Face models, one directory per variant (hf_test.py) ---
import pytest  # noqa: E402

# transformers config kwargs shared by every tiny HF model (dims of config.tiny())
HF_TINY_DIMS = dict(vocab_size=97, hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                    head_dim=16, intermediate_size=96, num_hidden_layers=2,
                    max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                    initializer_range=0.05)
# variant -> (transformers config class name, extra kwargs)
HF_TINY_VARIANTS = {
    "cohere": ("CohereConfig", dict(logit_scale=0.0625, use_qk_norm=False)),
    "cohere_qk": ("CohereConfig", dict(logit_scale=0.0625, use_qk_norm=True,
                                       rope_parameters=dict(rope_type="default",
                                                            rope_theta=10000.0))),
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rms_norm_eps=1e-5,
                                  rope_parameters=dict(rope_type="linear", factor=2.0,
                                                       rope_theta=10000.0))),
    "llama_bias": ("LlamaConfig", dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32,
                             rope_theta=10000.0))),
    "gemma2": ("Gemma2Config", dict(sliding_window=4, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=1.5)),
    # a sliding layer (window 4, RoPE) then a full one (no positional encoding)
    "cohere2": ("Cohere2Config", dict(
        logit_scale=0.0625, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # a sliding layer (window 4, its own RoPE base) then a full one (linear scaling)
    "gemma3": ("Gemma3TextConfig", dict(
        sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=100.0),
                         "full_attention": dict(rope_type="linear", factor=2.0,
                                                rope_theta=10000.0)})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True,
                                  rope_parameters=dict(rope_type="default",
                                                       rope_theta=1000000.0))),
}


def hf_tiny_model(variant: str, seed: int = 0):
  """A random tiny transformers CausalLM; every parameter (norms too) gets noise."""
  import torch
  import transformers
  name, extra = HF_TINY_VARIANTS[variant]
  config = getattr(transformers, name)(**HF_TINY_DIMS, **extra)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.1)
  return model.eval()


@pytest.fixture(scope="session")
def hf_tiny_dirs(tmp_path_factory):
  """variant -> directory of a tiny random HF model saved with save_pretrained."""
  root = tmp_path_factory.mktemp("hf_tiny")
  dirs = {}
  for seed, variant in enumerate(HF_TINY_VARIANTS):
    dirs[variant] = str(root / variant)
    hf_tiny_model(variant, seed).save_pretrained(dirs[variant])
  return dirs


# --- world_models: a world tokenizer and two tiny random models (evaluation tests) ---


@pytest.fixture(scope="session")
def world_models(tmp_path_factory):
  """A world tokenizer (en, fr, ru) and two random tiny Llamas: `a` a params/ dir (also
  in memory: cfg, params), `b` an HF dir with the tokenizer beside it."""
  import jax
  from aya_jax import checkpoint
  from aya_jax.data import formatting
  from aya_jax.models import config as model_config
  from aya_jax.models import hf, init_params
  from aya_jax.world import bootstrap as world
  d = tmp_path_factory.mktemp("models")
  tok = world.build_tokenizer(str(d / "tok"), ("en", "fr", "ru"))
  cfg = model_config.tiny("llama", vocab_size=len(tok), pad_id=tok.pad_token_id,
                          bos_id=tok.bos_token_id, eos_ids=formatting.end_of_turn_ids(tok))
  params = init_params(cfg, jax.random.key(1))
  checkpoint.save_params(str(d / "a" / "params"), cfg, params)
  hf.save(cfg, jax.device_get(init_params(cfg, jax.random.key(2))), str(d / "b"))
  tok.save_pretrained(str(d / "b"))
  return dict(tok=str(d / "tok"), a=str(d / "a" / "params"), b=str(d / "b"), cfg=cfg,
              params=params)


@pytest.fixture(scope="session")
def world_tok(tmp_path_factory):
  """The world's tokenizer (every language) and its directory."""
  from aya_jax.world import tasks
  d = tmp_path_factory.mktemp("world_tok")
  return tasks.build_tokenizer(str(d)), str(d)


def world_instances(n_per_task: int = 12, seed: int = 0):
  """Random world instances: every language x task, `n_per_task` each, templates in turn."""
  import numpy as np
  from aya_jax.world import tasks
  rng = np.random.default_rng(seed)
  for lang in tasks.LANGUAGES:
    for task in tasks.TASKS:
      for k in range(n_per_task):
        yield tasks.sample_instance(task, lang, rng, template=k % 3)


def read_tensorboard_scalars(logdir) -> dict:
  """{tag: [(step, value)]} of every event file under `logdir`, read with the writer's
  own protobuf definitions (TFRecord framing: length, its CRC, the event, its CRC)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for name in sorted(os.listdir(logdir)):
    if "tfevents" not in name:
      continue
    data = open(os.path.join(logdir, name), "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out
