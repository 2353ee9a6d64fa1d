"""Tests for aya_jax.data.formatting: tokenizer training, chat masks, pairs."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import transformers

from aya_jax.data import formatting as F

CORPUS = [
    # English
    'The cat sleeps on the warm windowsill.',
    'How many apples are left in the basket?',
    'Please translate this sentence into French.',
    'The river flows quietly past the old mill.',
    'Seven plus five equals twelve.',
    'She wrote a long letter to her grandmother.',
    'Which planet is closest to the sun?',
    'We will meet at the station at noon.',
    'Thank you for your help yesterday.',
    # French
    'Le chat dort sur le rebord de la fenêtre.',
    'Combien de pommes reste-t-il dans le panier ?',
    'Merci beaucoup pour votre aide hier.',
    'La rivière coule doucement près du vieux moulin.',
    'Sept plus cinq font douze.',
    'Elle a écrit une longue lettre à sa grand-mère.',
    'Quelle planète est la plus proche du soleil ?',
    'Nous nous retrouverons à la gare à midi.',
    "C'est une très belle journée d'été.",
    # Russian
    'Кошка спит на тёплом подоконнике.',
    'Сколько яблок осталось в корзине?',
    'Спасибо большое за вашу помощь вчера.',
    'Река тихо течёт мимо старой мельницы.',
    'Семь плюс пять равно двенадцати.',
    'Она написала длинное письмо бабушке.',
    'Какая планета ближе всего к солнцу?',
    'Мы встретимся на вокзале в полдень.',
    'Сегодня очень хорошая погода.',
    # Hindi
    'बिल्ली गर्म खिड़की पर सोती है।',
    'टोकरी में कितने सेब बचे हैं?',
    'कल आपकी मदद के लिए बहुत धन्यवाद।',
    'नदी पुरानी चक्की के पास से धीरे बहती है।',
    'सात और पाँच बारह होते हैं।',
    'उसने अपनी दादी को एक लंबा पत्र लिखा।',
    'सूर्य के सबसे निकट कौन सा ग्रह है?',
    'हम दोपहर को स्टेशन पर मिलेंगे।',
    'आज मौसम बहुत अच्छा है।',
    # Arabic
    'القطة تنام على حافة النافذة الدافئة.',
    'كم تفاحة بقيت في السلة؟',
    'شكرا جزيلا على مساعدتك بالأمس.',
    'يجري النهر بهدوء بجانب الطاحونة القديمة.',
    'سبعة زائد خمسة يساوي اثني عشر.',
    'كتبت رسالة طويلة إلى جدتها.',
    'ما هو الكوكب الأقرب إلى الشمس؟',
    'سنلتقي في المحطة عند الظهر.',
    'الطقس جميل جدا اليوم.',
    # Chinese
    '猫在温暖的窗台上睡觉。',
    '篮子里还剩几个苹果？',
    '非常感谢你昨天的帮助。',
    '河水静静地流过老磨坊。',
    '七加五等于十二。',
    '她给奶奶写了一封长信。',
    '哪颗行星离太阳最近？',
    '我们中午在车站见面。',
    '今天天气很好。',
]
# 264 reserved ids + 231 distinct characters (character_coverage 1.0) + merges.
VOCAB = 600

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{{ m['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
FOREIGN = {
    'chatml': (CHATML, ['<|im_start|>', '<|im_end|>'], '<|im_end|>'),
    'llama3': (LLAMA3, ['<|start_header_id|>', '<|end_header_id|>',
                        '<|eot_id|>'], '<|eot_id|>'),
}

MULTI_TURN = [
    {'role': 'system', 'content': 'Answer briefly.'},
    {'role': 'user', 'content': 'How many apples are left?'},
    {'role': 'assistant', 'content': 'Seven apples.'},
    {'role': 'user', 'content': 'Сколько яблок осталось?'},
    {'role': 'assistant', 'content': 'Семь яблок, спасибо.'},
    {'role': 'user', 'content': 'और हिंदी में?'},
    {'role': 'assistant', 'content': 'सात सेब। 苹果七个。'},
]


@pytest.fixture(scope='session')
def tok_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('tokenizer')
  F.train_tokenizer(CORPUS, out, vocab_size=VOCAB)
  return out


@pytest.fixture(scope='session')
def tok(tok_dir):
  return F.load_tokenizer(tok_dir)


def _foreign(tok_dir, name):
  """A fresh copy of the trained tokenizer with a foreign chat template."""
  template, new_tokens, _ = FOREIGN[name]
  t = F.load_tokenizer(tok_dir)
  t.add_tokens(new_tokens, special_tokens=True)
  t.chat_template = template
  return t


def _runs(mask):
  """[start, end) of each run of ones in a 0/1 mask."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  return list(zip(edges[::2], edges[1::2]))


