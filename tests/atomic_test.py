"""aya_jax.data.atomic: whole-or-nothing writes and the stale-cache reader."""

import errno
import json
import os

import pytest

from aya_jax.data import atomic


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "sub" / "state.json"  # the directory is made
  atomic.write_json(path, {"a": 1})
  atomic.write_json(path, {"a": "é"}, indent=1)
  assert json.loads(path.read_text(encoding="utf-8")) == {"a": "é"}
  assert "é" in path.read_text(encoding="utf-8")  # ensure_ascii=False: readable UTF-8
  assert os.listdir(path.parent) == ["state.json"]
  assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_a_failed_write_keeps_the_old_file_and_names_the_target(tmp_path, monkeypatch):
  path = tmp_path / "report.md"
  atomic.write_text(path, "old")

  def disk_full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", disk_full)
  with pytest.raises(OSError, match=r"could not write .*report\.md: No space left") as info:
    atomic.write_text(path, "new")
  assert info.value.errno == errno.ENOSPC
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["report.md"]  # the temporary file is gone


def test_a_value_that_is_not_json_raises_before_anything_is_written(tmp_path):
  path = tmp_path / "x.json"
  atomic.write_json(path, [1])
  with pytest.raises(TypeError):
    atomic.write_json(path, {"bad": object()})
  assert json.loads(path.read_text()) == [1]


def test_read_json_cache_absent_unreadable_and_valid(tmp_path, caplog):
  path = tmp_path / "cache.json"
  assert atomic.read_json_cache(path) is None  # absent: no warning
  assert not caplog.records
  path.write_text('{"half": ')  # a torn write
  assert atomic.read_json_cache(path, "world spec") is None
  assert any("cache.json" in r.getMessage() and "world spec" in r.getMessage()
             for r in caplog.records)
  path.write_bytes(b"\xff\xfe not utf-8")
  assert atomic.read_json_cache(path) is None
  atomic.write_json(path, {"ok": [1, 2]})
  assert atomic.read_json_cache(path) == {"ok": [1, 2]}
