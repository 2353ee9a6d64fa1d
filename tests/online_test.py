"""Online iterative DPO, CoPG, RLOO, GRPO and Dr. GRPO: a scorer that prefers answers containing
'red' makes a policy that says 'red' or 'cat' (50/50 after SFT) say 'red'
more often, round after round; per-iteration artefacts; resume; the merge
step between iterations (reference: `pytree.merge` and the linear formula
sum_i w_i x_i / sum_i w_i written out by hand)."""

import json
import os

import jax
import numpy as np
import pytest

from aya_jax import checkpoint, config_files
from aya_jax.data import formatting, records
from aya_jax.merging import pytree
from aya_jax.train import online, rounds, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 16


class LikesRed:
  """A Scorer: 1 for answers containing 'red', else 0."""

  def score(self, recs):
    return np.asarray([float("red" in r.completion) for r in recs], np.float32)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
  d = tmp_path_factory.mktemp("online")
  rows = []
  for i in range(N):
    for j, ans in enumerate(("red", "cat")):
      rows.append({"id": f"p{i}_{j}", "language": "en" if i % 2 else "fr", "messages": [
          {"role": "user", "content": f"name a thing number {i}"},
          {"role": "assistant", "content": ans}]})
  (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
  formatting.train_tokenizer([f"name a thing number {i}" for i in range(N)] + ["red", "cat"] * 8,
                             str(d / "tok"), vocab_size=300)
  c = sft.default_config()
  c.tokenizer, c.data.train = str(d / "tok"), (str(d / "sft.jsonl"),)
  c.data.seq_len, c.data.batch_size, c.data.pack = 32, 8, False
  c.optim.lr, c.optim.warmup_steps, c.optim.total_steps = 1e-2, 3, 40
  c.loop.num_steps, c.loop.log_every, c.loop.checkpoint_every = 40, 10, 100
  c.mesh.shape = (8, 1, 1)
  sft.run(c, str(d / "sft"))
  return d


def _config(d, algorithm):
  mod = config_files.load_module(os.path.join(ROOT, "configs/online_dpo.py"))
  c = mod.get_config()
  c.tokenizer, c.model.init = str(d / "tok"), str(d / "sft" / "params")
  c.data.prompts = (str(d / "prompts.jsonl"),)
  c.data.seq_len, c.data.batch_size = 32, 8
  c.online.algorithm, c.online.iterations, c.online.k = algorithm, 2, 4
  c.online.max_new_tokens, c.online.sample_batch = 6, 16
  c.online.betas = (0.5,)
  c.optim.lr, c.optim.warmup_steps, c.optim.total_steps = 2e-3, 1, 8
  c.dpo.rpo_alpha = 1.0  # keeps the chosen answers (and their end of turn) likely
  c.loop.num_steps, c.loop.log_every, c.loop.checkpoint_every = 8, 4, 100
  c.mesh.shape = (8, 1, 1)
  return c


@pytest.mark.parametrize("algorithm", ["dpo", "copg", "rloo", "grpo", "dr_grpo"])
def test_online_rounds_raise_the_preferred_property(sft_model, tmp_path, algorithm):
  c = _config(sft_model, algorithm)
  _, reports = online.run(c, str(tmp_path), scorer=LikesRed())
  scores = [r["mean_score"] for r in reports]
  print(algorithm, [{k: round(v, 3) for k, v in r.items()} for r in reports])
  assert 0.2 < scores[0] < 0.8  # the SFT policy says red about half the time
  assert scores[-1] > scores[0] + 0.2
  assert reports[1]["win_rate_vs_prev"] > 0.5
  for key in ("mean_length", "frac_no_stop", "mean_score/en", "win_rate_vs_prev/fr"):
    assert key in reports[-1]
  assert (tmp_path / "iter_0" / "samples.jsonl").exists()
  assert (tmp_path / "iter_1" / "params" / "model_config.json").exists()
  # merging is off by default: no merge, the final policy is the last iteration's
  assert c.online.merge.method == "" and "merge" not in reports[0]
  assert not (tmp_path / "iter_0" / "merged").exists()
  _assert_trees_equal(_load(tmp_path / "params"), _load(tmp_path / "iter_1" / "params"), 0.0)
  if algorithm == "dpo":
    pairs = records.read_jsonl(tmp_path / "iter_0" / "pairs.jsonl", "preference")
    assert all("red" in p.chosen and "red" not in p.rejected for p in pairs)
  if algorithm == "copg":  # every pair of distinct answers, the higher score chosen
    pairs = records.read_jsonl(tmp_path / "iter_0" / "pairs.jsonl", "preference")
    ids = [p.id.split("#")[0] for p in pairs]
    assert max(ids.count(i) for i in ids) <= 6 and any(ids.count(i) > 1 for i in ids)
    assert all(p.chosen_score >= p.rejected_score and p.chosen != p.rejected for p in pairs)
    assert all("red" in p.chosen for p in pairs if p.chosen_score > p.rejected_score)
  # a second run finds every iteration done: same final report, no training
  _, again = online.run(c, str(tmp_path), scorer=LikesRed())
  assert again[-1]["mean_score"] == pytest.approx(reports[-1]["mean_score"])


def _load(path):
  return jax.device_get(checkpoint.load_model(str(path))[1])


def _assert_trees_equal(a, b, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_merge_step_between_iterations(sft_model, tmp_path):
  """policy_{i+1} = linear(0.7 trained_i, 0.3 policy_i): each iteration starts
  from the previous one's merge, and the final params are the last merge."""
  c = _config(sft_model, "dpo")
  c.online.merge.method, c.online.merge.weights = "linear", (0.7, 0.3)  # policy, previous
  _, reports = online.run(c, str(tmp_path), scorer=LikesRed())
  assert [r.get("merge") for r in reports] == ["linear(policy 0.7, previous 0.3)"] * 2 + [None]
  previous = _load(sft_model / "sft" / "params")
  for i in range(2):
    trained, merged = _load(tmp_path / f"iter_{i}" / "params"), _load(
        tmp_path / f"iter_{i}" / "merged")
    want = pytree.merge("linear", [trained, previous],
                         model_parameters=[{"weight": 0.7}, {"weight": 0.3}])
    _assert_trees_equal(merged, want, 1e-7)
    _assert_trees_equal(merged, jax.tree.map(lambda t, p: (0.7 * t + 0.3 * p) / 1.0, trained,
                                             previous), 1e-6)
    moved = max(float(np.max(np.abs(t - p))) for t, p in zip(jax.tree.leaves(trained),
                                                             jax.tree.leaves(previous)))
    assert moved > 1e-3  # the iteration trained, so the merge is not the identity
    previous = merged
  _assert_trees_equal(_load(tmp_path / "params"), previous, 0.0)


def test_online_k_below_two_is_an_error(sft_model, tmp_path):
  c = _config(sft_model, "rloo")
  c.online.k = 1
  with pytest.raises(ValueError, match="online.k=1"):
    online.run(c, str(tmp_path), scorer=LikesRed())


def test_rloo_kl_is_to_the_fixed_reference(sft_model, tmp_path):
  """The pipeline runs one iteration per call, starting each from the last
  round's policy: the KL must be to the reference it names (dpo.reference_init),
  not to the round's own start (where it is 0 and kl_coef has no effect)."""
  def round_2(name, kl_coef, reference):
    c = _config(sft_model, "rloo")
    c.online.iterations, c.online.kl_coef = 1, kl_coef
    c.model.init, c.dpo.reference_init = str(tmp_path / "round_1" / "params"), reference
    c.loop.num_steps = c.optim.total_steps = 2
    return online.run(c, str(tmp_path / name), scorer=LikesRed())[1][0]

  c = _config(sft_model, "rloo")
  c.online.iterations = 1
  online.run(c, str(tmp_path / "round_1"), scorer=LikesRed())  # the policy moves off the SFT
  sft_params = str(sft_model / "sft" / "params")
  own = round_2("own", 0.5, "")  # reference = the round's own start: KL exactly 0
  assert own["mean_kl"] == 0.0 and own["mean_reward"] == pytest.approx(own["mean_score"])
  weak, strong = round_2("kl0", 0.0, sft_params), round_2("kl1", 1.0, sft_params)
  assert weak["mean_kl"] == pytest.approx(strong["mean_kl"]) and weak["mean_kl"] > 0.01
  assert weak["mean_reward"] == pytest.approx(weak["mean_score"])
  assert strong["mean_reward"] == pytest.approx(strong["mean_score"] - strong["mean_kl"],
                                                abs=1e-5)


def test_families_train_from_the_same_policy_and_merge_equally(sft_model, tmp_path):
  """online.families: each family's policy trains on its languages' prompts from pi_i,
  and pi_{i+1} is their equal-weight linear merge (Aya Expanse's per-family rounds)."""
  c = _config(sft_model, "dpo")
  c.online.iterations, c.online.families = 1, "fr_only:fr;en_only:en"
  _, reports = online.run(c, str(tmp_path), scorer=LikesRed())
  fams = reports[0]["families"]
  assert set(fams) == {"fr_only", "en_only"} and set(reports[1]) >= {"mean_score"}
  for name, lang in (("fr_only", "fr"), ("en_only", "en")):
    samples = records.read_jsonl(tmp_path / "iter_0" / name / "samples.jsonl", "completion")
    assert {r.language for r in samples} == {lang}  # its languages' prompts only
    assert fams[name]["n_pairs"] > 0
  a, b = (_load(tmp_path / "iter_0" / name / "params") for name in ("fr_only", "en_only"))
  want = jax.tree.map(lambda x, y: (x + y) / 2, a, b)
  _assert_trees_equal(_load(tmp_path / "iter_0" / "params"), want, 1e-6)
  _assert_trees_equal(_load(tmp_path / "params"), want, 1e-6)
  with pytest.raises(ValueError, match="family de_only .* has no prompts"):
    rounds.family_prompts("de_only:de", [records.PromptRecord(
        "a", "en", ({"role": "user", "content": "q"},))])


@pytest.mark.parametrize("algorithm", ["dpo", "rloo"])
def test_online_lora_rounds_train_adapters_on_the_frozen_base(sft_model, tmp_path, algorithm):
  """LoRA in the online rounds: the adapters carry over from round to round (the reference
  of the next DPO round is the policy with its adapters, on the same base), and each
  iteration's params/ holds adapters naming the SFT model."""
  from aya_jax.models import lora
  c = _config(sft_model, algorithm)
  c.lora.rank, c.lora.alpha = 16, 16.0
  c.optim.lr = 1e-2 if algorithm == "dpo" else 5e-3
  _, reports = online.run(c, str(tmp_path), scorer=LikesRed())
  scores = [r["mean_score"] for r in reports]
  # slower than full fine-tuning here: the adapters cannot touch the output embedding,
  # which is what moves 'red' against 'cat' most directly
  assert scores[-1] > scores[0] + 0.1, scores
  assert reports[-1]["frac_no_stop"] < 0.1
  for it in ("iter_0", "iter_1"):
    base = json.load(open(tmp_path / it / "params" / "base.json"))["path"]
    assert base == str(sft_model / "sft" / "params")
  raw_cfg, own = checkpoint.load_params(str(tmp_path / "params"))
  assert set(own) == {lora.KEY} and raw_cfg.lora.rank == 16
  cfg, merged = checkpoint.load_model(str(tmp_path / "params"))
  _, sft_params = checkpoint.load_model(str(sft_model / "sft" / "params"))
  want_cfg, want = lora.merge(raw_cfg, {**sft_params, **own})
  _assert_trees_equal(merged, want, 1e-6)
  # a second run reuses every iteration: same final report
  _, again = online.run(c, str(tmp_path), scorer=LikesRed())
  assert again[-1]["mean_score"] == pytest.approx(reports[-1]["mean_score"])


def test_online_lora_family_and_policy_merges_make_a_new_base(sft_model, tmp_path):
  """With LoRA, merging whole policies (the families' linear merge, then online.merge) works
  on the merged weights (base + scale * A B): the result is the next round's base with fresh
  adapters, and params/ from then on hold the whole tree."""
  from aya_jax.models import lora
  c = _config(sft_model, "dpo")
  c.lora.rank, c.lora.alpha = 8, 16.0
  c.optim.lr = 1e-2
  c.online.iterations, c.online.families = 1, "fr_only:fr;en_only:en"
  c.online.merge.method, c.online.merge.weights = "linear", (0.5, 0.5)  # policy, previous
  _, reports = online.run(c, str(tmp_path), scorer=LikesRed())
  assert reports[0]["merge"] == "linear(policy 0.5, previous 0.5)"
  # each family's adapters name the SFT model (the base of round 0)
  a, b = (_load(tmp_path / "iter_0" / name / "params") for name in ("fr_only", "en_only"))
  assert checkpoint.is_adapter_dir(str(tmp_path / "iter_0" / "fr_only" / "params"))
  want = jax.tree.map(lambda x, y: (x + y) / 2, a, b)
  family_merge = _load(tmp_path / "iter_0" / "params")
  _assert_trees_equal(family_merge, want, 1e-6)
  sft_params = _load(sft_model / "sft" / "params")
  _assert_trees_equal(_load(tmp_path / "iter_0" / "merged"),
                      jax.tree.map(lambda p, s: 0.5 * p + 0.5 * s, family_merge, sft_params),
                      1e-6)
  # the final params/: the whole tree (a merged base and the adapters), merged when loaded
  assert not checkpoint.is_adapter_dir(str(tmp_path / "params"))
  raw_cfg, raw = checkpoint.load_params(str(tmp_path / "params"))
  assert lora.KEY in raw and raw_cfg.lora.rank == 8
  cfg, merged = checkpoint.load_model(str(tmp_path / "params"))
  assert cfg.lora is None
  _assert_trees_equal(merged, lora.merge(raw_cfg, raw)[1], 1e-6)


def test_capped_rounds_without_a_final_pass(sft_model, tmp_path):
  """online.prompts_per_language draws that many prompts per language in each round (with
  the round's seed: other prompts each round); final_pass=False samples no last round."""
  c = _config(sft_model, "dpo")
  c.online.prompts_per_language, c.online.final_pass = 3, False
  _, reports = online.run(c, str(tmp_path), scorer=LikesRed())
  assert [r["round"] for r in reports] == [0, 1] and not (tmp_path / "iter_2").exists()
  prompts = records.read_prompts(sft_model / "prompts.jsonl")
  drawn = []
  for i in range(2):
    want = rounds.round_prompts(prompts, 3, c.seed + i)
    assert sorted(p.language for p in want) == ["en"] * 3 + ["fr"] * 3
    got = {r.id.split("#")[0]  # '<prompt id>#it<i>s<j>'
           for r in records.read_jsonl(tmp_path / f"iter_{i}" / "samples.jsonl", "completion")}
    assert got and got <= {p.id for p in want}
    drawn.append({p.id for p in want})
  assert drawn[0] != drawn[1]