def _decode(t, ids):
  return t.decode([int(i) for i in ids], skip_special_tokens=False)


# ----------------------------------------------------------------- tokenizer


def test_vocab_size_and_special_ids(tok):
  assert len(tok) == VOCAB
  ids = {t: tok.convert_tokens_to_ids(t) for t in
         ['<pad>', '<s>', '</s>', '<unk>', '<|user|>', '<|assistant|>',
          '<|system|>', '<|end|>']}
  assert ids == {'<pad>': 0, '<s>': 1, '</s>': 2, '<unk>': 3, '<|user|>': 4,
                 '<|assistant|>': 5, '<|system|>': 6, '<|end|>': 7}
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  assert tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize('text', CORPUS[::4] + [
    'Unseen words: Zanzibar, Ёжик, ज्ञान, 🙂 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!',
    '  leading and trailing spaces  ', 'two\nlines\tand a tab',
    'Çà et là, naïve façade; 東京 ٣٤٥ 12345'])
def test_round_trip_is_exact(tok, text):
  ids = tok.encode(text, add_special_tokens=False)
  assert tok.decode(ids) == text
  assert tok.unk_token_id not in ids  # byte fallback instead of <unk>


def test_coverage_below_one_falls_back_to_bytes(tmp_path):
  t = F.train_tokenizer(CORPUS, tmp_path, vocab_size=480,
                        character_coverage=0.98)
  assert len(t) == 480
  for text in CORPUS:
    assert t.decode(t.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize('model_type,vocab', [('bpe', VOCAB), ('unigram', 560)])
def test_matches_sentencepiece(tok, tmp_path, model_type, vocab):
  """The HF tokenizer splits text exactly as the sentencepiece model does."""
  proto = F._train_spm(CORPUS, vocab, model_type, 1.0, 0)
  sp = spm.SentencePieceProcessor(model_proto=proto)
  t = tok if model_type == 'bpe' else F.train_tokenizer(
      CORPUS, tmp_path, vocab_size=vocab, model_type=model_type)
  texts = CORPUS + ['Unseen: Zanzibar, Ёжик, ज्ञान 🙂', 'a  b\nc', '2024-05-17']
  for text in texts:
    assert t.encode(text, add_special_tokens=False) == sp.encode(text), text
  # Training learned something: a training sentence is well compressed.
  assert len(tok.encode(CORPUS[0], add_special_tokens=False)) < 25


def test_directory_loads_with_auto_tokenizer(tok_dir, tok):
  assert {'tokenizer.json', 'tokenizer_config.json'} <= set(os.listdir(tok_dir))
  auto = transformers.AutoTokenizer.from_pretrained(
      tok_dir, local_files_only=True)
  assert auto.chat_template == F.DEFAULT_CHAT_TEMPLATE
  text = 'Привет, мир! 你好'
  assert auto.encode(text) == tok.encode(text)
  assert len(auto) == VOCAB


def test_training_is_deterministic(tok_dir, tmp_path):
  F.train_tokenizer(CORPUS, tmp_path, vocab_size=VOCAB)
  def model(d):
    with open(os.path.join(d, 'tokenizer.json')) as f:
      return json.load(f)['model']
  assert model(tmp_path) == model(tok_dir)


def test_unigram(tmp_path):
  t = F.train_tokenizer(CORPUS, tmp_path, vocab_size=560, model_type='unigram')
  assert len(t) == 560 and t.convert_tokens_to_ids('<|end|>') == 7
  text = 'Кошка, 猫 and बिल्ली 🙂 sleep.'
  assert t.decode(t.encode(text, add_special_tokens=False)) == text


def test_load_tokenizer_errors(tmp_path, tok):
  empty = tmp_path / 'empty_dir'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='empty_dir'):
    F.load_tokenizer(empty)
  no_template = tmp_path / 'no_template'
  tok.save_pretrained(no_template)
  os.remove(no_template / 'chat_template.jinja')
  with pytest.raises(ValueError, match='no_template.*no chat template'):
    F.load_tokenizer(no_template)


# ------------------------------------------------------------ chat and masks


def test_end_of_turn_ids(tok):
  ids = F.end_of_turn_ids(tok)
  assert tok.convert_tokens_to_ids('<|end|>') in ids
  assert tok.eos_token_id in ids
  assert tok.pad_token_id not in ids


def test_exactly_one_bos(tok):
  ex = F.tokenize_chat(tok, MULTI_TURN)
  assert ex.tokens[0] == tok.bos_token_id
  assert (ex.tokens == tok.bos_token_id).sum() == 1
  # The trap this avoids: the tokenizer's own BOS on top of the template's.
  rendered = tok.apply_chat_template(MULTI_TURN, tokenize=False)
  assert tok.encode(rendered)[:2] == [tok.bos_token_id] * 2


