"""Arbitrage: reward-based, fixed and learned routing; resume; bad input."""

import json
import os

import numpy as np
import pytest

from aya_jax import config_files
from aya_jax import reward
from aya_jax.arbitrage import contrast as preference
from aya_jax.arbitrage import routing
from aya_jax.arbitrage import stage as A
from aya_jax.arbitrage import teachers as T
from aya_jax.data import records
from aya_jax.world import tasks as synthetic
from aya_jax.world import translator
from aya_jax.world import verifier
from conftest import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**kw):
  mod = config_files.load_module(os.path.join(ROOT, "configs/arbitrage.py"))
  c = mod.get_config()
  c.synthetic.languages = ("fr", "zh")
  c.synthetic.n_per_language = 30
  for k, v in kw.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _pool(n=2):
  # A is perfect in French and hopeless in Chinese; B the other way round.
  return A.FunctionPool({
      "A": (A.synthetic_teacher({"fr": 1.0, "zh": 0.0}, name="A"), n),
      "B": (A.synthetic_teacher({"fr": 0.0, "zh": 1.0}, name="B"), n)})


def _comp(pid, teacher, j, score, text=None, lang="en"):
  return records.CompletionRecord(
      id=records.completion_id(pid, teacher, j), language=lang,
      prompt=({"role": "user", "content": "q"},), completion=text or f"{teacher}{j}",
      teacher=teacher, score=score)


def _prompt(pid, lang="en"):
  return records.PromptRecord(id=pid, language=lang, messages=({"role": "user", "content": "q"},))


def test_reward_routing_argmax_ties_and_pairs():
  table = {("p1", "A", 0): 0.2, ("p1", "A", 1): 0.9, ("p1", "B", 0): 0.5, ("p1", "B", 1): 0.1,
           ("p2", "A", 0): 0.7, ("p2", "A", 1): 0.3, ("p2", "B", 0): 0.7, ("p2", "B", 1): 0.3,
           ("p3", "A", 0): 0.50, ("p3", "A", 1): 0.45, ("p3", "B", 0): 0.48, ("p3", "B", 1): 0.5}
  scored = [_comp(p, t, j, s) for (p, t, j), s in table.items()]
  prompts = [_prompt("p1"), _prompt("p2"), _prompt("p3"), _prompt("p4")]
  decisions, problems = A.route_by_reward(prompts, scored[::-1], ["A", "B"])
  best = {d.prompt.id: (d.best.teacher, d.best.completion) for d in decisions}
  worst = {d.prompt.id: d.worst.completion for d in decisions}
  assert best == {"p1": ("A", "A1"), "p2": ("A", "A0"), "p3": ("A", "A0")}
  # ties: best -> earlier teacher then lower sample; worst -> the reverse
  assert worst == {"p1": "B1", "p2": "B1", "p3": "A1"}
  assert problems == [{"id": "p4", "problem": "no scored answer (all empty or NaN)"}]
  sft, pairs, skipped = A.extract(decisions, min_gap=0.1)
  assert [s.messages[-1]["content"] for s in sft] == ["A1", "A0", "A0"]
  assert [(p.id, p.chosen, p.rejected) for p in pairs] == [("p1", "A1", "B1"), ("p2", "A0", "B1")]
  assert pairs[0].chosen_score == 0.9 and pairs[0].rejected_score == 0.1
  assert pairs[0].source == A.SOURCE
  assert [s["id"] for s in skipped] == ["p3"]  # gap 0.05 < 0.1
  _, pairs, _ = A.extract(decisions, min_gap={"en": 0.01})
  assert len(pairs) == 3
  # min_score: p2 and p3 (best 0.7, 0.5) keep their SFT record at 0.6 only p2; pairs as before
  sft, pairs, skipped = A.extract(decisions, min_gap=0.1, min_score=0.6)
  assert [s.id for s in sft] == ["p1", "p2"]
  assert [p.id for p in pairs] == ["p1", "p2"]
  assert [(s["id"], s.get("record")) for s in skipped] == [("p3", "sft"), ("p3", None)]
  assert "below min_score 0.6" in skipped[0]["problem"]


