"""aya_jax.data.formatting.load_tokenizer on damaged tokenizer directories: one clear error
naming the directory and the broken file, transformers' raw error kept as the cause."""

import json
import shutil

import pytest

from aya_jax.data import formatting as F

CORPUS = ["the cat sleeps on the warm windowsill", "how many apples are left?",
          "el gato duerme", "sieben Äpfel, danke"] * 4


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("tokenizer")
  F.train_tokenizer(CORPUS, out, vocab_size=300)
  return out


def _damaged(tok_dir, tmp_path, name, content: bytes):
  bad = tmp_path / "bad_tok"
  shutil.copytree(tok_dir, bad)
  (bad / name).write_bytes(content)
  return bad


@pytest.mark.parametrize("name, cut", [("tokenizer.json", 0.5),
                                       ("tokenizer_config.json", 0.5),
                                       ("tokenizer.json", 0.0)])
def test_corrupt_json_names_directory_and_file(tok_dir, tmp_path, name, cut):
  text = (tok_dir / name).read_bytes()
  bad = _damaged(tok_dir, tmp_path, name, text[:int(len(text) * cut)])
  with pytest.raises(ValueError, match=f"tokenizer directory {bad} cannot be loaded: {name} "
                                       r"is not valid JSON \(") as e:
    F.load_tokenizer(bad)
  assert e.value.__cause__ is not None


def test_valid_json_that_is_no_tokenizer_names_directory_and_error(tok_dir, tmp_path):
  bad = _damaged(tok_dir, tmp_path, "tokenizer.json", json.dumps({"version": "1.0"}).encode())
  with pytest.raises(ValueError, match=f"tokenizer directory {bad} cannot be loaded: "):
    F.load_tokenizer(bad)
  assert F.load_tokenizer(tok_dir).encode("the cat", add_special_tokens=False)  # intact: loads
