"""The world's tasks: instances and ids, splits, its tokenizer."""

import pytest

from aya_jax.data import formatting
from aya_jax.data import records
from aya_jax.world import tasks as S
from aya_jax.world import translator
from conftest import world_instances


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
  for inst in world_instances(4):
    assert S.parse_id(inst.id) == inst
    assert S.parse_id(f'round2/{inst.id}#teacher-3') == inst
  for bad in ('syn:fr:add:13.14:t0', 'syn:fr:sub:1.2:t0', 'syn:xx:add:1.1:t0',
              'syn:fr:translate:dog.fr:t0', 'syn:fr:copy:dog.cow:t0',
              'syn:fr:add:1.2:t3', 'prompt-17'):
    with pytest.raises(ValueError, match='record id'):
      S.parse_id(bad)


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


def test_make_split_stops_when_prompts_run_out(caplog):
  with caplog.at_level('WARNING'):
    recs = S.make_split('train', 100, 0, languages=('en', 'fr'),
                        tasks=('next_day', 'prev_day'))
  n_en = sum(r.language == 'en' for r in recs)
  assert 20 < n_en < 42  # 2 tasks x 7 days x 3 templates, ~80% train
  n_fr = len(recs) - n_en
  warned = [r.getMessage() for r in caplog.records if 'make_split' in r.getMessage()]
  assert warned == [f'make_split(train): fewer than 100 prompts (every task ran out) in '
                    f'en {n_en}, fr {n_fr}']  # one line for the call
  with pytest.raises(ValueError, match='unknown split'):
    S.make_split('dev', 1)


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
  texts += [translator.translate(t, 'en', 'zh', 0, 0.2) for t in texts[:50]]
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
