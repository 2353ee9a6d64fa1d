"""Record types of the recipe and their strict JSONL readers and writers.

Four kinds of record travel between stages, one JSON object per line, each
with a ``language`` field:

  PromptRecord      {"id", "language", "messages": [..., user turn]}: a request
  SFTRecord         {"id", "language", "messages": [{"role", "content"}, ...]}
  PreferenceRecord  {"id", "language", "prompt": [messages], "chosen",
                     "rejected", "chosen_score", "rejected_score", "source"}
  CompletionRecord  {"id", "language", "prompt": [messages], "completion",
                     "teacher", "score"}

Records validate themselves on construction, so an invalid record can be
neither read nor written. The rules:

  * every field is present (the nullable scores may be absent or null, and
    read as None); no unknown fields; exact types (a score is an int or a
    finite float, never a bool); ``id`` and ``language`` are non-empty;
  * a message is exactly {"role", "content"} with a known role and non-empty
    content; roles run: an optional "system" first, then "user" and
    "assistant" alternating, starting with "user". SFT conversations end
    with "assistant"; prompts end with "user" (the answer comes next);
  * answers (chosen, rejected, completion) are non-empty, and a preference
    pair's chosen and rejected answers differ: an identical pair teaches
    nothing;
  * a line is UTF-8 text (a line that is not is invalid, like malformed JSON);
  * ids are unique within a file; an empty file is an error.

Prompts have one reader, `read_prompts`, for every stage that answers them
(teachers, arbitrage, online rounds, evaluation): it takes prompt records,
the m-ArenaHard layouts ({"question_id"}, {"prompt": str}, {"turns"}) and the
prompts of SFT, preference and completion records.

Readers raise ``RecordError`` naming file, line and field. With
``skip_invalid=True`` invalid lines are skipped, counted by reason, and the
count is logged; an empty file still raises. Messages are kept as plain
dicts (in a tuple) so they go straight into ``apply_chat_template``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
from absl import logging

from aya_jax.data import atomic
from aya_jax.data.fields import (PathLike, RecordError, check_conversation, check_label,
                                 check_prompt, check_score, check_text, fail)


class _Record:
  """Shared validation and (de)serialisation of the record dataclasses."""
  KIND: str = ""
  _OPTIONAL: tuple = ()  # nullable fields that may be absent on disk
  _CHECKS: dict = {}     # field -> check(value, field) -> normalised value

  def __post_init__(self):
    for name, check in self._CHECKS.items():
      object.__setattr__(self, name, check(getattr(self, name), name))

  def to_dict(self) -> dict:
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, tuple):  # conversations
        value = [dict(m) for m in value]
      out[f.name] = value
    return out

  @classmethod
  def from_dict(cls, obj: Any):
    if not isinstance(obj, Mapping):
      raise RecordError(f"expected a JSON object, got {type(obj).__name__}",
                        reason="not an object")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(obj) - set(names))
    if unknown:
      raise fail(unknown[0], f"unknown field for a {cls.KIND} record "
                  f"(fields: {names})", "unknown field")
    for name in names:
      if name not in obj and name not in cls._OPTIONAL:
        raise fail(name, "missing", "missing field")
    return cls(**{name: obj.get(name) for name in names})


@dataclasses.dataclass(frozen=True)
class PromptRecord(_Record):
  """A conversation awaiting an answer (its last message is the user's)."""
  id: str
  language: str
  messages: tuple
  KIND = "prompt"
  _CHECKS = {"id": check_text, "language": check_text, "messages": check_prompt}


@dataclasses.dataclass(frozen=True)
class SFTRecord(_Record):
  """A conversation to imitate; the loss goes on the assistant turns."""
  id: str
  language: str
  messages: tuple
  KIND = "sft"
  _CHECKS = {"id": check_text, "language": check_text, "messages": check_conversation}


@dataclasses.dataclass(frozen=True)
class PreferenceRecord(_Record):
  """A prompt with a preferred and a dispreferred answer."""
  id: str
  language: str
  prompt: tuple
  chosen: str
  rejected: str
  chosen_score: Optional[float] = None
  rejected_score: Optional[float] = None
  source: str = ""
  KIND = "preference"
  _OPTIONAL = ("chosen_score", "rejected_score")
  _CHECKS = {"id": check_text, "language": check_text, "prompt": check_prompt,
             "chosen": check_text, "rejected": check_text, "chosen_score": check_score,
             "rejected_score": check_score, "source": check_label}

  def __post_init__(self):
    super().__post_init__()
    if self.chosen == self.rejected:
      raise fail("rejected", "is the same text as 'chosen': the pair prefers nothing",
                  "chosen equals rejected")


@dataclasses.dataclass(frozen=True)
class CompletionRecord(_Record):
  """One teacher's answer to a prompt, with its score once scored."""
  id: str
  language: str
  prompt: tuple
  completion: str
  teacher: str
  score: Optional[float] = None
  KIND = "completion"
  _OPTIONAL = ("score",)
  _CHECKS = {"id": check_text, "language": check_text, "prompt": check_prompt,
             "completion": check_text, "teacher": check_label, "score": check_score}


Record = Union[PromptRecord, SFTRecord, PreferenceRecord, CompletionRecord]
KINDS = {cls.KIND: cls for cls in (PromptRecord, SFTRecord, PreferenceRecord,
                                   CompletionRecord)}


def record_class(kind: Union[str, type]) -> type:
  """'prompt' | 'sft' | 'preference' | 'completion' (or the class itself) -> class."""
  if isinstance(kind, type) and kind in KINDS.values():
    return kind
  if kind not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; expected one of "
                     f"{sorted(KINDS)}")
  return KINDS[kind]


