"""The world's gold judge: answers compared unit by unit with the gold answer.

Text becomes units (`normalize`): NFC, casefolded, split at anything that is
not a letter, mark or digit, Han characters one by one, and runs of tokens
that spell a lexicon entry ('dix-sept', 'on bir', '十七') joined into one
unit. `Verifier` scores an answer from the record id alone (it parses the
instance and recomputes the gold answer); `verifier_scorer` wraps it as a
`reward.Scorer`.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from aya_jax import reward
from aya_jax.world import tasks


# -------------------------------------------------------------- tokenising


def _is_han(ch: str) -> bool:
  cp = ord(ch)
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or
          0xF900 <= cp <= 0xFAFF or 0x20000 <= cp <= 0x2FFFF)


def _tokens(text: str) -> list:
  """(start, end, casefolded) word tokens; Han characters one by one."""
  out, start = [], None
  for i, ch in enumerate(text + ' '):
    word = unicodedata.category(ch)[0] in 'LMN' and not _is_han(ch)
    if start is not None and not word:
      out.append((start, i, text[start:i].casefold()))
      start = None
    if word and start is None:
      start = i
    if _is_han(ch):
      out.append((i, i + 1, ch))
  return out


def _joinable(gap: str) -> bool:
  return len(gap) <= 2 and not gap.strip(' -\u00a0')


def units(text: str, phrases) -> list:
  """(start, end, unit) where unit is a tuple of tokens; runs of tokens that
  spell a phrase of `phrases` (with only spaces/hyphens between) merge."""
  toks, out, i = _tokens(text), [], 0
  while i < len(toks):
    n = min(_MAX_PHRASE, len(toks) - i)
    while n > 1:
      key = tuple(t[2] for t in toks[i:i + n])
      gaps = (text[toks[j][1]:toks[j + 1][0]] for j in range(i, i + n - 1))
      if key in phrases and all(map(_joinable, gaps)):
        break
      n -= 1
    out.append((toks[i][0], toks[i + n - 1][1],
                tuple(t[2] for t in toks[i:i + n])))
    i += n
  return out


def _unit_key(word: str) -> tuple:
  return tuple(t[2] for t in _tokens(word))


# unit -> {(language, (category, index))} over every answer word; and per
# language unit -> concept, for the translator.
_CONCEPTS: dict = {}
LANG_CONCEPTS: dict = {}
for _lang in tasks.LANGUAGES + (tasks.DIGITS,):
  LANG_CONCEPTS[_lang] = {}
  for _cat in (('numbers',) if _lang == tasks.DIGITS else
               ('numbers', 'days', 'words')):
    for _i, _w in enumerate(tasks.words(_lang, _cat)):
      _CONCEPTS.setdefault(_unit_key(_w), set()).add((_lang, (_cat, _i)))
      LANG_CONCEPTS[_lang][_unit_key(_w)] = (_cat, _i)
_MAX_PHRASE = max(len(k) for k in _CONCEPTS)


def normalize(text: str) -> list:
  """The units of `text` as strings (what the verifier compares)."""
  nfc = unicodedata.normalize('NFC', text)
  return [' '.join(u) for *_, u in units(nfc, _CONCEPTS)]


# --------------------------------------------------------------- verifier


class Verifier:
  """The gold judge of the world; a Scorer (`score(records)`).

  A completion scores, before the length penalty:
    1.0  if it contains the gold answer in the answer language;
    wrong_language_credit (0.5) if it contains instead the gold answer in
         another language, or (number answers) in digits: the language-
         confusion failure. For translate, the word in the prompt's own
         language is an echo of the prompt and gets nothing;
    0.0  otherwise, and also when an extra word is a different answer of
         the same kind in the matched language ('seven or eight').
  Each unit besides the answer then costs `length_penalty` (floor 0).
  Units compare after NFC, casefolding and dropping punctuation.
  """

  def __init__(self, wrong_language_credit: float = 0.5,
               length_penalty: float = 0.05, check_prompt: bool = True):
    self.wrong_language_credit = wrong_language_credit
    self.length_penalty = length_penalty
    self.check_prompt = check_prompt

  def score(self, records: Sequence[Any]) -> np.ndarray:
    """One float32 per record. A record is a CompletionRecord or SFTRecord
    (scored on its last assistant turn) or a dict with the same fields;
    its id must hold the canonical instance id (see `parse_id`)."""
    return np.asarray([self._score_record(r) for r in records], np.float32)

  def _score_record(self, record: Any) -> float:
    get = (record.get if isinstance(record, Mapping)
           else lambda k: getattr(record, k, None))
    rid, prompt, completion = get('id'), get('prompt'), get('completion')
    messages = get('messages')
    if completion is None and messages and messages[-1]['role'] == 'assistant':
      completion, prompt = messages[-1]['content'], messages[:-1]
    if completion is None:
      raise ValueError(f'record {rid!r}: no completion (expected a '
                       "'completion' or messages ending with the assistant)")
    inst = tasks.parse_id(rid)
    if get('language') is not None and get('language') != inst.language:
      raise ValueError(f'record {rid!r}: language {get("language")!r} but '
                       f'the id says {inst.language!r}')
    if self.check_prompt and prompt:
      users = [m['content'] for m in prompt if m['role'] == 'user']
      if not users or users[-1] != inst.prompt():
        raise ValueError(f'record {rid!r}: the prompt is not the one the id '
                         f'encodes ({inst.prompt()!r})')
    return self.score_answer(inst, completion)

  def score_answer(self, instance, completion: str) -> float:
    """Score of `completion` for an Instance (or a record id)."""
    inst = tasks.parse_id(instance) if isinstance(instance, str) else instance
    units = normalize(completion)
    if not units:
      return 0.0
    expected = inst.answer_language
    others = [l for l in tasks.LANGUAGES if l != expected]
    if inst.task == 'translate':  # an echo of the prompt's word is no answer
      echo = normalize(inst.answer(inst.language))
      others = [l for l in others if normalize(inst.answer(l)) != echo]
    if tasks.ANSWER_CATEGORY[inst.task] == 'numbers':
      others.append(tasks.DIGITS)
    candidates = [(expected, 1.0)] + [
        (l, self.wrong_language_credit) for l in others]
    for lang, base in candidates:
      gold = normalize(inst.answer(lang))
      at = _find(units, gold)
      if at is None:
        continue
      extras = units[:at] + units[at + len(gold):]
      if self._contradicts(extras, inst, {expected, lang}):
        return 0.0
      return max(0.0, base - self.length_penalty * len(extras))
    return 0.0

  @staticmethod
  def _contradicts(extras, inst: tasks.Instance, langs) -> bool:
    category, gold = tasks.ANSWER_CATEGORY[inst.task], set(inst.concepts())
    for unit in extras:
      for lang, concept in _CONCEPTS.get(tuple(unit.split(' ')), ()):
        if lang in langs and concept[0] == category and concept not in gold:
          return True
    return False


def _find(units: list, gold: list) -> Optional[int]:
  for i in range(len(units) - len(gold) + 1):
    if units[i:i + len(gold)] == gold:
      return i
  return None


def verifier_scorer(**kw) -> reward.FunctionScorer:
  """The world's gold judge as a Scorer."""
  return reward.FunctionScorer(Verifier(**kw).score)
