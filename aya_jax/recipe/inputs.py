"""The pipeline's real inputs (`config.inputs`): local paths instead of the world.

The fields, each with what it is, are documented once: configs/pipeline.py's
`inputs` block.

`resolve(config)` checks every path (an error names the config field) and
returns `Inputs`, what the steps train from; `Inputs.from_world` makes the
same from the world step's outputs. On real inputs `hashes` holds, per group
of inputs, a hash of its absolute paths, so that a changed path re-runs only
the steps that read it (pool, prompts -> arbitrage; rm -> arbitrage, online;
base -> SFT; eval).
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Optional

from aya_jax import artifacts
from aya_jax import checkpoint
from aya_jax.data import formatting
from aya_jax.world import bootstrap as world
from aya_jax.world import tasks as world_tasks

FIELD = "config.inputs"
# prompts / eval_prompts = WORLD: the world's tasks as natural prompts in its languages (its
# train / test split, as on the world); reward_model / judge = VERIFIER: the world's verifier
WORLD, VERIFIER = "world", "verifier"


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What the pipeline's steps train from: the world's models, or local paths."""
  tokenizer: str
  base: str
  teachers: dict                  # name -> model dir
  families: dict                  # name -> its languages
  languages: tuple
  weak: str = ""                  # the weak model ("" = none)
  teacher_tokenizers: dict = dataclasses.field(default_factory=dict)  # "" = `tokenizer`
  translator: str = ""            # the teacher that translates for contrast ("" = lexicon)
  prompts: tuple = ()             # real inputs: the prompt files, or (WORLD,)
  eval_prompts: str = ""
  reward_model: str = ""          # real inputs: the arbiter or VERIFIER (the world trains one)
  reward_tokenizer: str = ""
  judge: str = ""
  judge_tokenizer: str = ""
  hashes: Optional[dict] = None   # real inputs: group of paths -> hash
  world_report: str = ""          # the world's report (markdown)

  @property
  def real(self) -> bool:
    return self.hashes is not None

  @property
  def world_prompts(self) -> bool:
    """Whether arbitrage and online rounds answer the world's tasks (its train split)."""
    return not self.real or self.prompts == (WORLD,)

  @property
  def world_eval(self) -> bool:
    """Whether evaluation judges the world's test split under its verifier."""
    return not self.real or self.eval_prompts == WORLD

  @property
  def teacher_names(self) -> list:
    """In the given order on real inputs; the world's sorted by family name."""
    return list(self.teachers) if self.real else sorted(self.teachers)

  def tokenizer_of(self, model: str) -> str:
    """The tokenizer a pool member ('weak' or a teacher's name) renders with."""
    return self.teacher_tokenizers.get(model) or self.tokenizer

  @classmethod
  def from_world(cls, world: dict, languages) -> "Inputs":
    """From the world step's outputs (`steps.run_world`)."""
    return cls(tokenizer=world["tokenizer"], base=world["base"], teachers=world["teachers"],
               families={k: tuple(v) for k, v in world["families"].items()},
               languages=tuple(languages), weak=world["weak"],
               world_report=world.get("report_md", ""))


def _need(field: str, value):
  if not value:
    raise ValueError(f"{FIELD}.{field} is empty: it is required when {FIELD}.base is set "
                     "(the pipeline on real inputs)")


