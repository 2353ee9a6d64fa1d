"""Bradley-Terry loss, the reward-model stage and the reward-model scorer."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax import axes, checkpoint, config_files, losses, reward, sharding
from aya_jax.data import records
from aya_jax.models import tiny
from aya_jax.train import loop, reward_model
from aya_jax.world import tasks as synthetic
from conftest import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  mod = config_files.load_module(os.path.join(ROOT, "configs/reward_model.py"))
  return mod.get_config()


def _softplus(x):
  return math.log1p(math.exp(x))


# ------------------------------------------------------------------ loss


def test_bradley_terry_hand_computed():
  rc, rr = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 0.0, 3.0])
  loss, aux = losses.bradley_terry_loss(rc, rr)
  # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, 0, -1
  want = (_softplus(-1.0) + math.log(2.0) + _softplus(1.0)) / 3
  assert abs(want - 0.7732234) < 1e-6
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(aux["n_pairs"]) == 3 and float(aux["n_correct"]) == 1  # ties are not correct
  np.testing.assert_allclose(aux["margin_sum"], 0.0)
  # margin 0.5 on the first pair; centring: mean((rc + rr)^2) = (1 + 0 + 25) / 3
  loss, aux = losses.bradley_terry_loss(rc, rr, margin=jnp.array([0.5, 0.0, 0.0]),
                                        center_coef=0.1)
  want = (_softplus(-0.5) + math.log(2.0) + _softplus(1.0)) / 3 + 0.1 * 26 / 3
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(aux["center_sum"], 26.0)


def test_bradley_terry_matches_trl_formula():
  """TRL RewardTrainer (docs): -logsigmoid(rc - rr - margin).mean()
  + center_rewards_coefficient * mean((rc + rr)**2), computed in torch."""
  import torch
  rng = np.random.default_rng(0)
  rc, rr, m = (rng.normal(size=7).astype(np.float32) * 3 for _ in range(3))
  t = lambda x: torch.tensor(x)  # noqa: E731
  ref = (-torch.nn.functional.logsigmoid(t(rc) - t(rr) - t(m)).mean()
         + 0.01 * torch.mean((t(rc) + t(rr)) ** 2)).item()
  loss, _ = losses.bradley_terry_loss(rc, rr, margin=m, center_coef=0.01)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_bradley_terry_weights_and_normalizer_accumulate_exactly():
  rng = np.random.default_rng(1)
  rc, rr = rng.normal(size=8), rng.normal(size=8)
  w = np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)
  full, _ = losses.bradley_terry_loss(rc, rr, weights=w, center_coef=0.2)
  n = w.sum()
  a, _ = losses.bradley_terry_loss(rc[:4], rr[:4], weights=w[:4], normalizer=n, center_coef=0.2)
  b, _ = losses.bradley_terry_loss(rc[4:], rr[4:], weights=w[4:], normalizer=n, center_coef=0.2)
  np.testing.assert_allclose(a + b, full, rtol=1e-6)
  keep = w > 0
  ref, _ = losses.bradley_terry_loss(rc[keep], rr[keep], center_coef=0.2)
  np.testing.assert_allclose(full, ref, rtol=1e-6)


# ---------------------------------------------------------------- scorer


def test_setup_reward_model_from_causal_params_dir(tmp_path):
  cfg = tiny("llama", vocab_size=97)
  params = random_params(cfg, 3)
  checkpoint.save_params(str(tmp_path / "p"), cfg, params)
  c = _config()
  c.model.init = str(tmp_path / "p")
  mesh = sharding.make_mesh((2, 4, 1))
  rcfg, rparams = reward_model.setup_reward_model(c.model, 97, mesh, axes.rules("fsdp"), 0)
  assert rcfg.value_head and rparams["value_head"]["kernel"].shape == (48, 1)
  assert "lm_head" not in rparams
  for key in ("embedder", "layers", "final_norm"):
    jax.tree.map(np.testing.assert_array_equal, rparams[key], params[key])


# ----------------------------------------------------------------- stage


def _stage_config(tok_dir):
  """The toy ranking run shared by the stage tests (uninterrupted in `trained`)."""
  c = _config()
  c.tokenizer = tok_dir
  c.synthetic.n_per_language = 40
  c.synthetic.languages = ("en", "fr", "ru", "zh")
  # separable: the answer is in the prompt's language (no translate task)
  c.synthetic.tasks = tuple(t for t in synthetic.TASKS if t != "translate")
  c.data.seq_len = 80
  c.loop.num_steps = c.optim.total_steps = 60
  c.loop.log_every = 10
  c.loop.checkpoint_every = 100  # only at the end (or when stopped)
  c.mesh.shape = (2, 4, 1)
  c.export_hf = True
  return c


@pytest.fixture(scope="module")
def trained(world_tok, tmp_path_factory):
  """(workdir, tokenizer dir) of one uninterrupted reward-model stage run."""
  _, tok_dir = world_tok
  workdir = tmp_path_factory.mktemp("rm_stage")
  reward_model.run(_stage_config(tok_dir), str(workdir))
  return workdir, tok_dir


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(trained):
  workdir, tok_dir = trained
  ev = json.load(open(workdir / "reward_eval.json"))
  assert ev["valid"]["all"]["n"] >= 100
  # two pairs per prompt (gold vs English, gold vs repeated): chance is 0.5
  assert ev["valid"]["all"]["accuracy"] >= 0.9, ev["valid"]
  logged = [json.loads(l) for l in open(workdir / "reward_metrics.jsonl")]
  assert [l["step"] for l in logged] == list(range(10, 61, 10))
  assert logged[-1]["mean_margin"] > logged[0]["mean_margin"] + 1.0
  assert logged[-1]["accuracy"] >= logged[0]["accuracy"]
  assert {"accuracy/fr", "mean_margin/zh"} <= set(logged[-1])
  cfg, _ = checkpoint.load_model(str(workdir / "params"))
  assert cfg.value_head
  # the saved model scores the held-out file as the stage reported
  scorer = reward.RewardModelScorer.load(str(workdir / "params"), tok_dir, max_len=80)
  valid = records.read_jsonl(workdir / "synthetic" / "pairs_valid.jsonl", "preference")
  acc = reward.pair_accuracy(scorer, valid)
  np.testing.assert_allclose(acc["all"]["accuracy"], ev["valid"]["all"]["accuracy"])


@pytest.mark.slow
def test_killed_stage_resumes_to_the_same_params(trained, tmp_path):
  workdir, tok_dir = trained
  c = _stage_config(tok_dir)
  with pytest.raises(loop.Preempted):
    reward_model.run(c, str(tmp_path), stop_after=25)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["25"]
  assert not (tmp_path / "params").exists()
  reward_model.run(c, str(tmp_path))  # the same command again
  _, want = checkpoint.load_model(str(workdir / "params"))
  _, got = checkpoint.load_model(str(tmp_path / "params"))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert (json.load(open(tmp_path / "reward_eval.json")) ==
          json.load(open(workdir / "reward_eval.json")))
  # metrics of the interrupted run: logged before the stop and after the resume
  steps = [json.loads(l)["step"] for l in open(tmp_path / "reward_metrics.jsonl")]
  assert steps == [10, 20, 30, 40, 50, 60]


@pytest.mark.slow
def test_hf_export_matches_transformers_sequence_classification(trained):
  """The stage's hf/ directory, loaded by transformers as
  LlamaForSequenceClassification, gives our RewardModelScorer's rewards."""
  import torch
  import transformers
  workdir, tok_dir = trained
  assert json.load(open(workdir / "hf" / "config.json"))["architectures"] == [
      "LlamaForSequenceClassification"]
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      workdir / "hf", dtype=torch.float32, attn_implementation="eager").eval()
  assert type(model).__name__ == "LlamaForSequenceClassification"
  pairs = records.read_jsonl(workdir / "synthetic" / "pairs_valid.jsonl", "preference")[:12]
  recs = [dict(id=p.id, language=p.language, prompt=p.prompt, completion=a)
          for p in pairs for a in (p.chosen, p.rejected)]
  ours = reward.RewardModelScorer.load(str(workdir / "params"), tok_dir, max_len=80)
  toks = ours.encode_all(recs)[0]
  b = reward.rows(toks, len(toks), max(map(len, toks)), ours.pad_id)  # right-padded
  assert model.config.pad_token_id == ours.pad_id
  with torch.no_grad():
    ref = model(torch.tensor(b["tokens"], dtype=torch.long),
                attention_mask=torch.tensor(b["segment_ids"], dtype=torch.long)).logits
  ref = ref[:, 0].numpy()
  np.testing.assert_allclose(ours.score(recs), ref, rtol=0, atol=1e-4)
  assert np.std(ref) > 0.1  # a trained model: rewards differ
  # our loader reads the HF directory back to the same rewards
  again = reward.RewardModelScorer.load(str(workdir / "hf"), tok_dir, max_len=80)
  np.testing.assert_allclose(again.score(recs), ref, rtol=0, atol=1e-4)


