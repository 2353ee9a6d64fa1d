"""Tests for aya_jax.world.tasks and aya_jax.world.lexicon: the world."""

import unicodedata

import numpy as np
import pytest

from aya_jax.data import formatting
from aya_jax.data import records
from aya_jax.world import lexicon as lx
from aya_jax.world import tasks as S

V = S.Verifier()


def _instances(n_per_task=12, seed=0):
  rng = np.random.default_rng(seed)
  for lang in S.LANGUAGES:
    for task in S.TASKS:
      for k in range(n_per_task):
        yield S.sample_instance(task, lang, rng, template=k % 3)


# ---------------------------------------------------------------- lexicon


def test_lexicon_complete_and_distinct():
  assert len(S.LANGUAGES) >= 9 and len(set(S.SCRIPTS.values())) >= 5
  for lang in S.LANGUAGES:
    for cat, size in lx.CATEGORY_SIZES.items():
      words = lx.LEXICON[lang][cat]
      assert len(words) == size, (lang, cat)
      assert all(w and w == w.strip() for w in words), (lang, cat)
      units = [tuple(S.normalize(w)) for w in words]
      assert len(set(units)) == size, (lang, cat)  # no duplicates
      if cat != 'names':  # an answer word is one unit ('on bir', '十七')
        assert all(len(u) == 1 for u in units), (lang, cat)
    answers = [u for cat in ('numbers', 'days', 'colours', 'nouns')
               for u in map(S.normalize, lx.LEXICON[lang][cat])]
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
    texts += [i.prompt() for i in _instances(3) if i.language == lang]
    letters = {c for t in texts for c in t if unicodedata.category(c)[0] == 'L'}
    assert {_script(c) for c in letters} == {S.SCRIPTS[lang]}, lang
  assert S.SCRIPTS['ru'] == 'Cyrillic' and S.SCRIPTS['hi'] == 'Devanagari'
  assert S.SCRIPTS['ar'] == 'Arabic' and S.SCRIPTS['zh'] == 'Han'


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


# --------------------------------------------------------------- instances


def test_instances_examples_and_id_round_trip():
  inst = S.parse_id('syn:fr:add:3.4:t1')
  assert inst.prompt() == 'Additionne trois et quatre. Réponds en lettres.'
  assert inst.answer() == 'sept' and inst.answer('en') == 'seven'
  assert S.parse_id('syn:zh:sort:7.3.12:t0').answer() == '三、七、十二'
  tr = S.parse_id('syn:es:translate:dog.de:t1')
  assert (tr.prompt(), tr.answer()) == ('¿Cómo se dice «perro» en alemán?',
                                        'Hund')
  assert S.parse_id('syn:tr:add:0.1:t0').prompt() == 'Sıfır artı bir kaç eder?'
  assert S.parse_id('syn:tr:count:house.house:t2').prompt().startswith(
      'Ev, ev.')
  assert S.parse_id('syn:ar:reverse:dog.red:t0').answer() == 'أحمر، كلب'
  for inst in _instances(4):
    assert S.parse_id(inst.id) == inst
    assert S.parse_id(f'round2/{inst.id}#teacher-3') == inst
  for bad in ('syn:fr:add:13.14:t0', 'syn:fr:sub:1.2:t0', 'syn:xx:add:1.1:t0',
              'syn:fr:translate:dog.fr:t0', 'syn:fr:copy:dog.cow:t0',
              'syn:fr:add:1.2:t3', 'prompt-17'):
    with pytest.raises(ValueError, match='record id'):
      S.parse_id(bad)


# ---------------------------------------------------------------- verifier


def test_every_gold_answer_scores_one():
  insts = list(_instances())
  for inst in insts:
    assert V.score_answer(inst, inst.answer()) == 1.0, inst.id
  recs = [i.to_record() for i in insts]
  np.testing.assert_array_equal(V.score(recs), np.ones(len(recs)))
  comps = [records.CompletionRecord(r.id, r.language, r.messages[:1],
                                    r.messages[1]['content'], 't')
           for r in recs[:50]]
  np.testing.assert_array_equal(V.score(comps), np.ones(50))
  dicts = [dict(c.to_dict(), id=c.id + '#k1') for c in comps]
  np.testing.assert_array_equal(V.score(dicts), np.ones(50))


def test_wrong_language_gets_partial_credit():
  n_checked = 0
  for inst in _instances(4):
    right = S.normalize(inst.answer())
    for other in S.LANGUAGES:
      answer = inst.answer(other)
      if S.normalize(answer) == right:
        continue  # the same word in both languages ('six', 'orange')
      echo = inst.task == 'translate' and (
          S.normalize(answer) == S.normalize(inst.answer(inst.language)))
      want = 0.0 if echo else 0.5  # echoing the prompt's word is no answer
      assert V.score_answer(inst, answer) == want, (inst.id, other, answer)
      n_checked += 1
    if inst.task in ('add', 'sub', 'count', 'sort'):
      assert V.score_answer(inst, inst.answer(S.DIGITS)) == 0.5, inst.id
  assert n_checked > 2000


