"""Stage 'merge': merge checkpoints (aya_jax params/ or HF dirs), streaming.

Command (weighted linear average of two SFT runs, Aya Expanse's most consistent merge):

  python -m aya_jax.main --config=configs/merge.py --workdir=runs/merge \
    --config.merge.models="('runs/sft_eu/params','runs/sft_asia/params')" \
    --config.merge.model_parameters.weight="(0.6,0.4)"

or from a mergekit YAML (merge_method, models: [{model, parameters: {weight, density}}],
base_model, parameters, dtype):

  python -m aya_jax.main --config=configs/merge.py --workdir=runs/merge \
    --config.merge.yaml=merges/ties.yml

Expected result: `runs/merge/params/` (model_config.json + Orbax arrays, chunked by
layer) that `aya_jax.checkpoint.load_model` reads, `runs/merge/merge_spec.json`, and with
`--config.merge.out_hf=True` a HF directory `runs/merge/hf/` that transformers loads.
Host memory stays at a few tensors (one layer of each input), not the model size.
Methods: linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, slerp (parameters.t), model_stock; see aya_jax/merging/methods.py (methods),
aya_jax/merging/parameters.py (parameters), aya_jax/merging/spec.py (YAML) and
aya_jax/merging/stage.py (this stage).

Searching the weights first (`merge.search`; each candidate merge answers the prompts and a
scorer judges them, here the world's verifier; `runs/merge/search.jsonl` lists them):

  python -m aya_jax.main --config=configs/merge.py --workdir=runs/merge \
    --config.merge.models="('runs/world/teachers/european/params','runs/world/weak/params')" \
    --config.merge.search.budget=24 --config.merge.search.prompts=runs/eval/prompts.jsonl \
    --config.merge.search.tokenizer=runs/world/tokenizer
"""

import ml_collections

from aya_jax.merging import stage


def get_config(arg=None):
  del arg
  ref = ml_collections.FieldReference
  config = ml_collections.ConfigDict()
  config.stage = "merge"
  config.merge = ml_collections.ConfigDict(dict(
      yaml="",  # a mergekit-style YAML; when set, the fields below are ignored
      method="linear",
      models=(),  # paths: params/ or HF dirs
      base="",  # base model path (task_arithmetic, ties, dare_*, breadcrumbs, slerp, ...)
      # one value per model, in models' order (None: not set)
      model_parameters=ml_collections.ConfigDict(dict(
          weight=ref(None, field_type=tuple), density=ref(None, field_type=tuple),
          gamma=ref(None, field_type=tuple))),
      # shared parameters (None: the method's default)
      parameters=ml_collections.ConfigDict(dict(
          normalize=ref(None, field_type=bool), t=ref(None, field_type=float),
          rescale=ref(None, field_type=bool), **{"lambda": ref(None, field_type=float)})),
      dtype="",  # output dtype (and cast of every input); default: the inputs' dtype
      include="",  # regex of params paths to merge; the rest is copied from base/first
      seed=0,  # DARE masks
      out_hf=False,  # also write workdir/hf
      search=stage.search_block(),  # search the weights first (budget > 0)
  ))
  return config