@dataclasses.dataclass
class ReadStats:
  """Counts filled in while iterating a file."""
  n_read: int = 0
  n_skipped: int = 0
  reasons: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)


class ReadResult(list):
  """The records of a file (a list), plus what was skipped and why."""

  def __init__(self, records: Iterable[Record], n_skipped: int = 0,
               reasons: Optional[collections.Counter] = None,
               path: Optional[PathLike] = None):
    super().__init__(records)
    self.n_skipped = n_skipped
    self.reasons = reasons if reasons is not None else collections.Counter()
    self.path = path


def json_line(raw: bytes) -> Any:
  """One line's JSON value; RecordError for bytes that are not UTF-8 (naming
  the column) or text that is not JSON."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RecordError(f"not UTF-8 text: byte {raw[e.start:e.start + 1]!r} at column "
                      f"{e.start + 1}", reason="not UTF-8") from None
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    raise RecordError(f"malformed JSON: {e}", reason="malformed JSON") from None


def iter_jsonl(path: PathLike, kind: Union[str, type],
               skip_invalid: bool = False,
               stats: Optional[ReadStats] = None) -> Iterator[Record]:
  """Yields the records of a JSONL file, validating each line.

  Args:
    path: the file.
    kind: 'sft', 'preference', 'completion' or a record class.
    skip_invalid: skip invalid lines (not UTF-8, malformed, invalid, duplicate id)
      instead of raising; they are counted in ``stats`` and the total is
      logged when the file is done. An empty file raises regardless.
    stats: optional ReadStats, updated as lines are read.

  Blank lines are not records and are ignored.
  """
  cls = record_class(kind)
  stats = stats if stats is not None else ReadStats()
  seen: dict = {}  # id -> line number
  n_lines = 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      n_lines += 1
      try:
        record = cls.from_dict(json_line(raw))
        if record.id in seen:
          raise RecordError(f"duplicate id {record.id!r} (first on line "
                            f"{seen[record.id]}, again on line {lineno})",
                            field="id", reason="duplicate id")
      except RecordError as e:
        e = e.located(path, lineno)
        if not skip_invalid:
          raise e from None
        stats.n_skipped += 1
        stats.reasons[e.reason] += 1
        logging.vlog(1, "skipping %s", e)
        continue
      seen[record.id] = lineno
      stats.n_read += 1
      yield record
  if n_lines == 0:
    raise RecordError("empty file: no records", path=path, reason="empty file")
  if stats.n_skipped:
    logging.warning("%s: skipped %d invalid line(s) of %d: %s",
                    os.fspath(path), stats.n_skipped, n_lines,
                    dict(stats.reasons))


def read_jsonl(path: PathLike, kind: Union[str, type],
               skip_invalid: bool = False) -> ReadResult:
  """Reads a whole JSONL file of one record kind; see ``iter_jsonl``.

  Returns a ReadResult: a list of records with ``n_skipped`` and ``reasons``
  (a Counter of skip reasons, empty unless ``skip_invalid``).
  """
  stats = ReadStats()
  records = list(iter_jsonl(path, kind, skip_invalid, stats))
  return ReadResult(records, stats.n_skipped, stats.reasons, path)


def _dumps(record: Any) -> str:
  if not isinstance(record, _Record):
    raise TypeError(f"expected a record, got {type(record).__name__}")
  return json.dumps(record.to_dict(), ensure_ascii=False, allow_nan=False)


def write_jsonl(path: PathLike, records: Iterable[Record],
                append: bool = False) -> int:
  """Writes records as JSONL; returns the number written.

  A whole-file write (``append=False``) goes to a temporary file in the same
  directory that is renamed over ``path`` at the end, so readers never see a
  half-written file; the records must be one kind, unique ids, at least one.
  ``append=True`` adds lines to ``path`` (creating it), flushing after each
  line, for writers that produce records incrementally; duplicate ids
  against lines already in the file are caught when it is read.
  """
  path = os.fspath(path)
  if append:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "a", encoding="utf-8") as f:
      for record in records:
        f.write(_dumps(record) + "\n")
        f.flush()
        n += 1
    return n
  lines, seen, kinds = [], {}, set()
  for i, record in enumerate(records):
    lines.append(_dumps(record))
    kinds.add(type(record))
    if record.id in seen:
      raise RecordError(f"duplicate id {record.id!r} (records {seen[record.id]}"
                        f" and {i})", field="id", path=path,
                        reason="duplicate id")
    seen[record.id] = i
  if len(kinds) > 1:
    raise TypeError(f"{path}: mixed record kinds "
                    f"{sorted(k.KIND for k in kinds)}; one kind per file")
  if not lines:  # readers reject empty files: fail here, at the source
    raise ValueError(f"{path}: no records to write")
  atomic.write_text(path, "".join(line + "\n" for line in lines))
  return len(lines)


def read_parsed(path: PathLike, parse, what: str = "records") -> list:
  """Strictly reads a JSONL file of any layout: `parse(obj)` turns one JSON
  object into an item with an `id` (raising RecordError with the field).
  Errors name file, line and field: malformed JSON, parse errors, duplicate
  ids (both lines), an empty file."""
  out, seen = [], {}
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        item = parse(json_line(raw))
        if item.id in seen:
          raise RecordError(f"duplicate id {item.id!r} (first on line {seen[item.id]})",
                            field="id")
      except RecordError as e:
        raise e.located(path, lineno) from None
      seen[item.id] = lineno
      out.append(item)
  if not out:
    raise RecordError(f"empty file: no {what}", path=path)
  return out


# ------------------------------------------------------------------ prompts


def prompt_from_json(obj: Any) -> PromptRecord:
  """The request of one JSON line: a prompt record, an m-ArenaHard line
  ({"question_id" or "id", "language", "prompt": str or "turns": [{"content"}]}),
  an SFT record (its last assistant turn dropped) or a preference /
  completion record (its prompt)."""
  if not isinstance(obj, Mapping):
    raise RecordError(f"expected a JSON object, got {type(obj).__name__}",
                      reason="not an object")
  if "chosen" in obj:
    return _request_of(PreferenceRecord.from_dict(obj), "prompt")
  if "completion" in obj:
    return _request_of(CompletionRecord.from_dict(obj), "prompt")
  messages = obj.get("messages")
  if (isinstance(messages, list) and messages and isinstance(messages[-1], Mapping)
      and messages[-1].get("role") == "assistant"):
    return _request_of(SFTRecord.from_dict(obj), "messages")
  if "messages" in obj or ("id" in obj and "question_id" not in obj
                           and "prompt" not in obj and "turns" not in obj):
    return PromptRecord.from_dict(obj)
  return _arena_prompt(obj)


def _request_of(record, field: str) -> PromptRecord:
  messages = getattr(record, field)
  return PromptRecord(record.id, record.language,
                      messages[:-1] if field == "messages" else messages)


def _arena_prompt(obj: Mapping) -> PromptRecord:
  """m-ArenaHard: an int or str id (`id` or `question_id`), the request as
  `prompt` (a string) or `turns` (the first turn's content)."""
  unknown = sorted(set(obj) - {"id", "question_id", "language", "prompt", "turns"})
  if unknown:
    raise fail(unknown[0], "unknown field for a prompt (fields: id or question_id, language, "
               "messages, prompt or turns)", "unknown field")
  if "language" not in obj:
    raise fail("language", "missing", "missing field")
  pid = obj.get("id", obj.get("question_id"))
  if pid is None:
    raise fail("id", "missing (or 'question_id')", "missing field")
  if isinstance(pid, int) and not isinstance(pid, bool):
    pid = str(pid)
  if "prompt" in obj:
    text = check_text(obj["prompt"], "prompt")
  elif "turns" in obj:
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], Mapping):
      raise fail("turns", "expected a list of {'content': ...}", "wrong type")
    text = check_text(turns[0].get("content"), "turns[0].content")
  else:
    raise fail("messages", "missing (or 'prompt' / 'turns')", "missing field")
  return PromptRecord(pid, obj["language"], ({"role": "user", "content": text},))


