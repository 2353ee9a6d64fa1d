"""Grain input pipeline for SFT: mix, shuffle, shard by process, tokenise,
pack or pad, batch.

    records (JSONL files or loaded) -> [mix by language/source with weights]
      -> shuffle(seed), reshuffled each epoch -> repeat(num_epochs)
      -> every process_count-th element from process_index
      -> tokenize_chat (truncated to seq_len) -> rows of seq_len -> batches

Each process reads a disjoint share of the global stream (element i goes to
process i % process_count) and yields batches of ``global_batch_size //
process_count`` rows; `sharding.global_batch(batch, mesh)` assembles them
into global arrays.

The batch contract: a dict of int32 numpy arrays, all [B_local, seq_len]:

  tokens       input ids; `pad_id` on padding.
  segment_ids  1..k for the k examples of a row (in order), 0 on padding. In
               pad mode (`pack=False`) k is 1. Attention must stay within a
               segment: a token attends to earlier tokens of the same id.
  positions    0, 1, ... within each segment (restart at every example), 0 on
               padding.
  targets      the token to predict at t: targets[b, t] = tokens[b, t + 1]
               when t and t + 1 are in the same segment; otherwise (the last
               token of a segment, the last column, padding) `pad_id`.
  loss_mask    1 where targets[b, t] is an assistant token that carries loss
               (`tokenize_chat`'s mask of token t + 1, i.e. assistant content
               and its end-of-turn token); 0 at segment ends and padding.

The train step computes logits at every t from tokens[.., :t + 1] (within its
segment) and takes cross-entropy against targets[t] weighted by loss_mask[t]:
an example of n tokens x_0..x_{n-1} with token mask m gives n - 1
predictions, x_{j+1} from position j, weighted m_{j+1}. Packed and padded
batches hold the same examples with the same targets and weights, so they
give the same per-example loss. A later preference pipeline can build the
chosen and rejected rows with `build_batch` and stack them as [B, 2, L].

Packing is greedy first-fit: examples fill B_local rows in stream order,
each going to the first row with room; when one fits no row, the batch is
emitted and that example starts the next batch. Examples longer than seq_len
are cut to seq_len (counted). An example with no loss token after truncation
(nothing to learn) raises, or with `skip_invalid` is skipped and counted. A
finite stream is cut to a multiple of process_count examples (so in pad
mode every process yields as many batches) and ends with a partial batch
whose missing rows are all padding; packed, the number of batches can differ
between processes, so multi-process training should use `num_epochs=None`
and a step count.

The iterator is a `grain.DatasetIterator`: `get_state()` is a JSON-
serialisable dict and `set_state(state)` on a fresh iterator built with the
same arguments yields exactly the batches that followed (grain's Orbax
handler saves it).

`worker_count > 0` tokenises in grain worker processes (`mp_prefetch`;
close the iterator after use). Workers need absl flags parsed (`app.run` or
`flags.FLAGS(sys.argv)`) and the script an `if __name__ == "__main__"`
guard; the default 0 tokenises in `read_threads` threads of this process.
Batches do not depend on either.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

from absl import logging
import grain
import jax
import numpy as np

from aya_jax.data import formatting
from aya_jax.data import records as records_lib

PathLike = Union[str, os.PathLike]
KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_RUNNING = ("n_examples", "n_truncated", "n_truncated_tokens", "n_empty",
            "n_batches", "n_rows", "n_tokens", "n_loss_tokens")


@dataclasses.dataclass
class PipelineStats:
  """Counts of one iterator, for logging; restored with its state."""
  seq_len: int = 0
  n_records: int = 0           # valid records loaded
  n_invalid: int = 0           # invalid lines skipped when reading
  invalid_reasons: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  n_examples: int = 0          # examples placed in emitted batches
  n_truncated: int = 0         # ... of which cut to seq_len
  n_truncated_tokens: int = 0  # tokens cut off
  n_empty: int = 0             # skipped: no loss token after truncation
  n_batches: int = 0
  n_rows: int = 0              # rows emitted (all-padding rows included)
  n_tokens: int = 0            # non-padding tokens emitted
  n_loss_tokens: int = 0       # targets with loss_mask 1

  @property
  def padding_fraction(self) -> float:
    cells = self.n_rows * self.seq_len
    return 1.0 - self.n_tokens / cells if cells else 0.0

  def as_dict(self) -> dict:
    """Flat numbers to log, with padding_fraction and examples_per_row."""
    out = {k: v for k, v in dataclasses.asdict(self).items()
           if k not in ("invalid_reasons", "seq_len")}
    out["padding_fraction"] = self.padding_fraction
    out["examples_per_row"] = self.n_examples / max(self.n_rows, 1)
    return out

  def running_state(self) -> dict:
    return {k: int(getattr(self, k)) for k in _RUNNING}

  def load_running_state(self, state: Mapping[str, int]) -> None:
    for k in _RUNNING:
      setattr(self, k, int(state[k]))


# ------------------------------------------------------------ batch building


def shift_targets(tokens: np.ndarray, token_mask: np.ndarray,
                  segment_ids: np.ndarray, pad_id: int = 0):
  """(targets, loss_mask) for [..., L] rows: next token within a segment.

  targets[t] = tokens[t + 1] and loss_mask[t] = token_mask[t + 1] where
  segment_ids[t] == segment_ids[t + 1] != 0; pad_id and 0 elsewhere.
  """
  same = ((segment_ids[..., 1:] == segment_ids[..., :-1])
          & (segment_ids[..., :-1] != 0))
  targets = np.full(tokens.shape, pad_id, np.int32)
  loss_mask = np.zeros(tokens.shape, np.int32)
  targets[..., :-1] = np.where(same, tokens[..., 1:], pad_id)
  loss_mask[..., :-1] = np.where(same, token_mask[..., 1:], 0)
  return targets, loss_mask


def build_batch(rows: Sequence[Sequence[Any]], seq_len: int,
                pad_id: int = 0) -> dict[str, np.ndarray]:
  """Batch dict (see the module docstring) from examples grouped by row.

  Examples have .tokens and .loss_mask (TokenizedExample, Example). Row b
  holds rows[b] back to back as segments 1..k; a row with no examples is all
  padding. Raises if a row's examples exceed seq_len.
  """
  shape = (len(rows), seq_len)
  tokens = np.full(shape, pad_id, np.int32)
  token_mask, segment_ids, positions = (np.zeros(shape, np.int32)
                                        for _ in range(3))
  for b, row in enumerate(rows):
    start = 0
    for k, ex in enumerate(row, 1):
      n = len(ex.tokens)
      if start + n > seq_len:
        raise ValueError(f"build_batch: row {b} needs {start + n} tokens > "
                         f"seq_len {seq_len}")
      tokens[b, start:start + n] = ex.tokens
      token_mask[b, start:start + n] = ex.loss_mask
      segment_ids[b, start:start + n] = k
      positions[b, start:start + n] = np.arange(n)
      start += n
  targets, loss_mask = shift_targets(tokens, token_mask, segment_ids, pad_id)
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask,
              segment_ids=segment_ids, positions=positions)


# -------------------------------------------------------------- grain stages


class Example(NamedTuple):
  """A tokenised record as it travels through the pipeline."""
  tokens: np.ndarray     # int32 [n], n <= seq_len
  loss_mask: np.ndarray  # int32 [n], tokenize_chat's mask on tokens
  n_truncated: int
  id: str
  source: str


class _Tokenize:
  """(source, record) -> Example; picklable, for grain worker processes."""

  def __init__(self, tokenizer, seq_len: int):
    self.tokenizer, self.seq_len = tokenizer, seq_len

  def __call__(self, item) -> Example:
    source, rec = item
    ex = formatting.tokenize_chat(self.tokenizer, rec.messages, self.seq_len,
                                  example_id=rec.id)
    return Example(ex.tokens, ex.loss_mask, int(ex.n_truncated), rec.id,
                   source)


class SFTIterator(grain.DatasetIterator):
  """Packs (first-fit) or pads a grain iterator of Examples into batch dicts;
  `stats` counts what it emitted.

  State: {"parent": grain state of the example stream, "stats": counts}.
  When an example that did not fit ended the last batch, "parent" is the
  state before it, so a restored iterator reads it again.
  """

  def __init__(self, parent: grain.DatasetIterator, *, rows: int,
               seq_len: int, pack: bool, pad_id: int, skip_invalid: bool,
               base_stats: PipelineStats, pass_size: int = 0):
    super().__init__(parent)
    # examples of one pass over the data on this process: that many skipped in a
    # row means there is nothing to learn (an endless stream would spin forever)
    self._pass_size, self._skipped_in_a_row = pass_size, 0
    self._rows, self._seq_len, self._pack = rows, seq_len, pack
    self._pad_id, self._skip_invalid = pad_id, skip_invalid
    self.stats = dataclasses.replace(base_stats)
    self._pending = None        # an example read but not yet placed
    self._pending_state = None  # parent state before reading it

  def _next_example(self):
    """The next example with something to learn; None at the end."""
    if self._pending is not None:
      ex, self._pending = self._pending, None
      return ex
    while True:
      self._pending_state = self._parent.get_state()
      try:
        ex = next(self._parent)
      except StopIteration:
        return None
      if len(ex.tokens) and ex.loss_mask.any():
        self._skipped_in_a_row = 0
        return ex
      msg = (f"example {ex.id!r} of {ex.source}: no loss token within "
             f"seq_len {self._seq_len} ({len(ex.tokens)} tokens after "
             f"truncation); raise seq_len or pass skip_invalid=True")
      if not self._skip_invalid:
        raise ValueError(msg)
      self.stats.n_empty += 1
      self._skipped_in_a_row += 1
      if self._pass_size and self._skipped_in_a_row >= self._pass_size:
        raise ValueError(
            f"a full pass over the data ({self._pass_size} examples) yielded no example with "
            f"a loss token within seq_len {self._seq_len}: every one was skipped (the last: "
            f"{ex.id!r} of {ex.source}, {len(ex.tokens)} tokens); raise data.seq_len or check "
            "the data")
      logging.log_first_n(logging.WARNING, "skipping %s", 10, msg)

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [[] for _ in range(self._rows)]
    used = [0] * self._rows
    while True:
      if not self._pack and rows[-1]:
        break  # pad mode: every row holds its one example
      ex = self._next_example()
      if ex is None:
        break
      n = len(ex.tokens)
      fit = next((r for r in range(self._rows) if used[r] + n <= self._seq_len
                  and (self._pack or not rows[r])), None)
      if fit is None:
        self._pending = ex  # starts the next batch
        break
      rows[fit].append(ex)
      used[fit] += n
    if not any(rows):
      logging.info("input pipeline exhausted: %s", self.stats.as_dict())
      raise StopIteration
    return self._emit(rows)

  def _emit(self, rows) -> dict[str, np.ndarray]:
    s = self.stats
    for ex in (ex for row in rows for ex in row):
      s.n_examples += 1
      if ex.n_truncated:
        if not s.n_truncated:
          logging.warning("truncating examples to seq_len %d (first: %r of "
                          "%s, %d tokens cut); counted in stats",
                          self._seq_len, ex.id, ex.source, ex.n_truncated)
        s.n_truncated += 1
        s.n_truncated_tokens += ex.n_truncated
    batch = build_batch(rows, self._seq_len, self._pad_id)
    s.n_batches += 1
    s.n_rows += len(rows)
    s.n_tokens += int((batch["segment_ids"] != 0).sum())
    s.n_loss_tokens += int(batch["loss_mask"].sum())
    return batch

  def get_state(self) -> dict[str, Any]:
    parent = (self._pending_state if self._pending is not None
              else self._parent.get_state())
    return {"parent": parent, "stats": self.stats.running_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = self._pending_state = None
    self.stats.load_running_state(state["stats"])


# ------------------------------------------------------------------ sources


def _named_sources(sources) -> list[tuple[str, Any]]:
  """(name, path or record list) pairs from the accepted source forms."""
  if isinstance(sources, (str, os.PathLike)):
    return [(os.fspath(sources), sources)]
  if isinstance(sources, Mapping):
    return [(str(k), v) for k, v in sources.items()]
  sources = list(sources)
  if sources and all(isinstance(x, (records_lib.SFTRecord, Mapping))
                     for x in sources):
    return [("records", sources)]
  return [(os.fspath(s), s) if isinstance(s, (str, os.PathLike))
          else (f"records[{i}]", s) for i, s in enumerate(sources)]


def _load(name: str, src, skip_invalid: bool, stats: PipelineStats) -> list:
  if isinstance(src, (str, os.PathLike)):
    result = records_lib.read_jsonl(src, "sft", skip_invalid=skip_invalid)
    stats.n_invalid += result.n_skipped
    stats.invalid_reasons.update(result.reasons)
    return list(result)
  out = []
  for i, rec in enumerate(src):
    try:
      out.append(rec if isinstance(rec, records_lib.SFTRecord)
                 else records_lib.SFTRecord.from_dict(rec))
    except records_lib.RecordError as e:
      if not skip_invalid:
        raise records_lib.RecordError(e.detail, field=e.field,
                                      path=f"{name}[{i}]",
                                      reason=e.reason) from None
      stats.n_invalid += 1
      stats.invalid_reasons[e.reason] += 1
  if not out:
    raise ValueError(f"source {name}: no valid records")
  return out


def _component_seed(seed: int, k: int) -> int:
  return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def _mixture(groups: dict[str, list], weights: Mapping[str, float],
             mix_by: str, seed: int, num_epochs: Optional[int]):
  """Infinite (or num_epochs x total records long) weighted interleave."""
  unknown = sorted(set(weights) - set(groups))
  missing = sorted(set(groups) - set(weights))
  if unknown or missing:
    raise ValueError(f"mixture weights by {mix_by}: unknown keys {unknown}, "
                     f"no weight for {missing}; keys in the data: "
                     f"{sorted(groups)} (a weight of 0 drops a key)")
  for key, w in weights.items():
    if not (w >= 0 and np.isfinite(w)):
      raise ValueError(f"mixture weight for {key!r} must be >= 0, got {w}")
  keys = [k for k in groups if weights[k] > 0]
  if not keys:
    raise ValueError(f"mixture weights by {mix_by}: all zero")
  parts = [grain.MapDataset.source(groups[k])
           .shuffle(_component_seed(seed, i)).repeat() for i, k in
           enumerate(keys)]
  ds = grain.MapDataset.mix(parts, [float(weights[k]) for k in keys])
  if num_epochs is not None:
    ds = ds[:num_epochs * sum(len(g) for g in groups.values())]
  return ds


# ------------------------------------------------------------------- public


def make_sft_iterator(
    sources: Union[PathLike, Sequence, Mapping[str, Any]],
    tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int = 0,
    pack: bool = True,
    weights: Optional[Mapping[str, float]] = None,
    mix_by: str = "language",
    num_epochs: Optional[int] = 1,
    skip_invalid: bool = False,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    worker_count: int = 0,
    read_threads: int = 4,
) -> tuple[SFTIterator, PipelineStats]:
  """The SFT batch iterator of this process and its live stats.

  Args:
    sources: a JSONL path; loaded records (SFTRecord or dicts); a list of
      paths and/or record lists; or a {name: path or records} mapping. A
      source is named by its path, its mapping key, or "records[i]".
    tokenizer: an HF tokenizer with a chat template (`tokenize_chat`).
    seq_len: row length; longer examples are truncated (counted).
    global_batch_size: rows per step over all processes; this process yields
      global_batch_size // process_count rows per batch.
    seed: shuffle seed in [0, 2**32); same seed, same batches.
    pack: first-fit several examples per row, or one padded example per row.
    weights: mixture weights keyed by language or source name (`mix_by`:
      "language" or "source"): each group is shuffled and repeated on its
      own, and the groups are interleaved in exactly these proportions
      (grain's `MapDataset.mix`). Every key needs a weight (0 drops it).
    num_epochs: passes over the data (reshuffled each pass); None repeats
      forever. With weights, an epoch is as many examples as all sources
      hold.
    skip_invalid: skip and count invalid records (JSONL lines, dicts) and
      examples with no loss token after truncation, instead of raising.
    process_index, process_count: default jax.process_index()/count().
    worker_count: grain worker processes tokenising (module docstring:
      absl flags must be parsed); 0: `read_threads` threads here.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  for bad, msg in [
      (seq_len < 2, f"seq_len must be >= 2, got {seq_len}"),
      (global_batch_size <= 0 or global_batch_size % pc,
       f"global_batch_size {global_batch_size} must be a positive multiple "
       f"of process_count {pc}"),
      (not 0 <= pi < pc, f"process_index {pi} not in [0, {pc})"),
      (not 0 <= seed < 2**32, f"seed must be in [0, 2**32), got {seed}"),
      (num_epochs is not None and num_epochs <= 0,
       f"num_epochs must be positive or None, got {num_epochs}"),
      (mix_by not in ("language", "source"),
       f"mix_by must be 'language' or 'source', got {mix_by!r}")]:
    if bad:
      raise ValueError(msg)

  stats = PipelineStats(seq_len=seq_len)
  groups: dict[str, list] = collections.defaultdict(list)
  items = []
  for name, src in _named_sources(sources):
    for rec in _load(name, src, skip_invalid, stats):
      item = (name, rec)
      items.append(item)
      groups[rec.language if mix_by == "language" else name].append(item)
  stats.n_records = len(items)
  if weights is None:
    ds = grain.MapDataset.source(items).shuffle(seed).repeat(num_epochs)
  else:
    ds = _mixture(dict(groups), weights, mix_by, seed, num_epochs)
  if len(ds) < sys.maxsize:  # finite: every process gets as many examples
    ds = ds[:len(ds) - len(ds) % pc]
  ds = ds[pi::pc].map(_Tokenize(tokenizer, seq_len))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=max(16, 8 * read_threads)))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  pad_id = tokenizer.pad_token_id
  it = SFTIterator(iter(ds), rows=global_batch_size // pc, seq_len=seq_len,
                   pack=pack, pad_id=0 if pad_id is None else int(pad_id),
                   skip_invalid=skip_invalid, base_stats=stats,
                   pass_size=-(-stats.n_records // pc))
  return it, it.stats
