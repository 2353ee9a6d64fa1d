"""The embedded synthetic multilingual world: tasks, splits, a verifier.

Nine real languages (`lexicon.LANGUAGES`, five scripts) and nine tasks whose
answers can be checked (`TASKS`): add / sub (small numbers, answered in
number words), next_day / prev_day, count (how many nouns in a list), sort
(number words, ascending), translate (a noun or colour into another named
language), copy / reverse (a list of words). Prompts and answers are in the
prompt's language, except that a translation is answered in its target
language. Each task has three paraphrase templates per language.

A task instance is an `Instance` (language, task, args, template) and its
canonical id is the record id, e.g.::

  syn:fr:add:3.4:t1           'Additionne trois et quatre. ...' -> 'sept'
  syn:de:next_day:mon:t0      'Welcher Tag kommt nach Montag?' -> 'Dienstag'
  syn:ru:count:dog.cat.dog:t2 'Собака, кошка, собака. ...' -> 'три'
  syn:zh:sort:7.3.12:t0       '把这些数从小到大排列：七、三、十二。' -> '三、七、十二'
  syn:es:translate:dog.de:t1  '¿Cómo se dice «perro» en alemán?' -> 'Hund'
  syn:tr:reverse:dog.red:t0   'Bu listeyi ters sırayla ...' -> 'kırmızı, köpek'

So the verifier needs nothing but the id: it parses the instance and
recomputes the gold answer (`parse_id`; the canonical id may sit inside a
longer id, e.g. with a '#teacher' suffix added by a later stage). The split
of a prompt is a hash of its canonical id (`split_of`), so train / valid /
test never share a prompt, whatever the seed.

Answers are compared as sequences of units: NFC, casefolded, split at
anything that is not a letter, mark or digit, Han characters one by one, and
runs that spell a lexicon entry ('dix-sept', 'on bir', '十七') joined into one
unit. See `Verifier` for the scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import unicodedata
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from aya_jax.data.records import SFTRecord
from aya_jax.world import lexicon
from aya_jax.world.lexicon import (COLOUR_KEYS, DAY_KEYS, LANGUAGES, LEXICON,
                                  NOUN_KEYS, SCRIPTS, TEMPLATES)  # noqa: F401 (SCRIPTS: re-exported)

# Language families for per-family SFT; each includes English.
LANGUAGE_FAMILIES = {'european': ('en', 'fr', 'es', 'de'),
                     'slavic_turkic': ('en', 'ru', 'tr'),
                     'asian_semitic': ('en', 'hi', 'ar', 'zh')}
TASKS = ('add', 'sub', 'next_day', 'prev_day', 'count', 'sort', 'translate',
         'copy', 'reverse')
SPLITS = ('train', 'valid', 'test')
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MAX_NUMBER = 20
DIGITS = 'digits'  # pseudo-language: numbers written as 7, 12 (partial credit)
DEFAULT_VOCAB_SIZE = 1536  # the minimum: 362 distinct characters + 264

WORD_KEYS = COLOUR_KEYS + NOUN_KEYS  # what translate / copy / reverse use
_N_TEMPLATES = 3
_ANSWER_CATEGORY = {'add': 'numbers', 'sub': 'numbers', 'count': 'numbers',
                    'sort': 'numbers', 'next_day': 'days', 'prev_day': 'days',
                    'translate': 'words', 'copy': 'words', 'reverse': 'words'}
_ID_RE = re.compile(r'syn:([a-z]+):([a-z_]+):([A-Za-z0-9_.]+):t(\d+)(?!\d)')
_MAX_TRIES = 200


def _words(lang: str, category: str) -> tuple:
  if lang == DIGITS:
    if category != 'numbers':
      raise ValueError(f'only numbers have a digits form, not {category}')
    return tuple(str(i) for i in range(MAX_NUMBER + 1))
  if category == 'words':
    return LEXICON[lang]['colours'] + LEXICON[lang]['nouns']
  return LEXICON[lang][category]


def _join(lang: str, words: Sequence[str]) -> str:
  return lexicon.LIST_SEPARATORS.get(lang, ', ').join(words)


# ------------------------------------------------------------- instances


@dataclasses.dataclass(frozen=True)
class Instance:
  """One prompt of the world: a task instance in a language and template.

  args by task: add/sub (a, b) ints; next_day/prev_day (day key,);
  count/copy/reverse word keys (count: nouns only); sort distinct ints in
  the order shown; translate (word key, target language).
  """
  language: str
  task: str
  args: tuple
  template: int

  def __post_init__(self):
    where = f'instance {self.id}'
    if self.language not in LANGUAGES:
      raise ValueError(f'{where}: unknown language {self.language!r}; '
                       f'expected one of {LANGUAGES}')
    if self.task not in TASKS:
      raise ValueError(f'{where}: unknown task {self.task!r}; expected one '
                       f'of {TASKS}')
    if not 0 <= self.template < _N_TEMPLATES:
      raise ValueError(f'{where}: template {self.template} out of range')
    problem = _check_args(self.language, self.task, self.args)
    if problem:
      raise ValueError(f'{where}: bad args: {problem}')

  @property
  def id(self) -> str:
    args = '.'.join(str(a) for a in self.args)
    return f'syn:{self.language}:{self.task}:{args}:t{self.template}'

  @property
  def answer_language(self) -> str:
    """The language the answer must be in (translate: its target)."""
    return self.args[1] if self.task == 'translate' else self.language

  @property
  def split(self) -> str:
    return split_of(self.id)

  def concepts(self) -> list:
    """The answer as (category, index) concepts, in order."""
    t, a = self.task, self.args
    if t in ('add', 'sub'):
      return [('numbers', a[0] + a[1] if t == 'add' else a[0] - a[1])]
    if t in ('next_day', 'prev_day'):
      step = 1 if t == 'next_day' else -1
      return [('days', (DAY_KEYS.index(a[0]) + step) % 7)]
    if t == 'count':
      return [('numbers', len(a))]
    if t == 'sort':
      return [('numbers', n) for n in sorted(a)]
    keys = a[:1] if t == 'translate' else a[::-1] if t == 'reverse' else a
    return [('words', WORD_KEYS.index(k)) for k in keys]

  def answer(self, language: Optional[str] = None) -> str:
    """The gold answer, written in `language` (default: answer_language)."""
    lang = language or self.answer_language
    return _join(lang, [_words(lang, c)[i] for c, i in self.concepts()])

  def prompt(self) -> str:
    lang, a = self.language, self.args
    words = lambda cat: _words(lang, cat)  # noqa: E731
    fields = {}
    if self.task in ('add', 'sub'):
      fields = dict(a=words('numbers')[a[0]], b=words('numbers')[a[1]])
    elif self.task in ('next_day', 'prev_day'):
      fields = dict(day=words('days')[DAY_KEYS.index(a[0])])
    elif self.task == 'sort':
      fields = dict(nums=_join(lang, [words('numbers')[n] for n in a]))
    elif self.task == 'translate':
      fields = dict(word=words('words')[WORD_KEYS.index(a[0])],
                    lang=LEXICON[lang]['names'][LANGUAGES.index(a[1])])
    else:
      fields = dict(items=_join(lang, [words('words')[WORD_KEYS.index(k)]
                                       for k in a]))
    text = TEMPLATES[lang][self.task][self.template].format(**fields)
    first = {'i': 'İ', 'ı': 'I'}.get(text[0]) if lang == 'tr' else None
    return (first or text[0].upper()) + text[1:]  # a list may start it

  def to_record(self) -> SFTRecord:
    """The SFT record: user prompt, assistant gold answer; id = self.id."""
    return SFTRecord(id=self.id, language=self.language, messages=(
        {'role': 'user', 'content': self.prompt()},
        {'role': 'assistant', 'content': self.answer()}))


def _check_args(lang: str, task: str, args: tuple) -> str:
  """'' if `args` fit `task`, else what is wrong."""
  ints = all(isinstance(x, int) and 0 <= x <= MAX_NUMBER for x in args)
  if task in ('add', 'sub'):
    if len(args) != 2 or not ints:
      return f'expected two numbers in 0..{MAX_NUMBER}, got {args}'
    if task == 'add' and sum(args) > MAX_NUMBER:
      return f'sum over {MAX_NUMBER}'
    if task == 'sub' and args[0] < args[1]:
      return 'negative difference'
  elif task in ('next_day', 'prev_day'):
    if len(args) != 1 or args[0] not in DAY_KEYS:
      return f'expected one of {DAY_KEYS}, got {args}'
  elif task == 'sort':
    if not 2 <= len(args) <= 8 or not ints or len(set(args)) != len(args):
      return f'expected 2..8 distinct numbers in 0..{MAX_NUMBER}, got {args}'
  elif task == 'translate':
    if (len(args) != 2 or args[0] not in WORD_KEYS or
        args[1] not in LANGUAGES or args[1] == lang):
      return (f'expected (word key, target language other than {lang}), '
              f'got {args}')
  else:
    keys = NOUN_KEYS if task == 'count' else WORD_KEYS
    if not 1 <= len(args) <= MAX_NUMBER or any(k not in keys for k in args):
      return f'expected 1..{MAX_NUMBER} keys of {keys}, got {args}'
  return ''


def parse_id(record_id: str) -> Instance:
  """The Instance whose canonical id is (inside) `record_id`."""
  m = _ID_RE.search(record_id) if isinstance(record_id, str) else None
  if m is None:
    raise ValueError(f'record id {record_id!r} holds no synthetic task '
                     "instance (expected 'syn:<lang>:<task>:<args>:t<k>')")
  lang, task, raw, template = m.groups()
  parts = raw.split('.')
  if task in ('add', 'sub', 'sort'):
    if not all(p.isdigit() for p in parts):
      raise ValueError(f'record id {record_id!r}: args {raw!r} are not '
                       'numbers')
    parts = [int(p) for p in parts]
  try:
    return Instance(lang, task, tuple(parts), int(template))
  except ValueError as e:
    raise ValueError(f'record id {record_id!r}: {e}') from None


def split_of(record_id: str) -> str:
  """'train' | 'valid' | 'test', from a hash of the canonical id."""
  return _split_of_key(parse_id(record_id).id)


def _split_of_key(key: str) -> str:
  u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big') / 2**64
  edges = np.cumsum(SPLIT_FRACTIONS)
  return SPLITS[min(int(np.searchsorted(edges, u, side='right')), 2)]


_ADD = [(a, b) for a in range(MAX_NUMBER + 1)
        for b in range(MAX_NUMBER + 1 - a)]
_SUB = [(a, b) for a in range(MAX_NUMBER + 1) for b in range(a + 1)]


def sample_instance(task: str, language: str, rng: np.random.Generator,
                    languages: Sequence[str] = LANGUAGES,
                    template: Optional[int] = None) -> Instance:
  """A random instance of `task` in `language` (translation targets are
  drawn from `languages`, minus `language`)."""
  pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
  if task in ('add', 'sub'):
    args = pick(_ADD if task == 'add' else _SUB)
  elif task in ('next_day', 'prev_day'):
    args = (pick(DAY_KEYS),)
  elif task == 'count':
    args = tuple(pick(NOUN_KEYS) for _ in range(int(rng.integers(1, 10))))
  elif task == 'sort':
    n = int(rng.integers(3, 6))
    args = tuple(int(x) for x in rng.choice(MAX_NUMBER + 1, n, replace=False))
  elif task == 'translate':
    targets = [t for t in languages if t != language]
    if not targets:
      raise ValueError(f'translate from {language}: no other language in '
                       f'{languages}')
    args = (pick(WORD_KEYS), pick(targets))
  elif task in ('copy', 'reverse'):
    n = int(rng.integers(2, 6))
    args = tuple(WORD_KEYS[i] for i in rng.choice(len(WORD_KEYS), n,
                                                  replace=False))
  else:
    raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
  if template is None:
    template = int(rng.integers(_N_TEMPLATES))
  return Instance(language, task, tuple(args), template)


def make_split(split: str, n_per_language: int, seed: int = 0,
               languages: Sequence[str] = LANGUAGES,
               tasks: Sequence[str] = TASKS) -> list:
  """`n_per_language` SFT records (prompt + gold answer) per language.

  Tasks take turns; a task whose prompts in this split run out (the day
  tasks have 21 prompts per language in all) leaves the rotation, so a
  language gets fewer records only when every task ran out (logged).
  Deterministic in (split, seed, languages, tasks); ids are unique.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  for lang in languages:
    if lang not in LANGUAGES:
      raise ValueError(f'unknown language {lang!r}; expected {LANGUAGES}')
  out = []
  for lang in languages:
    rng = np.random.default_rng(
        [seed, SPLITS.index(split), LANGUAGES.index(lang)])
    seen, active, turn = set(), list(tasks), 0
    while len(seen) < n_per_language and active:
      task = active[turn % len(active)]
      for _ in range(_MAX_TRIES):
        inst = sample_instance(task, lang, rng, languages)
        key = inst.id
        if key not in seen and _split_of_key(key) == split:
          seen.add(key)
          out.append(inst.to_record())
          turn += 1
          break
      else:
        active.remove(task)
    if len(seen) < n_per_language:
      logging.warning('make_split(%s): only %d prompts for %s', split,
                      len(seen), lang)
  return out


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


