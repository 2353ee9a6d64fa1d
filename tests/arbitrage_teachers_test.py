"""Tests for aya_jax.arbitrage.teachers: the pool, resuming, prompts, errors, the stage."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from aya_jax import config_files
from aya_jax.arbitrage import teachers as T
from aya_jax.data import formatting as F
from aya_jax.data import records
from aya_jax.models import hf, init_params, tiny
from aya_jax.sampling import methods as M
from aya_jax.sampling import sampler

CORPUS = [
    'The cat sleeps on the warm windowsill every afternoon.',
    'How many apples are left in the basket after lunch?',
    'Please translate this short sentence into French for me.',
    'The river flows quietly past the old mill near the village.',
    'Seven plus five equals twelve, and twelve minus three is nine.',
    'She wrote a long letter to her grandmother about the summer.',
    'Which planet is closest to the sun in our solar system?',
    'We will meet at the station at noon on Saturday.',
    'Thank you very much for your kind help yesterday evening.',
    'Le chat dort sur le rebord chaud de la fenêtre.',
    'Combien de pommes reste-t-il dans le panier après le déjeuner ?',
    'Merci beaucoup pour votre aide précieuse hier soir.',
    'La rivière coule doucement près du vieux moulin du village.',
    'Sept plus cinq font douze, et douze moins trois font neuf.',
    'Elle a écrit une longue lettre à sa grand-mère cet été.',
    'Quelle planète est la plus proche du soleil ?',
    'Nous nous retrouverons à la gare à midi samedi.',
    'El gato duerme en la ventana caliente cada tarde.',
    '¿Cuántas manzanas quedan en la cesta después del almuerzo?',
    'Muchas gracias por tu ayuda de ayer por la tarde.',
    'El río fluye tranquilamente junto al viejo molino.',
    'Siete más cinco son doce, y doce menos tres son nueve.',
    'Ella escribió una carta larga a su abuela sobre el verano.',
    'Die Katze schläft jeden Nachmittag auf der warmen Fensterbank.',
    'Wie viele Äpfel sind nach dem Mittagessen noch im Korb?',
    'Vielen Dank für deine freundliche Hilfe gestern Abend.',
    'Der Fluss fließt ruhig an der alten Mühle vorbei.',
    'Sieben plus fünf ist zwölf, und zwölf minus drei ist neun.',
]
VOCAB = 500  # 264 reserved ids + the corpus characters + merges
PROMPTS = [  # (id, language, user text); 6 prompts -> 3 batches of 2
    ("en-1", "en", "How many apples are left?"),
    ("fr-1", "fr", "Combien de pommes reste-t-il ?"),
    ("en-2", "en", "Which planet is closest to the sun?"),
    ("es-1", "es", "¿Cuántas manzanas quedan?"),
    ("de-1", "de", "Wie viele Äpfel sind im Korb?"),
    ("fr#2", "fr", "Quelle planète est la plus proche du soleil ?"),
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("tokenizer")
  F.train_tokenizer(CORPUS, out, vocab_size=VOCAB)
  return str(out)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  with open(path, "w") as f:
    for pid, lang, text in PROMPTS:
      f.write(json.dumps({"id": pid, "language": lang,
                          "messages": [{"role": "user", "content": text}]}) + "\n")
  return str(path)


def _model(family, seed, **kw):
  cfg = tiny(family, vocab_size=VOCAB, **kw)
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(seed))
  # larger weights than the 0.02 init so the model prefers some tokens
  return cfg, jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, params)


@pytest.fixture(scope="module")
def models():
  return {"a": _model("llama", 0), "b": _model("qwen2", 1)}


@pytest.fixture(scope="module")
def pool(models, tok_dir):
  return T.TeacherPool([
      T.Teacher("alpha", models["a"], tok_dir, M.Sampling(temperature=1.0, top_k=40), n=2,
                max_new_tokens=8),
      T.Teacher("beta", models["b"], tok_dir, M.Greedy(), n=1, max_new_tokens=8),
  ], batch_size=2, seed=3)


@pytest.fixture(scope="module")
def full_run(pool, prompts_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("full") / "completions.jsonl"
  stats = pool.answer(prompts_file, out)
  return str(out), stats


def _bytes(path):
  with open(path, "rb") as f:
    return f.read()


def test_every_prompt_through_every_teacher(full_run, tok_dir):
  out, stats = full_run
  got = records.read_jsonl(out, "completion")
  want_ids = {records.completion_id(pid, "alpha", j) for pid, _, _ in PROMPTS for j in range(2)}
  want_ids |= {records.completion_id(pid, "beta", 0) for pid, _, _ in PROMPTS}
  empty = set()
  if os.path.exists(out + T.EMPTY_SUFFIX):
    empty = set(_bytes(out + T.EMPTY_SUFFIX).decode().split())
  assert {r.id for r in got} | empty == want_ids and not {r.id for r in got} & empty
  assert stats == dict(written=len(got), empty=len(empty), skipped=0, batches=6, finished=True)
  by_id = {pid: (lang, text) for pid, lang, text in PROMPTS}
  for r in got:
    pid, teacher, j = records.parse_completion_id(r.id)
    assert teacher == r.teacher and r.language == by_id[pid][0]
    assert r.prompt == ({"role": "user", "content": by_id[pid][1]},) and r.score is None
    assert "<|end|>" not in r.completion and "<pad>" not in r.completion
  assert records.parse_completion_id("fr#2#alpha#1") == ("fr#2", "alpha", 1)
  # two samples per prompt of the sampling teacher differ
  alpha = {r.id: r.completion for r in got if r.teacher == "alpha"}
  pairs = [(alpha.get(records.completion_id(p, "alpha", 0)), alpha.get(records.completion_id(p, "alpha", 1)))
           for p, _, _ in PROMPTS]
  assert sum(a != b for a, b in pairs) >= 4


def test_killed_run_resumes_to_the_same_file(pool, prompts_file, full_run, tmp_path,
                                             monkeypatch):
  full, _ = full_run
  rows = []
  real = sampler.generate
  monkeypatch.setattr(sampler, "generate", lambda *a, **k: rows.append(len(a[2])) or real(*a, **k))
  out = tmp_path / "completions.jsonl"
  first = pool.answer(prompts_file, out, max_batches=1)  # "killed" after one batch
  assert first["batches"] == 1 and not first["finished"]
  second = pool.answer(prompts_file, out, max_batches=3)  # into the second teacher
  assert second["batches"] == 3 and second["skipped"] == 4  # 2 prompts x 2 samples
  third = pool.answer(prompts_file, out)
  assert third["finished"] and third["batches"] == 2 and third["skipped"] == 12 + 2
  assert sum(rows) == len(PROMPTS) * 2  # each prompt generated once per teacher
  assert _bytes(out) == _bytes(full)
  again = pool.answer(prompts_file, out)  # nothing left to do
  assert again["batches"] == 0 and again["skipped"] == 3 * len(PROMPTS)
  assert _bytes(out) == _bytes(full)


def test_half_written_last_line_is_dropped_on_resume(pool, prompts_file, full_run, tmp_path):
  full, _ = full_run
  data = _bytes(full)
  cut = data.rindex(b"\n", 0, len(data) - 1) + 1  # start of the last line
  out = tmp_path / "completions.jsonl"
  out.write_bytes(data[:cut + 20])  # the last record half written
  if os.path.exists(full + T.EMPTY_SUFFIX):
    shutil.copy(full + T.EMPTY_SUFFIX, str(out) + T.EMPTY_SUFFIX)
  pool.answer(prompts_file, out)
  assert _bytes(out) == _bytes(full)


def test_empty_answers_are_recorded_as_done_not_as_records(models, tok_dir, prompts_file,
                                                         tmp_path):
  cfg, params = models["a"]
  end = F.end_of_turn_ids(F.load_tokenizer(tok_dir))[-1]  # <|end|>
  # zero the blocks' outputs: the last prompt token (<|assistant|>) alone decides the first
  # answer token, and the head turns its normed embedding into <|end|> (+1000 logits)
  layers = jax.tree.map(lambda x: x, params["layers"])
  layers["attn"]["o"]["kernel"] = 0 * layers["attn"]["o"]["kernel"]
  layers["mlp"]["down"]["kernel"] = 0 * layers["mlp"]["down"]["kernel"]
  x = np.asarray(params["embedder"]["embedding"][5])
  h = x / np.sqrt(np.mean(x ** 2) + cfg.norm_eps) * np.asarray(params["final_norm"]["scale"])
  head = params["lm_head"]["kernel"].at[:, end].add(1000.0 * h / (h @ h))
  mute = dict(params, layers=layers, lm_head=dict(kernel=head))
  pool = T.TeacherPool([T.Teacher("mute", (cfg, mute), tok_dir, M.Sampling(1.0), n=2,
                                  max_new_tokens=8)], batch_size=4)
  out = tmp_path / "completions.jsonl"
  stats = pool.answer(prompts_file, out)
  assert stats == dict(written=0, empty=12, skipped=0, batches=2, finished=True)
  assert sorted(_bytes(str(out) + T.EMPTY_SUFFIX).decode().split()) == sorted(
      records.completion_id(p, "mute", j) for p, _, _ in PROMPTS for j in range(2))
  assert not out.exists()
  assert pool.answer(prompts_file, out)["batches"] == 0  # nothing is redone


def test_hf_and_params_directory_teachers_equal_in_memory(models, tok_dir, prompts_file,
                                                          tmp_path):
  from aya_jax import checkpoint
  cfg, params = models["b"]
  hf.save(cfg, params, tmp_path / "beta_hf")
  checkpoint.save_params(str(tmp_path / "beta_params"), cfg, params)
  out = {}
  for kind, model in (("mem", models["b"]), ("hf", str(tmp_path / "beta_hf")),
                      ("params", str(tmp_path / "beta_params"))):
    pool = T.TeacherPool([T.Teacher("beta", model, tok_dir, M.Greedy(), max_new_tokens=8)],
                         batch_size=2, seed=3)
    out[kind] = tmp_path / f"{kind}.jsonl"
    pool.answer(prompts_file, out[kind])
  assert _bytes(out["mem"]) == _bytes(out["hf"]) == _bytes(out["params"])


def test_bad_input_gets_a_clear_error(pool, models, tok_dir, prompts_file, tmp_path):
  with pytest.raises(ValueError, match=r"unknown teacher 'gamma'; the pool has \['alpha', "):
    pool.answer(prompts_file, tmp_path / "x.jsonl", teachers=["gamma"])
  small = T.TeacherPool([T.Teacher("small", (tiny("llama"), models["a"][1]), tok_dir)])
  with pytest.raises(ValueError, match=r"teacher small: tokenizer .* has 500 tokens but the "
                     r"in-memory model has vocab_size 97"):
    small.answer(prompts_file, tmp_path / "x.jsonl")
  cfg, params = models["a"]
  short = T.TeacherPool([T.Teacher("short", (cfg.replace(max_seq_len=20), params), tok_dir,
                                   max_new_tokens=8)])
  with pytest.raises(ValueError, match=r"prompt '.*': \d+ tokens with teacher short's template"
                     r".*max_seq_len=20"):
    short.answer(prompts_file, tmp_path / "x.jsonl")
  with pytest.raises(ValueError, match="neither an aya_jax params/ directory"):
    T.TeacherPool([T.Teacher("ckpt", str(tmp_path), tok_dir)]).answer(
        prompts_file, tmp_path / "x.jsonl")
  with pytest.raises(ValueError, match="without '#'"):
    T.Teacher("a#b", str(tmp_path), tok_dir)


def test_generate_stage_from_config(models, tok_dir, prompts_file, tmp_path):
  module = config_files.load_module(os.path.join(os.path.dirname(__file__), "..", "configs", "generate.py"))
  config = module.get_config()
  assert config.stage == "generate"
  cfg, params = models["b"]
  hf.save(cfg, params, tmp_path / "model")
  shutil.copytree(tok_dir, tmp_path / "model", dirs_exist_ok=True)  # tokenizer beside it
  config.prompts = prompts_file
  config.teachers.llama8b.model = str(tmp_path / "model")
  config.teachers.llama8b.temperature = 0.0
  config.teachers.llama8b.max_new_tokens = 8
  config.only = "llama8b"
  config.batch_size = 2
  workdir = tmp_path / "work"
  stats = T.run(config, str(workdir))
  got = records.read_jsonl(workdir / "completions.jsonl", "completion")
  assert stats["written"] == len(got) and stats["written"] + stats["empty"] == len(PROMPTS)
  assert {r.teacher for r in got} == {"llama8b"}
  assert json.loads(_bytes(workdir / "generate_stats.json"))["written"] == len(got)