def read_prompts(path: PathLike, only: Optional[Iterable[str]] = None) -> list:
  """The PromptRecords of a JSONL file (any layout `prompt_from_json` takes),
  read strictly: errors name the file, line and field; ids are unique. With
  `only`, the prompts in other languages are dropped (every line is still
  checked)."""
  prompts = read_parsed(path, prompt_from_json, "prompts")
  return prompts if only is None else [p for p in prompts if p.language in set(only)]


def as_prompts(prompts) -> list:
  """A path, or PromptRecords / dicts of that shape; at least one, unique ids."""
  if isinstance(prompts, (str, os.PathLike)):
    return read_prompts(prompts)
  out = [p if isinstance(p, PromptRecord) else prompt_from_json(p) for p in prompts]
  ids = [p.id for p in out]
  if len(set(ids)) != len(ids):
    raise ValueError(f"prompts: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})}")
  if not out:
    raise ValueError("prompts: none given")
  return out


# ------------------------------------------------------- completion ids

SEP = "#"  # completion ids: '<prompt id>#<teacher>#<sample>'


def completion_id(prompt_id: str, teacher: str, sample: int) -> str:
  return f"{prompt_id}{SEP}{teacher}{SEP}{sample}"


def parse_completion_id(cid: str) -> tuple:
  """(prompt id, teacher, sample) of a completion id (prompt ids may hold '#')."""
  prompt_id, teacher, sample = cid.rsplit(SEP, 2)
  return prompt_id, teacher, int(sample)


def keyed_rng(seed: int, key: str) -> np.random.Generator:
  """A generator that depends only on (seed, key), e.g. a record id: the same
  draws on a rerun, whatever the order records come in."""
  digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
  return np.random.default_rng([seed, digest])


def drop_partial_line(path: PathLike):
  """Cuts a half-written last line (no trailing newline, from a killed append)
  off a JSONL file, so an append-mode writer resumes on a line boundary."""
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      keep = data.rfind(b"\n") + 1
      logging.warning("%s: dropping a half-written last line (%d bytes)", os.fspath(path),
                      len(data) - keep)
      f.truncate(keep)