def test_pair_batches_layout_and_exact_resume():
  items = [(np.arange(1, 3 + i % 4, dtype=np.int32), np.arange(5, 7 + i % 3, dtype=np.int32),
            i % 2, 0.5 * i) for i in range(10)]
  it = reward_model.PairBatches(items, 4, 8, pad_id=0, seed=1)
  first = [next(it) for _ in range(3)]
  b = first[0]
  assert b["tokens"].shape == (4, 2, 8) and b["valid"].tolist() == [1, 1, 1, 1]
  i = int(round(b["margin"][0] / 0.5))  # which item went first
  np.testing.assert_array_equal(b["tokens"][0, 0, :len(items[i][0])], items[i][0])
  assert b["segment_ids"][0, 1].sum() == len(items[i][1]) and b["lang"][0] == i % 2
  # every item once per epoch (10 items, batches of 4: the epoch ends mid-batch)
  seen = [int(round(m / 0.5)) for bb in first for m in bb["margin"]][:10]
  assert sorted(seen) == list(range(10))
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = reward_model.PairBatches(items, 4, 8, pad_id=0, seed=1)
  again.set_state(json.loads(json.dumps(state)))
  for a, w in zip([next(again) for _ in range(2)], want):
    jax.tree.map(np.testing.assert_array_equal, a, w)


