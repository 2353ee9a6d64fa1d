"""Tests for aya_jax.data.records: round trips and every validation rule.

Reference: the record format of DESIGN.md ("Records"), written out by hand
as JSON lines below.
"""

import errno
import json
import os

import pytest

from aya_jax.data import atomic
from aya_jax.data import records as R

SYS = {"role": "system", "content": "Be brief."}
U = {"role": "user", "content": "¿Cuál es la capital de Francia?"}
A = {"role": "assistant", "content": "París."}

SFT = {"id": "s1", "language": "es", "messages": [SYS, U, A]}
PREF = {"id": "p1", "language": "es", "prompt": [U], "chosen": "París.",
        "rejected": "Lyon.", "chosen_score": 0.9, "rejected_score": -1,
        "source": "offline"}
COMP = {"id": "c1", "language": "hi", "prompt": [SYS, U],
        "completion": "पेरिस", "teacher": "teacher_a", "score": None}


def _write_lines(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l,
                           ensure_ascii=False)) + "\n" for l in lines),
                  encoding="utf-8")
  return path


def _with(base, **kw):
  out = dict(base)
  out.update(kw)
  return out


@pytest.mark.parametrize("kind,obj,cls", [("sft", SFT, R.SFTRecord),
                                          ("preference", PREF,
                                           R.PreferenceRecord),
                                          ("completion", COMP,
                                           R.CompletionRecord)])
def test_round_trip_each_kind(tmp_path, kind, obj, cls):
  objs = [obj, _with(obj, id=obj["id"] + "b")]
  path = _write_lines(tmp_path, objs)
  got = R.read_jsonl(path, kind)
  assert [type(r) for r in got] == [cls, cls]
  assert got.n_skipped == 0 and not got.reasons
  want = [dict(o) for o in objs]
  if kind == "preference":  # ints become floats
    for w in want:
      w["rejected_score"] = -1.0
  assert [r.to_dict() for r in got] == want
  out = tmp_path / "sub" / "out.jsonl"
  assert R.write_jsonl(out, got) == 2
  assert [r.to_dict() for r in R.read_jsonl(out, cls)] == want
  # non-ASCII kept as UTF-8 text, not escapes
  assert "¿Cuál" in out.read_text(encoding="utf-8")
  assert not [f for f in os.listdir(out.parent) if f.endswith(".tmp")]


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "state.json"
  atomic.write_json(path, {"step": 1})
  def killed(fd):
    raise KeyboardInterrupt
  monkeypatch.setattr(os, "fsync", killed)
  with pytest.raises(KeyboardInterrupt):
    atomic.write_json(path, {"step": 2, "big": "x" * 100_000})
  assert json.loads(path.read_text()) == {"step": 1}
  assert os.listdir(tmp_path) == ["state.json"]  # no temporary left behind
  monkeypatch.undo()
  atomic.write_json(path, {"é": 2}, indent=1)
  assert json.loads(path.read_text(encoding="utf-8")) == {"é": 2}
  assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_disk_full_raises_one_error_naming_the_file_and_keeps_the_old(
    tmp_path, monkeypatch):
  path = tmp_path / "report.json"
  atomic.write_json(path, {"step": 1})
  jsonl = tmp_path / "sft.jsonl"
  R.write_jsonl(jsonl, [R.SFTRecord.from_dict(SFT)])
  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(os, "fsync", full)
  for target, write in ((path, lambda: atomic.write_json(path, {"step": 2})),
                        (jsonl, lambda: R.write_jsonl(
                            jsonl, [R.SFTRecord.from_dict(_with(SFT, id="s9"))]))):
    with pytest.raises(OSError) as e:
      write()
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == (f"[Errno {errno.ENOSPC}] could not write {target}: No space left "
                            "on device (the previous file, if there was one, is unchanged)")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one traceback
  assert json.loads(path.read_text()) == {"step": 1}
  assert [r.id for r in R.read_jsonl(jsonl, "sft")] == ["s1"]
  assert sorted(os.listdir(tmp_path)) == ["report.json", "sft.jsonl"]  # no temporaries


