r"""Bootstrap of the synthetic world: tokenizer, base model, teacher pool, weak model.

    python -m aya_jax.main --config=configs/world.py --workdir=runs/world

`bootstrap(workdir, config) -> paths` builds, in workdir:

  tokenizer/                 the world's sentencepiece tokenizer (HF dir)
  base/params/               a tiny decoder pretrained on the world's raw text
                             (lexicon lists, train-split prompts and answers as
                             separate documents, never a prompt with its answer)
  teachers/<family>/params/  the base fine-tuned (SFT, prompt -> gold answer) on
                             the train split of one language family only
  weak/params/               the base fine-tuned briefly on English only
  (and <model>/hf/ when export_hf: transformers-loadable, tokenizer included)
  world_report.json / .md    every model's mean verifier score per language on
                             the validation split; own vs other family means

Pretraining is the SFT stage on records whose assistant turn is the text (a
fixed one-character user turn), so `train/sft.py` is used unchanged; the
initial params come from `config.model` (random, saved as params/).

Caching: every artifact is a step of `aya_jax.artifacts.Runner` (the
pipeline's step cache; its state is workdir/world_state.json), keyed by a
hash of its config and of the steps it reads. A second call with the same
config trains nothing (the returned `trained` list is empty); a changed spec
retrains that artifact and everything after it. A killed run resumes from the
SFT checkpoints of the artifact it was building. An artifact whose output
(params/, the tokenizer) is gone, or a state file that cannot be read, is
built again (a warning names it). world_report.json and .md are views of the
report step's output, written again when they do not hold it.
"""

from __future__ import annotations

import os
import shutil

import jax
import ml_collections
import numpy as np
from absl import logging

from aya_jax import artifacts, axes, checkpoint, evaluation, sharding
from aya_jax.data import atomic, formatting, records
from aya_jax.models import config as model_config
from aya_jax.train import common, sft
from aya_jax.world import evaluate as world_evaluate
from aya_jax.world import lexicon
from aya_jax.world import tasks as synthetic

DOC_USER = "·"  # the user turn of a pretraining document


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "world"
  c.seed = 0
  c.languages = synthetic.LANGUAGES
  c.tasks = synthetic.TASKS
  # 'name:l1,l2;name:...'; "" = LANGUAGE_FAMILIES restricted to `languages`
  c.families = ""
  c.weak_languages = ("en",)
  c.vocab_size = 0        # 0: the world's characters + 264 + 384 merges (x64)
  c.model = ml_collections.ConfigDict(dict(
      family="llama", d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=24, d_ff=256,
      max_seq_len=256))
  c.data = ml_collections.ConfigDict(dict(seq_len=96, batch_size=16))
  c.pretrain = ml_collections.ConfigDict(dict(steps=500, lr=3e-3, n_per_language=600))
  c.teacher = ml_collections.ConfigDict(dict(steps=400, lr=2e-3, n_per_language=500))
  c.weak = ml_collections.ConfigDict(dict(steps=100, lr=2e-3, n_per_language=200))
  c.report = ml_collections.ConfigDict(dict(n_per_language=40, max_new_tokens=40,
                                            batch_size=64))
  c.mesh = sharding.mesh_block()
  c.export_hf = True
  return c


def families(config, prefix: str = "config") -> dict:
  """{family name: languages}, each within config.languages; errors name the
  fields as `prefix`.families / `prefix`.languages."""
  langs = tuple(config.languages)
  if config.families:
    out = {}
    for part in [p for p in config.families.split(";") if p.strip()]:
      if ":" not in part:
        raise ValueError(f"{prefix}.families: {part!r} is not 'name:lang,lang'")
      name, ls = part.split(":", 1)
      fam = tuple(x.strip() for x in ls.split(",") if x.strip())
      bad = [x for x in fam if x not in langs]
      if bad:
        raise ValueError(f"{prefix}.families: family {name} has languages {bad} not in "
                         f"{prefix}.languages {langs}")
      out[name.strip()] = fam
    return out
  common = set.intersection(*(set(f) for f in synthetic.LANGUAGE_FAMILIES.values()))
  out = {}
  for name, fam in synthetic.LANGUAGE_FAMILIES.items():
    fam = tuple(x for x in fam if x in langs)
    if set(fam) - common:  # a family of English alone is no family
      out[name] = fam
  return out


# ------------------------------------------------------------------- data