def test_wrong_and_empty_answers_get_zero():
  rng = np.random.default_rng(3)
  for inst in _instances(4):
    while True:
      other = S.sample_instance(inst.task, inst.language, rng)
      if inst.task == 'translate':
        other = S.Instance(inst.language, 'translate',
                           (other.args[0], inst.args[1]), 0)
      if set(other.concepts()) != set(inst.concepts()):
        break
    assert V.score_answer(inst, other.answer()) == 0.0, (inst.id, other.id)
    assert V.score_answer(inst, '') == 0.0
    assert V.score_answer(inst, ' ... ') == 0.0


def test_extra_words_reduce_the_score():
  for inst in _instances(2):
    gold = inst.answer()
    one, three = V.score_answer(inst, gold + ' xyz'), V.score_answer(
        inst, 'xyz qqq ' + gold + ' zzz')
    assert one == pytest.approx(0.95) and three == pytest.approx(0.85), inst.id
  inst = S.parse_id('syn:en:add:3.4:t0')
  assert V.score_answer(inst, ' '.join(['blah'] * 40 + ['seven'])) == 0.0


@pytest.mark.parametrize('rid,answer,want', [
    ('syn:fr:add:3.4:t0', 'sept', 1.0),
    ('syn:fr:add:3.4:t0', 'Sept !', 1.0),
    ('syn:fr:add:3.4:t0', 'La réponse est sept.', 0.85),
    ('syn:fr:add:3.4:t0', 'seven', 0.5),
    ('syn:fr:add:3.4:t0', '7', 0.5),
    ('syn:fr:add:3.4:t0', 'huit', 0.0),
    ('syn:fr:add:3.4:t0', 'sept ou huit', 0.0),  # a hedge is wrong
    ('syn:fr:add:9.8:t0', 'dix-sept', 1.0),
    ('syn:fr:add:9.8:t0', 'dix sept', 1.0),
    ('syn:fr:add:3.4:t0', 'dix-sept', 0.0),
    ('syn:zh:add:3.4:t0', '七', 1.0),
    ('syn:zh:add:3.4:t0', '答案是七。', 0.85),
    ('syn:zh:add:3.4:t0', '十七', 0.0),
    ('syn:zh:add:3.4:t0', 'seven', 0.5),
    ('syn:zh:sort:2.10:t0', '二、十', 1.0),
    ('syn:zh:sort:2.10:t0', '二十', 0.0),
    ('syn:tr:add:10.1:t0', 'on bir', 1.0),
    ('syn:tr:add:10.1:t0', 'bir', 0.0),
    ('syn:tr:add:0.1:t0', 'on bir', 0.0),
    ('syn:tr:add:0.1:t0', 'Bir.', 1.0),
    ('syn:ar:add:10.3:t0', 'ثلاثة عشر', 1.0),
    ('syn:ar:add:0.3:t0', 'ثلاثة عشر', 0.0),
    ('syn:ar:add:0.3:t0', 'three', 0.5),
    ('syn:hi:next_day:sun:t0', 'सोमवार', 1.0),
    ('syn:hi:next_day:sun:t0', 'Monday', 0.5),
    ('syn:hi:next_day:sun:t0', 'मंगलवार', 0.0),
    ('syn:ru:reverse:dog.red:t0', 'красный, собака', 1.0),
    ('syn:ru:reverse:dog.red:t0', 'собака, красный', 0.0),
    ('syn:ru:reverse:dog.red:t0', 'red, dog', 0.5),
    ('syn:de:translate:dog.fr:t0', 'chien', 1.0),
    ('syn:de:translate:dog.fr:t0', 'dog', 0.5),
    ('syn:de:translate:dog.fr:t0', 'Hund', 0.0),  # echo of the prompt
    ('syn:de:translate:dog.fr:t0', 'chat', 0.0),
    ('syn:en:translate:orange.ru:t0', 'orange', 0.0),  # echo, also fr/de
    ('syn:fr:translate:orange.en:t0', 'orange', 1.0),
    ('syn:en:count:dog.cat.dog:t0', 'Three.', 1.0),
    ('syn:en:count:dog.cat.dog:t0', 'Seven.', 0.0),
    ('syn:en:add:3.4:t0', 'Seven (sept).', 0.95),  # an echo in French: 1 extra
])
def test_hand_written_answers(rid, answer, want):
  assert V.score_answer(rid, answer) == pytest.approx(want)


def test_score_rejects_inconsistent_records():
  rec = S.parse_id('syn:fr:add:3.4:t0').to_record().to_dict()
  with pytest.raises(ValueError, match='prompt is not'):
    V.score([dict(rec, id='syn:fr:add:3.5:t0')])
  with pytest.raises(ValueError, match="language 'en'"):
    V.score([dict(rec, language='en')])
  with pytest.raises(ValueError, match='holds no synthetic'):
    V.score([dict(rec, id='x1')])
  with pytest.raises(ValueError, match='no completion'):
    V.score([dict(rec, messages=rec['messages'][:1])])
  assert S.Verifier(check_prompt=False).score(
      [dict(rec, id='syn:fr:add:3.5:t0')])[0] == 0.0