def test_unreadable_cache_is_stale_with_a_warning_naming_it(tmp_path, caplog):
  path = tmp_path / "cache.json"
  assert atomic.read_json_cache(path) is None  # absent: no warning
  path.write_text('{"spec": {"a": 1}, "sco')  # a torn write
  with caplog.at_level("WARNING"):
    assert atomic.read_json_cache(path, "world report") is None
  assert f"{path}: unreadable world report" in caplog.text
  path.write_bytes(b'{"a": "\xff\xfe"}')
  assert atomic.read_json_cache(path) is None
  atomic.write_json(path, {"a": [1]})
  assert atomic.read_json_cache(path) == {"a": [1]}


def test_bytes_that_are_not_utf8_name_file_and_line_and_are_counted(tmp_path):
  path = tmp_path / "latin1.jsonl"
  bad = json.dumps(_with(SFT, id="s2"), ensure_ascii=False).encode("latin-1")
  good = json.dumps(_with(SFT, id="s3")).encode()
  path.write_bytes(json.dumps(SFT).encode() + b"\n" + bad + b"\n" + good + b"\n")
  with pytest.raises(R.RecordError) as e:
    R.read_jsonl(path, "sft")
  assert str(e.value).startswith(f"{path}:2: not UTF-8 text: byte b'\\xbf'")
  assert e.value.reason == "not UTF-8"
  got = R.read_jsonl(path, "sft", skip_invalid=True)
  assert [r.id for r in got] == ["s1", "s3"] and got.reasons == {"not UTF-8": 1}
  with pytest.raises(R.RecordError, match=f"^{path}:2: not UTF-8"):
    R.read_parsed(path, R.SFTRecord.from_dict)


def test_messages_are_chat_template_dicts():
  r = R.SFTRecord.from_dict(SFT)
  assert r.messages[1] == {"role": "user", "content": U["content"]}
  assert isinstance(r.messages, tuple)
  with pytest.raises(Exception):
    r.id = "x"  # frozen


def test_missing_optional_scores_read_as_none(tmp_path):
  obj = {k: v for k, v in PREF.items() if not k.endswith("_score")}
  (r,) = R.read_jsonl(_write_lines(tmp_path, [obj]), "preference")
  assert r.chosen_score is None and r.rejected_score is None


BAD_CASES = [
    # (kind, line, field named in the message, reason)
    ("sft", '{"id": "x", "language": "es", "messages": [', None,
     "malformed JSON"),
    ("sft", _with(SFT, language=""), "language", "empty value"),
    ("sft", {k: v for k, v in SFT.items() if k != "language"}, "language",
     "missing field"),
    ("sft", _with(SFT, id=7), "id", "wrong type"),
    ("sft", _with(SFT, extra=1), "extra", "unknown field"),
    ("sft", _with(SFT, messages=[U, {"role": "bot", "content": "hi"}]),
     "messages[1].role", "unknown role"),
    ("sft", _with(SFT, messages=[U, A, A]), "messages[2].role", "role order"),
    ("sft", _with(SFT, messages=[A, U, A]), "messages[0].role", "role order"),
    ("sft", _with(SFT, messages=[U, SYS, A]), "messages[1].role",
     "role order"),
    ("sft", _with(SFT, messages=[SYS, U]), "messages", "role order"),
    ("sft", _with(SFT, messages=[U, {"role": "assistant", "content": " "}]),
     "messages[1].content", "empty value"),
    ("sft", _with(SFT, messages=[U, {"role": "assistant"}]),
     "messages[1].content", "missing field"),
    ("sft", _with(SFT, messages=[]), "messages", "empty value"),
    ("preference", _with(PREF, chosen=""), "chosen", "empty value"),
    ("preference", _with(PREF, prompt=[U, A]), "prompt", "role order"),
    ("preference", _with(PREF, chosen_score="0.5"), "chosen_score",
     "wrong type"),
    ("preference", _with(PREF, chosen_score=True), "chosen_score",
     "wrong type"),
    ("preference", '{"id": "p", "language": "es", "prompt": [{"role": "user", '
     '"content": "q"}], "chosen": "a", "rejected": "b", "chosen_score": NaN, '
     '"source": ""}', "chosen_score", "non-finite score"),
    ("completion", {k: v for k, v in COMP.items() if k != "teacher"},
     "teacher", "missing field"),
    ("completion", _with(COMP, completion=None), "completion", "wrong type"),
    ("completion", "[1, 2]", None, "not an object"),
    ("preference", _with(PREF, rejected=PREF["chosen"]), "rejected",
     "chosen equals rejected"),
]


