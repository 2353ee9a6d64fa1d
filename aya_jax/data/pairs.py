"""Preference pairs -> [B, 2, L] batches (row 0 chosen, row 1 rejected; SRPO: [B, 5, L]
with the revision rows 2-4, `rows_of`).

    pairs, stats = tokenize_pairs(records, tokenizer, seq_len)
    it = PairIterator(pairs, global_batch_size=16, seq_len=256, seed=0,
                      languages=languages, ref_logps=cached)   # or None
    batch = next(it)

Each pair is tokenised with `formatting.tokenize_prompt_completions`, so the
prompt/answer boundary is exactly the one SFT trains on: prompt + answer +
end-of-turn, one padded example per row. A batch is the pipeline contract
(`pipeline.build_batch`: tokens, targets, loss_mask, segment_ids,
positions), every array [B, 2, L], plus

  pair_mask  [B]     1 for a real pair, 0 for padding (a short last batch)
  language   [B]     index into `languages`
  score_margin [B]   chosen_score - rejected_score (NaN for an unscored pair; CoPG's)
  index      [B]     the pair's index in `pairs` (-1 on padding)
  ref_logps  [B, R]  summed reference log-probs of each row (only
                     when the iterator was given cached ones)

`PairIterator` is checkpointable (`get_state`/`set_state`: the position in
a stream of epochs, each a permutation drawn from (seed, epoch)); process p
of P reads rows [p B/P, (p+1) B/P) of every global batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, NamedTuple, Optional, Sequence

import jax
import numpy as np
from absl import logging

from aya_jax.data import formatting, pipeline
from aya_jax.data import records as records_lib


class Pair(NamedTuple):
  """A tokenised preference pair."""
  prompt: np.ndarray    # int32 prompt tokens (with the assistant header)
  chosen: np.ndarray    # int32 answer tokens (with the end of turn)
  rejected: np.ndarray
  language: str
  id: str
  score_margin: float = float("nan")  # chosen_score - rejected_score (NaN: unscored)
  # SRPO's self-revision rows, (prompt, answer) each: the rejected answer revised into the
  # chosen, into itself, and the chosen into itself (`tokenize_pairs(revision_request=)`)
  revisions: tuple = ()


def rows_of(p: Pair) -> list:
  """The (prompt, answer) token rows of a pair: chosen, rejected, then its revisions."""
  return [(p.prompt, p.chosen), (p.prompt, p.rejected)] + list(p.revisions)


class _Row(NamedTuple):
  tokens: np.ndarray
  loss_mask: np.ndarray


@dataclasses.dataclass
class PairStats:
  n_records: int = 0
  n_pairs: int = 0
  n_truncated: int = 0   # pairs with an answer cut to fit seq_len
  n_skipped: int = 0     # pairs whose answer is empty after truncation, or
                         # whose answers are the same tokens within seq_len


def read_pairs(paths: Sequence[str], skip_invalid: bool = False) -> list:
  """PreferenceRecords from JSONL files (strict reader, ids unique per file)."""
  out = []
  for path in paths:
    out += list(records_lib.read_jsonl(path, "preference", skip_invalid=skip_invalid))
  return out


TOKENIZE_CHUNK = 4096  # pairs rendered and encoded per batch call


def tokenize_pairs(recs: Iterable, tokenizer, seq_len: int, skip_invalid: bool = False,
                   revision_request: Optional[str] = None) -> tuple[list, PairStats]:
  """Tokenised pairs; an answer that does not fit at all, or a pair whose two
  answers are the same tokens within seq_len (nothing to prefer), raises
  naming the pair (or is skipped and counted with `skip_invalid`). With a
  `revision_request` (SRPO) each pair also gets its three revision rows
  (`formatting.revision_messages`), which must fit seq_len whole. Pairs are
  encoded TOKENIZE_CHUNK at a time (`formatting.tokenize_prompt_completions`)."""
  stats, out, chunk = PairStats(), [], []
  for rec in recs:
    if not isinstance(rec, records_lib.PreferenceRecord):
      rec = records_lib.PreferenceRecord.from_dict(rec)
    stats.n_records += 1
    chunk.append(rec)
    if len(chunk) == TOKENIZE_CHUNK:
      out += _tokenize_chunk(chunk, tokenizer, seq_len, skip_invalid, revision_request, stats)
      chunk = []
  out += _tokenize_chunk(chunk, tokenizer, seq_len, skip_invalid, revision_request, stats)
  stats.n_pairs = len(out)
  if not out:
    raise ValueError("no preference pairs left after tokenisation")
  return out, stats


def _items(rec, revision_request):
  """(messages, answer, id) to tokenise for a pair: chosen, rejected, then the revision rows
  (the rejected draft revised into the chosen and into itself, the chosen into itself)."""
  out = [(rec.prompt, rec.chosen, rec.id), (rec.prompt, rec.rejected, rec.id)]
  if revision_request is not None:
    out += [(formatting.revision_messages(rec.prompt, draft, revision_request), answer, rec.id)
            for draft, answer in ((rec.rejected, rec.chosen), (rec.rejected, rec.rejected),
                                  (rec.chosen, rec.chosen))]
  return out


def _tokenize_chunk(recs, tokenizer, seq_len, skip_invalid, revision_request, stats) -> list:
  items = [_items(rec, revision_request) for rec in recs]
  flat = formatting.tokenize_prompt_completions(tokenizer, [i for its in items for i in its])
  out, at = [], 0
  for rec, its in zip(recs, items):
    rows, at = flat[at:at + len(its)], at + len(its)
    (prompt, full_c), (_, full_r) = rows[:2]
    room = max(0, seq_len - len(prompt))  # as tokenize_prompt_completion(max_len=seq_len)
    prompt, chosen, rejected = prompt[:seq_len], full_c[:room], full_r[:room]
    msg = None
    if len(chosen) == 0 or len(rejected) == 0:
      msg = (f"pair {rec.id!r}: prompt of {len(prompt)} tokens leaves no room for the answer "
             f"within seq_len {seq_len}")
    elif np.array_equal(chosen, rejected):
      msg = (f"pair {rec.id!r}: chosen and rejected are the same {len(chosen)} tokens within "
             f"seq_len {seq_len} (they differ only after the cut)")
    else:
      msg = next((f"pair {rec.id!r}: its revision row (prompt with the draft, {len(p)} "
                  f"tokens, + answer, {len(a)}) exceeds seq_len {seq_len}"
                  for p, a in rows[2:] if len(p) + len(a) > seq_len), None)
    if msg is not None:
      if not skip_invalid:
        raise ValueError(msg + " (raise seq_len or pass skip_invalid)")
      stats.n_skipped += 1
      logging.log_first_n(logging.WARNING, "skipping %s", 5, msg)
      continue
    stats.n_truncated += int(len(chosen) < len(full_c) or len(rejected) < len(full_r))
    margin = (float("nan") if rec.chosen_score is None or rec.rejected_score is None
              else rec.chosen_score - rec.rejected_score)
    out.append(Pair(prompt, chosen, rejected, rec.language, rec.id, margin, tuple(rows[2:])))
  return out


def fingerprint(pairs: Sequence[Pair], seq_len: int) -> str:
  """sha256 over the pairs' tokens in order (what the reference scores)."""
  h = hashlib.sha256(f"seq_len={seq_len};n={len(pairs)};".encode())
  for p in pairs:
    for row in rows_of(p):
      for part in row:
        h.update(np.asarray(part, np.int32).tobytes())
        h.update(b"|")
    h.update(b"#")
  return h.hexdigest()


