"""Field checks: the value normalised or a RecordError naming field, reason and place."""

import math

import pytest

from aya_jax.data import fields


def test_error_message_names_file_line_and_field():
  e = fields.RecordError("must not be empty", field="id", reason="empty value")
  assert str(e) == "field 'id': must not be empty" and e.reason == "empty value"
  at = e.located("data/x.jsonl", 7)
  assert str(at) == "data/x.jsonl:7: field 'id': must not be empty"
  assert (at.field, at.line, at.reason) == ("id", 7, "empty value")
  assert str(fields.RecordError("empty file", path="x.jsonl")) == "x.jsonl: empty file"


@pytest.mark.parametrize("value, ok", [(0, 0.0), (2, 2.0), (-0.5, -0.5), (None, None)])
def test_scores_are_finite_numbers_or_null(value, ok):
  assert fields.check_score(value, "score") == ok


@pytest.mark.parametrize("value, reason", [
    (True, "wrong type"), ("1", "wrong type"), (math.nan, "non-finite score"),
    (math.inf, "non-finite score")])
def test_bad_scores_name_the_reason(value, reason):
  with pytest.raises(fields.RecordError) as e:
    fields.check_score(value, "chosen_score")
  assert e.value.field == "chosen_score" and e.value.reason == reason


def test_text_must_be_a_non_empty_string_and_a_label_may_be_empty():
  assert fields.check_text("a", "id") == "a" and fields.check_label("", "source") == ""
  for bad, reason in ((" \n", "empty value"), (3, "wrong type")):
    with pytest.raises(fields.RecordError) as e:
      fields.check_text(bad, "id")
    assert e.value.reason == reason
  with pytest.raises(fields.RecordError, match="expected a string"):
    fields.check_label(None, "source")


def test_conversations_and_prompts_follow_the_role_order():
  sys_ = {"role": "system", "content": "be brief"}
  user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
  got = fields.check_conversation([sys_, user, bot], "messages")
  assert got == (sys_, user, bot) and got[0] is not sys_  # fresh dicts in a tuple
  assert fields.check_prompt([user, bot, user], "prompt") == (user, bot, user)
  cases = [
      ([user], fields.check_conversation, "messages", "must end with a 'assistant'"),
      ([bot, user], fields.check_prompt, "prompt[0].role", "expected 'user' here"),
      ([user, user], fields.check_prompt, "prompt[1].role", "expected 'assistant' here"),
      ([sys_], fields.check_prompt, "prompt", "must end with a 'user'"),
      ([], fields.check_prompt, "prompt", "at least one message"),
      ([{"role": "user"}], fields.check_prompt, "prompt[0].content", "missing"),
      ([dict(user, name="x")], fields.check_prompt, "prompt[0]", "unknown keys ['name']"),
      ([{"role": "tool", "content": "x"}], fields.check_prompt, "prompt[0].role", "unknown role"),
      ("hi", fields.check_prompt, "prompt", "expected a list of messages"),
  ]
  for value, check, field, message in cases:
    name = field.split("[")[0]
    with pytest.raises(fields.RecordError) as e:
      check(value, name)
    assert e.value.field == field and message in str(e.value), (value, str(e.value))
