"""Tests for aya_jax.data.pipeline: packing, padding, targets, determinism,
resume, process sharding, mixtures and bad input.

Reference for every per-example check: `formatting.tokenize_chat` of the
same record (tokens and token loss mask), shifted by one inside the segment.
"""

import json
import random

import grain
import jax
import numpy as np
import pytest

from aya_jax import sharding
from aya_jax.data import formatting as F
from aya_jax.data import pipeline as P
from aya_jax.data import records as R

WORDS = {
    "en": "the cat sleeps on a warm windowsill how many apples are left in "
          "basket river flows quietly past old mill thank you".split(),
    "fr": "le chat dort sur rebord de la fenêtre combien pommes reste dans "
          "panier rivière coule doucement merci beaucoup".split(),
    "ru": "кошка спит на тёплом подоконнике сколько яблок осталось в "
          "корзине река тихо течёт мимо старой мельницы".split(),
}


def _sentence(rng, lang, n):
  return " ".join(rng.choice(WORDS[lang]) for _ in range(n))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  rng = random.Random(0)
  corpus = [_sentence(rng, lang, 10) + f" {i}." for i in range(300)
            for lang in WORDS]
  return F.train_tokenizer(corpus, tmp_path_factory.mktemp("tok"),
                           vocab_size=500, character_coverage=1.0)