def pair_batch(pairs: Sequence[Optional[Pair]], seq_len: int, pad_id: int,
               languages: Sequence[str], indices: Optional[Sequence[int]] = None,
               ref_logps: Optional[np.ndarray] = None, n_rows: int = 0) -> dict:
  """The [B, R, L] batch of `pairs` (None = a padding pair); R = 2, or 5 with SRPO's
  revision rows (`n_rows` gives it when every pair is padding)."""
  lang_index = {l: i for i, l in enumerate(languages)}
  r = n_rows or next((len(rows_of(p)) for p in pairs if p is not None), 2)
  rows = []
  for p in pairs:
    if p is None:
      rows += [[] for _ in range(r)]
      continue
    for prompt, answer in rows_of(p):
      rows.append([_Row(np.concatenate([prompt, answer]).astype(np.int32),
                        np.concatenate([np.zeros(len(prompt), np.int32),
                                        np.ones(len(answer), np.int32)]))])
  flat = pipeline.build_batch(rows, seq_len, pad_id)
  b = len(pairs)
  batch = {k: v.reshape(b, r, seq_len) for k, v in flat.items()}
  batch["pair_mask"] = np.asarray([p is not None for p in pairs], np.int32)
  batch["language"] = np.asarray([lang_index[p.language] if p is not None else 0
                                  for p in pairs], np.int32)
  batch["score_margin"] = np.asarray([p.score_margin if p is not None else 0.0
                                      for p in pairs], np.float32)
  idx = np.asarray([-1] * b if indices is None else indices, np.int32)
  batch["index"] = idx
  if ref_logps is not None:
    ref = np.zeros((b, r), np.float32)
    ref[idx >= 0] = ref_logps[idx[idx >= 0]]
    batch["ref_logps"] = ref
  return batch


