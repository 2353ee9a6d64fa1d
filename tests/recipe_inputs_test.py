"""Real inputs: every path checked with the config field named, tokenizer defaults, and
one hash per group of inputs so that a changed path re-runs only the steps that read it."""

import os

import pytest

from aya_jax import config_files
from aya_jax.data import records
from aya_jax.recipe import inputs as recipe_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_dir(path, tokenizer=False):
  """A directory that passes for an HF model (config.json), with tokenizer files or not."""
  os.makedirs(path, exist_ok=True)
  open(os.path.join(path, "config.json"), "w").write("{}")
  if tokenizer:
    open(os.path.join(path, "tokenizer.json"), "w").write("{}")
  return str(path)


@pytest.fixture
def config(tmp_path):
  c = config_files.load_module(os.path.join(ROOT, "configs/pipeline.py")).get_config("smoke")
  i = c.inputs
  i.base = _model_dir(tmp_path / "base", tokenizer=True)
  i.teachers = (f"eu:{_model_dir(tmp_path / 'eu', tokenizer=True)};"
                f"sl:{_model_dir(tmp_path / 'sl')}")
  i.families = "eu:en,fr;sl:en,ru"
  i.reward_model = _model_dir(tmp_path / "rm")
  (tmp_path / "p.jsonl").write_text("{}\n")
  (tmp_path / "e.jsonl").write_text("{}\n")
  i.prompts, i.eval_prompts = (str(tmp_path / "p.jsonl"),), str(tmp_path / "e.jsonl")
  return c


def test_resolve_fills_tokenizer_defaults_and_languages(config, tmp_path):
  got = recipe_inputs.resolve(config)
  assert got.real and got.tokenizer == str(tmp_path / "base")  # base holds tokenizer files
  assert got.teachers == {"eu": str(tmp_path / "eu"), "sl": str(tmp_path / "sl")}
  assert got.teacher_names == ["eu", "sl"]  # the given order
  # a teacher with tokenizer files uses its own; one without, the student's
  assert got.tokenizer_of("eu") == str(tmp_path / "eu")
  assert got.tokenizer_of("sl") == str(tmp_path / "base")
  assert got.languages == ("en", "fr", "ru")
  assert got.families == {"eu": ("en", "fr"), "sl": ("en", "ru")}
  # the reward model has no tokenizer files: the student's; the judge is the arbiter
  assert got.reward_tokenizer == got.judge_tokenizer == str(tmp_path / "base")
  assert got.judge == got.reward_model == str(tmp_path / "rm")


def test_world_inputs_sort_the_teachers_and_have_no_hashes():
  world = dict(tokenizer="t", base="b", teachers={"slavic": "s", "european": "e"}, weak="w",
               families={"slavic": ["en", "ru"], "european": ["en", "fr"]}, report_md="| x |")
  got = recipe_inputs.Inputs.from_world(world, ["en", "fr", "ru"])
  assert not got.real and got.teacher_names == ["european", "slavic"]
  assert got.tokenizer_of("weak") == "t" and got.families["slavic"] == ("en", "ru")
  assert got.world_report == "| x |" and got.languages == ("en", "fr", "ru")


def test_a_changed_path_changes_only_its_group_hash(config, tmp_path):
  before = recipe_inputs.resolve(config).hashes
  (tmp_path / "e2.jsonl").write_text("{}\n")
  config.inputs.eval_prompts = str(tmp_path / "e2.jsonl")
  after = recipe_inputs.resolve(config).hashes
  assert {k for k in before if before[k] != after[k]} == {"eval"}
  config.inputs.teachers = config.inputs.teachers.replace("sl:", "slavic:")
  again = recipe_inputs.resolve(config).hashes
  assert {k for k in after if after[k] != again[k]} == {"pool"}


@pytest.mark.parametrize("spec, match", [
    ("eu", "'eu' is not 'name:path'"),
    ("weak:{d}", "is empty, repeated, holds '#' or is 'weak'"),
    ("a#b:{d}", "holds '#'"),
    ("a:{d};a:{d}", "repeated"),
    ("a:{d}/nope", r"config\.inputs\.teachers \(a\)=.*no such file"),
    ("", r"config\.inputs\.teachers is empty"),
])
def test_teacher_specs_errors_name_the_field(tmp_path, spec, match):
  d = _model_dir(tmp_path / "m")
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    recipe_inputs.parse_teachers(spec.format(d=d))


def test_contrast_needs_a_known_translator_and_a_weak_model(config, tmp_path):
  config.inputs.translator = "nobody"
  with pytest.raises(ValueError, match=r"config\.inputs\.translator='nobody': not one of"):
    recipe_inputs.resolve(config)
  config.inputs.translator = "eu"
  with pytest.raises(ValueError, match=r"config\.inputs\.weak is empty"):
    recipe_inputs.resolve(config)
  config.inputs.weak = str(tmp_path / "no-model")
  os.makedirs(config.inputs.weak)
  with pytest.raises(ValueError, match="neither an aya_jax params/ directory nor a Hugging Face"):
    recipe_inputs.resolve(config)