def test_single_turn_mask(tok):
  msgs = [{'role': 'user', 'content': 'Which planet is closest to the sun?'},
          {'role': 'assistant', 'content': 'Меркурий, 水星.'}]
  ex = F.tokenize_chat(tok, msgs)
  assert len(ex.tokens) == len(ex.loss_mask) and ex.n_truncated == 0
  (start, stop), = _runs(ex.loss_mask)  # one run, ending the sequence
  assert stop == len(ex.tokens)
  assert ex.tokens[start - 1] == tok.convert_tokens_to_ids('<|assistant|>')
  assert _decode(tok, ex.tokens[ex.loss_mask == 1]) == 'Меркурий, 水星.<|end|>'
  assert ex.tokens[-1] == tok.convert_tokens_to_ids('<|end|>')
  assert ex.loss_mask[-1] == 1


def test_multi_turn_masks_every_assistant_turn_and_no_user_turn(tok):
  ex = F.tokenize_chat(tok, MULTI_TURN)
  runs = [_decode(tok, ex.tokens[a:b]) for a, b in _runs(ex.loss_mask)]
  assert runs == [m['content'] + '<|end|>' for m in MULTI_TURN
                  if m['role'] == 'assistant']
  unmasked = _decode(tok, ex.tokens[ex.loss_mask == 0])
  for m in MULTI_TURN:
    if m['role'] != 'assistant':
      assert m['content'] in unmasked
  assert '<|assistant|>' in unmasked  # role headers are not trained on


@pytest.mark.parametrize('completion', [
    'Seven.', ' leading space', 'Семь яблок.', 'सात', '七个', 'سبعة', ''])
def test_prompt_completion_boundary(tok, completion):
  prompt = MULTI_TURN[:4]
  p, c = F.tokenize_prompt_completion(tok, prompt, completion)
  full = F.tokenize_chat(tok, prompt + [
      {'role': 'assistant', 'content': completion}])
  np.testing.assert_array_equal(np.concatenate([p, c]), full.tokens)
  np.testing.assert_array_equal(c, full.tokens[full.loss_mask == 1][-len(c):])
  np.testing.assert_array_equal(p, F.tokenize_prompt(tok, prompt))
  assert c[-1] == tok.convert_tokens_to_ids('<|end|>')
  assert _decode(tok, c) == completion + '<|end|>'


def test_many_prompt_completions_in_one_encode_call(tok, monkeypatch):
  """The batched tokenisation (pairs, reward scorer) gives tokenize_chat's tokens for every
  item, from one encode call; tokenize_pairs makes one call per TOKENIZE_CHUNK pairs."""
  calls = []
  encode_batch = F._encode_batch
  monkeypatch.setattr(F, '_encode_batch', lambda t, texts: calls.append(len(texts)) or
                      encode_batch(t, texts))
  completions = ['Seven.', ' leading space', 'Семь яблок.', '七个', '']
  items = [(MULTI_TURN[:2 * (i % 2 + 1)], c, i) for i, c in enumerate(completions)]
  out = F.tokenize_prompt_completions(tok, items)
  assert calls == [2 * len(items)]
  for (p, c), (messages, completion, _) in zip(out, items):
    full = F.tokenize_chat(tok, list(messages) + [{'role': 'assistant', 'content': completion}])
    np.testing.assert_array_equal(np.concatenate([p, c]), full.tokens)
  from aya_jax.data import pairs as pp
  from aya_jax.data import records
  monkeypatch.setattr(pp, 'TOKENIZE_CHUNK', 2)
  recs = [records.PreferenceRecord(id=f'p{i}', language='en', prompt=tuple(MULTI_TURN[:2]),
                                   chosen=f'yes {i}', rejected=f'no {i}') for i in range(5)]
  calls.clear()
  got, stats = pp.tokenize_pairs(recs, tok, 256)
  assert calls == [8, 8, 4] and stats.n_pairs == 5
  p, c = F.tokenize_prompt_completion(tok, recs[4].prompt, recs[4].rejected)
  np.testing.assert_array_equal(got[4].prompt, p)
  np.testing.assert_array_equal(got[4].rejected, c)


