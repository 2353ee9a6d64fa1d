"""Files that a later run reads back: written whole or not at all.

Every writer here goes to a temporary file in the target's directory, syncs
it and renames it over the target, so a reader (a resumed run, another host
on a shared filesystem) sees the old file or the new one, never half of one.
A failed write (a full disk, a kill) leaves the old file as it was, removes
the temporary file, and raises one OSError that names the target.

`read_json_cache` is the other side for caches: a file that cannot be read
or parsed (a torn write by an older version, a disk error) is stale, not a
crash: it returns None and logs a warning naming the file, and the caller
rebuilds what the file described.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Union

from absl import logging

PathLike = Union[str, os.PathLike]


def write_bytes(path: PathLike, data: bytes):
  """Writes `data` to `path` atomically (see the module docstring)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp",
                               prefix=f".{os.path.basename(path)}.")
    with os.fdopen(fd, "wb") as f:
      os.chmod(tmp, 0o644)  # mkstemp makes 0600
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
  except OSError as e:
    raise OSError(e.errno, f"could not write {path}: {e.strerror or e} (the previous "
                  "file, if there was one, is unchanged)") from None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: PathLike, text: str):
  """`text` as UTF-8, written atomically."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, **dump_kwargs):
  """json.dumps(obj, **dump_kwargs) written atomically."""
  write_text(path, json.dumps(obj, ensure_ascii=False, **dump_kwargs))


def read_json_cache(path: PathLike, what: str = "cache file"):
  """The JSON in `path`; None when it is absent, and None with a warning
  naming it when it cannot be read or parsed (the caller rebuilds it)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    logging.warning("%s: unreadable %s (%s): treated as stale and rebuilt", path, what, e)
    return None
