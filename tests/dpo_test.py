"""Offline DPO: pair batches, learning on a toy preference set, the cached
reference (reuse, invalidation, same trajectory as live), TR-DPO sync,
chunked log-probs, 8 devices == 1 device."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax import axes, checkpoint, config_files, sharding
from aya_jax.data import formatting
from aya_jax.data import pairs as pp
from aya_jax.data import records
from aya_jax.metrics import read_metrics
from aya_jax.train import common, dpo, pair_logps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = ["red", "blue", "green", "yellow", "purple", "orange"]
BAD = ["cat", "dog", "fish", "horse", "mouse", "bird"]
REQUEST = "name a thing"  # SRPO's revision request, in the toy tokenizer's words


def _pairs(lo, hi, lang):
  out = []
  for i in range(lo, hi):
    out.append(records.PreferenceRecord(
        id=f"{lang}{i}", language=lang,
        prompt=({"role": "user", "content": (f"name a thing number {i}" if lang == "en"
                                             else f"nomme une chose {i}")},),
        chosen=f"{GOOD[i % 6]} {GOOD[(i // 6) % 6]}", rejected=f"{BAD[(i * 5) % 6]} {BAD[i % 6]}",
        chosen_score=1.0, rejected_score=0.0, source="toy"))
  return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  d = tmp_path_factory.mktemp("dpo")
  train = _pairs(0, 24, "en") + _pairs(0, 24, "fr")
  held = _pairs(40, 52, "en") + _pairs(40, 52, "fr")
  records.write_jsonl(d / "train.jsonl", train)
  records.write_jsonl(d / "eval.jsonl", held)
  corpus = [f"name a thing number {i}" for i in range(60)] + [
      f"nomme une chose {i}" for i in range(60)] + GOOD * 5 + BAD * 5
  formatting.train_tokenizer(corpus, str(d / "tok"), vocab_size=300)
  return d


def _config(d, steps=30, name="dpo.py"):
  mod = config_files.load_module(os.path.join(ROOT, "configs", name))
  c = mod.get_config()
  c.tokenizer = str(d / "tok")
  c.data.train, c.data.eval = (str(d / "train.jsonl"),), (str(d / "eval.jsonl"),)
  c.data.seq_len, c.data.batch_size = 40, 8
  c.optim.lr, c.optim.warmup_steps, c.optim.total_steps = 3e-3, 2, steps
  c.loop.num_steps, c.loop.log_every, c.loop.checkpoint_every = steps, 1, 100
  c.mesh.shape = (8, 1, 1)
  c.dpo.beta = 0.5
  return c


def test_pair_batch_shares_the_prompt_and_matches_sft_tokenisation(toy):
  tok = formatting.load_tokenizer(str(toy / "tok"))
  rec = _pairs(3, 4, "en")[0]
  pairs, stats = pp.tokenize_pairs([rec], tok, 48)
  b = pp.pair_batch(pairs, 48, 0, ("en",), [0])
  assert b["tokens"].shape == (1, 2, 48) and stats.n_pairs == 1 and stats.n_truncated == 0
  n_prompt = len(pairs[0].prompt)
  np.testing.assert_array_equal(b["tokens"][0, 0, :n_prompt], b["tokens"][0, 1, :n_prompt])
  # exactly SFT's tokens and loss mask for the conversation prompt + chosen
  sft = formatting.tokenize_chat(tok, list(rec.prompt) + [
      {"role": "assistant", "content": rec.chosen}])
  n = len(sft.tokens)
  np.testing.assert_array_equal(b["tokens"][0, 0, :n], sft.tokens)
  np.testing.assert_array_equal(b["loss_mask"][0, 0, :n - 1], sft.loss_mask[1:])
  assert b["loss_mask"][0, 0].sum() == len(pairs[0].chosen)


def test_dpo_stage_learns_held_out_preferences(toy, tmp_path):
  c = _config(toy)
  dpo.run(c, str(tmp_path))
  logged = read_metrics(str(tmp_path))
  assert logged[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
  ev = json.load(open(tmp_path / "eval_metrics.json"))
  ref = np.load(next((tmp_path / "ref_logps").glob("*.npz")))
  print("eval", {k: round(v, 3) for k, v in ev.items()})
  assert ev["rewards/accuracies"] > 0.9
  assert ev["rewards/accuracies/en"] > 0.9 and ev["rewards/accuracies/fr"] > 0.9
  assert ev["rewards/margins"] > 1.0
  assert ev["logps/margin"] > ev["ref_logps/margin"] + 5.0  # chosen - rejected log-prob
  lang_log = [json.loads(l) for l in open(tmp_path / "metrics_language.jsonl")]
  assert "rewards/accuracies/fr" in lang_log[-1]
  cfg, params = checkpoint.load_model(str(tmp_path / "params"))
  assert cfg.vocab_size == 300
  del ref, params


def test_copg_stage_regresses_the_log_ratio_margin_onto_the_score_gap(toy, tmp_path):
  """CoPG's optimum is beta * delta = chosen_score - rejected_score (here 1): the first
  loss is that gap squared (policy == reference), the held-out reward margin ends near 1
  (where sigmoid DPO's keeps growing), and a pair without scores is an error naming it."""
  c = _config(toy, steps=40, name="copg.py")
  assert c.dpo.loss_type == "copg"
  dpo.run(c, str(tmp_path / "copg"))
  assert read_metrics(str(tmp_path / "copg"))[0]["dpo_loss"] == pytest.approx(1.0, abs=1e-5)
  ev = json.load(open(tmp_path / "copg" / "eval_metrics.json"))
  print("copg eval", {k: round(v, 3) for k, v in ev.items()})
  assert ev["rewards/accuracies"] > 0.9 and 0.6 < ev["rewards/margins"] < 1.4
  rec = _pairs(0, 2, "en")
  rec[1] = records.PreferenceRecord(**{**rec[1].to_dict(), "chosen_score": None})
  records.write_jsonl(tmp_path / "unscored.jsonl", rec)
  c.data.train, c.data.eval = (str(tmp_path / "unscored.jsonl"),), ()
  with pytest.raises(ValueError, match=r"1 train pair\(s\) without .*'en1'"):
    dpo.run(c, str(tmp_path / "unscored"))


def test_srpo_stage_trains_the_answer_and_the_revision(toy, tmp_path):
  """SRPO: 5 rows per pair (answers and revisions); at policy == reference both
  regressions sit at -1/(2 beta), so the first loss is (1/(2 beta))^2 = 1; training
  brings the held-out loss down; the model revises a wrong draft into a right answer."""
  from aya_jax import evaluation
  c = _config(toy, steps=40, name="srpo.py")
  assert c.dpo.loss_type == "srpo"
  c.data.seq_len = 64
  c.dpo.revision_request = REQUEST
  dpo.run(c, str(tmp_path))
  assert read_metrics(str(tmp_path))[0]["dpo_loss"] == pytest.approx(1.0, abs=1e-5)
  ev = json.load(open(tmp_path / "eval_metrics.json"))
  assert ev["loss"] < 0.3 and ev["rewards/accuracies"] > 0.9
  assert sorted(np.load(f)["logps"].shape for f in (tmp_path / "ref_logps").glob("*.npz")) \
      == [(24, 5), (48, 5)]  # held-out and train pairs, 5 rows each
  # the reviser prefers turning the rejected draft into the chosen answer over keeping it
  cfg, params = checkpoint.load_model(str(tmp_path / "params"))
  _, _, ref_params, _, mesh, rules = _setup(toy, n_dev=1)
  tok = formatting.load_tokenizer(str(toy / "tok"))
  held, _ = pp.tokenize_pairs(_pairs(40, 52, "en"), tok, 64, revision_request=REQUEST)
  kw = dict(seq_len=64, batch_size=8, pad_id=0, mesh=mesh, rules=rules)
  pol = pair_logps.compute_pair_logps(cfg, params, held, ("en",), **kw)[0]
  ref = pair_logps.compute_pair_logps(cfg, ref_params, held, ("en",), **kw)[0]
  h = pol - ref
  assert np.mean(h[:, 2] - h[:, 3] > 0) > 0.9
  # revisions=1 answers = the model's answers to the revision prompt of its own drafts
  prompts = [records.PromptRecord(p.id, p.language, p.prompt) for p in _pairs(40, 44, "en")]
  model = evaluation.Model("srpo", tmp_path / "params", toy / "tok", max_new_tokens=6)
  drafts = model.answer(prompts)
  by_hand = model.answer([records.PromptRecord(p.id, p.language, tuple(
      formatting.revision_messages(p.messages, d, REQUEST))) for p, d in zip(prompts, drafts)])
  again = evaluation.Model("srpo", tmp_path / "params", toy / "tok", max_new_tokens=6,
                           revisions=1, revision_request=REQUEST)
  assert again.answer(prompts) == [b if d else d for b, d in zip(by_hand, drafts)]
  # the RPO term's tokens: the chosen answer, answered and revised from the rejected draft
  srpo_pairs = _setup_srpo(toy)[2]
  norm = dpo.pair_normalizer(pp.pair_batch(srpo_pairs, 64, 0, ("en",)))
  assert float(norm["chosen_tokens"]) == sum(len(p.chosen) + len(p.revisions[0][1])
                                             for p in srpo_pairs)
  with pytest.raises(ValueError, match="revision rows"):
    c.dpo.loss_type = "sigmoid"
    dpo.train_dpo(c, str(tmp_path / "x"), *_setup_srpo(toy))


def _setup_srpo(toy):
  """(cfg, params, SRPO-tokenised pairs, mesh, rules) of the toy model."""
  _, cfg, params, _, mesh, rules = _setup(toy, n_dev=1)
  tok = formatting.load_tokenizer(str(toy / "tok"))
  pairs, _ = pp.tokenize_pairs(_pairs(0, 4, "en"), tok, 64, revision_request=REQUEST)
  return cfg, params, pairs, mesh, rules


def _setup(toy, n_dev=8, **over):
  c = _config(toy, steps=4)
  for k, v in over.items():
    setattr(c.dpo, k, v)
  tok = formatting.load_tokenizer(str(toy / "tok"))
  mesh = sharding.make_mesh((n_dev, 1, 1), jax.devices()[:n_dev])
  rules = axes.rules("fsdp")
  cfg, params = common.setup_model(c.model, len(tok), mesh, rules, 0, pad_id=0, bos_id=1,
                                    eos_ids=formatting.end_of_turn_ids(tok))
  pairs, _ = pp.tokenize_pairs(records.read_jsonl(toy / "train.jsonl", "preference"), tok, 40)
  return c, cfg, params, pairs, mesh, rules


def test_reference_cache_reused_and_invalidated(toy, tmp_path):
  c, cfg, params, pairs, mesh, rules = _setup(toy)
  kw = dict(seq_len=40, batch_size=8, pad_id=0, mesh=mesh, rules=rules, vocab_chunk=0,
            cache_dir=str(tmp_path))
  langs = ("en", "fr")
  a, path_a, hit = pair_logps.cached_reference_logps(cfg, params, pairs, langs, **kw)
  assert not hit
  b, path_b, hit = pair_logps.cached_reference_logps(cfg, params, pairs, langs, **kw)
  assert hit and path_b == path_a
  np.testing.assert_array_equal(a, b)
  _, path_c, hit = pair_logps.cached_reference_logps(cfg, params, pairs[:-1], langs, **kw)  # data
  assert not hit and path_c != path_a
  other = jax.tree.map(lambda x: x * 1.001, params)  # reference
  _, path_d, hit = pair_logps.cached_reference_logps(cfg, other, pairs, langs, **kw)
  assert not hit and path_d not in (path_a, path_c)
  assert len(os.listdir(tmp_path)) == 3


def _train(toy, workdir, n_dev=8, stop_after=None, **over):
  c, cfg, params, pairs, mesh, rules = _setup(toy, n_dev, **over)
  out, _ = dpo.train_dpo(c, str(workdir), cfg, params, pairs, mesh, rules, stop_after=stop_after)
  return out, read_metrics(str(workdir))


def _close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol),
               a, b)