def _units(text: str, phrases) -> list:
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
_LANG_CONCEPTS: dict = {}
for _lang in LANGUAGES + (DIGITS,):
  _LANG_CONCEPTS[_lang] = {}
  for _cat in (('numbers',) if _lang == DIGITS else
               ('numbers', 'days', 'words')):
    for _i, _w in enumerate(_words(_lang, _cat)):
      _CONCEPTS.setdefault(_unit_key(_w), set()).add((_lang, (_cat, _i)))
      _LANG_CONCEPTS[_lang][_unit_key(_w)] = (_cat, _i)
_MAX_PHRASE = max(len(k) for k in _CONCEPTS)


def normalize(text: str) -> list:
  """The units of `text` as strings (what the verifier compares)."""
  nfc = unicodedata.normalize('NFC', text)
  return [' '.join(u) for *_, u in _units(nfc, _CONCEPTS)]


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
    inst = parse_id(rid)
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
    inst = parse_id(instance) if isinstance(instance, str) else instance
    units = normalize(completion)
    if not units:
      return 0.0
    expected = inst.answer_language
    others = [l for l in LANGUAGES if l != expected]
    if inst.task == 'translate':  # an echo of the prompt's word is no answer
      echo = normalize(inst.answer(inst.language))
      others = [l for l in others if normalize(inst.answer(l)) != echo]
    if _ANSWER_CATEGORY[inst.task] == 'numbers':
      others.append(DIGITS)
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
  def _contradicts(extras, inst: Instance, langs) -> bool:
    category, gold = _ANSWER_CATEGORY[inst.task], set(inst.concepts())
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


