r"""Preference-pair and reward-scorer tokenisation throughput: ours batched vs ours one
item at a time vs TRL 1.16's DPOTrainer dataset preparation, on the same pairs, with the
same real tokenizers (the packaged Gemma 3 270M, 262k vocabulary, and SmolLM2-135M, 49k).

    .venv/bin/python experiments/bench/tokenizing.py [--pairs 2000 --iters 3]

Pairs come from the embedded world's train split in its 9 languages (chosen: the gold answer,
rejected: another prompt's answer, so both are real text of the prompt's language).
Rows, each the median (and min) of --iters timed runs after one untimed warm-up run:
  ours batched      `pairs.tokenize_pairs` (renders every pair's prompt and prompt +
                    answer, encodes them in one `tokenizer(list)` call per 4096 pairs)
  ours one by one   `formatting.tokenize_prompt_completion` per (prompt, answer), as
                    tokenize_pairs did before
  TRL DPOTrainer    `DPOTrainer._prepare_dataset` on a `datasets.Dataset` of the same
                    conversational pairs (apply_chat_template + tokenise per example in
                    `Dataset.map`, one process: TRL's default dataset_num_proc)
  scorer batched / one by one
                    `reward.RewardModelScorer.encode_all`'s tokenisation
                    (`reward.encode_many`) against `reward.encode` per record
The outputs are checked equal (ours batched == ours one by one == TRL's ids, per pair)
before anything is timed. No network.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from aya_jax import reward  # noqa: E402
from aya_jax.data import formatting, records  # noqa: E402
from aya_jax.data import pairs as pp  # noqa: E402
from aya_jax.models import packaged  # noqa: E402
from aya_jax.world import tasks  # noqa: E402


def make_pairs(n: int) -> list:
  recs = tasks.make_split("train", n // 7 + 1, 0, tasks.LANGUAGES)
  out = []
  for i, r in enumerate(recs[:n]):
    other = recs[(i + 7) % len(recs)].messages[-1]["content"]
    chosen = r.messages[-1]["content"]
    out.append(records.PreferenceRecord(
        id=r.id, language=r.language, prompt=tuple(r.messages[:-1]), chosen=chosen,
        rejected=other if other != chosen else chosen + " !", chosen_score=1.0,
        rejected_score=0.0))
  return out


def one_by_one(recs, tok, seq_len):
  out = []
  for r in recs:
    p, c = formatting.tokenize_prompt_completion(tok, r.prompt, r.chosen, example_id=r.id)
    _, j = formatting.tokenize_prompt_completion(tok, r.prompt, r.rejected, example_id=r.id)
    out.append((p, c[:seq_len - len(p)], j[:seq_len - len(p)]))
  return out


def trl_prepare(recs, tok):
  import datasets
  import types
  from trl import DPOConfig, DPOTrainer
  import transformers
  transformers.utils.logging.set_verbosity_error()
  datasets.disable_progress_bars()
  ds = datasets.Dataset.from_list([dict(prompt=list(r.prompt),
                                        chosen=[{"role": "assistant", "content": r.chosen}],
                                        rejected=[{"role": "assistant", "content": r.rejected}])
                                   for r in recs])
  fake = types.SimpleNamespace(_tokenizer=tok)
  args = DPOConfig(output_dir="/tmp/unused_trl_bench", report_to=[], max_length=None,
                   use_cpu=True, bf16=False)
  return DPOTrainer._prepare_dataset(fake, ds, tok, args, "train")


def timed(fn, iters):
  fn()  # warm-up: template compilation, caches
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), min(times)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--pairs", type=int, default=2000)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--no_trl", action="store_true")
  a = ap.parse_args(argv)
  recs = make_pairs(a.pairs)
  comp = [dict(id=r.id, language=r.language, prompt=r.prompt, completion=r.chosen)
          for r in recs]
  print(f"{len(recs)} pairs in {len(tasks.LANGUAGES)} languages; median (min) of {a.iters} "
        f"runs after a warm-up; items/s")
  print("| tokenizer | contender | items/s | vs ours batched |")
  print("|---|---|---:|---:|")
  for name in ("gemma3_270m", "smollm2"):
    tok = formatting.load_tokenizer(packaged.tokenizer(name))
    batched, _ = pp.tokenize_pairs(recs, tok, a.seq)
    single = one_by_one(recs, tok, a.seq)
    assert all((p.prompt.tolist(), p.chosen.tolist(), p.rejected.tolist())
               == (s[0].tolist(), s[1].tolist(), s[2].tolist()) for p, s in zip(batched, single))
    rows = [("pairs: ours batched", lambda: pp.tokenize_pairs(recs, tok, a.seq)),
            ("pairs: ours one by one", lambda: one_by_one(recs, tok, a.seq))]
    if not a.no_trl:
      ds = trl_prepare(recs, tok)
      # the same prompt; TRL's answer also keeps what the template writes after the end
      # of turn (Gemma's newline), ours stops at the end of turn
      assert all(list(d["prompt_ids"]) == p.prompt.tolist() and
                 list(d["chosen_ids"])[:len(p.chosen)] == p.chosen.tolist()
                 for d, p in zip(ds, batched))
      rows.append(("pairs: TRL DPOTrainer._prepare_dataset", lambda: trl_prepare(recs, tok)))
    max_len = 1 << 20
    many = [t.tolist() for t, _ in reward.encode_many(
        tok, [(c["prompt"], c["completion"], c["id"]) for c in comp], max_len)]
    assert many == [reward.encode(tok, c["prompt"], c["completion"], max_len)[0].tolist()
                    for c in comp]
    rows += [("scorer: ours batched", lambda: reward.encode_many(
                  tok, [(c["prompt"], c["completion"], c["id"]) for c in comp], max_len)),
             ("scorer: ours one by one", lambda: [reward.encode(
                  tok, c["prompt"], c["completion"], max_len) for c in comp])]
    base = {}
    for label, fn in rows:
      med, best = timed(fn, a.iters)
      rate = len(recs) / med
      kind = label.split(":")[0]
      base.setdefault(kind, rate)
      print(f"| {name} | {label} | {rate:,.0f} ({len(recs) / best:,.0f}) | "
            f"{rate / base[kind]:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