def test_cached_reference_gives_the_live_trajectory_and_resumes(toy, tmp_path):
  cached, m1 = _train(toy, tmp_path / "cached")
  live, m2 = _train(toy, tmp_path / "live", reference="live")
  _close(cached, live)
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m2], rtol=1e-5)
  with pytest.raises(dpo.loop_lib.Preempted):
    _train(toy, tmp_path / "killed", stop_after=2)
  resumed, _ = _train(toy, tmp_path / "killed")
  _close(cached, resumed, atol=0)


def test_eight_devices_equal_one(toy, tmp_path):
  one, m1 = _train(toy, tmp_path / "one", n_dev=1)
  eight, m8 = _train(toy, tmp_path / "eight", n_dev=8)
  _close(one, eight, atol=2e-5)
  np.testing.assert_allclose(m1[-1]["rewards/margins"], m8[-1]["rewards/margins"], rtol=1e-3)


def test_rpo_term_and_chunked_logps(toy, tmp_path):
  _, m = _train(toy, tmp_path / "rpo", rpo_alpha=1.0)
  assert m[0]["nll_loss"] > 1.0
  assert m[0]["loss"] == pytest.approx(m[0]["dpo_loss"] + m[0]["nll_loss"], rel=1e-5)
  c, cfg, params, pairs, mesh, rules = _setup(toy, 1)
  kw = dict(seq_len=40, batch_size=8, pad_id=0, mesh=mesh, rules=rules)
  full = pair_logps.compute_pair_logps(cfg, params, pairs[:8], ("en", "fr"), **kw)
  chunked = pair_logps.compute_pair_logps(cfg, params, pairs[:8], ("en", "fr"), vocab_chunk=64, **kw)
  np.testing.assert_allclose(full[0], chunked[0], rtol=1e-5)
  np.testing.assert_array_equal(full[1], chunked[1])