def pretrain_records(languages, tasks, n_per_language: int, seed: int,
                     docs_per_record: int = 4) -> list:
  """Raw world text as SFT records: lexicon lists, train prompts and answers
  (separately, shuffled), `docs_per_record` documents per assistant turn."""
  rng = np.random.default_rng(seed)
  docs = {lang: [] for lang in languages}
  for lang in languages:
    for cat in ("numbers", "days", "colours", "nouns", "names"):
      words = list(lexicon.LEXICON[lang][cat])
      for _ in range(3):
        docs[lang].append(lexicon.LIST_SEPARATORS.get(lang, ", ").join(words))
        rng.shuffle(words)
  for r in synthetic.make_split("train", n_per_language, seed, tuple(languages), tuple(tasks)):
    docs[r.language] += [r.messages[0]["content"], r.messages[1]["content"]]
  out = []
  for lang in languages:
    d = docs[lang]
    order = rng.permutation(len(d))
    for k in range(0, len(d), docs_per_record):
      text = "\n".join(d[i] for i in order[k:k + docs_per_record])
      out.append(records.SFTRecord(id=f"pretrain:{lang}:{k}", language=lang, messages=(
          {"role": "user", "content": DOC_USER}, {"role": "assistant", "content": text})))
  return out


def sft_records(languages, tasks, n_per_language: int, seed: int) -> list:
  """Train-split SFT records of `languages` (translation targets among them)."""
  tasks = tuple(tasks)
  if len(languages) < 2:  # no target language to translate into
    tasks = tuple(t for t in tasks if t != "translate")
  return synthetic.make_split("train", n_per_language, seed, tuple(languages), tasks)


# --------------------------------------------------------------- artifacts


