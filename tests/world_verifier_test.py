"""The world's verifier: gold answers score one, partial credit, hand-written cases."""

import numpy as np
import pytest

from aya_jax.data import records
from aya_jax.world import tasks as S
from aya_jax.world import verifier
from conftest import world_instances


V = verifier.Verifier()


# ---------------------------------------------------------------- verifier


def test_every_gold_answer_scores_one():
  insts = list(world_instances())
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
  for inst in world_instances(4):
    right = verifier.normalize(inst.answer())
    for other in S.LANGUAGES:
      answer = inst.answer(other)
      if verifier.normalize(answer) == right:
        continue  # the same word in both languages ('six', 'orange')
      echo = inst.task == 'translate' and (
          verifier.normalize(answer) == verifier.normalize(inst.answer(inst.language)))
      want = 0.0 if echo else 0.5  # echoing the prompt's word is no answer
      assert V.score_answer(inst, answer) == want, (inst.id, other, answer)
      n_checked += 1
    if inst.task in ('add', 'sub', 'count', 'sort'):
      assert V.score_answer(inst, inst.answer(S.DIGITS)) == 0.5, inst.id
  assert n_checked > 2000


def test_wrong_and_empty_answers_get_zero():
  rng = np.random.default_rng(3)
  for inst in world_instances(4):
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
  for inst in world_instances(2):
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
  assert verifier.Verifier(check_prompt=False).score(
      [dict(rec, id='syn:fr:add:3.5:t0')])[0] == 0.0
