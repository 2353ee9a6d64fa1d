"""Preference pairs into tokens: a pair that prefers nothing is refused, with its id."""

import pytest

from aya_jax.data import formatting
from aya_jax.data import pairs as pp
from aya_jax.data import records

WORDS = ["red", "blue", "green", "cat", "dog", "fish"]
PROMPT = ({"role": "user", "content": "name some things"},)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  return formatting.train_tokenizer(["name some things"] * 20 + WORDS * 20, str(d),
                                    vocab_size=320)


def _pair(pid, chosen, rejected):
  return records.PreferenceRecord(id=pid, language="en", prompt=PROMPT, chosen=chosen,
                                  rejected=rejected)


def test_a_pair_whose_answers_are_the_same_tokens_within_seq_len_is_refused(tok):
  shared = " ".join(WORDS * 3)
  same = _pair("same", shared + " red", shared + " dog")  # they differ after the cut
  fine = _pair("fine", "red blue", "cat dog")
  n_prompt = len(formatting.tokenize_prompt_completion(tok, PROMPT, "red")[0])
  seq_len = n_prompt + 6  # room for 6 answer tokens: inside the shared words
  with pytest.raises(ValueError, match=r"^pair 'same': chosen and rejected are the same 6 "
                                       r"tokens within seq_len"):
    pp.tokenize_pairs([fine, same], tok, seq_len)
  pairs, stats = pp.tokenize_pairs([fine, same], tok, seq_len, skip_invalid=True)
  assert [p.id for p in pairs] == ["fine"] and stats.n_skipped == 1 and stats.n_records == 2
  # with room for the whole answers both pairs are kept
  pairs, stats = pp.tokenize_pairs([fine, same], tok, n_prompt + 64)
  assert [p.id for p in pairs] == ["fine", "same"] and stats.n_skipped == 0


def test_identical_answers_are_not_a_pair():
  with pytest.raises(records.RecordError, match=r"field 'rejected': is the same text as "
                                                r"'chosen'"):
    _pair("p", "red", "red")