# ------------------------------------------------------------- translator


def translate(text: str, src: str, tgt: str, rng,
              untranslated_rate: float = 0.1) -> str:
  """Word-by-word lexicon translation, with a literal translator's artefacts.

  Every lexicon word of `src` (numbers, days, colours, nouns) is replaced by
  its `tgt` word, except with probability `untranslated_rate` (one draw per
  lexicon word, in order) it is left as it was. Everything else (function
  words, punctuation, list separators, word order) stays as in `src`.
  `rng`: a np.random.Generator or an int seed.
  """
  for lang in (src, tgt):
    if lang not in LANGUAGES:
      raise ValueError(f'unknown language {lang!r}; expected {LANGUAGES}')
  if not 0.0 <= untranslated_rate <= 1.0:
    raise ValueError(f'untranslated_rate must be in [0, 1], got '
                     f'{untranslated_rate}')
  rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
  text = unicodedata.normalize('NFC', text)
  table = _LANG_CONCEPTS[src]
  pieces, last = [], 0
  for start, end, unit in _units(text, table):
    concept = table.get(unit)
    if concept is None or rng.random() < untranslated_rate:
      continue
    pieces += [text[last:start], _words(tgt, concept[0])[concept[1]]]
    last = end
  return ''.join(pieces + [text[last:]])