@pytest.mark.parametrize("kind,bad,field,reason", BAD_CASES)
def test_invalid_line_raises_with_file_line_field(tmp_path, kind, bad, field,
                                                  reason):
  good = {"sft": SFT, "preference": PREF, "completion": COMP}[kind]
  path = _write_lines(tmp_path, [good, bad])
  with pytest.raises(R.RecordError) as e:
    R.read_jsonl(path, kind)
  assert e.value.line == 2 and e.value.reason == reason
  assert str(e.value).startswith(f"{path}:2: ")
  if field:
    assert e.value.field == field and f"field '{field}'" in str(e.value)


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
  lines = [SFT, _with(SFT, id="s2", language=""), "not json",
           _with(SFT, id="s3"), _with(SFT, id="s4", messages=[U]), "",
           _with(SFT, id="s3")]
  path = _write_lines(tmp_path, lines)
  with caplog.at_level("WARNING"):
    got = R.read_jsonl(path, "sft", skip_invalid=True)
  assert [r.id for r in got] == ["s1", "s3"]
  assert got.n_skipped == 4
  assert got.reasons == {"empty value": 1, "malformed JSON": 1,
                         "role order": 1, "duplicate id": 1}
  assert "skipped 4 invalid line(s) of 6" in caplog.text


def test_iterator_fills_stats(tmp_path):
  path = _write_lines(tmp_path, [COMP, _with(COMP, id="")])
  stats = R.ReadStats()
  got = list(R.iter_jsonl(path, "completion", skip_invalid=True, stats=stats))
  assert len(got) == 1 and stats.n_read == 1 and stats.n_skipped == 1


def test_duplicate_ids_name_both_lines(tmp_path):
  path = _write_lines(tmp_path, [SFT, _with(SFT, id="s2"), SFT])
  with pytest.raises(R.RecordError, match=r"duplicate id 's1' \(first on "
                     r"line 1, again on line 3\)"):
    R.read_jsonl(path, "sft")
  with pytest.raises(R.RecordError, match="duplicate id"):
    R.write_jsonl(tmp_path / "o.jsonl", [R.SFTRecord.from_dict(SFT)] * 2)


def test_empty_file_is_an_error_even_when_skipping(tmp_path):
  path = _write_lines(tmp_path, ["", "  "])
  for skip in (False, True):
    with pytest.raises(R.RecordError, match="empty file"):
      R.read_jsonl(path, "sft", skip_invalid=skip)


def test_construction_validates():
  with pytest.raises(R.RecordError, match="prompt"):
    R.CompletionRecord(id="c", language="en", prompt=[U, A], completion="x",
                       teacher="t")
  with pytest.raises(ValueError, match="unknown record kind"):
    R.record_class("dpo")


def test_append_mode_and_atomic_overwrite(tmp_path):
  path = tmp_path / "inc.jsonl"
  recs = [R.CompletionRecord.from_dict(_with(COMP, id=f"c{i}"))
          for i in range(3)]
  assert R.write_jsonl(path, recs[:1], append=True) == 1
  assert R.write_jsonl(path, recs[1:], append=True) == 2
  assert [r.id for r in R.read_jsonl(path, "completion")] == ["c0", "c1",
                                                                "c2"]
  # a failed whole-file write leaves the old file intact, no temp files
  with pytest.raises(TypeError, match="mixed record kinds"):
    R.write_jsonl(path, [recs[0], R.SFTRecord.from_dict(SFT)])
  with pytest.raises(TypeError):
    R.write_jsonl(path, [recs[0], {"id": "raw dict"}])
  assert len(R.read_jsonl(path, "completion")) == 3
  with pytest.raises(ValueError, match="no records"):
    R.write_jsonl(path, [])
  R.write_jsonl(path, recs[:1])
  assert [r.id for r in R.read_jsonl(path, "completion")] == ["c0"]
  assert sorted(os.listdir(tmp_path)) == ["inc.jsonl"]


