"""Record types of the recipe and their strict JSONL readers and writers.

Three kinds of record travel between stages, one JSON object per line, each
with a ``language`` field:

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

Readers raise ``RecordError`` naming file, line and field. With
``skip_invalid=True`` invalid lines are skipped, counted by reason, and the
count is logged; an empty file still raises. Messages are kept as plain
dicts (in a tuple) so they go straight into ``apply_chat_template``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

from absl import logging

from aya_jax.data import atomic

ROLES = ("system", "user", "assistant")
PathLike = Union[str, os.PathLike]


class RecordError(ValueError):
  """An invalid record; the message names file, line and field when known."""

  def __init__(self, message: str, *, field: Optional[str] = None,
               path: Optional[PathLike] = None, line: Optional[int] = None,
               reason: Optional[str] = None):
    self.field, self.path, self.line, self.detail = field, path, line, message
    self.reason = reason or message  # short, countable, for skip summaries
    where = ""
    if path is not None:
      where = f"{os.fspath(path)}:{line}: " if line else f"{os.fspath(path)}: "
    what = f"field '{field}': " if field else ""
    super().__init__(f"{where}{what}{message}")

  def located(self, path: PathLike, line: int) -> "RecordError":
    return RecordError(self.detail, field=self.field, path=path, line=line,
                       reason=self.reason)


def _fail(field: str, message: str, reason: str) -> RecordError:
  return RecordError(message, field=field, reason=reason)


def _check_str(value: Any, field: str, non_empty: bool = True) -> str:
  if not isinstance(value, str):
    raise _fail(field, f"expected a string, got {type(value).__name__}",
                "wrong type")
  if non_empty and not value.strip():
    raise _fail(field, "must not be empty", "empty value")
  return value


def _check_score(value: Any, field: str) -> Optional[float]:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _fail(field, f"expected a number or null, got "
                f"{type(value).__name__}", "wrong type")
  if not math.isfinite(value):
    raise _fail(field, f"must be finite, got {value}", "non-finite score")
  return float(value)


def _check_messages(value: Any, field: str, last_role: str) -> tuple:
  """Validates a conversation; returns it as a tuple of fresh dicts."""
  if not isinstance(value, (list, tuple)):
    raise _fail(field, f"expected a list of messages, got "
                f"{type(value).__name__}", "wrong type")
  if not value:
    raise _fail(field, "must contain at least one message", "empty value")
  out = []
  for i, msg in enumerate(value):
    where = f"{field}[{i}]"
    if not isinstance(msg, Mapping):
      raise _fail(where, f"expected an object, got {type(msg).__name__}",
                  "wrong type")
    for key in ("role", "content"):
      if key not in msg:
        raise _fail(f"{where}.{key}", "missing", "missing field")
    extra = sorted(set(msg) - {"role", "content"})
    if extra:
      raise _fail(where, f"unknown keys {extra}", "unknown field")
    role = _check_str(msg["role"], f"{where}.role")
    if role not in ROLES:
      raise _fail(f"{where}.role", f"unknown role {role!r}; expected one of "
                  f"{ROLES}", "unknown role")
    content = _check_str(msg["content"], f"{where}.content")
    out.append({"role": role, "content": content})
  # role order: [system] user assistant user ... <last_role>
  start = 1 if out[0]["role"] == "system" else 0
  for i, msg in enumerate(out[start:], start):
    want = "user" if (i - start) % 2 == 0 else "assistant"
    if msg["role"] != want:
      raise _fail(f"{field}[{i}].role", f"expected {want!r} here, got "
                  f"{msg['role']!r} (order: optional system, then user/"
                  f"assistant alternating from user)", "role order")
  if len(out) == start or out[-1]["role"] != last_role:
    raise _fail(field, f"must end with a {last_role!r} message", "role order")
  return tuple(out)


_text = _check_str
_label = functools.partial(_check_str, non_empty=False)  # may be empty
_conversation = functools.partial(_check_messages, last_role="assistant")
_prompt = functools.partial(_check_messages, last_role="user")


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
      raise _fail(unknown[0], f"unknown field for a {cls.KIND} record "
                  f"(fields: {names})", "unknown field")
    for name in names:
      if name not in obj and name not in cls._OPTIONAL:
        raise _fail(name, "missing", "missing field")
    return cls(**{name: obj.get(name) for name in names})


@dataclasses.dataclass(frozen=True)
class SFTRecord(_Record):
  """A conversation to imitate; the loss goes on the assistant turns."""
  id: str
  language: str
  messages: tuple
  KIND = "sft"
  _CHECKS = {"id": _text, "language": _text, "messages": _conversation}


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
  _CHECKS = {"id": _text, "language": _text, "prompt": _prompt,
             "chosen": _text, "rejected": _text, "chosen_score": _check_score,
             "rejected_score": _check_score, "source": _label}

  def __post_init__(self):
    super().__post_init__()
    if self.chosen == self.rejected:
      raise _fail("rejected", "is the same text as 'chosen': the pair prefers nothing",
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
  _CHECKS = {"id": _text, "language": _text, "prompt": _prompt,
             "completion": _text, "teacher": _label, "score": _check_score}


Record = Union[SFTRecord, PreferenceRecord, CompletionRecord]
KINDS = {cls.KIND: cls for cls in (SFTRecord, PreferenceRecord,
                                   CompletionRecord)}


def record_class(kind: Union[str, type]) -> type:
  """'sft' | 'preference' | 'completion' (or the class itself) -> class."""
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