def test_reward_and_learned_routing_pick_the_best_teacher_per_language(tmp_path):
  c = _config()
  pool = _pool()
  rep = A.run(c, str(tmp_path / "reward"), pool=pool)
  n_fr, n_zh = rep["languages"]["fr"]["n_prompts"], rep["languages"]["zh"]["n_prompts"]
  assert (n_fr, n_zh) == (30, 30)
  assert rep["languages"]["fr"]["wins"] == {"A": 30, "B": 0}
  assert rep["languages"]["zh"]["wins"] == {"A": 0, "B": 30}
  assert pool.generated == 60 * 4
  # report numbers against the scored file
  scored = list(records.iter_jsonl(tmp_path / "reward" / "scored.jsonl", "completion"))
  assert len(scored) == 240
  for lang in ("fr", "zh"):
    for t in ("A", "B"):
      want = np.mean([s.score for s in scored if s.language == lang and s.teacher == t])
      assert rep["languages"][lang]["mean_score"][t] == pytest.approx(want)
  assert rep["languages"]["fr"]["mean_score"]["A"] == 1.0
  assert rep["languages"]["fr"]["mean_routed_score"] == 1.0
  sft = records.read_jsonl(tmp_path / "reward" / "sft.jsonl", "sft")
  v = verifier.Verifier()
  assert all(v.score_answer(r.id, r.messages[-1]["content"]) == 1.0 for r in sft)
  pairs = records.read_jsonl(tmp_path / "reward" / "pairs_offline.jsonl", "preference")
  assert len(pairs) == rep["n_pairs"] == 60 - len(rep["skipped_pairs"])
  assert all(p.chosen_score - p.rejected_score >= 0.1 for p in pairs)
  router = rep["router"]
  assert router["holdout_agreement"] >= 0.9 and router["train_agreement"] >= 0.9
  assert router["compute_saved"] == 0.5
  md = open(tmp_path / "reward" / "report.md").read()
  assert "| fr | 30 | 30 | 0 |" in md and "contrast" not in md
  router_model = routing.LearnedRouter.load(str(tmp_path / "reward" / "router.npz"))
  prompts = records.read_prompts(tmp_path / "reward" / "prompts.jsonl")
  routed = dict(zip([p.language for p in prompts], router_model.predict(prompts)))
  assert routed == {"fr": "A", "zh": "B"}
  # learned routing: only the routed teacher generates
  c = _config(mode="learned", **{"router.path": str(tmp_path / "reward" / "router.npz")})
  pool = _pool()
  rep = A.run(c, str(tmp_path / "learned"), pool=pool)
  assert pool.generated == 60 * 2
  assert rep["compute"]["generations"] == 120 and rep["compute"]["generations_all_teachers"] == 240
  assert rep["languages"]["fr"]["wins"] == {"A": 30, "B": 0}
  assert rep["languages"]["zh"]["wins"] == {"A": 0, "B": 30}
  # fixed routing from a table
  c = _config(mode="fixed", **{"routing.table": "fr:B,zh:B"})
  rep = A.run(c, str(tmp_path / "fixed"), pool=_pool())
  assert rep["languages"]["fr"]["wins"] == {"A": 0, "B": 30}
  assert rep["languages"]["fr"]["mean_routed_score"] < 1.0
  assert rep["languages"]["zh"]["mean_routed_score"] == 1.0
  # rejection sampling: only prompts whose routed answer reaches min_score give SFT records
  c = _config(mode="fixed", **{"routing.table": "fr:B,zh:B", "routing.min_score": 1.0})
  rep = A.run(c, str(tmp_path / "fixed_min"), pool=_pool())
  sft = records.read_jsonl(tmp_path / "fixed_min" / "sft.jsonl", "sft")
  scored = records.read_jsonl(tmp_path / "fixed_min" / "scored.jsonl", "completion")
  best = {}
  for s in scored:
    pid = records.parse_completion_id(s.id)[0]
    best[pid] = max(best.get(pid, -1.0), s.score)
  assert sorted(r.id for r in sft) == sorted(p for p, b in best.items() if b >= 1.0)
  assert 30 <= len(sft) < 60 and rep["n_sft"] == len(sft)
  assert rep["languages"]["zh"]["sft_written"] == 30
  assert rep["languages"]["fr"]["sft_written"] == len(sft) - 30


class _Killed(Exception):
  pass


def test_killed_run_resumes_without_regenerating(tmp_path):
  c = _config(**{"synthetic.n_per_language": 6})
  full = A.run(c, str(tmp_path / "full"), pool=_pool())
  killer = _pool()
  fns = dict(killer.fns)

  def dying(p, j, fn=fns["B"]):
    if killer.generated >= 30:
      raise _Killed()
    return fn(p, j)
  killer.fns["B"] = dying
  with pytest.raises(_Killed):
    A.run(c, str(tmp_path / "resumed"), pool=killer)
  done = len(T.done_ids(tmp_path / "resumed" / "completions.jsonl"))
  assert done == 30
  again = _pool()
  rep = A.run(c, str(tmp_path / "resumed"), pool=again)
  assert again.generated == 48 - 30
  for name in ("sft.jsonl", "pairs_offline.jsonl"):
    assert (open(tmp_path / "resumed" / name).read() == open(tmp_path / "full" / name).read())
  assert rep["languages"] == full["languages"]
  # a third run generates and scores nothing
  calls = []
  scorer = reward.FunctionScorer(lambda recs: calls.append(len(recs)) or
                                 verifier.Verifier().score(recs))
  third = _pool()
  A.run(c, str(tmp_path / "resumed"), pool=third, scorer=scorer)
  assert third.generated == 0 and calls == []