def test_pad_batch(tok):
  a = F.tokenize_chat(tok, MULTI_TURN[1:3])
  b = F.tokenize_chat(tok, MULTI_TURN)
  length = len(b.tokens) + 5
  batch = F.pad_batch([a, b], length, tok.pad_token_id)
  assert set(batch) == {'tokens', 'loss_mask', 'segment_ids', 'positions'}
  assert all(v.shape == (2, length) for v in batch.values())
  n = len(a.tokens)
  np.testing.assert_array_equal(batch['tokens'][0, :n], a.tokens)
  assert (batch['tokens'][0, n:] == tok.pad_token_id).all()
  assert (batch['loss_mask'][0, n:] == 0).all()
  np.testing.assert_array_equal(batch['segment_ids'][0], np.arange(length) < n)
  np.testing.assert_array_equal(batch['positions'][0, :n], np.arange(n))
  assert (batch['positions'][0, n:] == 0).all()
  # The end-of-turn token inside the answer is trained on, padding is not.
  end = tok.convert_tokens_to_ids('<|end|>')
  assert batch['tokens'][0, n - 1] == end and batch['loss_mask'][0, n - 1] == 1
  with pytest.raises(ValueError, match='example 1'):
    F.pad_batch([a, b], len(b.tokens) - 1, tok.pad_token_id)


def test_truncation(tok):
  full = F.tokenize_chat(tok, MULTI_TURN)
  ex = F.tokenize_chat(tok, MULTI_TURN, max_len=20)
  assert ex.n_truncated == len(full.tokens) - 20 > 0
  np.testing.assert_array_equal(ex.tokens, full.tokens[:20])
  np.testing.assert_array_equal(ex.loss_mask, full.loss_mask[:20])
  assert F.tokenize_chat(tok, MULTI_TURN, max_len=1000).n_truncated == 0
  p, c = F.tokenize_prompt_completion(tok, MULTI_TURN[:4], 'Seven apples.',
                                      max_len=len(F.tokenize_prompt(
                                          tok, MULTI_TURN[:4])) + 2)
  assert len(c) == 2


def test_template_breaking_prefix_property_raises(tok_dir):
  t = F.load_tokenizer(tok_dir)
  # The generation prompt adds a newline the rendered answer does not have.
  t.chat_template = F.DEFAULT_CHAT_TEMPLATE.replace(
      "{{ '<|assistant|>' }}{% endif %}", "{{ '<|assistant|>\n' }}{% endif %}")
  with pytest.raises(ValueError, match='prefix property.*example-42'):
    F.tokenize_chat(t, MULTI_TURN[1:3], example_id='example-42')
  with pytest.raises(ValueError, match='prefix property'):
    F.tokenize_prompt_completion(t, MULTI_TURN[1:2], 'Seven.')


def test_decode_completion_and_strip(tok):
  p, c = F.tokenize_prompt_completion(tok, MULTI_TURN[:4], 'Семь яблок, 🙂.')
  sampled = np.concatenate([c, [4, 300, 301, tok.pad_token_id]])
  assert F.decode_completion(tok, sampled) == 'Семь яблок, 🙂.'
  raw = _decode(tok, sampled)
  assert F.strip_end_of_turn(raw, tok) == 'Семь яблок, 🙂.'
  assert F.decode_completion(tok, c[:-1]) == 'Семь яблок, 🙂.'


# --------------------------------------------------------- foreign templates


@pytest.mark.parametrize('name', sorted(FOREIGN))
def test_foreign_template(tok_dir, name):
  t = _foreign(tok_dir, name)
  end_name = FOREIGN[name][2]
  end = t.convert_tokens_to_ids(end_name)
  assert end in F.end_of_turn_ids(t) and t.eos_token_id in F.end_of_turn_ids(t)
  ex = F.tokenize_chat(t, MULTI_TURN)
  runs = [_decode(t, ex.tokens[a:b]) for a, b in _runs(ex.loss_mask)]
  assert runs == [m['content'] + end_name for m in MULTI_TURN
                  if m['role'] == 'assistant']
  if name == 'chatml':  # the newline after <|im_end|> is not trained on
    assert ex.loss_mask[-1] == 0 and ex.tokens[-2] == end
  for completion in ['Seven.', 'Семь.', '七个']:
    p, c = F.tokenize_prompt_completion(t, MULTI_TURN[:4], completion)
    full = F.tokenize_chat(t, MULTI_TURN[:4] + [
        {'role': 'assistant', 'content': completion}])
    n = len(p) + len(c)
    np.testing.assert_array_equal(np.concatenate([p, c]), full.tokens[:n])
    # The completion is exactly the last masked run of the conversation.
    assert _runs(full.loss_mask)[-1] == (len(p), n)
    assert F.decode_completion(t, np.concatenate([c, [5, 6]])) == completion


def test_has_tokenizer_looks_for_the_tokenizer_files(tmp_path):
  assert not F.has_tokenizer(tmp_path)
  (tmp_path / "config.json").write_text("{}")
  assert not F.has_tokenizer(tmp_path)  # a model config is not a tokenizer
  (tmp_path / "tokenizer.model").write_bytes(b"x")
  assert F.has_tokenizer(tmp_path)
