"""The world's bootstrap: teacher pool structure, caching, families, pretraining text."""

import json
import os
import shutil

import pytest

from aya_jax import checkpoint, config_files
from aya_jax.data import formatting
from aya_jax.world import bootstrap as world
from aya_jax.world import tasks as synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg="tiny"):
  mod = config_files.load_module(os.path.join(ROOT, "configs/world.py"))
  return mod.get_config(arg)


def test_families_default_explicit_and_errors():
  c = _config()
  assert world.families(c) == {"european": ("en", "fr"), "slavic_turkic": ("en", "ru")}
  assert set(world.families(_config(None))) == set(synthetic.LANGUAGE_FAMILIES)
  c.families = "west:en,fr;east:ru"
  assert world.families(c) == {"west": ("en", "fr"), "east": ("ru",)}
  c.families = "west:en,de"
  with pytest.raises(ValueError, match=r"family west has languages \['de'\]"):
    world.families(c)


def test_pretraining_text_is_train_split_and_never_pairs_prompt_with_answer():
  langs, tasks = ("en", "fr"), ("next_day", "prev_day", "translate")
  recs = world.pretrain_records(langs, tasks, 40, seed=0)
  lines = {line for r in recs for line in r.messages[1]["content"].split("\n")}
  texts = [r.messages[1]["content"] for r in recs]
  train = synthetic.make_split("train", 40, 0, langs, tasks)
  for r in train:
    prompt, answer = r.messages[0]["content"], r.messages[1]["content"]
    assert prompt in lines and answer in lines
  for split in ("valid", "test"):
    for r in synthetic.make_split(split, 10, 0, langs, tasks):
      assert r.messages[0]["content"] not in lines, r.id
  assert {r.language for r in recs} == set(langs)
  assert all(r.messages[0]["content"] == world.DOC_USER for r in recs)
  assert len(texts) == len(set(r.id for r in recs))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("world"))
  out = world.run(_config(), workdir)
  return workdir, out


@pytest.mark.slow
def test_teachers_strong_on_their_family_weak_elsewhere(tiny_world):
  _, out = tiny_world
  report = out["report"]
  assert set(report["scores"]) == {"base", "weak", "teacher_european", "teacher_slavic_turkic"}
  for name, fam in report["families"].items():
    assert fam["own"] > fam["other"] + 0.1, (name, report["scores"])
  # the family's own non-English language is where the teachers differ most
  s = report["scores"]
  assert s["teacher_european"]["fr"] > s["teacher_slavic_turkic"]["fr"]
  assert s["teacher_slavic_turkic"]["ru"] > s["teacher_european"]["ru"]
  n_vocab = len(formatting.load_tokenizer(out["tokenizer"]))
  for p in [out["base"], out["weak"], *out["teachers"].values()]:
    cfg, _ = checkpoint.load_model(p)
    assert cfg.d_model == 64 and cfg.vocab_size == n_vocab


@pytest.mark.slow
def test_second_bootstrap_trains_nothing_and_a_change_retrains_only_its_part(tiny_world):
  workdir, first = tiny_world
  assert first["trained"] == ["tokenizer", "base", "teachers/european",
                              "teachers/slavic_turkic", "weak", "report"]
  assert not os.path.exists(os.path.join(workdir, "base", "checkpoints"))  # gone once done
  stamp = lambda p: os.path.getmtime(os.path.join(p, checkpoint.MODEL_CONFIG))  # noqa: E731
  before = {p: stamp(p) for p in [first["base"], first["weak"], *first["teachers"].values()]}
  again = world.bootstrap(workdir, _config())
  assert again["trained"] == [] and again["seconds"] == {}
  assert {p: stamp(p) for p in before} == before
  assert again["report"] == first["report"]
  c = _config()
  c.weak.steps = 20  # only the weak model (and the report) depend on it
  third = world.bootstrap(workdir, c)
  assert third["trained"] == ["weak", "report"]
  assert {p: stamp(p) for p in before if p != first["weak"]} == {
      p: t for p, t in before.items() if p != first["weak"]}
  # a torn report view is written again from the step's state: nothing trained or scored
  path = os.path.join(workdir, "world_report.json")
  with open(path, "r+") as f:
    f.truncate(20)
  fourth = world.bootstrap(workdir, c)
  assert fourth["trained"] == [] and fourth["report"] == third["report"]
  assert json.load(open(path)) == third["report"]
  # a deleted model is trained again (the same spec: the report stands)
  shutil.rmtree(os.path.join(workdir, "weak", "params"))
  fifth = world.bootstrap(workdir, c)
  assert fifth["trained"] == ["weak"] and os.path.exists(first["weak"])
