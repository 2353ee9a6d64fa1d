"""Chat templates, tokenisation and loss masks.

Everything here goes through `tokenizer.apply_chat_template`, so the same code
serves the small tokenizer that `train_tokenizer` builds (with
`DEFAULT_CHAT_TEMPLATE`) and any Hugging Face tokenizer with its own template.

A rendered conversation is tokenised with `add_special_tokens=False`: the
template writes its own BOS, and letting the tokenizer add another one is the
double-BOS trap. Loss masks come from rendering prefixes of the conversation
and checking that their tokens are prefixes of the whole (the prefix
property); a template that breaks it raises an error naming the example.
"""

from __future__ import annotations

import io
import os
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import tokenizers
from tokenizers import decoders, models, pre_tokenizers
import transformers

Messages = Sequence[dict[str, str]]

PAD, BOS, EOS, UNK = '<pad>', '<s>', '</s>', '<unk>'
CHAT_TOKENS = ('<|user|>', '<|assistant|>', '<|system|>', '<|end|>')
# Names that chat templates use for "end of turn"; eos always counts too.
END_OF_TURN_NAMES = ('<|end|>', '<end_of_turn>', '<|eot_id|>', '<|im_end|>',
                     '<|END_OF_TURN_TOKEN|>')

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

_SPM_NORMAL, _SPM_BYTE = 1, 6  # sentencepiece ModelProto.SentencePiece.Type
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json',
                    'tokenizer.tiktoken')


class TokenizedExample(NamedTuple):
  """A tokenised conversation.

  tokens: int32 [T]; loss_mask: int32 [T], 1 on assistant content and its
  end-of-turn token; n_truncated: tokens cut from the end by `max_len`.
  """
  tokens: np.ndarray
  loss_mask: np.ndarray
  n_truncated: int


# ----------------------------------------------------------------- training


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 512,
    model_type: str = 'bpe',
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
    character_coverage: float = 1.0,
    seed: int = 0,
) -> transformers.PreTrainedTokenizerFast:
  """Trains a sentencepiece model and saves it as an HF tokenizer directory.

  Ids: <pad>=0, <s>=1, </s>=2, <unk>=3, then <|user|>, <|assistant|>,
  <|system|>, <|end|> = 4..7, then the 256 byte pieces <0x00>..<0xFF>, then
  learned pieces; `vocab_size` counts all of them. With `character_coverage`
  1.0 every character of `texts` gets a piece, so the vocabulary must hold
  264 + the number of distinct characters (sentencepiece accepts 0.98 to 1.0;
  below 1.0 the rarest characters get no piece). Byte fallback makes any text
  in any script tokenise (a character without a piece becomes its bytes).
  Normalisation is off and no dummy prefix is added, so decode(encode(text))
  == text for any text without a literal '▁'. Training is single-threaded
  with a fixed seed: the same texts give the same tokenizer. The saved
  tokenizer adds BOS in `tokenizer(text)`; chat rendering never does.

  Returns the tokenizer as reloaded from `out_dir` with `load_tokenizer`.
  """
  if model_type not in ('bpe', 'unigram'):
    raise ValueError(f'model_type must be bpe or unigram, got {model_type!r}')
  texts = list(texts)
  proto = sentencepiece_model_pb2.ModelProto.FromString(_train_spm(
      texts, vocab_size, model_type, character_coverage, seed))
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=_backend_from_spm(proto, model_type),
      bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
      extra_special_tokens=list(CHAT_TOKENS), add_bos_token=True,
      add_eos_token=False, clean_up_tokenization_spaces=False)
  tok.chat_template = chat_template
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  tok.save_pretrained(out_dir)
  loaded = load_tokenizer(out_dir)
  _verify_trained(loaded, out_dir, vocab_size, texts[:8])
  return loaded


def _train_spm(texts, vocab_size, model_type, character_coverage, seed):
  """Serialized sentencepiece model trained on `texts` (ids as above)."""
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError('train_tokenizer: no non-empty texts')
  spm.set_random_generator_seed(seed)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
      model_type=model_type, character_coverage=character_coverage,
      byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
      pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK,
      user_defined_symbols=list(CHAT_TOKENS),
      normalization_rule_name='identity', add_dummy_prefix=False,
      remove_extra_whitespaces=False, split_digits=True, num_threads=1,
      shuffle_input_sentence=False, hard_vocab_limit=True, minloglevel=2)
  return buf.getvalue()


