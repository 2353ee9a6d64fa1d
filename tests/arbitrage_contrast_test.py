"""Preference pairs beyond arbitrage: translation contrast and verifier-labelled pairs."""

import json

import numpy as np
import pytest

from aya_jax.arbitrage import contrast as preference
from aya_jax.arbitrage import stage as arbitrage
from aya_jax.data import records
from aya_jax.world import tasks as synthetic
from aya_jax.world import verifier


def _items():
  recs = synthetic.make_split("train", 4, languages=("en", "fr", "ru"))
  return preference.contrast_items(recs), recs


def test_synthetic_items_pair_the_prompt_with_its_english_version():
  (items, problems), recs = _items()
  assert len(items) == 8 and len(problems) == 4  # the English records
  assert all(p["problem"].startswith("english prompt") for p in problems)
  for it in items:
    inst = synthetic.parse_id(it.id)
    assert it.prompt[0]["content"] == inst.prompt()
    en = synthetic.Instance("en", inst.task, inst.args, inst.template)
    assert it.english_prompt[0]["content"] == en.prompt() and it.english_id == en.id


def test_items_of_other_prompts_translate_the_user_turns():
  recs = [records.SFTRecord("q1", "fr", ({"role": "system", "content": "sois bref"},
                                         {"role": "user", "content": "le chien ?"},
                                         {"role": "assistant", "content": "oui"})),
          records.SFTRecord("q2", "en", ({"role": "user", "content": "x"},
                                         {"role": "assistant", "content": "y"}))]
  tr = lambda text, src, tgt, rng: f"<{src}->{tgt}> {text}"  # noqa: E731
  items, problems = preference.contrast_items(recs, tr)
  assert problems == [{"id": "q2", "problem": "english prompt: nothing to contrast"}]
  (it,) = items
  assert it.prompt == recs[0].messages[:2] and it.english_id == ""
  assert it.english_prompt == ({"role": "system", "content": "sois bref"},
                               {"role": "user", "content": "<fr->en> le chien ?"})
  items, problems = preference.contrast_items(recs[:1])  # no translator: reported
  assert not items and problems[0]["problem"].startswith("no English version")


def test_pairs_from_stub_models_and_translator():
  items = [preference.ContrastItem("q1", "fr", ({"role": "user", "content": "Bonjour ?"},),
                                   ({"role": "user", "content": "Hello?"},)),
           preference.ContrastItem("q2", "de", ({"role": "user", "content": "Hallo?"},),
                                   ({"role": "user", "content": "Hi?"},)),
           preference.ContrastItem("q3", "fr", ({"role": "user", "content": "Salut ?"},),
                                   ({"role": "user", "content": "Hey?"},))]
  seen = {}
  strong_fn = lambda reqs: [{"q1": "natif un", "q2": "nativ zwei", "q3": ""}[r.id]  # noqa
                            for r in reqs]

  def weak_fn(reqs):
    seen["weak"] = reqs
    return [f"english {r.id}" for r in reqs]
  calls = []

  def translator(text, src, tgt, rng):
    calls.append((text, src, tgt))
    return f"[{tgt}] {text} {rng.integers(1000)}"
  pairs, problems = preference.translation_contrast_pairs(items, strong_fn, weak_fn, translator,
                                                          seed=3)
  assert [p.id for p in pairs] == ["q1#tc", "q2#tc"]
  assert problems == [{"id": "q3", "problem": "strong model gave an empty answer"}]
  # the weak model saw the English prompts; the translator went en -> target
  assert [r.messages[0]["content"] for r in seen["weak"]] == ["Hello?", "Hi?", "Hey?"]
  assert {r.language for r in seen["weak"]} == {"en"}
  assert calls[:2] == [("english q1#en", "en", "fr"), ("english q2#en", "en", "de")]
  p = pairs[0]
  assert p.source == "translation_contrast" and p.language == "fr"
  assert p.prompt[0]["content"] == "Bonjour ?" and p.chosen == "natif un"
  assert p.rejected.startswith("[fr] english q1#en")
  assert p.chosen_score is None
  again, _ = preference.translation_contrast_pairs(items, strong_fn, weak_fn, translator, seed=3)
  assert again == pairs  # deterministic in the seed


def test_world_pairs_with_lexicon_translator_and_verifier_scores(tmp_path):
  (items, _), _ = _items()
  gold = lambda reqs: [synthetic.parse_id(r.id).answer() for r in reqs]  # noqa: E731
  # the weak model answers the English prompt (its id: the English instance) right
  # but verbosely
  weak = lambda reqs: [" ".join([synthetic.parse_id(r.id).answer()] * 2)  # noqa: E731
                       for r in reqs]
  pairs, problems = preference.translation_contrast_pairs(
      items, gold, weak, preference.lexicon_translator(0.0), scorer=verifier.verifier_scorer())
  assert len(pairs) == len(items) and not problems
  v = verifier.Verifier()
  for p in pairs:
    inst = synthetic.parse_id(p.id)
    assert p.chosen_score == 1.0 and p.rejected_score < 1.0
    assert p.rejected_score == np.float32(v.score_answer(inst, p.rejected))
  assert records.write_jsonl(tmp_path / "tc.jsonl", pairs) == len(pairs)
  # with untranslated words the rejected side keeps English (language confusion)
  pairs, _ = preference.translation_contrast_pairs(
      items, gold, weak, preference.lexicon_translator(1.0))
  ru = [p for p in pairs if p.language == "ru"]
  assert ru and all(not any("\u0400" <= ch <= "\u04ff" for ch in p.rejected) for p in ru)