def test_tr_dpo_sync_moves_the_reference():
  tx = dpo.reference_sync(alpha=0.25, every=2)
  p = {"w": jnp.asarray([1.0, 2.0])}
  state = tx.init(p)
  u = {"w": jnp.asarray([1.0, 1.0])}
  _, state = tx.update(u, state, p)           # update 1: no sync
  np.testing.assert_allclose(state.ref["w"], [1.0, 2.0])
  _, state = tx.update(u, state, {"w": jnp.asarray([3.0, 3.0])})  # update 2: policy 4, 4
  np.testing.assert_allclose(state.ref["w"], [0.25 * 4 + 0.75 * 1, 0.25 * 4 + 0.75 * 2])


def test_tr_dpo_needs_live_reference_and_runs(toy, tmp_path):
  with pytest.raises(ValueError, match="live"):
    _train(toy, tmp_path / "bad", sync_every=2)
  synced, m = _train(toy, tmp_path / "sync", reference="live", sync_every=2)
  plain, _ = _train(toy, tmp_path / "plain", reference="live")
  assert not np.allclose(np.asarray(synced["embedder"]["embedding"]),
                         np.asarray(plain["embedder"]["embedding"]))


def test_tr_dpo_live_reference_survives_the_donated_state(toy, tmp_path):
  """With TR-DPO the reference moves into the optimizer state, which every step
  donates: the caller's reference arrays (online rounds keep them for later
  rounds and merges) must not be freed with it."""
  c, cfg, params, pairs, mesh, rules = _setup(toy, 8, reference="live", sync_every=2)
  ref = jax.tree.map(jnp.copy, params)
  # of a copy: a host view of ref itself (device_get on CPU) would pin its buffers
  want = jax.device_get(jax.tree.map(jnp.copy, ref))
  dpo.train_dpo(c, str(tmp_path), cfg, params, pairs, mesh, rules, ref_params=ref)
  assert not any(x.is_deleted() for x in jax.tree.leaves(ref))
  _close(jax.device_get(ref), want, atol=0)