def test_cached_answers_and_scores_outlive_a_changed_routing(tmp_path):
  """With cache.dir the answers and scores live outside the workdir, keyed by what they
  depend on: a run with another min_gap in a new workdir generates and scores nothing;
  another scores key scores again, another completions key generates again."""
  cache = dict(dir=str(tmp_path / "cache"), completions_key="c1", scores_key="s1")
  c = _config(**{"synthetic.n_per_language": 6, "routing.min_gap": 0.1})
  c.cache.update(cache)
  first = A.run(c, str(tmp_path / "a"), pool=_pool())
  calls = []
  scorer = reward.FunctionScorer(lambda recs: calls.append(len(recs)) or
                                 verifier.Verifier().score(recs))
  c.routing.min_gap, again = 2.0, _pool()
  second = A.run(c, str(tmp_path / "b"), pool=again, scorer=scorer)
  assert again.generated == 0 and calls == []
  assert first["languages"] != second["languages"]  # no pair clears a gap of 2
  assert not (tmp_path / "b" / "completions.jsonl").exists()
  c.cache.scores_key = "s2"
  A.run(c, str(tmp_path / "c"), pool=_pool(), scorer=scorer)
  assert calls and sum(calls) == 48
  c.cache.completions_key, fresh = "c2", _pool()
  A.run(c, str(tmp_path / "d"), pool=fresh)
  assert fresh.generated == 48
  c.cache.scores_key = ""
  with pytest.raises(ValueError, match="cache.completions_key and cache.scores_key"):
    A.run(c, str(tmp_path / "e"), pool=_pool())


def test_bad_input_is_reported_per_record(tmp_path):
  recs = synthetic.make_split("train", 3, languages=("fr", "zh"))
  path = tmp_path / "prompts.jsonl"
  lines = [json.dumps(dict(id=r.id, language=r.language, messages=list(r.messages[:1])))
           for r in recs]
  lines.append(json.dumps(dict(id="nolang", messages=[{"role": "user", "content": "hi"}])))
  path.write_text("\n".join(lines) + "\n")
  empty_for, nan_for = recs[0].id, recs[1].id
  pool = A.FunctionPool({
      "A": (lambda p, j: "" if p.id == empty_for else synthetic.parse_id(p.id).answer(), 1),
      "B": (lambda p, j: "" if p.id == empty_for else "nonsense", 1)})
  base = verifier.Verifier()

  def score(rs):
    return np.array([np.nan if r.id.startswith(nan_for) and r.teacher == "A"
                     else base.score([r])[0] for r in rs])
  rep = A.run(_config(prompts=str(path)), str(tmp_path / "w"), pool=pool,
              scorer=reward.FunctionScorer(score))
  problems = {(p.get("id"), p["problem"].split(":")[0]) for p in rep["problems"]}
  assert ("nolang", "invalid prompt") in problems
  assert any(p.get("line") == 7 for p in rep["problems"])
  assert (records.completion_id(empty_for, "A", 0), "empty answer") in problems
  assert (records.completion_id(empty_for, "B", 0), "empty answer") in problems
  assert (records.completion_id(nan_for, "A", 0), "score is NaN") in problems
  assert (empty_for, "no scored answer (all empty or NaN)") in problems
  assert rep["n_sft"] == 5  # six prompts, one with no answer at all
  sft = {r.id: r for r in records.read_jsonl(tmp_path / "w" / "sft.jsonl", "sft")}
  assert sft[nan_for].messages[-1]["content"] == "nonsense"  # only B's answer was scored