def _exists(field: str, path: str) -> str:
  _need(field, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{FIELD}.{field}={path!r}: no such file or directory")
  return os.path.abspath(path)


def _model(field: str, path: str) -> str:
  path = _exists(field, path)
  if not checkpoint.is_model_dir(path):
    raise ValueError(f"{FIELD}.{field}={path!r}: neither an aya_jax params/ directory nor a "
                     "Hugging Face directory (config.json) nor a GGUF file")
  return path


def _tokenizer(field: str, path: str, *defaults: tuple) -> str:
  """`path` (field) or, when empty, the first (field, dir) of `defaults` whose
  directory holds tokenizer files."""
  if not path:
    for _, d in defaults:
      if d and formatting.has_tokenizer(d):
        return d
    tried = " nor ".join(f"{FIELD}.{f}={d!r}" for f, d in defaults)
    raise ValueError(f"{FIELD}.{field} is empty and neither {tried} has tokenizer files: "
                     "set it to an HF tokenizer directory")
  path = _exists(field, path)
  if not formatting.has_tokenizer(path):
    raise ValueError(f"{FIELD}.{field}={path!r} has no tokenizer files")
  return path


def _pairs(field: str, spec: str) -> dict:
  """'name:path;name:path' -> {name: path} (in the given order), names checked."""
  out = {}
  for part in [p for p in spec.split(";") if p.strip()]:
    if ":" not in part:
      raise ValueError(f"{FIELD}.{field}: {part!r} is not 'name:path'")
    name, path = (x.strip() for x in part.split(":", 1))
    if not name or "#" in name or name == "weak" or name in out:
      raise ValueError(f"{FIELD}.{field}: teacher name {name!r} is empty, repeated, holds "
                       "'#' or is 'weak' (the name of inputs.weak in the pool)")
    out[name] = path
  return out


def parse_teachers(spec: str) -> dict:
  """'name:path;name:path' -> {name: model path} (in the given order), each checked."""
  out = {name: _model(f"teachers ({name})", path)
         for name, path in _pairs("teachers", spec).items()}
  _need("teachers", out)
  return out


def _paths(value) -> list:
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  return list(value)


def world_langs(langs, field: str):
  """The world's tasks exist in its languages only: an error names the others."""
  other = sorted(set(langs) - set(world_tasks.LANGUAGES))
  if other:
    raise ValueError(f"{FIELD}.{field}='world': the world's tasks have no {other} (its "
                     f"languages: {list(world_tasks.LANGUAGES)})")


def _world_spec(config, paths) -> list:
  """What the world's prompts depend on beyond the languages (they are made, not read)."""
  return [list(config.world.tasks)] if WORLD in paths else []


def resolve(config) -> Inputs:
  """The checked inputs of `config.inputs` (see the module docstring)."""
  c = config.inputs
  base = _model("base", c.base)
  tok = _tokenizer("tokenizer", c.tokenizer, ("base", base))
  teachers = parse_teachers(c.teachers)
  tokenizers = {n: p if formatting.has_tokenizer(p) else tok for n, p in teachers.items()}
  for name, path in _pairs("teacher_tokenizers", c.get("teacher_tokenizers", "")).items():
    if name not in teachers:
      raise ValueError(f"{FIELD}.teacher_tokenizers: {name!r} is not one of {FIELD}.teachers "
                       f"{list(teachers)}")
    tokenizers[name] = _tokenizer(f"teacher_tokenizers ({name})", path)
  weak = _model("weak", c.weak) if c.weak else ""
  if weak:
    tokenizers["weak"] = weak if formatting.has_tokenizer(weak) else tok
  if c.translator and c.translator not in teachers:
    raise ValueError(f"{FIELD}.translator={c.translator!r}: not one of {FIELD}.teachers "
                     f"{list(teachers)}")
  if c.translator and not weak:
    raise ValueError(f"{FIELD}.translator is set but {FIELD}.weak is empty: translation "
                     "contrast needs a weak model (its rejected side)")
  _need("families", c.families)
  langs = tuple(c.languages) or tuple(dict.fromkeys(
      x.strip() for part in c.families.split(";") if ":" in part
      for x in part.split(":", 1)[1].split(",") if x.strip()))
  fams = world.families(types.SimpleNamespace(languages=langs, families=c.families), FIELD)
  prompts = _paths(c.prompts)
  _need("prompts", prompts)
  if prompts == [WORLD]:
    world_langs(langs, "prompts")
  else:
    prompts = [_exists("prompts", p) for p in prompts]
  if c.reward_model == VERIFIER:
    if prompts != [WORLD]:
      raise ValueError(f"{FIELD}.reward_model='verifier' scores the world's tasks only: set "
                       f"{FIELD}.prompts='world'")
    rm, rm_tok = VERIFIER, ""
  else:
    rm = _model("reward_model", c.reward_model)
    rm_tok = _tokenizer("reward_tokenizer", c.reward_tokenizer, ("reward_model", rm),
                        ("tokenizer", tok))
  judge = c.judge or rm
  if c.eval_prompts == WORLD:
    world_langs(langs, "eval_prompts")
    eval_prompts = WORLD
  else:
    eval_prompts = _exists("eval_prompts", c.eval_prompts)
  if judge == VERIFIER:
    if eval_prompts != WORLD:
      raise ValueError(f"{FIELD}.judge='verifier' judges the world's tasks only: set "
                       f"{FIELD}.eval_prompts='world'")
    judge_tok = ""
  else:
    judge = _model("judge", judge) if c.judge else rm
    judge_tok = judge if formatting.has_tokenizer(judge) else rm_tok
  model = config.model.to_dict() if "model" in config else None  # dtype, remat
  hashes = dict(
      pool=artifacts.spec_hash([teachers, tokenizers, weak, c.translator, tok]),
      prompts=artifacts.spec_hash([prompts, langs] + _world_spec(config, prompts)),
      rm=artifacts.spec_hash([rm, rm_tok]),
      base=artifacts.spec_hash([base, tok, model]),
      eval=artifacts.spec_hash([eval_prompts, judge, judge_tok, langs] +
                               _world_spec(config, [eval_prompts])))
  return Inputs(tokenizer=tok, base=base, teachers=teachers, teacher_tokenizers=tokenizers,
                weak=weak, translator=c.translator, families=dict(fams), languages=langs,
                prompts=tuple(prompts), eval_prompts=eval_prompts, reward_model=rm,
                reward_tokenizer=rm_tok, judge=judge, judge_tokenizer=judge_tok, hashes=hashes)
