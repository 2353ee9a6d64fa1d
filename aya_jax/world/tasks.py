"""The embedded synthetic multilingual world: tasks, instances, splits, its tokenizer.

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
unit. The judge is `aya_jax.world.verifier.Verifier`; the literal translator
`aya_jax.world.translator.translate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Iterator, Optional, Sequence

from absl import logging
import numpy as np

from aya_jax.data.records import SFTRecord
from aya_jax.world import lexicon
from aya_jax.world.lexicon import (COLOUR_KEYS, DAY_KEYS, LANGUAGES, LEXICON, NOUN_KEYS,
                                  TEMPLATES)

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
ANSWER_CATEGORY = {'add': 'numbers', 'sub': 'numbers', 'count': 'numbers',
                    'sort': 'numbers', 'next_day': 'days', 'prev_day': 'days',
                    'translate': 'words', 'copy': 'words', 'reverse': 'words'}
_ID_RE = re.compile(r'syn:([a-z]+):([a-z_]+):([A-Za-z0-9_.]+):t(\d+)(?!\d)')
_MAX_TRIES = 200


def words(lang: str, category: str) -> tuple:
  """The lexicon list of a category ('numbers', 'days', 'colours', 'nouns', 'names';
  'words' = colours + nouns) in a language, or the numbers in digits."""
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
    return _join(lang, [words(lang, c)[i] for c, i in self.concepts()])

  def prompt(self) -> str:
    lang, a = self.language, self.args
    lexicon_words = lambda cat: words(lang, cat)  # noqa: E731
    fields = {}
    if self.task in ('add', 'sub'):
      fields = dict(a=lexicon_words('numbers')[a[0]], b=lexicon_words('numbers')[a[1]])
    elif self.task in ('next_day', 'prev_day'):
      fields = dict(day=lexicon_words('days')[DAY_KEYS.index(a[0])])
    elif self.task == 'sort':
      fields = dict(nums=_join(lang, [lexicon_words('numbers')[n] for n in a]))
    elif self.task == 'translate':
      fields = dict(word=lexicon_words('words')[WORD_KEYS.index(a[0])],
                    lang=LEXICON[lang]['names'][LANGUAGES.index(a[1])])
    else:
      fields = dict(items=_join(lang, [lexicon_words('words')[WORD_KEYS.index(k)]
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
  out, short = [], {}
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
      short[lang] = len(seen)
  if short:  # one line for the call: every task ran out in these languages
    logging.warning('make_split(%s): fewer than %d prompts (every task ran out) in %s', split,
                    n_per_language, ', '.join(f'{k} {v}' for k, v in short.items()))
  return out


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