@pytest.mark.slow
def test_lora_reward_model_trains_adapters_and_value_head(world_tok, tmp_path):
  """A LoRA reward model on a language model: the adapters and the new value head train
  (the base frozen), params/ keeps them naming the base, and load_model's merged model
  scores the held-out pairs as the stage did."""
  from aya_jax.models import lora
  tok, tok_dir = world_tok
  cfg = tiny("llama", vocab_size=len(tok), pad_id=tok.pad_token_id, bos_id=tok.bos_token_id)
  checkpoint.save_params(str(tmp_path / "base"), cfg, random_params(cfg, 5, std=0.05))
  c = _stage_config(tok_dir)
  c.model.init = str(tmp_path / "base")
  c.lora.rank, c.lora.alpha = 8, 16.0
  c.optim.lr = 3e-2
  reward_model.run(c, str(tmp_path / "rm"))
  ev = json.load(open(tmp_path / "rm" / "reward_eval.json"))
  # chance is 0.5 (280 pairs: +-0.03); the base's embeddings are random and frozen
  assert ev["valid"]["all"]["accuracy"] >= 0.65, ev["valid"]
  raw_cfg, own = checkpoint.load_params(str(tmp_path / "rm" / "params"))
  assert set(own) == {lora.KEY, "value_head"} and raw_cfg.value_head
  merged_cfg, _ = checkpoint.load_model(str(tmp_path / "rm" / "params"))
  assert merged_cfg.value_head and merged_cfg.lora is None and not merged_cfg.has_lm_head
  scorer = reward.RewardModelScorer.load(str(tmp_path / "rm" / "params"), tok_dir, max_len=80)
  valid = records.read_jsonl(tmp_path / "rm" / "synthetic" / "pairs_valid.jsonl", "preference")
  acc = reward.pair_accuracy(scorer, valid)
  np.testing.assert_allclose(acc["all"]["accuracy"], ev["valid"]["all"]["accuracy"])
  # the HF export is the merged sequence classifier
  assert json.load(open(tmp_path / "rm" / "hf" / "config.json"))["architectures"] == [
      "LlamaForSequenceClassification"]
  again = reward.RewardModelScorer.load(str(tmp_path / "rm" / "hf"), tok_dir, max_len=80)
  recs = [dict(id=p.id, language=p.language, prompt=p.prompt, completion=p.chosen)
          for p in valid[:8]]
  np.testing.assert_allclose(again.score(recs), scorer.score(recs), atol=1e-4)
