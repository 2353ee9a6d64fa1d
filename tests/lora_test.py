"""LoRA, rsLoRA and MoLoRA in the model (models/lora.py): step 0 is the base exactly,
PEFT's init and scale, merging into the kernels, one expert is LoRA, the router's weights
sum to 1, target selection, and training that moves only the adapters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax import axes, sharding
from aya_jax.models import config as mc
from aya_jax.models import forward, lora
from aya_jax.train import common, steps

TOKENS = (np.arange(24).reshape(2, 12) * 7) % 90 + 3


def _mesh():
  return sharding.make_mesh((-1, 1, 1)), axes.rules("fsdp")


def _with_adapters(cfg, seed=1, **lora_kw):
  mesh, rules = _mesh()
  base = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, rules)
  lcfg = cfg.replace(lora=mc.LoraConfig(**{"rank": 4, "alpha": 8.0, **lora_kw}))
  return base, lcfg, sharding.add_adapters_sharded(lcfg, base, jax.random.key(seed), mesh, rules)


def _randomise_b(params, seed=3, scale=0.05):
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  ads = jax.tree_util.tree_map_with_path(
      lambda kp, x: (jax.random.normal(next(keys), x.shape) * scale
                     if str(kp[-1].key) == "b" else x), params[lora.KEY])
  return {**params, lora.KEY: ads}


@pytest.mark.parametrize("family", ["llama", "cohere", "gemma3", "qwen2"])
def test_step_zero_is_the_base_exactly(family):
  cfg = mc.tiny(family)
  base, lcfg, params = _with_adapters(cfg, rslora=True)
  np.testing.assert_array_equal(forward(lcfg, params, TOKENS), forward(cfg, base, TOKENS))


def test_init_and_scale_follow_peft():
  base, lcfg, params = _with_adapters(mc.tiny("llama"), rank=8, alpha=16.0)
  q = params[lora.KEY]["layers"]["attn"]["q"]
  assert q["a"].shape == (2, 48, 8) and q["b"].shape == (2, 8, 3, 16)
  assert not np.any(np.asarray(q["b"]))
  bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) over fan_in 48
  a = np.asarray(q["a"])
  assert np.abs(a).max() <= bound and abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound
  o = params[lora.KEY]["layers"]["attn"]["o"]["a"]  # o's input is [heads, head_dim]
  assert np.abs(np.asarray(o)).max() <= 1 / math.sqrt(48)
  assert mc.LoraConfig(rank=8, alpha=16.0).scale == 2.0
  assert mc.LoraConfig(rank=16, alpha=16.0, rslora=True).scale == 4.0


@pytest.mark.parametrize("family", ["llama", "cohere2"])
def test_merged_kernels_compute_the_adapted_model(family):
  cfg = mc.tiny(family)
  base, lcfg, params = _with_adapters(cfg)
  params = _randomise_b(params)
  with_adapters = forward(lcfg, params, TOKENS)
  assert np.abs(with_adapters - forward(cfg, base, TOKENS)).max() > 1e-2  # they do something
  merged_cfg, merged = lora.merge(lcfg, params)
  assert merged_cfg.lora is None and lora.KEY not in merged
  np.testing.assert_allclose(forward(merged_cfg, merged, TOKENS), with_adapters, atol=2e-5)
  # by hand for one kernel: W + alpha/r * A B
  q = params[lora.KEY]["layers"]["attn"]["q"]
  want = base["layers"]["attn"]["q"]["kernel"] + 2.0 * jnp.einsum("ldr,lrhk->ldhk", q["a"],
                                                                  q["b"])
  np.testing.assert_allclose(merged["layers"]["attn"]["q"]["kernel"], want, atol=1e-6)


def test_targets_pick_the_kernels_and_a_miss_is_named():
  _, _, params = _with_adapters(mc.tiny("llama"), targets=r".*/attn/(q|v)/kernel")
  assert sorted(lora.adapted_paths(params)) == ["layers/attn/q", "layers/attn/v"]
  with pytest.raises(ValueError, match="matches no kernel.*layers/"):
    _with_adapters(mc.tiny("llama"), targets=r".*/qproj/kernel")
  with pytest.raises(ValueError, match="not a regex"):
    mc.LoraConfig(targets="(")


def test_one_expert_is_lora_and_the_router_weights_sum_to_one():
  cfg = mc.tiny("llama")
  base, lcfg, params = _with_adapters(cfg)
  params = _randomise_b(params)
  plain = forward(lcfg, params, TOKENS)
  for experts in (1, 3):
    _, ecfg, moe = _with_adapters(cfg, experts=experts, seed=5)
    routers = {p: ad["router"] for p, ad in lora.adapted_paths(moe).items()}
    # every expert a copy of the plain adapter, random routers: the mixture is that
    # adapter exactly when the weights sum to 1
    ads = {}
    for path, ad in lora.adapted_paths(params).items():
      a = jnp.repeat(ad["a"][..., None, :], experts, axis=-2)
      b = jnp.repeat(ad["b"][:, None], experts, axis=1)
      router = jax.random.normal(jax.random.key(experts), routers[path].shape)
      node = ads
      for k in path.split("/"):
        node = node.setdefault(k, {})
      node.update(a=a, b=b, router=router)
    out = forward(ecfg, {**base, lora.KEY: ads}, TOKENS)
    np.testing.assert_allclose(out, plain, atol=2e-5)
  with pytest.raises(ValueError, match="cannot be merged"):
    lora.merge(ecfg, moe)


def test_molora_experts_differ_by_token():
  cfg = mc.tiny("llama")
  base, ecfg, moe = _with_adapters(cfg, experts=2)
  moe = _randomise_b(moe)
  moe2 = jax.tree_util.tree_map_with_path(
      lambda kp, x: x * 10 if str(kp[-1].key) == "router" else x, moe)
  # the router changes the output: the mixture depends on the token
  assert np.abs(forward(ecfg, moe, TOKENS) - forward(ecfg, moe2, TOKENS)).max() > 1e-4


def _sft_batch(vocab=97, rows=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, vocab, (rows, length)).astype(np.int32)
  return dict(tokens=toks, targets=np.roll(toks, -1, 1), loss_mask=np.ones_like(toks),
              segment_ids=np.ones_like(toks), positions=np.tile(np.arange(length), (rows, 1)))


@pytest.mark.parametrize("experts,dropout", [(0, 0.0), (0, 0.1), (2, 0.0)])
def test_training_moves_only_the_adapters(experts, dropout):
  cfg = mc.tiny("llama")
  mesh, rules = _mesh()
  _, lcfg, params = _with_adapters(cfg, experts=experts, dropout=dropout)
  base_before = jax.device_get(lora.without_adapters(params))
  config = common.base_config("sft")
  config.optim.lr, config.optim.warmup_steps = 1e-2, 0
  st, fn = common.make_trainer(config, lcfg, params, steps.sft_loss_fn(lcfg), mesh, rules)
  # no optimizer state, no gradient for the base: Adam's moments mirror the adapters only
  n_adapter = sum(x.size for x in jax.tree.leaves(params[lora.KEY]))
  n_moments = sum(x.size for x in jax.tree.leaves(st.opt_state) if x.ndim > 0)
  assert n_moments == 2 * n_adapter
  batch = sharding.global_batch(_sft_batch(), mesh)
  step = common.jit_for(fn, st, batch, mesh)
  losses_seen = []
  for i in range(12):
    st, m = step(st, batch, jax.random.key(i))
    losses_seen.append(float(m["loss"]))
  assert losses_seen[-1] < losses_seen[0] - 0.05, losses_seen
  after = jax.device_get(st.model_params())
  for x, y in zip(jax.tree.leaves(base_before), jax.tree.leaves(lora.without_adapters(after))):
    assert x.tobytes() == y.tobytes()  # the base, byte for byte
  assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(after[lora.KEY]))