def make_records(n, langs=("en", "fr", "ru"), seed=0, prefix="r", long=0):
  """n unique SFT records; every 4th has a system turn and two exchanges."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    lang = langs[i % len(langs)]
    msgs = [{"role": "user", "content": f"{_sentence(rng, lang, 3)} {i}"},
            {"role": "assistant",
             "content": _sentence(rng, lang, rng.randint(1, 6) + long)}]
    if i % 4 == 0:
      msgs = [{"role": "system", "content": "brief"}] + msgs + [
          {"role": "user", "content": _sentence(rng, lang, 2)},
          {"role": "assistant", "content": _sentence(rng, lang, 2)}]
    out.append(R.SFTRecord(id=f"{prefix}{i}", language=lang, messages=msgs))
  return out


def reference(tok, recs):
  """tokens tuple -> (record id, token loss mask) from tokenize_chat."""
  ref = {}
  for r in recs:
    ex = F.tokenize_chat(tok, r.messages)
    ref[tuple(ex.tokens.tolist())] = (r.id, ex.loss_mask)
  assert len(ref) == len(recs)
  return ref


def segments(batch):
  """Yields (b, k, slice) for every segment of every row; checks layout."""
  for b in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][b]
    n_real = int((seg != 0).sum())
    assert (seg[n_real:] == 0).all(), "padding only at the end of a row"
    if not n_real:
      continue
    ks = seg[:n_real]
    assert ks[0] == 1
    assert ((np.diff(ks) == 0) | (np.diff(ks) == 1)).all(), "ids 1..k in order"
    for k in range(1, int(ks.max()) + 1):
      idx = np.flatnonzero(seg == k)
      assert (np.diff(idx) == 1).all(), "a segment is contiguous"
      yield b, k, slice(int(idx[0]), int(idx[-1]) + 1)


def check_batch(batch, ref, seq_len, rows, pad_id=0):
  """Checks one batch against tokenize_chat; returns the record ids in it."""
  assert set(batch) == set(P.KEYS)
  for v in batch.values():
    assert v.shape == (rows, seq_len) and v.dtype == np.int32
  covered = np.zeros((rows, seq_len), bool)
  ids = []
  for b, _, sl in segments(batch):
    toks = batch["tokens"][b, sl]
    rid, mask = ref[tuple(toks.tolist())]
    ids.append(rid)
    n = len(toks)
    assert not covered[b, sl].any()
    covered[b, sl] = True
    np.testing.assert_array_equal(batch["positions"][b, sl], np.arange(n))
    np.testing.assert_array_equal(batch["targets"][b, sl],
                                  np.append(toks[1:], pad_id))
    np.testing.assert_array_equal(batch["loss_mask"][b, sl],
                                  np.append(mask[1:], 0))
  pad = ~covered
  assert (batch["tokens"][pad] == pad_id).all()
  for key in ("targets", "loss_mask", "segment_ids", "positions"):
    assert (batch[key][pad] == (pad_id if key == "targets" else 0)).all()
  return ids


def run(recs, tok, **kw):
  kw = dict(dict(seq_len=64, global_batch_size=4, seed=0), **kw)
  it, stats = P.make_sft_iterator(recs, tok, **kw)
  return list(it), stats


def test_packing_layout_targets_and_masks(tok):
  recs = make_records(60)
  ref = reference(tok, recs)
  batches, stats = run(recs, tok, seq_len=64, global_batch_size=4)
  ids = [i for b in batches for i in check_batch(b, ref, 64, 4)]
  assert sorted(ids) == sorted(r.id for r in recs)  # each once, no overlap
  per_row = [int(b["segment_ids"][r].max()) for b in batches for r in range(4)]
  assert max(per_row) >= 3  # really packed
  assert stats.n_examples == 60 and stats.n_batches == len(batches)
  assert stats.n_rows == 4 * len(batches)
  n_real = sum(int((b["segment_ids"] != 0).sum()) for b in batches)
  assert stats.n_tokens == n_real
  assert stats.padding_fraction == pytest.approx(1 - n_real / (stats.n_rows
                                                               * 64))
  assert stats.n_loss_tokens == sum(int(b["loss_mask"].sum()) for b in batches)
  # Loss only on assistant tokens: every target with loss is not a role or
  # BOS token, and every answer's end-of-turn token is a target.
  special = {tok.convert_tokens_to_ids(t) for t in
             ("<s>", "<|user|>", "<|assistant|>", "<|system|>")}
  for b in batches:
    assert not np.isin(b["targets"][b["loss_mask"] == 1], list(special)).any()


def _toy_iterator(lengths, rows, seq_len, pack=True):
  """The batcher over hand-made examples: example j is all token j + 10."""
  exs = [P.Example(np.full(n, j + 10, np.int32), np.ones(n, np.int32), 0,
                   f"e{j}", "toy") for j, n in enumerate(lengths)]
  return P.SFTIterator(
      iter(grain.MapDataset.source(exs).to_iter_dataset()), rows=rows,
      seq_len=seq_len, pack=pack, pad_id=0, skip_invalid=False,
      base_stats=P.PipelineStats(seq_len=seq_len))


def test_first_fit_by_hand():
  # seq_len 10, 2 rows: 5 -> row 0; 7 -> row 1; 4 -> row 0 (9); 3 -> row 1
  # (10); 6 fits nowhere: the batch goes out and 6 starts the next one.
  batches = list(_toy_iterator([5, 7, 4, 3, 6, 2], rows=2, seq_len=10))
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[0]["tokens"], [
      [10] * 5 + [12] * 4 + [0], [11] * 7 + [13] * 3])
  np.testing.assert_array_equal(batches[0]["segment_ids"], [
      [1] * 5 + [2] * 4 + [0], [1] * 7 + [2] * 3])
  np.testing.assert_array_equal(batches[0]["positions"][0],
                                [0, 1, 2, 3, 4, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(batches[0]["targets"][1],
                                [11] * 6 + [0] + [13] * 2 + [0])
  np.testing.assert_array_equal(batches[0]["loss_mask"][1],
                                [1] * 6 + [0] + [1] * 2 + [0])
  np.testing.assert_array_equal(batches[1]["tokens"], [
      [14] * 6 + [15] * 2 + [0] * 2, [0] * 10])
  # Resume from between the batches: the example that ended batch 0 is
  # read again.
  it = _toy_iterator([5, 7, 4, 3, 6, 2], rows=2, seq_len=10)
  next(it)
  state = it.get_state()
  again = _toy_iterator([5, 7, 4, 3, 6, 2], rows=2, seq_len=10)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["tokens"], batches[1]["tokens"])


def test_pad_mode(tok):
  recs = make_records(30)
  ref = reference(tok, recs)
  batches, stats = run(recs, tok, pack=False, seq_len=96,
                       global_batch_size=4)
  ids = [i for b in batches for i in check_batch(b, ref, 96, 4)]
  assert sorted(ids) == sorted(r.id for r in recs)
  for b in batches:
    assert b["segment_ids"].max() <= 1
  assert len(batches) == 8  # 30 examples, 4 per batch, last one half empty
  assert (batches[-1]["segment_ids"][2:] == 0).all()
  assert stats.n_rows == 32 and stats.n_examples == 30
  # the padded batch equals formatting.pad_batch plus the shift
  exs = [F.tokenize_chat(tok, recs[0].messages)]
  padded = F.pad_batch(exs, 96, tok.pad_token_id)
  got = P.build_batch([exs], 96, tok.pad_token_id)
  for key in ("tokens", "segment_ids", "positions"):
    np.testing.assert_array_equal(got[key], padded[key])


def test_truncation_counted(tok):
  recs = make_records(6) + make_records(6, long=40, prefix="L", seed=1)
  full = [F.tokenize_chat(tok, r.messages) for r in recs]
  seq_len = 48
  want = [len(ex.tokens) - seq_len for ex in full if len(ex.tokens) > seq_len]
  assert 0 < len(want) < len(recs)
  batches, stats = run(recs, tok, seq_len=seq_len, global_batch_size=2,
                       pack=False)
  assert stats.n_truncated == len(want)
  assert stats.n_truncated_tokens == sum(want)
  cut = {tuple(ex.tokens[:seq_len].tolist()): ex for ex in full}
  for b in batches:
    for row in range(2):
      seg = b["segment_ids"][row]
      if seg.any():
        assert tuple(b["tokens"][row][seg == 1].tolist()) in cut


def test_no_loss_after_truncation_raises_or_is_counted(tok):
  recs = make_records(6)
  long_prompt = R.SFTRecord(id="longq", language="en", messages=[
      {"role": "user", "content": " ".join(["cat sleeps"] * 60)},
      {"role": "assistant", "content": "yes"}])
  with pytest.raises(ValueError, match="longq.*no loss token"):
    run(recs + [long_prompt], tok, seq_len=40)
  batches, stats = run(recs + [long_prompt], tok, seq_len=40,
                       skip_invalid=True)
  assert stats.n_empty == 1 and stats.n_examples == 6


def test_same_seed_same_batches_other_seed_other_order(tok):
  recs = make_records(40)
  a, _ = run(recs, tok, seed=5)
  b, _ = run(recs, tok, seed=5)
  c, _ = run(recs, tok, seed=6)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in P.KEYS:
      np.testing.assert_array_equal(x[key], y[key])
  ref = reference(tok, recs)
  order = lambda bs: [i for x in bs for i in check_batch(x, ref, 64, 4)]
  assert order(a) != order(c) and sorted(order(a)) == sorted(order(c))


def test_epochs_reshuffle(tok):
  recs = make_records(20)
  ref = reference(tok, recs)
  batches, stats = run(recs, tok, pack=False, num_epochs=2)
  ids = [i for b in batches for i in check_batch(b, ref, 64, 4)]
  assert len(ids) == 40 and sorted(ids[:20]) == sorted(ids[20:])
  assert ids[:20] != ids[20:]
  assert stats.n_examples == 40


@pytest.mark.parametrize("pack", [True, False])
def test_resume_yields_exactly_the_remaining_batches(tok, pack):
  recs = make_records(50)
  kw = dict(seq_len=48, global_batch_size=3, seed=1, pack=pack, num_epochs=2)
  full, full_stats = run(recs, tok, **kw)
  for k in (0, 1, 4, len(full) - 1, len(full)):
    it, _ = P.make_sft_iterator(recs, tok, **kw)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    fresh, stats = P.make_sft_iterator(recs, tok, **kw)
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(full) - k
    for x, y in zip(rest, full[k:]):
      for key in P.KEYS:
        np.testing.assert_array_equal(x[key], y[key])
    assert stats.as_dict() == full_stats.as_dict()


def test_infinite_resume(tok):
  recs = make_records(10)
  kw = dict(seq_len=48, global_batch_size=2, num_epochs=None)
  it, _ = P.make_sft_iterator(recs, tok, **kw)
  first = [next(it) for _ in range(30)]  # well past one epoch
  it, _ = P.make_sft_iterator(recs, tok, **kw)
  for _ in range(17):
    next(it)
  again, _ = P.make_sft_iterator(recs, tok, **kw)
  again.set_state(it.get_state())
  for x in first[17:]:
    np.testing.assert_array_equal(next(again)["tokens"], x["tokens"])


@pytest.mark.parametrize("pack", [True, False])
def test_process_shards_are_disjoint_and_cover(tok, monkeypatch, pack):
  recs = make_records(40)
  ref = reference(tok, recs)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  per_process = []
  for pi in range(2):
    monkeypatch.setattr(jax, "process_index", lambda pi=pi: pi)
    batches, _ = run(recs, tok, global_batch_size=6, pack=pack)
    per_process.append([i for b in batches
                        for i in check_batch(b, ref, 64, 3)])
  a, b = map(set, per_process)
  assert not a & b
  assert a | b == {r.id for r in recs}
  assert len(per_process[0]) == len(per_process[1]) == 20


def test_finite_stream_gives_every_process_as_many_batches(tok):
  recs = make_records(41)  # one left over: dropped so shares stay equal
  counts = []
  for pi in range(2):
    batches, stats = run(recs, tok, global_batch_size=6, pack=False,
                         process_index=pi, process_count=2)
    counts.append((len(batches), stats.n_examples))
  assert counts == [(7, 20), (7, 20)]


def test_global_batch_on_fake_devices(tok):
  mesh = sharding.make_mesh((-1, 1, 1))
  assert mesh.size == 8
  it, _ = P.make_sft_iterator(make_records(30), tok, seq_len=32,
                              global_batch_size=8, pack=True)
  batch = next(it)
  glob = sharding.global_batch(batch, mesh)
  for key in P.KEYS:
    assert glob[key].shape == (8, 32)
    np.testing.assert_array_equal(np.asarray(glob[key]), batch[key])


def _languages(batches, ref, by_id):
  return [by_id[ref[tuple(b["tokens"][r][b["segment_ids"][r] == 1]
                          .tolist())][0]]
          for b in batches for r in range(b["tokens"].shape[0])
          if b["segment_ids"][r].any()]


def test_mixture_weights_by_language(tok):
  recs = make_records(30, langs=("en", "fr", "ru"))
  ref = reference(tok, recs)
  by_id = {r.id: r.language for r in recs}
  weights = {"en": 0.6, "fr": 0.3, "ru": 0.1}
  it, stats = P.make_sft_iterator(recs, tok, seq_len=64, global_batch_size=4,
                                  pack=False, weights=weights,
                                  num_epochs=None, seed=2)
  batches = [next(it) for _ in range(100)]  # 400 samples
  langs = _languages(batches, ref, by_id)
  assert len(langs) == 400
  for lang, w in weights.items():
    assert abs(langs.count(lang) / 400 - w) < 0.05, (lang, langs.count(lang))
  # deterministic from the seed
  it2, _ = P.make_sft_iterator(recs, tok, seq_len=64, global_batch_size=4,
                               pack=False, weights=weights, num_epochs=None,
                               seed=2)
  np.testing.assert_array_equal(next(it2)["tokens"], batches[0]["tokens"])


def test_mixture_weights_by_file_and_epochs(tok, tmp_path):
  a, b = make_records(20, prefix="a"), make_records(20, prefix="b", seed=1)
  pa, pb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  R.write_jsonl(pa, a)
  R.write_jsonl(pb, b)
  ref = reference(tok, a + b)
  weights = {str(pa): 3.0, str(pb): 1.0}
  batches, stats = run([pa, pb], tok, pack=False, weights=weights,
                       mix_by="source", num_epochs=5)
  ids = [i for x in batches for i in check_batch(x, ref, 64, 4)]
  assert len(ids) == 200  # 5 epochs of 40 records
  assert abs(sum(i.startswith("a") for i in ids) / 200 - 0.75) < 0.05
  with pytest.raises(ValueError, match="unknown keys"):
    run([pa, pb], tok, weights={"nope": 1.0, str(pa): 1, str(pb): 1},
        mix_by="source")
  with pytest.raises(ValueError, match="no weight for"):
    run([pa, pb], tok, weights={str(pa): 1.0}, mix_by="source")
  # weight 0 drops a source entirely
  batches, _ = run([pa, pb], tok, weights={str(pa): 0, str(pb): 1},
                   mix_by="source", pack=False)
  assert all(i.startswith("b") for x in batches
             for i in check_batch(x, ref, 64, 4))


def test_invalid_jsonl_line_raises_or_is_counted(tok, tmp_path):
  path = tmp_path / "sft.jsonl"
  good = [json.dumps(r.to_dict()) for r in make_records(9)]
  lines = good[:4] + ['{"id": "bad", "language": "en"'] + good[4:]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  with pytest.raises(R.RecordError, match=f"{path}:5"):
    run(path, tok)
  batches, stats = run(path, tok, skip_invalid=True)
  assert stats.n_invalid == 1 and stats.n_records == 9
  assert stats.invalid_reasons == {"malformed JSON": 1}
  assert stats.n_examples == 9


def test_invalid_loaded_record_names_source_and_index(tok):
  recs = [r.to_dict() for r in make_records(3)]
  recs[1]["messages"] = recs[1]["messages"][:-1] + [
      {"role": "assistant", "content": " "}]
  with pytest.raises(R.RecordError,
                     match=r"mine\[1\]: .*messages\[1\]\.content"):
    run({"mine": recs}, tok)
  _, stats = run({"mine": recs}, tok, skip_invalid=True)
  assert stats.n_invalid == 1 and stats.n_examples == 2


def test_bad_arguments(tok):
  recs = make_records(4)
  with pytest.raises(ValueError, match="multiple of process_count 2"):
    run(recs, tok, global_batch_size=3, process_count=2, process_index=0)
  with pytest.raises(ValueError, match="seed"):
    run(recs, tok, seed=-1)
  with pytest.raises(ValueError, match="mix_by"):
    run(recs, tok, weights={"en": 1}, mix_by="lang")


def test_endless_stream_with_every_example_skipped_is_an_error(tok):
  """skip_invalid and no example with a loss token within seq_len: an endless
  stream (num_epochs=None, what training uses) used to spin forever."""
  import signal

  def hung(*_):
    raise TimeoutError("the iterator spun for 120 s without an error")

  long = [R.SFTRecord(id=f"long{i}", language="en", messages=[
      {"role": "user", "content": " ".join(["cat sleeps"] * 60)},
      {"role": "assistant", "content": "yes"}]) for i in range(5)]
  it, stats = P.make_sft_iterator(long, tok, seq_len=40, global_batch_size=4, seed=0,
                                  num_epochs=None, skip_invalid=True)
  old = signal.signal(signal.SIGALRM, hung)
  signal.alarm(120)
  try:
    with pytest.raises(ValueError, match=r"a full pass over the data \(5 examples\) yielded no"):
      next(it)
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  assert stats.n_empty == 5
