"""Scorers: one protocol, `score(records) -> np.ndarray` (one float each).

    scorer = RewardModelScorer.load("runs/rm/params", tokenizer_dir)
    scorer = FunctionScorer(lambda records: [len(r.completion) for r in records])
    scores = scorer.score(completion_records)

A record is anything holding a prompt and an answer: a CompletionRecord (or
a dict with "prompt" and "completion"), an SFTRecord (or a dict with
"messages"; the last assistant turn is the answer, the turns before it the
prompt), or a `(prompt_messages, completion)` tuple. Arbitrage, online DPO
and evaluation take any Scorer and never know which they have. Rewards of
a reward model carry an arbitrary per-prompt offset: compare them only
between answers to the same prompt, or at least within one language.

The reward of (prompt, completion) under a value-head model is its value at
the last token of prompt + completion (the completion's end-of-turn token),
the layout `tokenize_prompt_completion` gives; training
(`train/reward_model.py`) and scoring share `encode` and `rows` below, so
they see the same tokens.

`RewardModelScorer` sorts records by length, pads each batch to a length
bucket (`sampler.bucket_length`) and a fixed number of rows, so a scorer
compiles once per bucket; every row has its own positions and segment ids
(padding is segment 0), so a record's score does not depend on its batch.
With a mesh, params are sharded as in training and batches over ('data',
'fsdp'). A record whose answer is cut away entirely by `max_len` scores NaN
(callers report NaN scores per record).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from aya_jax import axes as axes_lib
from aya_jax import console
from aya_jax import sharding as sharding_lib
from aya_jax.data import formatting
from aya_jax.models import lora
from aya_jax.models.transformer import Transformer
from aya_jax.sampling.sampler import bucket_length


@runtime_checkable
class Scorer(Protocol):
  def score(self, records: Sequence[Any]) -> np.ndarray:
    """One float per record, in order."""


def prompt_and_completion(record) -> tuple[tuple, str]:
  """(prompt messages, answer text) of any record form the scorers accept."""
  if isinstance(record, tuple) and len(record) == 2 and isinstance(record[1], str):
    return tuple(record[0]), record[1]
  get = record.get if isinstance(record, Mapping) else lambda k: getattr(record, k, None)
  prompt, completion, messages = get("prompt"), get("completion"), get("messages")
  if completion is not None and prompt is not None:
    return tuple(prompt), completion
  if messages and messages[-1]["role"] == "assistant":
    return tuple(messages[:-1]), messages[-1]["content"]
  raise ValueError(f"record {get('id')!r}: no prompt and answer (expected 'prompt' + "
                   "'completion', or 'messages' ending with an assistant turn)")


def encode(tokenizer, prompt, completion: str, max_len: int, example_id=None):
  """(tokens int32 [n], n_cut): prompt + completion tokens, cut to max_len;
  n_cut = -1 when nothing of the completion is left."""
  return encode_many(tokenizer, [(prompt, completion, example_id)], max_len)[0]


def encode_many(tokenizer, items, max_len: int) -> list:
  """`encode` of many (prompt, completion, example_id) items, encoded in one batch call."""
  pcs = formatting.tokenize_prompt_completions(tokenizer, [(list(p), c, i) for p, c, i in items])
  return [_cut(p, c, max_len) for p, c in pcs]


def _cut(p, c, max_len: int):
  full = np.concatenate([p, c]).astype(np.int32)
  if len(full) <= max_len:
    return full, 0
  if len(p) >= max_len:
    return full[:max_len], -1
  return full[:max_len], len(full) - max_len


def rows(token_lists: Sequence[np.ndarray], n_rows: int, length: int, pad_id: int) -> dict:
  """Right-padded tokens/positions/segment_ids [n_rows, length] (extra rows empty)."""
  out = dict(tokens=np.full((n_rows, length), pad_id, np.int32),
             positions=np.zeros((n_rows, length), np.int32),
             segment_ids=np.zeros((n_rows, length), np.int32))
  for i, t in enumerate(token_lists):
    n = len(t)
    out["tokens"][i, :n] = t
    out["positions"][i, :n] = np.arange(n)
    out["segment_ids"][i, :n] = 1
  return out


def last_token_values(values_bt, segment_ids_bt):
  """values at each row's last non-padding token ([B]); 0 for empty rows."""
  n = jnp.sum((segment_ids_bt != 0).astype(jnp.int32), axis=-1)
  idx = jnp.maximum(n - 1, 0)
  picked = jnp.take_along_axis(values_bt, idx[:, None], axis=-1)[:, 0]
  return jnp.where(n > 0, picked, 0.0)