def _backend_from_spm(proto, model_type: str) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` equivalent to the sentencepiece model `proto`."""
  pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
  if model_type == 'bpe':
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    model = models.BPE(vocab=vocab, merges=_bpe_merges(pieces), unk_token=UNK,
                       byte_fallback=True, fuse_unk=True)
  else:
    # Byte and special pieces must never be matched against text.
    low = min(s for _, s, t in pieces if t == _SPM_NORMAL) - 1e3
    vocab = [(p, s if t == _SPM_NORMAL else low) for p, s, t in pieces]
    model = models.Unigram(vocab=vocab, unk_id=3, byte_fallback=True)
  backend = tokenizers.Tokenizer(model)
  # Spaces become '▁' and start a new word, as sentencepiece does.
  backend.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement='▁', prepend_scheme='never', split=True)
  backend.decoder = decoders.Sequence([
      decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse()])
  backend.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t in (PAD, BOS, EOS, UNK) + CHAT_TOKENS])
  return backend


def _bpe_merges(pieces) -> list[tuple[str, str]]:
  """Merges for sentencepiece BPE pieces, ranked by the merged piece's id.

  Sentencepiece ranks BPE pieces by merge order (score = -rank), so every
  split of a learned piece into two known pieces is a merge at that rank.
  """
  ids = {p: i for i, (p, _, t) in enumerate(pieces) if t == _SPM_NORMAL}
  merges = []
  for piece, i in ids.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in ids and right in ids:
        merges.append((i, ids[left], ids[right], left, right))
  merges.sort()
  return [(left, right) for *_, left, right in merges]


def _verify_trained(tok, out_dir, vocab_size, sample_texts):
  """Fails loudly if the saved tokenizer is not the one that was trained."""
  where = f'tokenizer saved in {out_dir}'
  if len(tok) != vocab_size:
    raise RuntimeError(f'{where}: {len(tok)} tokens, expected {vocab_size}')
  want = dict(zip((PAD, BOS, EOS, UNK) + CHAT_TOKENS, range(8)))
  got = {t: tok.convert_tokens_to_ids(t) for t in want}
  if got != want:
    raise RuntimeError(f'{where}: special token ids {got}, expected {want}')
  for text in sample_texts:
    back = tok.decode(tok.encode(text, add_special_tokens=False))
    if back != text:
      raise RuntimeError(f'{where}: round trip {text!r} -> {back!r}')


# ------------------------------------------------------------------ loading


def has_tokenizer(path: str | os.PathLike) -> bool:
  """Whether `path` holds a tokenizer: a directory with the files of an HF tokenizer,
  or a GGUF model (its tokenizer is converted when loaded)."""
  from aya_jax.models import gguf
  return _has_tokenizer_files(path) or gguf.is_gguf(path)


def _has_tokenizer_files(path) -> bool:
  return any(os.path.exists(os.path.join(os.fspath(path), f)) for f in _TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike, require_chat_template: bool = True):
  """Loads an HF tokenizer from a local directory, never from the Hub; a GGUF
  model's (a .gguf file, or a directory holding one and no tokenizer files) from
  the tokenizer directory converted from it (models.gguf.tokenizer_dir, cached)."""
  path = os.fspath(path)
  from aya_jax.models import gguf
  if gguf.is_gguf(path) and not _has_tokenizer_files(path):  # its tokenizer, converted
    path = gguf.tokenizer_dir(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'tokenizer directory {path} does not exist')
  if not has_tokenizer(path):
    raise FileNotFoundError(f'{path} has no tokenizer files (looked for '
                            f'{", ".join(_TOKENIZER_FILES)})')
  try:
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001 -- transformers' raw errors name no directory
    import json  # only on this error path: which file is broken
    why = f'{type(e).__name__}: {e}'
    for name in sorted(f for f in os.listdir(path) if f.endswith('.json')):
      try:
        with open(os.path.join(path, name), encoding='utf-8') as f:
          json.load(f)
      except ValueError as bad:  # JSONDecodeError, UnicodeDecodeError
        why = f'{name} is not valid JSON ({bad})'
        break
    raise ValueError(f'tokenizer directory {path} cannot be loaded: {why}') from e
  if len(tok.get_vocab()) <= len(tok.all_special_tokens):
    raise ValueError(f'{path}: tokenizer loaded with an empty vocabulary')
  if require_chat_template and not tok.chat_template:
    raise ValueError(f'{path}: tokenizer has no chat template '
                     '(chat_template.jinja or tokenizer_config.json)')
  return tok


# ---------------------------------------------------------------- rendering


def _render(tokenizer, messages: Messages, add_generation_prompt=False) -> str:
  return tokenizer.apply_chat_template(
      list(messages), tokenize=False,
      add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """`_encode` of every text in one call (a fast tokenizer encodes them in parallel)."""
  if not texts:
    return []
  return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)['input_ids']]


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
  """Ids that end an assistant turn: eos, the template's end-of-turn token
  (the token right after an assistant message's content) and any known
  end-of-turn name in the vocabulary. Cached on the tokenizer object (keyed
  by its chat template and eos), since a 256k vocabulary is slow to scan."""
  # not len(tokenizer): it recounts a 262k vocabulary (0.8 ms a call, half of pair tokenising)
  key = (tokenizer.chat_template, tokenizer.eos_token_id)
  cached = getattr(tokenizer, '_aya_end_of_turn', None)
  if cached is not None and cached[0] == key:
    return cached[1]
  ids = _end_of_turn_ids(tokenizer)
  try:
    tokenizer._aya_end_of_turn = (key, ids)  # pylint: disable=protected-access
  except AttributeError:
    pass
  return ids


def _end_of_turn_ids(tokenizer) -> tuple[int, ...]:
  ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  marker = 'MARKER'
  try:
    text = _render(tokenizer, [{'role': 'user', 'content': 'q'},
                               {'role': 'assistant', 'content': marker}])
  except Exception:  # pylint: disable=broad-except
    text = ''  # A template that cannot render this falls back to names.
  if marker in text:
    after = _encode(tokenizer, text[text.rindex(marker) + len(marker):])
    if after and after[0] in tokenizer.added_tokens_decoder:
      ids.append(after[0])
  vocab = tokenizer.get_vocab()
  ids += [vocab[name] for name in END_OF_TURN_NAMES if name in vocab]
  return tuple(dict.fromkeys(ids))


def _check_prefix(tokenizer, prefix, full, example, what):
  """Raises unless token list `prefix` starts token list `full`."""
  if full[:len(prefix)] == prefix:
    return
  at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b),
            len(full))
  raise ValueError(
      f'chat template breaks the prefix property in example {example!r} at '
      f'{what}: the tokens of the shorter rendering are not a prefix of the '
      f'longer one (first difference at token {at}: '
      f'{tokenizer.convert_ids_to_tokens(prefix[at:at + 4])} vs '
      f'{tokenizer.convert_ids_to_tokens(full[at:at + 4])})')


def _answer_mask(answer: list[int], stop: tuple[int, ...]) -> list[int]:
  """1 on answer tokens up to and including the first end-of-turn id."""
  end = next((i + 1 for i, t in enumerate(answer) if t in stop), len(answer))
  return [1] * end + [0] * (len(answer) - end)


def tokenize_chat(tokenizer, messages: Messages, max_len: int | None = None,
                  example_id: Any = None) -> TokenizedExample:
  """Tokenises a whole conversation with a loss mask on assistant turns.

  The mask is 1 on each assistant message's content and its end-of-turn
  token (so the model learns to stop) and 0 on system/user turns, role
  headers (what `add_generation_prompt` renders) and anything after the
  end-of-turn token (e.g. ChatML's newline). Over `max_len`, the tokens are
  cut from the end and `n_truncated` says how many.
  """
  example = example_id if example_id is not None else messages[:1]
  stop = end_of_turn_ids(tokenizer)
  tokens: list[int] = []
  mask: list[int] = []
  for i, message in enumerate(messages):
    if message['role'] == 'assistant':
      prompt = _encode(tokenizer, _render(tokenizer, messages[:i], True))
      _check_prefix(tokenizer, tokens, prompt, example,
                    f'the prompt of message {i}')
      mask += [0] * (len(prompt) - len(tokens))
      tokens = prompt
    full = _encode(tokenizer, _render(tokenizer, messages[:i + 1]))
    _check_prefix(tokenizer, tokens, full, example, f'message {i}')
    new = full[len(tokens):]
    if message['role'] == 'assistant':
      mask += _answer_mask(new, stop)
    else:
      mask += [0] * len(new)
    tokens = full
  n_truncated = 0
  if max_len is not None and len(tokens) > max_len:
    n_truncated = len(tokens) - max_len
    tokens, mask = tokens[:max_len], mask[:max_len]
  return TokenizedExample(np.asarray(tokens, np.int32),
                          np.asarray(mask, np.int32), n_truncated)


def tokenize_prompt(tokenizer, messages: Messages) -> np.ndarray:
  """Tokens of `messages` followed by the assistant header, for sampling."""
  return np.asarray(_encode(tokenizer, _render(tokenizer, messages, True)),
                    np.int32)


def tokenize_prompt_completion(
    tokenizer, prompt_messages: Messages, completion: str,
    max_len: int | None = None, example_id: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Prompt tokens (with the assistant header) and completion tokens.

  The completion is the answer plus its end-of-turn token, tokenised exactly
  as `tokenize_chat` does in context, so prompt + completion equals the
  start of `tokenize_chat(prompt_messages + [assistant completion]).tokens`.
  Over `max_len`, the concatenation is cut from the end (the completion
  first, so it can come back empty for an over-long prompt).
  """
  return tokenize_prompt_completions(tokenizer, [(prompt_messages, completion, example_id)],
                                     max_len)[0]


def tokenize_prompt_completions(
    tokenizer, items: Sequence[tuple[Messages, str, Any]], max_len: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """`tokenize_prompt_completion` of many (prompt_messages, completion, example_id) items:
  the same tokens, the renderings encoded in one batch call."""
  prompts_text = [_render(tokenizer, m, True) for m, _, _ in items]
  full_text = [_render(tokenizer, list(m) + [{'role': 'assistant', 'content': c}])
               for m, c, _ in items]
  encoded = _encode_batch(tokenizer, prompts_text + full_text)
  stop = end_of_turn_ids(tokenizer)
  out = []
  for i, (messages, _, example_id) in enumerate(items):
    prompt, full = encoded[i], encoded[len(items) + i]
    example = example_id if example_id is not None else messages[:1]
    _check_prefix(tokenizer, prompt, full, example, 'the completion')
    answer = full[len(prompt):]
    answer = answer[:sum(_answer_mask(answer, stop))]
    if max_len is not None and len(prompt) + len(answer) > max_len:
      answer = answer[:max(0, max_len - len(prompt))]
      prompt = prompt[:max_len]
    out.append((np.asarray(prompt, np.int32), np.asarray(answer, np.int32)))
  return out


REVISION_REQUEST = "Improve your answer."


def revision_messages(prompt_messages: Messages, draft: str,
                      request: str = REVISION_REQUEST) -> list[dict[str, str]]:
  """SRPO's self-revision prompt: the conversation, the draft as the assistant's turn,
  then `request` as the user's; the model's next turn is the revised answer."""
  return list(prompt_messages) + [{'role': 'assistant', 'content': draft},
                                  {'role': 'user', 'content': request}]


# ----------------------------------------------------------------- decoding


def decode_completion(tokenizer, ids: Sequence[int],
                      stop_ids: Sequence[int] | None = None) -> str:
  """Decodes sampled ids up to the first stop id, without special tokens."""
  stop = set(end_of_turn_ids(tokenizer) if stop_ids is None else stop_ids)
  ids = [int(i) for i in ids]
  end = next((k for k, t in enumerate(ids) if t in stop), len(ids))
  return tokenizer.decode(ids[:end], skip_special_tokens=True)


def strip_end_of_turn(text: str, tokenizer) -> str:
  """Cuts decoded text at the first end-of-turn token string."""
  names = tokenizer.convert_ids_to_tokens(list(end_of_turn_ids(tokenizer)))
  cut = min((text.index(n) for n in names if n and n in text), default=None)
  return text if cut is None else text[:cut]


# ------------------------------------------------------------------ batching


def pad_batch(examples: Sequence[TokenizedExample], length: int,
              pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads examples to `length`.

  Returns int32 arrays [B, length]: tokens (pad_id on padding), loss_mask (0
  on padding), segment_ids (1 on real tokens, 0 on padding) and positions
  (0, 1, ... on real tokens, 0 on padding).
  """
  batch = len(examples)
  out = {'tokens': np.full((batch, length), pad_id, np.int32)}
  for key in ('loss_mask', 'segment_ids', 'positions'):
    out[key] = np.zeros((batch, length), np.int32)
  for b, ex in enumerate(examples):
    n = len(ex.tokens)
    if n > length:
      raise ValueError(f'pad_batch: example {b} has {n} tokens > {length}')
    out['tokens'][b, :n] = ex.tokens
    out['loss_mask'][b, :n] = ex.loss_mask
    out['segment_ids'][b, :n] = 1
    out['positions'][b, :n] = np.arange(n)
  return out