def test_real_models_on_the_worlds_tasks_under_its_verifier(config, tmp_path):
  """prompts/eval_prompts 'world' and reward_model 'verifier' (configs/real_small.py): the
  judge defaults to the verifier, the world's task list is part of both prompt hashes, and
  the pipeline's scorer is the verifier (a gold answer scores 1, a wrong one 0)."""
  from aya_jax.recipe import steps
  from aya_jax.world import tasks
  i = config.inputs
  i.prompts, i.eval_prompts, i.reward_model = ("world",), "world", "verifier"
  got = recipe_inputs.resolve(config)
  assert got.real and got.world_prompts and got.world_eval
  assert got.reward_model == got.judge == "verifier" and got.reward_tokenizer == ""
  score = steps.scorer(got, config, dict(params=got.reward_model), judge=True)
  inst = tasks.parse_id("syn:fr:next_day:mon:t0")
  recs = [dict(id=inst.id, language="fr", prompt=[{"role": "user", "content": inst.prompt()}],
               completion=c) for c in ("mardi", "jeudi")]
  assert list(score.score(recs)) == [1.0, 0.0]
  before = got.hashes
  config.world.tasks = ("add",)
  after = recipe_inputs.resolve(config).hashes
  assert after["prompts"] != before["prompts"] and after["eval"] != before["eval"]
  assert after["base"] == before["base"] and after["pool"] == before["pool"]
  written = steps._prompt_file(config, str(tmp_path), got)
  ids = [r.id for r in records.read_prompts(written)]
  assert ids and {tasks.parse_id(x).language for x in ids} == {"en", "fr", "ru"}


@pytest.mark.parametrize("change, match", [
    (dict(reward_model="verifier"), "reward_model='verifier' scores the world's tasks only"),
    (dict(prompts=("world",), eval_prompts="world", judge="verifier", families="x:en,ja"),
     r"prompts='world': the world's tasks have no \['ja'\]"),
])
def test_the_verifier_and_the_worlds_prompts_go_together(config, change, match):
  config.inputs.update(change)
  with pytest.raises(ValueError, match=match):
    recipe_inputs.resolve(config)


def test_a_verifier_judge_needs_the_worlds_eval_prompts(config):
  config.inputs.judge = "verifier"
  with pytest.raises(ValueError, match="judge='verifier' judges the world's tasks only"):
    recipe_inputs.resolve(config)


def test_a_teachers_tokenizer_can_be_named(config, tmp_path):
  """inputs.teacher_tokenizers: a base model's GGUF has no chat template, so its teacher
  renders with a tokenizer directory that has one (packaged.tokenizer)."""
  other = _model_dir(tmp_path / "tok", tokenizer=True)
  config.inputs.teacher_tokenizers = f"sl:{other}"
  got = recipe_inputs.resolve(config)
  assert got.tokenizer_of("sl") == other and got.tokenizer_of("eu") == str(tmp_path / "eu")
  config.inputs.teacher_tokenizers = f"xx:{other}"
  with pytest.raises(ValueError, match=r"teacher_tokenizers: 'xx' is not one of"):
    recipe_inputs.resolve(config)
  config.inputs.teacher_tokenizers = f"sl:{tmp_path / 'none'}"
  with pytest.raises(FileNotFoundError, match=r"teacher_tokenizers \(sl\)="):
    recipe_inputs.resolve(config)


def test_real_small_teachers_see_no_judged_task_and_no_held_out_prompt():
  """configs/real_small.py's worked examples (the Gemma teacher's prompt) are training-split
  instances of tasks the run neither trains nor judges, one language after another, each
  with its gold answer."""
  from aya_jax import config_files
  from aya_jax.world import tasks, verifier
  mod = config_files.load_module(os.path.join(ROOT, "configs", "real_small.py"))
  assert not set(mod.EXAMPLE_TASKS) & set(mod.TASKS)
  recs, shots = mod.example_records(), mod.examples()
  assert len(shots) == 6 and shots == tuple((r.messages[0]["content"], r.messages[-1]["content"])
                                            for r in recs)
  v = verifier.Verifier()
  for r, (question, answer) in zip(recs, shots):
    inst = tasks.parse_id(r.id)
    assert tasks.split_of(r.id) == "train" and inst.task in mod.EXAMPLE_TASKS
    assert question == inst.prompt() and v.score_answer(inst, answer) == 1.0
  assert [r.language for r in recs] == ["en", "fr", "de", "es", "ru", "en"]