def languages_of(pairs: Sequence[Pair]) -> tuple:
  return tuple(sorted({p.language for p in pairs}))


class PairIterator:
  """Epochs of shuffled pairs as [B_local, 2, L] batches; checkpointable.

  `num_epochs=None` repeats forever (train); with a number it ends after
  that many passes, the last batch padded (pair_mask 0). `shuffle=False`
  keeps the file order (evaluation, reference log-probs).
  """

  def __init__(self, pairs: Sequence[Pair], *, global_batch_size: int, seq_len: int,
               pad_id: int = 0, seed: int = 0, languages: Sequence[str] = (),
               ref_logps: Optional[np.ndarray] = None, shuffle: bool = True,
               num_epochs: Optional[int] = None, process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    self.pairs, self.seq_len, self.pad_id = list(pairs), seq_len, pad_id
    self.languages = tuple(languages) or languages_of(self.pairs)
    self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
    pc = jax.process_count() if process_count is None else process_count
    self.pi = jax.process_index() if process_index is None else process_index
    if global_batch_size % pc:
      raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of "
                       f"process_count {pc}")
    self.global_batch, self.rows = global_batch_size, global_batch_size // pc
    if ref_logps is not None and len(ref_logps) != len(self.pairs):
      raise ValueError(f"ref_logps has {len(ref_logps)} rows for {len(self.pairs)} pairs")
    self.ref_logps = ref_logps
    self.position = 0  # pairs of the stream consumed (global)
    self._perm_epoch, self._perm = -1, None

  def _order(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      n = len(self.pairs)
      self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n)
                    if self.shuffle else np.arange(n))
      self._perm_epoch = epoch
    return self._perm

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    n = len(self.pairs)
    total = None if self.num_epochs is None else self.num_epochs * n
    if total is not None and self.position >= total:
      raise StopIteration
    start = self.position + self.pi * self.rows
    indices = []
    for g in range(start, start + self.rows):
      if total is not None and g >= total:
        indices.append(-1)
      else:
        indices.append(int(self._order(g // n)[g % n]))
    self.position += self.global_batch
    chosen = [self.pairs[i] if i >= 0 else None for i in indices]
    return pair_batch(chosen, self.seq_len, self.pad_id, self.languages, indices,
                      self.ref_logps, n_rows=len(rows_of(self.pairs[0])))

  def get_state(self) -> dict:
    return {"position": int(self.position)}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])
