"""The checks every record field goes through, with the one error type.

`RecordError` names the file, line and field of a bad value when known; the
checks (`check_text`, `check_label`, `check_score`, `check_conversation`,
`check_prompt`) validate one value and return it normalised (messages as a
tuple of fresh dicts). The rules are listed in aya_jax.data.records.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Mapping, Optional, Union

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


def fail(field: str, message: str, reason: str) -> RecordError:
  return RecordError(message, field=field, reason=reason)


def check_str(value: Any, field: str, non_empty: bool = True) -> str:
  if not isinstance(value, str):
    raise fail(field, f"expected a string, got {type(value).__name__}",
                "wrong type")
  if non_empty and not value.strip():
    raise fail(field, "must not be empty", "empty value")
  return value


def check_score(value: Any, field: str) -> Optional[float]:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise fail(field, f"expected a number or null, got "
                f"{type(value).__name__}", "wrong type")
  if not math.isfinite(value):
    raise fail(field, f"must be finite, got {value}", "non-finite score")
  return float(value)


def check_messages(value: Any, field: str, last_role: str) -> tuple:
  """Validates a conversation; returns it as a tuple of fresh dicts."""
  if not isinstance(value, (list, tuple)):
    raise fail(field, f"expected a list of messages, got "
                f"{type(value).__name__}", "wrong type")
  if not value:
    raise fail(field, "must contain at least one message", "empty value")
  out = []
  for i, msg in enumerate(value):
    where = f"{field}[{i}]"
    if not isinstance(msg, Mapping):
      raise fail(where, f"expected an object, got {type(msg).__name__}",
                  "wrong type")
    for key in ("role", "content"):
      if key not in msg:
        raise fail(f"{where}.{key}", "missing", "missing field")
    extra = sorted(set(msg) - {"role", "content"})
    if extra:
      raise fail(where, f"unknown keys {extra}", "unknown field")
    role = check_str(msg["role"], f"{where}.role")
    if role not in ROLES:
      raise fail(f"{where}.role", f"unknown role {role!r}; expected one of "
                  f"{ROLES}", "unknown role")
    content = check_str(msg["content"], f"{where}.content")
    out.append({"role": role, "content": content})
  # role order: [system] user assistant user ... <last_role>
  start = 1 if out[0]["role"] == "system" else 0
  for i, msg in enumerate(out[start:], start):
    want = "user" if (i - start) % 2 == 0 else "assistant"
    if msg["role"] != want:
      raise fail(f"{field}[{i}].role", f"expected {want!r} here, got "
                  f"{msg['role']!r} (order: optional system, then user/"
                  f"assistant alternating from user)", "role order")
  if len(out) == start or out[-1]["role"] != last_role:
    raise fail(field, f"must end with a {last_role!r} message", "role order")
  return tuple(out)


check_text = check_str
check_label = functools.partial(check_str, non_empty=False)  # may be empty
check_conversation = functools.partial(check_messages, last_role="assistant")
check_prompt = functools.partial(check_messages, last_role="user")
