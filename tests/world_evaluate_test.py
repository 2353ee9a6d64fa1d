"""The 'eval' stage on the world: world prompts, the verifier as judge and reference."""

import json
import os

import pytest

from aya_jax import config_files
from aya_jax.data import records
from aya_jax.world import evaluate as world_evaluate
from aya_jax.world import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANGS = ("en", "fr", "ru")


def _write(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_world_prompts_are_the_user_turns_of_the_split():
  prompts = world_evaluate.world_prompts("test", 3, LANGS, seed=0)
  split = tasks.make_split("test", 3, 0, LANGS, tasks.TASKS)
  assert [p.id for p in prompts] == [r.id for r in split]
  assert all(p.messages == r.messages[:-1] for p, r in zip(prompts, split))
  gold = [tasks.parse_id(p.id).answer() for p in prompts]
  assert world_evaluate.verifier_scores(prompts, gold).tolist() == [1.0] * len(prompts)
  assert world_evaluate.verifier_scores(
      [records.PromptRecord("q1", "en", prompts[0].messages)], ["x"]) is None


def test_prompt_files_must_hold_world_prompts_in_known_languages(tmp_path):
  good = world_evaluate.world_prompts("test", 1, ("en",))[0].to_dict()
  ok = world_evaluate.read_world_prompts(_write(tmp_path / "ok.jsonl", [good]), LANGS)
  assert [p.id for p in ok] == [good["id"]]
  with pytest.raises(records.RecordError, match=r"de\.jsonl:1: field 'language': unknown "
                                                r"language 'de'"):
    world_evaluate.read_world_prompts(_write(tmp_path / "de.jsonl", [dict(good, language="de")]),
                                      LANGS)
  arena = {"question_id": 1, "language": "en", "prompt": "Write a poem."}
  with pytest.raises(records.RecordError, match=r"arena\.jsonl:2: field 'id'.*only world"):
    world_evaluate.read_world_prompts(_write(tmp_path / "arena.jsonl", [good, arena]), LANGS)


def _eval_config():
  return config_files.load_module(os.path.join(ROOT, "configs/eval.py")).get_config()


@pytest.mark.slow
def test_eval_stage_writes_report(world_models, tmp_path):
  c = _eval_config()
  c.models = f"a={world_models['a']},b={world_models['b']}"
  c.tokenizer = world_models["tok"]
  c.languages, c.n_per_language, c.max_new_tokens = LANGS, 4, 6
  results = world_evaluate.run(c, str(tmp_path))
  report = json.load(open(tmp_path / "eval.json"))
  assert report["comparisons"] == json.loads(json.dumps(results))
  row = results[0]["per_language"]
  assert results[0]["a"] == "a" and results[0]["b"] == "b"
  assert set(row) == set(LANGS) | {"all"} and row["all"]["n"] == 12
  assert 0 <= row["all"]["win_rate"] <= 1 and "verifier_a" in row["en"]
  md = open(tmp_path / "eval.md").read()
  assert "| fr | 4 |" in md
  assert len(records.read_prompts(str(tmp_path / "prompts.jsonl"))) == 12
  c.models = "a=x"
  with pytest.raises(ValueError, match="at least two"):
    world_evaluate.run(c, str(tmp_path))
