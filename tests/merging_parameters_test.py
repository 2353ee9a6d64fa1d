"""Merge parameters per tensor: depth interpolation and filters by hand, defaults and
errors, DARE keys that depend only on (seed, path, layer), HF names."""

import jax
import pytest

from aya_jax.merging import parameters
from aya_jax.models import tiny


def test_settings_interpolate_over_depth_and_the_first_matching_filter_wins():
  r = parameters.resolve_setting
  assert r(0.3, ("x",), 0.7) == 0.3 and r(None, ("x",)) is None
  # [0, 1, 4] at t: x = t * 2 between entries -> t = 0.75: 1 + 0.5 * (4 - 1)
  assert r([0.0, 1.0, 4.0], ("x",), 0.75) == pytest.approx(2.5)
  assert r([0.0, 1.0, 4.0], ("x",), 1.0) == 4.0
  assert r(["a", "b"], ("x",), 0.9) == "a"  # not numbers: a step at int(t * (n - 1))
  setting = [{"filter": "attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]},
             {"value": 0.9}]
  assert r(setting, ("layers/attn/q/kernel",), 0.5) == 0.1
  assert r(setting, ("layers/mlp/up/kernel",), 0.5) == pytest.approx(0.5)
  assert r(setting, ("embedder/embedding",), 0.0) == 0.9
  # a filter may match the HF name alone
  assert r([{"filter": r"layers\.3\.self_attn", "value": 2.0}],
           ("layers/attn/q/kernel", "model.layers.3.self_attn.q_proj.weight"), 0.0) == 2.0
  with pytest.raises(ValueError, match="expected numbers or"):
    r([{"filter": "x"}], ("x",), 0.0)


def test_resolve_fills_defaults_and_names_what_is_wrong():
  p = parameters.resolve_parameters("ties", {"lambda": 0.5}, [{"weight": 1.0},
                                                             {"weight": 2, "density": 0.3}],
                                    2, ("w",), 0.0)
  assert p == {"normalize": True, "rescale": False, "lambda": 0.5,
               "weight": [1.0, 2.0], "density": [1.0, 0.3]}
  bad = [
      (("linear", {"lambda": 1.0}, [{"weight": 1.0}]), r"\['lambda'\] are not parameters"),
      (("linear", None, [{}]), "needs parameter 'weight' for model 0"),
      (("linear", None, [{"weight": "x"}]), "'weight' of model 0 is 'x', not a number"),
      (("slerp", None, [{}]), "needs parameter 't'"),
      (("nope", None, [{}]), "unknown merge method 'nope'"),
      (("linear", None, [{"weight": 1.0}, {"weight": 1.0}]), "2 model_parameters for 1"),
  ]
  for (method, shared, per_model), match in bad:
    with pytest.raises(ValueError, match=match):
      parameters.resolve_parameters(method, shared, per_model, 1, ("w",), 0.0)
  assert parameters.resolve_parameters("linear", {"int8_mask": True}, [{"weight": 1.0}], 1,
                                       ("w",), 0.0)["weight"] == [1.0]  # a memory option


def test_check_method_before_any_tensor():
  for args, match in [(("ties", 2, False), "needs a base model"), (("linear", 0, False),
                      "no models"), (("slerp", 2, True), "one other model"),
                      (("model_stock", 1, True), "2 or more")]:
    with pytest.raises(ValueError, match=match):
      parameters.check_method(*args)
  parameters.check_method("linear", 2, False)


def test_dare_keys_depend_on_seed_path_and_layer_only():
  same = lambda a, b: bool((jax.random.key_data(a) == jax.random.key_data(b)).all())  # noqa
  k = parameters.tensor_key
  assert same(k(3, "layers/a", 1), k(3, "layers/a", 1))
  assert not same(k(3, "layers/a", 1), k(3, "layers/a", 2))
  assert not same(k(3, "layers/a", None), k(3, "layers/b", None))
  assert not same(k(3, "e"), k(4, "e"))
  names, p, key = parameters.tensor_parameters(
      "dare_linear", None, [{"weight": 1.0, "density": [0.2, 0.6]}], 1, "layers/a", 2, 3,
      {"layers/a": "model.layers.{i}.a"}, seed=3)
  assert names == ("layers/a", "model.layers.2.a") and p["density"] == [pytest.approx(0.6)]
  assert same(key, k(3, "layers/a", 2))
  assert parameters.tensor_parameters("linear", None, [{"weight": 1.0}], 1, "e", None, 1,
                                      None)[2] is None  # no drop, no key


def test_hf_names_and_layouts_of_a_llama():
  cfg = tiny("llama")
  names = parameters.hf_names(cfg)
  assert names["layers/attn/q/kernel"] == "model.layers.{i}.self_attn.q_proj.weight"
  assert names["embedder/embedding"] == "model.embed_tokens.weight"
  layouts = parameters.hf_layouts(cfg)
  # a linear layer is stored transposed in HF ([out, in]); the embedding as it is
  assert layouts["layers/mlp/up/kernel"] == ("lin", (cfg.d_model, cfg.d_ff))
  assert layouts["embedder/embedding"] == ("copy", (cfg.vocab_size, cfg.d_model))