def test_pool_responder_and_prompted_translator(tmp_path):
  pool = arbitrage.FunctionPool({
      "strong": (lambda p, j: "" if p.id == "e" else f"answer to {p.messages[-1]['content']}",
                 1)})
  respond = preference.pool_responder(pool, "strong", str(tmp_path / "c.jsonl"))
  req = lambda i, text: records.PromptRecord(i, "fr", ({"role": "user", "content": text},))
  reqs = [req("a", "x"), req("b", "y"), req("a", "x"), req("e", "z")]
  assert respond(reqs) == ["answer to x", "answer to y", "answer to x", ""]
  assert respond(reqs) == ["answer to x", "answer to y", "answer to x", ""]
  assert pool.generated == 3  # duplicates asked once; the second call resumed
  # answers in a reuse file (arbitrage's completions) are not asked again
  reused = preference.pool_responder(pool, "strong", str(tmp_path / "d.jsonl"),
                                     reuse=(str(tmp_path / "c.jsonl"),))
  assert reused([req("a", "x"), req("c", "w")]) == ["answer to x", "answer to w"]
  assert pool.generated == 4 and len(records.read_jsonl(tmp_path / "d.jsonl",
                                                        "completion")) == 1
  tr = preference.PromptedTranslator(respond)
  out = tr("the dog", "en", "fr", None)
  assert out.startswith("answer to Translate the following text from en into fr")
  assert out.endswith("the dog")
  tr.prefetch([("a cat", "en", "de"), ("a cow", "en", "de"), ("the dog", "en", "fr")])
  assert pool.generated == 7  # one call for both new texts; the dog was cached
  assert tr("a cow", "en", "de", None).endswith("a cow") and pool.generated == 7


# ------------------------------------------------------ verifier-labelled


def test_verifier_labelled_pairs_are_labelled_by_the_verifier():
  recs = synthetic.make_split("train", 4, languages=("en", "fr"))
  pairs = preference.verifier_labelled_pairs(recs)
  assert pairs and all(p.chosen_score > p.rejected_score for p in pairs)
  v = verifier.Verifier()
  for p in pairs:
    assert p.chosen_score == pytest.approx(v.score_answer(p.id, p.chosen))
    assert p.rejected_score == pytest.approx(v.score_answer(p.id, p.rejected))
  fr = [p for p in pairs if p.language == "fr"]
  assert any(p.rejected_score == 0.5 for p in fr)  # English answer: half credit


def test_sample_labelled_pairs_rank_model_answers_by_the_verifier():
  recs = synthetic.make_split("train", 3, languages=("en", "fr"), tasks=("next_day",))
  v = verifier.Verifier()
  comps = []
  for r in recs:
    inst = synthetic.parse_id(r.id)
    answers = [inst.answer(), inst.answer("en"), "xyz", inst.answer()]  # right, English, wrong, dup
    comps += [records.CompletionRecord(id=f"{r.id}#t{j % 2}#{j // 2}", language=r.language,
                                       prompt=r.messages[:-1], completion=a, teacher=f"t{j % 2}")
              for j, a in enumerate(answers)]
  pairs = preference.sample_labelled_pairs(comps, min_gap=0.25, max_per_prompt=2)
  by_prompt = {}
  for p in pairs:
    pid = p.id.split("#")[0]
    by_prompt.setdefault(pid, []).append(p)
    assert p.chosen_score == pytest.approx(v.score_answer(pid, p.chosen))
    assert p.rejected_score == pytest.approx(v.score_answer(pid, p.rejected))
    assert p.chosen_score - p.rejected_score >= 0.25 and p.source == "verifier_samples"
  assert set(by_prompt) == {r.id for r in recs}
  assert all(len(ps) <= 2 for ps in by_prompt.values())
  en = [p for p in pairs if p.language == "en"]  # en: right vs wrong only (English = right)
  assert en and all(p.chosen_score == 1.0 and p.rejected_score == 0.0 for p in en)
  fr_pairs = {(p.chosen, p.rejected) for p in pairs if p.language == "fr"}
  assert len(fr_pairs) > len([r for r in recs if r.language == "fr"])  # more than one kind
  # order-independent; a larger budget gives every pair with a big enough gap
  again = preference.sample_labelled_pairs(comps[::-1], min_gap=0.25, max_per_prompt=2)
  dump = lambda ps: sorted(json.dumps(p.to_dict(), sort_keys=True) for p in ps)  # noqa: E731
  assert dump(again) == dump(pairs)
  fr = [c for c in comps if c.language == "fr"]
  full = preference.sample_labelled_pairs(fr, min_gap=0.25, max_per_prompt=10, gold=False)
  assert len(full) == 3 * len(fr) // 4  # (right, en), (right, wrong), (en, wrong) per prompt
