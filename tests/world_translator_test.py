"""The world's literal translator: order kept, words left untranslated at the rate."""

import numpy as np

from aya_jax.world import tasks as S
from aya_jax.world import translator


# -------------------------------------------------------------- translator


def test_translate_keeps_order_and_artefacts():
  rng = np.random.default_rng(0)
  assert translator.translate('dog, cat, red', 'en', 'fr', rng, 0.0) == \
      'chien, chat, rouge'
  assert translator.translate('The answer is Seven.', 'en', 'de', rng, 0.0) == \
      'The answer is sieben.'
  assert translator.translate('狗、猫', 'zh', 'en', rng, 0.0) == 'dog、cat'
  assert translator.translate('on bir, iki', 'tr', 'en', rng, 0.0) == 'eleven, two'
  assert translator.translate('dix-sept', 'fr', 'ru', rng, 0.0) == 'семнадцать'
  assert translator.translate('dog, cat', 'en', 'fr', rng, 1.0) == 'dog, cat'
  assert translator.translate('dog, cat', 'en', 'fr', 7) == translator.translate(
      'dog, cat', 'en', 'fr', 7)


def test_translate_leaves_words_untranslated_at_the_rate():
  rng = np.random.default_rng(1)
  keys = [S.WORD_KEYS[i] for i in rng.integers(len(S.WORD_KEYS), size=3000)]
  idx = [S.WORD_KEYS.index(k) for k in keys]
  src = [S.words('en', 'words')[i] for i in idx]
  tgt = [S.words('ru', 'words')[i] for i in idx]
  out = translator.translate(' '.join(src), 'en', 'ru', rng, 0.3).split(' ')
  assert len(out) == len(src)
  assert all(o in (s, t) for o, s, t in zip(out, src, tgt))  # order kept
  kept = np.mean([o == s for o, s in zip(out, src)])
  assert abs(kept - 0.3) < 0.03