# ------------------------------------------------------------------ prompts


def test_prompts_of_every_layout(tmp_path):
  good = {"id": "syn:en:next_day:mon:t0", "language": "en",
          "messages": [{"role": "user", "content": "What day comes after Monday?"}]}
  arena = {"question_id": 17, "language": "fr", "prompt": "Bonjour ?"}
  turns = {"question_id": "q3", "language": "ru", "turns": [{"content": "Привет?"}]}
  sft = {"id": "s1", "language": "en", "messages": [
      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
  pref = {"id": "p1", "language": "en", "prompt": [{"role": "user", "content": "Which?"}],
          "chosen": "a", "rejected": "b", "source": "x"}
  ps = R.read_prompts(_write_lines(tmp_path, name="ok.jsonl",
                                   lines=[good, arena, turns, sft, pref]))
  assert [p.id for p in ps] == ["syn:en:next_day:mon:t0", "17", "q3", "s1", "p1"]
  assert all(isinstance(p, R.PromptRecord) for p in ps)
  assert ps[1].messages == ({"role": "user", "content": "Bonjour ?"},)
  assert ps[2].messages == ({"role": "user", "content": "Привет?"},)
  assert ps[3].messages == ({"role": "user", "content": "Hi"},)  # the answer dropped
  assert ps[4].messages == ({"role": "user", "content": "Which?"},)
  # only=: any language parses, the others are dropped, every line is still checked
  xx = {"id": "x1", "language": "xx", "prompt": "hi"}
  mixed = _write_lines(tmp_path, name="mixed.jsonl", lines=[good, xx, arena])
  assert [p.id for p in R.read_prompts(mixed, only=("en", "fr"))] == [good["id"], "17"]
  assert [p.id for p in R.read_prompts(mixed, only=("xx",))] == ["x1"]
  with pytest.raises(R.RecordError, match="bad.jsonl:2:.*field 'id'"):
    R.read_prompts(_write_lines(tmp_path, name="bad.jsonl",
                                lines=[xx, {"language": "xx", "prompt": "a"}]), only=("en",))


@pytest.mark.parametrize("row, field, what", [
    ({"id": "a", "prompt": "hi"}, "language", "missing"),
    ({"id": "a", "language": "en"}, "messages", "missing"),  # no messages, prompt or turns
    ({"language": "en", "prompt": "hi"}, "id", "missing"),
    ({"id": "a", "language": "en", "prompt": ""}, "prompt", "empty"),
    ({"id": "a", "language": "", "prompt": "hi"}, None, None),
    ({"id": "a", "language": "en", "messages": [{"role": "assistant", "content": "x"}]},
     "messages[0].role", "expected 'user'"),
    ({"id": "a", "language": "en", "prompt": "hi", "cluster": "x"}, "cluster", "unknown field"),
    ({"id": "p1", "language": "en", "prompt": "again"}, "id", "duplicate id 'p1' (first on line 1)"),
    ("{not json", None, "malformed JSON"),
])
def test_prompt_file_errors_name_file_line_and_field(tmp_path, row, field, what):
  good = {"id": "p1", "language": "en", "messages": [{"role": "user", "content": "q"}]}
  path = _write_lines(tmp_path, name="bad.jsonl", lines=[good, row])
  with pytest.raises(R.RecordError) as e:
    R.read_prompts(path)
  msg = str(e.value)
  assert "bad.jsonl:2:" in msg, msg
  if what:
    assert what in msg, msg
  if field:
    assert f"field '{field}'" in msg, msg
