"""The lexicon of the world: complete, distinct, in the right scripts, hand-checked."""

import unicodedata

import pytest

from aya_jax.world import lexicon
from aya_jax.world import lexicon as lx
from aya_jax.world import tasks as S
from aya_jax.world import verifier
from conftest import world_instances


# ---------------------------------------------------------------- lexicon


def test_lexicon_complete_and_distinct():
  assert len(S.LANGUAGES) >= 9 and len(set(lexicon.SCRIPTS.values())) >= 5
  for lang in S.LANGUAGES:
    for cat, size in lx.CATEGORY_SIZES.items():
      words = lx.LEXICON[lang][cat]
      assert len(words) == size, (lang, cat)
      assert all(w and w == w.strip() for w in words), (lang, cat)
      units = [tuple(verifier.normalize(w)) for w in words]
      assert len(set(units)) == size, (lang, cat)  # no duplicates
      if cat != 'names':  # an answer word is one unit ('on bir', '十七')
        assert all(len(u) == 1 for u in units), (lang, cat)
    answers = [u for cat in ('numbers', 'days', 'colours', 'nouns')
               for u in map(verifier.normalize, lx.LEXICON[lang][cat])]
    assert len(set(map(tuple, answers))) == len(answers), lang
    for task in S.TASKS:
      assert len(lx.TEMPLATES[lang][task]) == 3, (lang, task)
      assert len(set(lx.TEMPLATES[lang][task])) == 3, (lang, task)


def _script(ch):
  name = unicodedata.name(ch)
  for script in ('LATIN', 'CYRILLIC', 'DEVANAGARI', 'ARABIC'):
    if name.startswith(script):
      return script.capitalize()
  return 'Han' if name.startswith('CJK UNIFIED IDEOGRAPH') else name


def test_scripts_of_words_and_prompts():
  for lang in S.LANGUAGES:
    texts = [w for words in lx.LEXICON[lang].values() for w in words]
    texts += [i.prompt() for i in world_instances(3) if i.language == lang]
    letters = {c for t in texts for c in t if unicodedata.category(c)[0] == 'L'}
    assert {_script(c) for c in letters} == {lexicon.SCRIPTS[lang]}, lang
  assert lexicon.SCRIPTS['ru'] == 'Cyrillic' and lexicon.SCRIPTS['hi'] == 'Devanagari'
  assert lexicon.SCRIPTS['ar'] == 'Arabic' and lexicon.SCRIPTS['zh'] == 'Han'


HAND_CHECKED = {  # (category, index) -> word, written out by hand
    'en': {('numbers', 13): 'thirteen', ('days', 2): 'Wednesday',
           ('colours', 3): 'yellow', ('nouns', 4): 'horse'},
    'fr': {('numbers', 17): 'dix-sept', ('days', 3): 'jeudi',
           ('colours', 2): 'vert', ('nouns', 1): 'chat',
           ('names', 3): 'allemand'},
    'es': {('numbers', 16): 'dieciséis', ('days', 2): 'miércoles',
           ('colours', 3): 'amarillo', ('nouns', 7): 'árbol',
           ('names', 0): 'inglés'},
    'de': {('numbers', 12): 'zwölf', ('days', 5): 'Samstag',
           ('colours', 5): 'weiß', ('nouns', 10): 'Brot', ('names', 1):
           'Französisch'},
    'ru': {('numbers', 11): 'одиннадцать', ('days', 6): 'воскресенье',
           ('colours', 3): 'жёлтый', ('nouns', 0): 'собака',
           ('names', 2): 'испанский'},
    'hi': {('numbers', 5): 'पाँच', ('numbers', 19): 'उन्नीस',
           ('days', 0): 'सोमवार', ('colours', 0): 'लाल', ('nouns', 3): 'मछली',
           ('names', 0): 'अंग्रेज़ी'},
    'ar': {('numbers', 3): 'ثلاثة', ('numbers', 20): 'عشرون',
           ('days', 4): 'الجمعة', ('colours', 1): 'أزرق', ('nouns', 6): 'كتاب',
           ('names', 8): 'الصينية'},
    'tr': {('numbers', 11): 'on bir', ('numbers', 3): 'üç',
           ('days', 2): 'Çarşamba', ('colours', 7): 'kahverengi',
           ('nouns', 7): 'ağaç', ('names', 4): 'Rusça'},
    'zh': {('numbers', 20): '二十', ('numbers', 2): '二', ('days', 6): '星期日',
           ('colours', 0): '红色', ('nouns', 8): '苹果', ('names', 3): '德语'},
}


@pytest.mark.parametrize('lang', S.LANGUAGES)
def test_hand_checked_entries(lang):
  for (cat, i), word in HAND_CHECKED[lang].items():
    assert lx.LEXICON[lang][cat][i] == unicodedata.normalize('NFC', word)


def test_families_include_english_and_cover_all():
  fams = S.LANGUAGE_FAMILIES
  assert all('en' in langs for langs in fams.values())
  assert set().union(*fams.values()) == set(S.LANGUAGES)