def test_a_half_written_prompts_file_is_not_trusted(tmp_path):
  c = _config(**{"synthetic.n_per_language": 6})
  work = tmp_path / "w"
  full = A.run(c, str(work), pool=_pool())
  assert full["n_sft"] == 12
  prompts = work / "prompts.jsonl"
  whole = prompts.read_bytes()
  prompts.write_bytes(whole[:len(whole) // 3])  # killed while writing it
  for name in os.listdir(work):  # and nothing answered yet
    if name != "prompts.jsonl":
      os.remove(work / name)
  again = _pool()
  rep = A.run(c, str(work), pool=again)
  assert rep["n_sft"] == 12 and again.generated == 48 and prompts.read_bytes() == whole
  # a given prompts file cut mid-line is an error naming it, not 1/3 of the run
  cut = tmp_path / "cut.jsonl"
  cut.write_bytes(whole[:len(whole) // 3])
  n_lines = cut.read_bytes().count(b"\n") + 1
  with pytest.raises(records.RecordError, match=f"^{cut}:{n_lines}: the last line is cut off"):
    A.run(_config(prompts=str(cut)), str(tmp_path / "w2"), pool=_pool())
  # a line that is not UTF-8 is a problem naming its line; the others are answered
  bad = tmp_path / "latin1.jsonl"
  lines = whole.splitlines(keepends=True)
  bad.write_bytes(b"".join(lines[:2]) + b'{"id": "x\xe9", "language": "fr"}\n'
                  + b"".join(lines[2:]))
  got, problems = A.read_prompts(str(bad))
  assert len(got) == 12 and [p["line"] for p in problems] == [3]
  assert "not UTF-8" in problems[0]["problem"]


@pytest.mark.slow
def test_real_teacher_pool_and_reward_model_scorer(tmp_path):
  """The stage drives aya_jax.arbitrage.teachers.TeacherPool and a RewardModelScorer
  (tiny random models) through the same interfaces."""
  from aya_jax.models import tiny
  from aya_jax.sampling import methods
  tok = synthetic.build_tokenizer(str(tmp_path / "tok"))
  cfg = tiny("llama", vocab_size=len(tok))
  # large weights: peaked, prompt-dependent next-token distributions
  models = {name: (cfg, random_params(cfg, i, std=0.8)) for i, name in enumerate(("a", "b"))}
  pool = T.TeacherPool([T.Teacher(n, models[n], str(tmp_path / "tok"), methods.Greedy(), n=1,
                                  max_new_tokens=6) for n in ("a", "b")], batch_size=4)
  rm_cfg = tiny("llama", vocab_size=len(tok), value_head=True)
  scorer = reward.RewardModelScorer(rm_cfg, random_params(rm_cfg, 5), tok, batch_size=8,
                                    max_len=96)
  c = _config(**{"synthetic.n_per_language": 3, "routing.min_gap": 0.0})
  rep = A.run(c, str(tmp_path / "w"), pool=pool, scorer=scorer)
  comps = list(records.iter_jsonl(tmp_path / "w" / "completions.jsonl", "completion"))
  empty = T.done_ids(tmp_path / "w" / "completions.jsonl") - {x.id for x in comps}
  assert len(comps) + len(empty) == 12
  assert len(comps) >= 6 and len({x.completion for x in comps}) >= 4, comps  # not degenerate
  scored = {s.id: s.score for s in records.iter_jsonl(tmp_path / "w" / "scored.jsonl",
                                                     "completion")}
  np.testing.assert_allclose([scored[x.id] for x in comps], scorer.score(comps), atol=1e-5)
  assert rep["n_sft"] + sum("no scored answer" in p["problem"] for p in rep["problems"]) == 6
  for d in records.read_jsonl(tmp_path / "w" / "sft.jsonl", "sft"):
    answers = [x for x in comps if x.id.startswith(d.id + "#")]
    best = max(answers, key=lambda x: scored[x.id])
    assert d.messages[-1]["content"] == best.completion


# ------------------------------------------------------ translation contrast


def _contrast_config(n=8, **kw):
  return _config(**{"synthetic.n_per_language": n, "contrast.enabled": True,
                    "contrast.strong": "A", "contrast.weak": "B",
                    "contrast.untranslated_rate": 0.0, **kw})


def _expected_contrast(workdir, translate):
  """Reference pairs from the files and the teachers, independent of the stage:
  chosen = A's sample 0 (completions.jsonl), rejected = B's English answer to
  the English instance, translated; dropped when equal or scored lower."""
  comps = {c.id: c.completion for c in records.iter_jsonl(workdir / "completions.jsonl",
                                                          "completion")}
  v, weak, out = verifier.Verifier(), _pool().fns["B"], {}
  for p in records.read_prompts(workdir / "prompts.jsonl"):
    inst = synthetic.parse_id(p.id)
    en = synthetic.Instance("en", inst.task, inst.args, inst.template)
    good = comps.get(records.completion_id(p.id, "A", 0), "")
    bad = weak(records.PromptRecord(en.id, "en", ({"role": "user", "content": en.prompt()},)), 0)
    rejected = translate(bad, p.language, p.id)
    cs, rs = v.score_answer(inst, good), v.score_answer(inst, rejected)
    if good and rejected != good and cs >= rs:  # scores as the stage's float32 scorer
      out[p.id + "#tc"] = (p.language, good, rejected, float(np.float32(cs)),
                           float(np.float32(rs)))
  return out


def test_contrast_pairs_in_the_stage_match_a_reference_and_resume(tmp_path):
  c = _contrast_config()
  pool = _pool()
  rep = A.run(c, str(tmp_path / "full"), pool=pool)
  full = tmp_path / "full"
  pairs = records.read_jsonl(full / "pairs_contrast.jsonl", "preference")
  lexicon = lambda text, lang, pid: translator.translate(  # noqa: E731
      text, "en", lang, records.keyed_rng(0, pid), 0.0)
  want = _expected_contrast(full, lexicon)
  assert len(want) >= 4 and {w[0] for w in want.values()} == {"fr", "zh"}
  got = {p.id: (p.language, p.chosen, p.rejected, p.chosen_score, p.rejected_score)
         for p in pairs}
  assert got == want
  assert all(p.source == preference.SOURCE for p in pairs)
  # A's in-language answers were reused; B answered each English instance once (n=2)
  en_ids = {synthetic.Instance("en", i.task, i.args, i.template).id for i in
            (synthetic.parse_id(p.id) for p in records.read_prompts(full / "prompts.jsonl"))}
  assert pool.generated == 16 * 4 + 2 * len(en_ids)
  con = rep["contrast"]
  assert con["n_pairs"] == len(pairs) and con["per_language"] == {
      lang: sum(w[0] == lang for w in want.values()) for lang in ("fr", "zh")}
  assert len(con["problems"]) == 16 - len(pairs)  # every prompt without a pair, with why
  assert rep["languages"]["fr"]["contrast_pairs"] == con["per_language"]["fr"]
  assert "contrast pairs" in open(full / "report.md").read()
  # killed while the weak teacher answers: the rerun asks only for the rest
  killer = _pool()
  fn_b = killer.fns["B"]

  def dying(p, j):
    if killer.generated >= 16 * 4 + 5:
      raise _Killed()
    return fn_b(p, j)
  killer.fns["B"] = dying
  with pytest.raises(_Killed):
    A.run(c, str(tmp_path / "resumed"), pool=killer)
  again = _pool()
  A.run(c, str(tmp_path / "resumed"), pool=again)
  # 5 samples were written: instances 1-3 have sample 0 (all a responder needs)
  assert again.generated == 2 * (len(en_ids) - 3)
  assert (open(tmp_path / "resumed" / "pairs_contrast.jsonl").read() ==
          open(full / "pairs_contrast.jsonl").read())
  # a third run generates and scores nothing
  calls = []
  scorer = reward.FunctionScorer(lambda recs: calls.append(len(recs)) or
                                 verifier.Verifier().score(recs))
  third = _pool()
  rep3 = A.run(c, str(tmp_path / "resumed"), pool=third, scorer=scorer)
  assert third.generated == 0 and calls == [] and rep3["contrast"] == con


def test_contrast_with_a_prompted_translator(tmp_path):
  pool = _pool()
  fn_a = pool.fns["A"]
  pool.fns["A"] = lambda p, j: (f"<<{p.messages[-1]['content'].rsplit(chr(10), 1)[-1]}>>"
                                if p.id.startswith("translate:") else fn_a(p, j))
  c = _contrast_config(n=4, **{"contrast.translator": "prompted"})
  rep = A.run(c, str(tmp_path), pool=pool)
  want = _expected_contrast(tmp_path, lambda text, lang, pid: f"<<{text}>>")
  got = {p.id: (p.language, p.chosen, p.rejected, p.chosen_score, p.rejected_score)
         for p in records.read_jsonl(tmp_path / "pairs_contrast.jsonl", "preference")}
  assert got == want and rep["contrast"]["translator"] == "prompted"
  asked = [r for r in records.read_jsonl(tmp_path / "contrast_completions.jsonl",
                                         "completion") if r.id.startswith("translate:")]
  assert asked and all("into fr" in r.prompt[0]["content"] or "into zh" in r.prompt[0]["content"]
                       for r in asked)
  with pytest.raises(ValueError, match="contrast.weak='nobody'"):
    A.run(_contrast_config(n=4, **{"contrast.weak": "nobody"}), str(tmp_path / "x"),
          pool=_pool())