def build_tokenizer(out_dir: str, languages, vocab_size: int = 0, seed: int = 0):
  """The world's tokenizer trained on the text of `languages` only."""
  texts = list(synthetic.world_corpus(16, seed, tuple(languages)))
  n_chars = len(set("".join(texts)))
  if not vocab_size:
    vocab_size = -(-(n_chars + 264 + 384) // 64) * 64
  return formatting.train_tokenizer(texts, out_dir, vocab_size=vocab_size, seed=seed)


def _sft_config(config, init: str, train_path: str, tok_dir: str, steps: int, lr: float):
  c = sft.default_config()
  c.seed = config.seed
  c.model.init = init
  c.tokenizer = tok_dir
  c.data.train = (train_path,)
  common.set_schedule(c, steps, lr, config.data.batch_size, config.data.seq_len,
                      warmup_steps=max(1, min(50, steps // 10)), log_every=max(1, steps // 10),
                      checkpoint_every=max(100, steps // 2))
  c.optim.weight_decay = 0.0
  c.loop.seed = config.seed
  c.mesh.shape = tuple(config.mesh.shape)
  c.export_hf = bool(config.export_hf)
  return c


def _train(config, directory: str, recs: list, init: str, tok_dir: str, steps: int,
           lr: float, tokenizer) -> dict:
  """SFT of `init` on `recs` into directory/params (and hf/); the step's outputs.
  The SFT checkpoints (kept while it runs, to resume a killed run) go at the end."""
  path = os.path.join(directory, "train.jsonl")
  records.write_jsonl(path, recs)
  sft.run(_sft_config(config, init, path, tok_dir, steps, lr), directory)
  if config.export_hf:
    tokenizer.save_pretrained(os.path.join(directory, "hf"))
  shutil.rmtree(os.path.join(directory, "checkpoints"), ignore_errors=True)
  return dict(params=os.path.join(directory, "params"),  # stale without its config file
              config=os.path.join(directory, "params", checkpoint.MODEL_CONFIG))


def _init_params(config, directory: str, tokenizer) -> str:
  m = config.model
  cfg = model_config.tiny(m.family, vocab_size=len(tokenizer), d_model=m.d_model,
                          n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                          head_dim=m.head_dim, d_ff=m.d_ff, max_seq_len=m.max_seq_len,
                          pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id,
                          eos_ids=formatting.end_of_turn_ids(tokenizer))
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  params = sharding.init_params_sharded(cfg, jax.random.key(config.seed), mesh,
                                        axes.rules("fsdp"))
  return checkpoint.save_params(os.path.join(directory, "init"), cfg, params)


def bootstrap(workdir: str, config=None) -> dict:
  """Builds (or reuses) every artifact; returns their paths, the report and
  `trained` (the steps run by this call) with `seconds` per step run."""
  config = config or default_config()
  runner = artifacts.Runner(workdir, label="world")
  langs, tasks = tuple(config.languages), tuple(config.tasks)
  fams = families(config)

  def tokenizer_step(directory):
    build_tokenizer(directory, langs, config.vocab_size, config.seed)
    return dict(dir=directory, config=os.path.join(directory, "tokenizer_config.json"))

  tok_spec = dict(vocab_size=config.vocab_size, seed=config.seed, languages=langs)
  tok_out, tok_hash = runner.step("tokenizer", tok_spec, tokenizer_step)
  tok_dir = tok_out["dir"]
  tok = formatting.load_tokenizer(tok_dir)

  def base_step(directory):
    init = _init_params(config, directory, tok)
    recs = pretrain_records(langs, tasks, config.pretrain.n_per_language, config.seed)
    return _train(config, directory, recs, init, tok_dir, config.pretrain.steps,
                  config.pretrain.lr, tok)

  base_spec = dict(tokenizer=tok_hash, model=config.model.to_dict(), data=config.data.to_dict(),
                   pretrain=config.pretrain.to_dict(), languages=langs, tasks=tasks,
                   seed=config.seed)
  base_out, base_hash = runner.step("base", base_spec, base_step)
  base = base_out["params"]

  models = {f"teachers/{name}": (fam, config.teacher) for name, fam in fams.items()}
  models["weak"] = (tuple(config.weak_languages), config.weak)
  params, hashes = {}, {}
  for name, (fam, block) in models.items():

    def model_step(directory, fam=fam, block=block):
      recs = sft_records(fam, tasks, block.n_per_language, config.seed)
      return _train(config, directory, recs, base, tok_dir, block.steps, block.lr, tok)

    spec = dict(base=base_hash, languages=fam, tasks=tasks, train=block.to_dict(),
                data=config.data.to_dict(), seed=config.seed)
    out, hashes[name] = runner.step(name, spec, model_step)
    params[name] = out["params"]

  paths = dict(tokenizer=tok_dir, base=base, weak=params["weak"],
               teachers={n[len("teachers/"):]: p for n, p in params.items()
                         if n.startswith("teachers/")})
  if config.export_hf:
    paths["teachers_hf"] = {n: os.path.join(os.path.dirname(p), "hf")
                            for n, p in paths["teachers"].items()}

  def report_step(directory):
    del directory
    scored = dict(base=base, weak=paths["weak"],
                  **{f"teacher_{n}": p for n, p in paths["teachers"].items()})
    return dict(report=score_models(config, scored, tok_dir, fams))

  report_spec = dict(models=hashes, base=base_hash, report=config.report.to_dict())
  report = runner.step("report", report_spec, report_step)[0]["report"]
  _write_report_views(workdir, report)
  return dict(paths, report=report, trained=list(runner.ran), seconds=dict(runner.seconds))


def _write_report_views(workdir: str, report: dict):
  """world_report.json and .md: views of the report the step state keeps,
  (re)written whenever they do not hold it (a torn or deleted file)."""
  path = os.path.join(workdir, "world_report.json")
  if atomic.read_json_cache(path, "world report") != report:
    atomic.write_json(path, report, indent=1)
    atomic.write_text(os.path.join(workdir, "world_report.md"), report_markdown(report))


def score_models(config, model_paths: dict, tok_dir: str, fams: dict) -> dict:
  """Mean verifier score per language (validation split, greedy) of each model,
  and for each teacher its mean over own-family and other languages."""
  langs = tuple(config.languages)
  prompts = world_evaluate.world_prompts("valid", config.report.n_per_language, langs,
                                     tuple(config.tasks), config.seed)
  scores = {}
  for name, path in model_paths.items():
    model = evaluation.Model(name, path, tok_dir, max_new_tokens=config.report.max_new_tokens,
                             batch_size=config.report.batch_size, seed=config.seed)
    v = world_evaluate.verifier_scores(prompts, model.answer(prompts))
    scores[name] = {lang: float(x.mean()) for lang, x in evaluation.by_language(prompts, v).items()}
  family = {}
  for name, fam in fams.items():
    s = scores[f"teacher_{name}"]
    own = [s[l] for l in langs if l in fam]
    other = [s[l] for l in langs if l not in fam]
    family[name] = dict(languages=list(fam), own=float(np.mean(own)),
                        other=float(np.mean(other)) if other else None)
  return dict(languages=list(langs), tasks=list(config.tasks),
              n_per_language=config.report.n_per_language, scores=scores, families=family)


def report_markdown(report: dict) -> str:
  langs = report["languages"]
  lines = ["| model | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
  for name, s in report["scores"].items():
    lines.append(f"| {name} | " + " | ".join(f"{s[l]:.2f}" for l in langs) + " |")
  lines += ["", "| teacher | family | own | other |", "|---|---|---|---|"]
  for name, f in report["families"].items():
    other = "-" if f["other"] is None else f"{f['other']:.3f}"
    lines.append(f"| {name} | {','.join(f['languages'])} | {f['own']:.3f} | {other} |")
  return "\n".join(lines) + "\n"


def run(config, workdir: str) -> dict:
  out = bootstrap(workdir, config)
  logging.info("world: trained %s in %s; report in %s", out["trained"],
               {k: round(v, 1) for k, v in out["seconds"].items()},
               os.path.join(workdir, "world_report.md"))
  logging.info("world report:\n%s", report_markdown(out["report"]))
  return out