# ------------------------------------------------------------------ splits


def test_splits_disjoint_deterministic_and_valid(tmp_path):
  ids = {}
  for split in S.SPLITS:
    for seed in (0, 1):
      recs = S.make_split(split, 40, seed)
      assert len(recs) == 40 * len(S.LANGUAGES)
      assert len({r.id for r in recs}) == len(recs)
      assert all(S.split_of(r.id) == split for r in recs)
      ids.setdefault(split, set()).update(r.id for r in recs)
      if split == 'train':
        assert {r.id.split(':')[2] for r in recs} == set(S.TASKS)
  assert not ids['train'] & ids['valid'] and not ids['train'] & ids['test']
  assert not ids['valid'] & ids['test']
  prompts = {s: {S.parse_id(i).prompt() for i in ids[s]} for s in S.SPLITS}
  assert not prompts['train'] & (prompts['valid'] | prompts['test'])
  a, b = S.make_split('valid', 30, 5), S.make_split('valid', 30, 5)
  assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
  assert [r.id for r in a] != [r.id for r in S.make_split('valid', 30, 6)]
  path = tmp_path / 'valid.jsonl'
  records.write_jsonl(path, a)
  assert list(records.read_jsonl(path, 'sft')) == a
  fam = S.make_split('test', 10, 0, languages=('en', 'ru', 'tr'))
  assert {r.language for r in fam} == {'en', 'ru', 'tr'}
  assert all(S.parse_id(r.id).answer_language in ('en', 'ru', 'tr')
             for r in fam)


def test_make_split_stops_when_prompts_run_out():
  recs = S.make_split('train', 100, 0, languages=('en',),
                      tasks=('next_day', 'prev_day'))
  assert 20 < len(recs) < 42  # 2 tasks x 7 days x 3 templates, ~80% train
  with pytest.raises(ValueError, match='unknown split'):
    S.make_split('dev', 1)


# -------------------------------------------------------------- translator


def test_translate_keeps_order_and_artefacts():
  rng = np.random.default_rng(0)
  assert S.translate('dog, cat, red', 'en', 'fr', rng, 0.0) == \
      'chien, chat, rouge'
  assert S.translate('The answer is Seven.', 'en', 'de', rng, 0.0) == \
      'The answer is sieben.'
  assert S.translate('狗、猫', 'zh', 'en', rng, 0.0) == 'dog、cat'
  assert S.translate('on bir, iki', 'tr', 'en', rng, 0.0) == 'eleven, two'
  assert S.translate('dix-sept', 'fr', 'ru', rng, 0.0) == 'семнадцать'
  assert S.translate('dog, cat', 'en', 'fr', rng, 1.0) == 'dog, cat'
  assert S.translate('dog, cat', 'en', 'fr', 7) == S.translate(
      'dog, cat', 'en', 'fr', 7)


def test_translate_leaves_words_untranslated_at_the_rate():
  rng = np.random.default_rng(1)
  keys = [S.WORD_KEYS[i] for i in rng.integers(len(S.WORD_KEYS), size=3000)]
  idx = [S.WORD_KEYS.index(k) for k in keys]
  src = [S._words('en', 'words')[i] for i in idx]
  tgt = [S._words('ru', 'words')[i] for i in idx]
  out = S.translate(' '.join(src), 'en', 'ru', rng, 0.3).split(' ')
  assert len(out) == len(src)
  assert all(o in (s, t) for o, s, t in zip(out, src, tgt))  # order kept
  kept = np.mean([o == s for o, s in zip(out, src)])
  assert abs(kept - 0.3) < 0.03


# --------------------------------------------------------------- tokenizer


@pytest.fixture(scope='module')
def world_tokenizer(tmp_path_factory):
  out = tmp_path_factory.mktemp('world_tok')
  return S.build_tokenizer(out), out


def test_tokenizer_round_trips_world_text(world_tokenizer):
  tok, out = world_tokenizer
  assert len(tok) == S.DEFAULT_VOCAB_SIZE
  texts = list(S.world_corpus(n_per_template=2, seed=9))
  texts += [m['content'] for r in S.make_split('test', 20, 0)
            for m in r.messages]
  texts += [S.translate(t, 'en', 'zh', 0, 0.2) for t in texts[:50]]
  for text in texts:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
  reloaded = formatting.load_tokenizer(out)
  rec = S.make_split('valid', 1, 0, languages=('hi',))[0]
  ex = formatting.tokenize_chat(reloaded, rec.messages)
  answer = reloaded.decode(ex.tokens[ex.loss_mask == 1])
  assert answer == rec.messages[1]['content'] + '<|end|>'


def test_build_tokenizer_rejects_too_small_vocab(tmp_path):
  with pytest.raises(ValueError, match='distinct characters'):
    S.build_tokenizer(tmp_path, vocab_size=600)
