"""Batched sampling: one prefill, then a `lax.while_loop` decode over a KV cache.

`generate(cfg, params, prompts, rng, method, max_new_tokens, stop_ids, n)`:

1. Ragged prompts are left-padded to a length bucket (`bucket_length`) and
   the batch to a batch bucket, so a new prompt length or a short last batch
   rarely compiles again. Padding has segment id 0 and each row has its own
   positions 0..len-1, so padding never changes a row's numbers.
2. Prefill runs the padded prompts once into a cache of `bucket +
   max_new_tokens` slots; only the last column is projected to logits.
3. For n > 1 the cache (and the last logits) is repeated along the batch:
   the prompt is never recomputed. Row `i * n + j` is sample j of prompt i.
4. Decode is a `lax.while_loop`: sample from the current logits, write the
   token, feed it back for the next logits. A row is done after it emits
   any stop id or `max_new_tokens` tokens; from then on it emits `pad_id`
   (log-probs 0), its fed tokens have segment id 0 (they never enter
   attention), and the loop ends as soon as every row is done.

Randomness: prompt i gets key `fold_in(rng, i)` (or `rng[i]` when `rng` is a
[B] array of keys); sample j of it at step t uses `fold_in(fold_in(key, j),
t)`. A row's tokens depend only on its key and its logits, not on the batch.

Everything from prefill to the end of decode is one jitted function, built
once per (config, method, max_new_tokens, n, stop ids, pad id, mesh) and
compiled by jit once per (batch, prompt) bucket. With a mesh, the batch is
sharded over ('data', 'fsdp') and params as in training (`axes.rules`). A
mesh may span several processes (multi-host): every process passes the same
prompts and rng and gets every row back.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from aya_jax import axes as axes_lib
from aya_jax import checkpoint, losses
from aya_jax import sharding as sharding_lib
from aya_jax.data import formatting
from aya_jax.models import lora
from aya_jax.models.config import ModelConfig
from aya_jax.models.layers import dtype_of
from aya_jax.models.transformer import (Transformer, init_cache, output_logits,
                                        unembed_matrix)
from aya_jax.sampling import methods as methods_lib

MIN_BUCKET = 16
POW2_UP_TO = 512  # powers of two up to here, then multiples of it


def bucket_length(n: int) -> int:
  """16, 32, ..., 512, then multiples of 512."""
  if n <= POW2_UP_TO:
    return max(MIN_BUCKET, 1 << max(0, (n - 1).bit_length()))
  return -(-n // POW2_UP_TO) * POW2_UP_TO


def bucket_batch(b: int, multiple: int = 1) -> int:
  """Next power of two, rounded up to a multiple of the batch shards."""
  b = 1 << max(0, (b - 1).bit_length())
  return -(-b // multiple) * multiple


@dataclasses.dataclass
class SampleResult:
  """What `generate` returns; rows are [prompt 0 sample 0..n-1, prompt 1, ...].

  tokens          int32 [B*n, max_new]   pad_id after a row is done
  logprobs        float32 [B*n, max_new] log-prob under the sampling
                  distribution (0 for greedy and on padding)
  model_logprobs  float32 [B*n, max_new] log-prob under the raw model (0 on
                  padding)
  lengths         int32 [B*n]  generated tokens, the stop token included
  stopped         bool [B*n]   the row ended with a stop id (not by length)
  """
  tokens: np.ndarray
  logprobs: np.ndarray
  model_logprobs: np.ndarray
  lengths: np.ndarray
  stopped: np.ndarray
  n: int = 1

  def completion(self, row: int) -> np.ndarray:
    """The generated ids of one row (stop token included)."""
    return self.tokens[row, :self.lengths[row]]

  def texts(self, tokenizer, stop_ids: Optional[Sequence[int]] = None) -> list[str]:
    """Detokenised rows, cut at the first stop id (the template's end of turn
    by default), special tokens skipped."""
    from aya_jax.data import formatting  # pylint: disable=import-outside-toplevel
    stop = tuple(formatting.end_of_turn_ids(tokenizer) if stop_ids is None else stop_ids)
    return [formatting.decode_completion(tokenizer, self.completion(r), stop)
            for r in range(self.tokens.shape[0])]


def _as_prompt_keys(rng, b: int, b_pad: int):
  """[b_pad] typed keys: fold_in(rng, i) for one key, or rng[i] for [b] keys."""
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # raw uint32 key data
  if rng.ndim == 0:
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(b_pad))
  if rng.shape != (b,):
    raise ValueError(f"generate: rng must be one key or one key per prompt ({b}); got "
                     f"shape {rng.shape}")
  if b_pad > b:  # padding rows reuse key 0; their samples are dropped
    rng = jnp.concatenate([rng, jnp.broadcast_to(rng[:1], (b_pad - b,))])
  return rng


def _pad_prompts(prompts, b_pad: int, length: int, pad_id: int):
  """Left-padded tokens, positions and segment ids [b_pad, length]; lengths [b_pad]."""
  tokens = np.full((b_pad, length), pad_id, np.int32)
  positions = np.zeros((b_pad, length), np.int32)
  segments = np.zeros((b_pad, length), np.int32)
  lengths = np.ones((b_pad,), np.int32)  # padding rows: a one-token prompt
  segments[:, -1] = 1
  for i, p in enumerate(prompts):
    m = len(p)
    tokens[i, length - m:] = p
    positions[i, length - m:] = np.arange(m)
    segments[i, :] = 0
    segments[i, length - m:] = 1
    lengths[i] = m
  return tokens, positions, segments, lengths


def _check_prompts(cfg: ModelConfig, prompts, max_new_tokens: int):
  out = []
  for i, p in enumerate(prompts):
    p = np.asarray(p)
    if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
      raise ValueError(f"generate: prompt {i} must be a 1-D array of token ids, got "
                       f"shape {p.shape} dtype {p.dtype}")
    if p.size == 0:
      raise ValueError(f"generate: prompt {i} is empty")
    bad = p[(p < 0) | (p >= cfg.vocab_size)]
    if bad.size:
      raise ValueError(f"generate: prompt {i} has token id {int(bad[0])} outside the model "
                       f"vocabulary [0, {cfg.vocab_size}) (tokenizer and model do not match?)")
    if p.size + max_new_tokens > cfg.max_seq_len:
      raise ValueError(f"generate: prompt {i} has {p.size} tokens; with max_new_tokens="
                       f"{max_new_tokens} that exceeds the model's max_seq_len="
                       f"{cfg.max_seq_len} (the positions the model supports)")
    out.append(p.astype(np.int32))
  return out


def generate(cfg: ModelConfig, params, prompts: Sequence[np.ndarray], rng,
             method=methods_lib.Greedy(), max_new_tokens: int = 64,
             stop_ids: Optional[Sequence[int]] = None, n: int = 1,
             pad_id: Optional[int] = None, mesh: Optional[Mesh] = None,
             rules: str = "fsdp") -> SampleResult:
  """Samples `n` completions of each prompt (ragged 1-D token id arrays).

  Args:
    cfg, params: the model (params: a plain dict of arrays, host or device).
    prompts: B prompts, 1-D int arrays of different lengths, not empty.
    rng: one PRNG key, or a [B] array of keys (one per prompt).
    method: a sampling method from `aya_jax.sampling.methods`.
    max_new_tokens: tokens generated at most per row.
    stop_ids: ids that end a row (kept in its output); default cfg.eos_ids.
    n: samples per prompt (the prompt is prefilled once).
    pad_id: emitted after a row is done; default cfg.pad_id (or 0).
    mesh: a ('data', 'fsdp', 'tensor') mesh: batch over data x fsdp, params
      by `rules` (see aya_jax.axes.PRESETS).
  Returns a SampleResult with B * n rows.
  """
  if cfg.value_head:
    raise ValueError("generate: the model has a value head (a reward model), not an LM head")
  if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
    raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an int >= 1")
  if not (isinstance(n, int) and n >= 1):
    raise ValueError(f"generate: n={n!r} must be an int >= 1")
  if not prompts:
    raise ValueError("generate: no prompts")
  prompts = _check_prompts(cfg, prompts, max_new_tokens)
  stop = tuple(sorted({int(s) for s in (cfg.eos_ids if stop_ids is None else stop_ids)}))
  pad = int(pad_id if pad_id is not None else (cfg.pad_id if cfg.pad_id is not None else 0))
  b = len(prompts)
  shards = 1 if mesh is None else int(np.prod([mesh.shape[a]
                                               for a in sharding_lib.BATCH_AXES]))
  b_pad = bucket_batch(b, shards)
  length = bucket_length(max(len(p) for p in prompts))
  tokens, positions, segments, lengths = _pad_prompts(prompts, b_pad, length, pad)
  keys = _as_prompt_keys(rng, b, b_pad)

  fn = _compiled(cfg, method, max_new_tokens, n, stop, pad, mesh, rules)
  if mesh is None:
    params = jax.tree.map(jnp.asarray, params)
    out = fn(params, tokens, positions, segments, lengths, keys)
  else:  # every process holds the same inputs; device_put makes global arrays of them
    params = sharding_lib.shard_tree(params, _param_shardings(cfg, mesh, rules))
    b2, b1 = sharding_lib.batch_sharding(mesh, 2), sharding_lib.batch_sharding(mesh, 1)
    tokens, positions, segments = (jax.device_put(x, b2) for x in (tokens, positions, segments))
    lengths = jax.device_put(lengths, b1)
    keys = jax.random.wrap_key_data(  # typed keys cannot be put on other hosts' devices
        jax.device_put(np.asarray(jax.random.key_data(keys)), b2), impl=jax.random.key_impl(keys))
    with sharding_lib.activation_rules(mesh, axes_lib.rules(rules)):
      out = fn(params, tokens, positions, segments, lengths, keys)
  out = jax.device_get(out)
  rows = b * n
  return SampleResult(*(np.asarray(x)[:rows] for x in out), n=n)


@functools.lru_cache(maxsize=16)
def _param_shardings(cfg, mesh, preset):
  return sharding_lib.param_shardings(cfg, mesh, axes_lib.rules(preset))


@functools.lru_cache(maxsize=64)
def _compiled(cfg, method, max_new, n, stop, pad, mesh, preset):
  fn = functools.partial(_prefill_and_decode, cfg, method, max_new, n, stop, pad,
                         None if mesh is None else (mesh, axes_lib.rules(preset)))
  if mesh is None:
    return jax.jit(fn)
  b2, b1 = sharding_lib.batch_sharding(mesh, 2), sharding_lib.batch_sharding(mesh, 1)
  return jax.jit(fn, in_shardings=(_param_shardings(cfg, mesh, preset),
                                   b2, b2, b2, b1, b1),
                 out_shardings=sharding_lib.replicated(mesh))


def _constrain_cache(cache, mesh_and_rules):
  """Cache batch over the batch axes (kv heads as the rules say)."""
  if mesh_and_rules is None:
    return cache
  mesh, rules = mesh_and_rules
  names = dict(k=("layers", "batch", "length", "kv_heads", "kv"),
               v=("layers", "batch", "length", "kv_heads", "kv"),
               segment_ids=("batch", "length"), positions=("batch", "length"), index=())
  return {key: jax.lax.with_sharding_constraint(
      x, sharding_lib.logical_to_sharding(names[key], x.shape, mesh, rules))
          for key, x in cache.items()}


def _prefill_and_decode(cfg, method, max_new, n, stop, pad, mesh_and_rules,
                        params, tokens, positions, segments, lengths, keys):
  model = Transformer(cfg)
  b, length = tokens.shape
  rows = b * n

  # prefill: the whole padded prompt, logits of the last column only
  cache = _constrain_cache(init_cache(cfg, b, length + max_new), mesh_and_rules)
  hidden, cache = model.apply(lora.variables(params), tokens, positions, segments, cache=cache,
                              return_hidden=True)
  cdt = dtype_of(cfg.dtype)
  logits_bv = output_logits(cfg, jnp.einsum(
      "bd,dv->bv", hidden[:, -1], unembed_matrix(cfg, params).astype(cdt),
      preferred_element_type=jnp.float32))

  # n samples per prompt: repeat the cache, not the prompt
  if n > 1:
    cache = dict(k=jnp.repeat(cache["k"], n, axis=1), v=jnp.repeat(cache["v"], n, axis=1),
                 segment_ids=jnp.repeat(cache["segment_ids"], n, axis=0),
                 positions=jnp.repeat(cache["positions"], n, axis=0), index=cache["index"])
    cache = _constrain_cache(cache, mesh_and_rules)
    logits_bv = jnp.repeat(logits_bv, n, axis=0)
    lengths = jnp.repeat(lengths, n)
  sample_ids = jnp.tile(jnp.arange(n, dtype=jnp.int32), b)
  row_keys = jax.vmap(jax.random.fold_in)(jnp.repeat(keys, n), sample_ids)
  stop_arr = jnp.asarray(stop, jnp.int32)

  def emit(t, logits, done, outs):
    """Samples column t from `logits` for the rows that are not done."""
    toks, lps, mlps, n_gen = outs
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)
    tok, lp = methods_lib.sample(method, logits, step_keys)
    mlp = losses.token_logprobs(logits, tok)  # the raw model's log-prob
    tok = jnp.where(done, pad, tok)
    lp = jnp.where(done, 0.0, lp)
    mlp = jnp.where(done, 0.0, mlp)
    outs = (toks.at[:, t].set(tok), lps.at[:, t].set(lp), mlps.at[:, t].set(mlp),
            n_gen + (~done).astype(jnp.int32))
    if stop:
      done = done | jnp.isin(tok, stop_arr)
    return tok, done, outs

  outs = (jnp.full((rows, max_new), pad, jnp.int32), jnp.zeros((rows, max_new), jnp.float32),
          jnp.zeros((rows, max_new), jnp.float32), jnp.zeros((rows,), jnp.int32))
  tok, done, outs = emit(0, logits_bv, jnp.zeros((rows,), bool), outs)

  def cond(state):
    t, _, _, done, _ = state
    return (t < max_new) & ~jnp.all(done)

  def body(state):
    t, cache, tok, done, outs = state
    # feed the token of column t-1 (at position len + t - 1); done rows feed padding
    pos = (lengths + t - 1)[:, None]
    seg = (~done).astype(jnp.int32)[:, None]
    logits, cache = model.apply(lora.variables(params), tok[:, None], pos, seg, cache=cache)
    tok, done, outs = emit(t, logits[:, 0], done, outs)
    return t + 1, cache, tok, done, outs

  state = (jnp.asarray(1, jnp.int32), cache, tok, done, outs)
  _, _, _, done, outs = jax.lax.while_loop(cond, body, state)
  toks, lps, mlps, n_gen = outs
  return toks, lps, mlps, n_gen, done


# ------------------------------------------------------- models to sample


@dataclasses.dataclass
class SamplingModel:
  """A model ready to sample from: config, params (on device), tokenizer, the
  ids that end an answer and the pad id."""
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  stop_ids: tuple
  pad_id: int


def load_for_sampling(model: Union[str, os.PathLike, tuple], tokenizer: Optional[str] = None,
                      mesh=None, rules: str = "fsdp", name: str = "model") -> SamplingModel:
  """`model`: an HF dir, an aya_jax params/ dir or an in-memory (cfg, params);
  `tokenizer`: a directory (default: `model`'s). Params go on the device,
  sharded by `rules` over `mesh` when one is given. Errors (named after
  `name`) for a missing checkpoint and a tokenizer larger than the vocabulary."""
  tok_dir = tokenizer or model
  tok = formatting.load_tokenizer(tok_dir)
  if isinstance(model, (str, os.PathLike)):
    path = os.fspath(model)
    try:
      cfg = checkpoint.peek_config(path)
    except FileNotFoundError as e:
      raise ValueError(f"{name}: {e}") from None
    shardings = None
    if mesh is not None:
      shardings = sharding_lib.param_shardings(cfg, mesh, axes_lib.rules(rules))
    cfg, params = checkpoint.load_model(path, shardings=shardings)
    where = path
  else:
    cfg, params = model
    where = "the in-memory model"
  if mesh is None:
    params = jax.tree.map(jnp.asarray, params)
  if len(tok) > cfg.vocab_size:
    raise ValueError(f"{name}: tokenizer {tok_dir} has {len(tok)} tokens but "
                     f"{where} has vocab_size {cfg.vocab_size} (tokenizer/model mismatch)")
  stop = tuple(dict.fromkeys(formatting.end_of_turn_ids(tok) + tuple(cfg.eos_ids)))
  pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_id or 0)
  return SamplingModel(cfg, params, tok, stop, int(pad))


def prompt_keys(seed: int, prompt_ids: Sequence[str], salt: str = ""):
  """[B] PRNG keys, one per (seed, salt, prompt id): independent of batching
  and order. A teacher salts with its name (each teacher its own draws);
  evaluation leaves it empty (both models of a comparison get the same keys)."""
  texts = [f"{salt}\0{pid}" if salt else pid for pid in prompt_ids]
  words = np.asarray([np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], np.uint32)
                      for t in texts])
  base = jax.random.key(seed)
  fold = lambda w: jax.random.fold_in(jax.random.fold_in(base, w[0]), w[1])  # noqa: E731
  return jax.vmap(fold)(jnp.asarray(words, jnp.uint32))
