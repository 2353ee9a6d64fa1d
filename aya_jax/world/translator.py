"""The world's literal translator: lexicon words replaced one by one.

What a weak machine translation of an English answer looks like: every
lexicon word becomes the target language's, now and then one is left as it
was, and word order, function words and punctuation stay English.
"""

from __future__ import annotations

import unicodedata

import numpy as np

from aya_jax.world import tasks, verifier


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
    if lang not in tasks.LANGUAGES:
      raise ValueError(f'unknown language {lang!r}; expected {tasks.LANGUAGES}')
  if not 0.0 <= untranslated_rate <= 1.0:
    raise ValueError(f'untranslated_rate must be in [0, 1], got '
                     f'{untranslated_rate}')
  rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
  text = unicodedata.normalize('NFC', text)
  table = verifier.LANG_CONCEPTS[src]
  pieces, last = [], 0
  for start, end, unit in verifier.units(text, table):
    concept = table.get(unit)
    if concept is None or rng.random() < untranslated_rate:
      continue
    pieces += [text[last:start], tasks.words(tgt, concept[0])[concept[1]]]
    last = end
  return ''.join(pieces + [text[last:]])