# -------------------------------------------------------------- tokenizer


def world_corpus(n_per_template: int = 16, seed: int = 0,
                 languages: Sequence[str] = LANGUAGES) -> Iterator[str]:
  """All text of the world: every lexicon list, every template rendered
  with `n_per_template` random instances (prompt, answer) and, once per
  template, the chat rendering with the role tokens."""
  from aya_jax.data import formatting  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  user, assistant, _, end = formatting.CHAT_TOKENS
  for lang in languages:
    for category in ('numbers', 'days', 'colours', 'nouns', 'names'):
      yield _join(lang, LEXICON[lang][category])
    yield ' '.join(str(i) for i in range(MAX_NUMBER + 1))
    for task in TASKS:
      for template in range(_N_TEMPLATES):
        for k in range(n_per_template):
          inst = sample_instance(task, lang, rng, languages, template)
          prompt, answer = inst.prompt(), inst.answer()
          if k == 0:
            yield f'{user}{prompt}{end}{assistant}{answer}{end}'
          else:
            yield prompt
            yield answer


def build_tokenizer(out_dir: str | os.PathLike,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0,
                    n_per_template: int = 16):
  """Trains the world's tokenizer (sentencepiece BPE, byte fallback, the
  default chat template with <|end|>) on `world_corpus` and saves it to
  `out_dir` as an HF tokenizer directory; returns it reloaded."""
  from aya_jax.data import formatting  # pylint: disable=g-import-not-at-top
  texts = list(world_corpus(n_per_template, seed))
  n_chars = len(set(''.join(texts)))
  if vocab_size < n_chars + 264:
    raise ValueError(f'vocab_size {vocab_size} is too small for the world: '
                     f'{n_chars} distinct characters + 264 needed')
  return formatting.train_tokenizer(texts, out_dir, vocab_size=vocab_size,
                                    seed=seed)