def _lora_setup(toy, **over):
  from aya_jax.models import lora
  c, cfg, params, pairs, mesh, rules = _setup(toy, **over)
  c.lora.rank, c.lora.alpha = 8, 16.0
  c.optim.lr = 2e-2
  c.loop.num_steps = c.optim.total_steps = 12
  base = jax.device_get(jax.tree.map(jnp.copy, params))
  lcfg = cfg.replace(lora=lora.from_block(c.lora))
  lp = sharding.add_adapters_sharded(lcfg, params, jax.random.key(1), mesh, rules)
  return c, lcfg, lp, base, pairs, mesh, rules


def test_lora_dpo_reference_is_the_base_with_adapters_off(toy, tmp_path):
  from aya_jax.models import lora
  c, lcfg, lp, base, pairs, mesh, rules = _lora_setup(toy, reference="live")
  out, _ = dpo.train_dpo(c, str(tmp_path / "live"), lcfg, lp, pairs, mesh, rules)
  logged = read_metrics(str(tmp_path / "live"))
  assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"] + 0.5
  # the base came through training byte for byte, and only the adapters moved
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(lora.without_adapters(out)), base)
  assert not lora.adapters_are_fresh(out)
  batch = pp.pair_batch(pairs[:8], 40, 0, ("en", "fr"))
  batch.pop("index")
  mb = jax.tree.map(jnp.asarray, batch)
  fn = pair_logps.pair_logps_fn(lcfg)
  # the reference pass (adapters off) is the base's log-probs
  np.testing.assert_array_equal(fn(lora.without_adapters(out), mb)[0], fn(base, mb)[0])
  assert np.abs(np.asarray(fn(out, mb)[0] - fn(base, mb)[0])).max() > 0.1
  norm = dpo.pair_normalizer(mb)
  off = dpo.dpo_loss_fn(lcfg, c.dpo, ("en", "fr"), 0, dpo.ADAPTERS_OFF)(out, mb, norm, None)
  live = dpo.dpo_loss_fn(lcfg, c.dpo, ("en", "fr"), 0, base)(out, mb, norm, None)
  np.testing.assert_array_equal(off[0], live[0])
  # cached reference log-probs give the same trajectory
  c2, lcfg2, lp2, _, pairs2, _, _ = _lora_setup(toy, reference="cached")
  cached, _ = dpo.train_dpo(c2, str(tmp_path / "cached"), lcfg2, lp2, pairs2, mesh, rules)
  _close(cached, out, atol=2e-5)
  with pytest.raises(ValueError, match="sync_every=0"):
    c3, lcfg3, lp3, _, pairs3, _, _ = _lora_setup(toy, reference="live", sync_every=2)
    dpo.train_dpo(c3, str(tmp_path / "sync"), lcfg3, lp3, pairs3, mesh, rules)