def reward_fn(cfg):
  """(params, tokens, positions, segment_ids) -> rewards [B] (fp32)."""
  if not cfg.value_head:
    raise ValueError("reward model config has value_head=False: a reward model needs the "
                     "scalar head (train one with the reward_model stage)")
  model = Transformer(cfg)

  def fn(params, tokens, positions, segment_ids):
    values, _ = model.apply(lora.variables(params), tokens, positions, segment_ids)
    return last_token_values(values.astype(jnp.float32), segment_ids)
  return fn


@dataclasses.dataclass
class ScoreStats:
  n_scored: int = 0
  n_truncated: int = 0     # answer partly cut by max_len
  n_cut: int = 0           # answer cut entirely: NaN


class RewardModelScorer:
  """A value-head model as a Scorer (batched, length-bucketed, sharded)."""

  def __init__(self, cfg, params, tokenizer, batch_size: int = 16,
               max_len: Optional[int] = None, mesh=None, rules: str = "fsdp"):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.max_len = int(max_len or cfg.max_seq_len)
    self.mesh = mesh
    self.rules = axes_lib.rules(rules) if isinstance(rules, str) else rules
    shards = 1
    if mesh is not None:
      shards = int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))
    self.batch_size = -(-int(batch_size) // shards) * shards
    pad = tokenizer.pad_token_id
    self.pad_id = int(cfg.pad_id or 0) if pad is None else int(pad)
    self.stats = ScoreStats()
    fn = reward_fn(cfg)
    if mesh is None:
      self.params = jax.tree.map(jnp.asarray, params)
      self._fn = jax.jit(fn)
    else:
      shardings = sharding_lib.param_shardings(cfg, mesh, self.rules)
      self.params = sharding_lib.shard_tree(params, shardings)
      bsh = sharding_lib.batch_sharding(mesh, 2)
      self._fn = jax.jit(fn, in_shardings=(shardings, bsh, bsh, bsh),
                         out_shardings=sharding_lib.batch_sharding(mesh, 1))

  @classmethod
  def load(cls, model_path: str, tokenizer_dir: Optional[str] = None, **kw):
    """From a params/ or HF (…ForSequenceClassification) directory."""
    from aya_jax import checkpoint
    peek = checkpoint.peek_config(model_path)
    mesh = kw.get("mesh") or sharding_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    rules = kw.get("rules", "fsdp")
    rules = axes_lib.rules(rules) if isinstance(rules, str) else rules
    cfg, params = checkpoint.load_model(
        model_path, sharding_lib.param_shardings(peek, mesh, rules))  # any saved topology
    tok = formatting.load_tokenizer(tokenizer_dir or model_path)
    return cls(cfg, params, tok, **kw)

  def encode_all(self, records) -> tuple[list, np.ndarray]:
    items = []
    for i, r in enumerate(records):
      prompt, completion = prompt_and_completion(r)
      items.append((prompt, completion,
                    r.get("id") if isinstance(r, Mapping) else getattr(r, "id", i)))
    toks, cut = [], np.zeros(len(records), bool)
    for i, (t, n_cut) in enumerate(encode_many(self.tokenizer, items, self.max_len)):
      toks.append(t)
      cut[i] = n_cut < 0
      self.stats.n_truncated += int(n_cut > 0)
    return toks, cut

  def score_tokens(self, toks: Sequence[np.ndarray]) -> np.ndarray:
    """Rewards of already encoded rows, in order."""
    out = np.zeros(len(toks), np.float32)
    order = sorted(range(len(toks)), key=lambda i: len(toks[i]))
    progress = console.Progress(len(toks), "scoring", unit="answer")
    for s in range(0, len(order), self.batch_size):
      idx = order[s:s + self.batch_size]
      length = min(bucket_length(max(len(toks[i]) for i in idx)), self.max_len)
      b = rows([toks[i] for i in idx], self.batch_size, length, self.pad_id)
      if self.mesh is not None:
        with sharding_lib.activation_rules(self.mesh, self.rules):
          r = self._fn(self.params, b["tokens"], b["positions"], b["segment_ids"])
      else:
        r = self._fn(self.params, b["tokens"], b["positions"], b["segment_ids"])
      out[idx] = np.asarray(jax.device_get(r))[:len(idx)]
      progress.update(len(idx))
    progress.close()
    return out

  def score(self, records: Sequence[Any]) -> np.ndarray:
    records = list(records)
    if not records:
      return np.zeros((0,), np.float32)
    toks, cut = self.encode_all(records)
    out = self.score_tokens(toks)
    out[cut] = np.nan
    self.stats.n_scored += len(records)
    self.stats.n_cut += int(cut.sum())
    return out


class FunctionScorer:
  """Wraps `fn(records) -> scores` (e.g. the world's `Verifier().score`) or,
  with `per_record=True`, `fn(record) -> float`, as a Scorer. A record the
  function raises on scores NaN (`errors` keeps why) unless `strict`."""

  def __init__(self, fn: Callable, per_record: bool = False, strict: bool = False):
    self.fn, self.per_record, self.strict = fn, per_record, strict
    self.errors: dict = {}

  def score(self, records: Sequence[Any]) -> np.ndarray:
    records = list(records)
    if not self.per_record:
      try:
        out = np.asarray(self.fn(records), np.float32).reshape(-1)
        if out.shape != (len(records),):
          raise ValueError(f"scorer {self.fn!r} returned {out.shape[0]} scores for "
                           f"{len(records)} records")
        return out
      except Exception:  # pylint: disable=broad-except
        if self.strict:
          raise
        # one bad record must not sink the batch: score one by one below
    out = np.zeros(len(records), np.float32)
    for i, r in enumerate(records):
      try:
        out[i] = float(self.fn(r) if self.per_record else np.asarray(self.fn([r])).reshape(()))
      except Exception as e:  # pylint: disable=broad-except
        if self.strict:
          raise
        rid = r.get("id") if isinstance(r, Mapping) else getattr(r, "id", i)
        self.errors[rid] = f"{type(e).__name__}: {e}"
        out[i] = np.nan
    return out


def pair_scores(scorer: Scorer, pairs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
  """(chosen, rejected) scores of PreferenceRecords (or same-shaped dicts)."""
  get = lambda r, k: r[k] if isinstance(r, Mapping) else getattr(r, k)  # noqa: E731
  recs = []
  for p in pairs:
    for key in ("chosen", "rejected"):
      recs.append(dict(id=get(p, "id"), language=get(p, "language"), prompt=get(p, "prompt"),
                       completion=get(p, key)))
  s = scorer.score(recs)
  return s[0::2], s[1::2]


def pair_accuracy(scorer: Scorer, pairs: Sequence[Any]) -> dict:
  """Fraction of pairs ranked right (chosen > rejected), overall and per language."""
  rc, rr = pair_scores(scorer, pairs)
  langs = [p["language"] if isinstance(p, Mapping) else p.language for p in pairs]
  ok = rc > rr
  out = {"all": dict(n=len(pairs), accuracy=float(ok.mean()) if len(pairs) else float("nan"),
                     mean_margin=float(np.mean(rc - rr)) if len(pairs) else float("nan"))}
  for lang in sorted(set(langs)):
    m = np.asarray([l == lang for l in langs])
    out[lang] = dict(n=int(m.sum()), accuracy=float(ok[m].mean()),
                     mean_margin=float(np.mean((rc - rr)[m])))
  return out
