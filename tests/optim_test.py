"""Tests for aya_jax.optim.

References: hand-computed schedule values (formulas in the comments) and
torch.optim.AdamW (+ torch.nn.utils.clip_grad_norm_) for the update rule.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from aya_jax import optim


def _cfg(**kw):
  cfg = optim.default_optim_config()
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  return {
      "embedder": {"embedding": f(7, 5)},
      "layers": {"attn": {"q": {"kernel": f(2, 5, 3), "bias": f(2, 3)}},
                 "pre_attn_norm": {"scale": f(2, 5)}},
      "final_norm": {"scale": f(5)},
      "lm_head": {"kernel": f(5, 7)},
  }


def _apply(tx, params, grads_seq):
  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for g in grads_seq:
    params, state = step(params, state, g)
  return params, state


# ---------------------------------------------------------------- schedule

LR, END = 1e-3, 1e-4  # end_lr_ratio 0.1; warmup 10; total 110 -> decay 100


@pytest.mark.parametrize("kind,step,want", [
    ("cosine", 0, 0.0),
    ("cosine", 5, LR * 5 / 10),                 # warmup midpoint: lr / 2
    ("cosine", 10, LR),                         # end of warmup
    ("cosine", 35, END + (LR - END) * 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine", 60, (LR + END) / 2),             # cosine midpoint
    ("cosine", 110, END),                       # end
    ("cosine", 500, END),                       # held after the end
    ("linear", 35, LR - (LR - END) * 0.25),
    ("linear", 60, (LR + END) / 2),
    ("linear", 110, END),
    ("constant", 5, LR / 2),
    ("constant", 60, LR),
    ("constant", 500, LR),
])
def test_schedule_values(kind, step, want):
  sched = optim.make_schedule(_cfg(lr=LR, warmup_steps=10, total_steps=110,
                                   end_lr_ratio=0.1, schedule=kind))
  np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, atol=1e-12)


def test_schedule_without_warmup_starts_at_peak():
  sched = optim.make_schedule({"lr": 2e-5, "warmup_steps": 0,
                               "total_steps": 100, "schedule": "linear"})
  np.testing.assert_allclose(float(sched(0)), 2e-5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(50)), 1e-5, rtol=1e-6)


def test_config_is_locked_and_validated():
  cfg = optim.default_optim_config()
  with pytest.raises(AttributeError):
    cfg.learning_rate = 1.0  # typo: not a field
  with pytest.raises(KeyError, match="lrr"):
    optim.make_optimizer({"lrr": 1e-3}, _params())
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule({"schedule": "cosin"})
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule({"warmup_steps": 20, "total_steps": 10})


# ---------------------------------------------------------------- AdamW

def test_adamw_matches_torch_with_schedule_clipping_and_decay_mask():
  hp = dict(lr=3e-2, warmup_steps=2, total_steps=6, schedule="cosine",
            end_lr_ratio=0.1, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1,
            max_grad_norm=0.7)
  cfg = _cfg(**hp)
  params = _params(1)
  rng = np.random.default_rng(2)
  grads_seq = [jax.tree.map(
      lambda p, s=s: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)
                                 * s), params) for s in (0.1, 3.0, 1.0, 0.05)]
  got, _ = _apply(optim.make_optimizer(cfg, params), params, grads_seq)

  # torch reference: decay group = kernels; no-decay group = norms, bias,
  # embedding (decay_embeddings=False).
  paths = jax.tree.leaves(optim.param_paths(params))
  leaves = jax.tree.leaves(params)
  tparams = [torch.tensor(np.asarray(p), dtype=torch.float64,
                          requires_grad=True) for p in leaves]
  decays = jax.tree.leaves(optim.decay_mask(params))
  assert sorted(p for p, d in zip(paths, decays) if d) == [
      "layers/attn/q/kernel", "lm_head/kernel"]
  topt = torch.optim.AdamW(
      [{"params": [t for t, d in zip(tparams, decays) if d],
        "weight_decay": hp["weight_decay"]},
       {"params": [t for t, d in zip(tparams, decays) if not d],
        "weight_decay": 0.0}],
      lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"])
  sched = optim.make_schedule(cfg)
  for i, grads in enumerate(grads_seq):
    for t, g in zip(tparams, jax.tree.leaves(grads)):
      t.grad = torch.tensor(np.asarray(g), dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_(tparams, hp["max_grad_norm"])
    for group in topt.param_groups:
      group["lr"] = float(sched(i))
    topt.step()
  for path, t, g in zip(paths, tparams, jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), t.detach().numpy(), rtol=2e-5,
                               atol=2e-6, err_msg=path)
  # and the run really moved every leaf
  for a, b in zip(jax.tree.leaves(got), leaves):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_no_weight_decay_on_norms_biases_embeddings(decay_embeddings):
  params = _params(3)
  cfg = _cfg(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant",
             decay_embeddings=decay_embeddings)
  zeros = jax.tree.map(jnp.zeros_like, params)
  got, _ = _apply(optim.make_optimizer(cfg, params), params, [zeros])
  # zero grads: Adam part is 0 / (0 + eps) = 0; decay gives p * (1 - lr wd)
  shrink = 1.0 - 0.1 * 0.5
  for path, new, old in zip(jax.tree.leaves(optim.param_paths(params)),
                            jax.tree.leaves(got), jax.tree.leaves(params)):
    decayed = path.endswith("kernel") or (decay_embeddings and
                                          path.startswith("embedder"))
    want = np.asarray(old) * (shrink if decayed else 1.0)
    np.testing.assert_allclose(new, want, rtol=1e-6, err_msg=path)


def test_frozen_leaves_unchanged_and_hold_no_state():
  params = _params(4)
  params["embedder"]["embedding"] = jnp.ones((11, 13))  # a unique shape
  cfg = _cfg(lr=0.1, weight_decay=0.1, warmup_steps=0, schedule="constant",
             freeze=("embedder/.*", "layers/attn/q/bias"))
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.make_optimizer(cfg, params)
  got, state = _apply(tx, params, [grads, grads, grads])
  np.testing.assert_array_equal(got["embedder"]["embedding"],
                                params["embedder"]["embedding"])
  np.testing.assert_array_equal(got["layers"]["attn"]["q"]["bias"],
                                params["layers"]["attn"]["q"]["bias"])
  assert not np.allclose(got["lm_head"]["kernel"], params["lm_head"]["kernel"])
  assert (11, 13) not in [x.shape for x in jax.tree.leaves(state)]
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  n_train = sum(p.size for p in jax.tree.leaves(params)) - 11 * 13 - 2 * 3
  assert n_state == 2 * n_train  # mu and nu for trainable leaves only


def test_freeze_pattern_matching_nothing_fails():
  with pytest.raises(ValueError, match="embedding_table"):
    optim.make_optimizer({"freeze": ["embedding_table"]}, _params())


def test_clipping_caps_global_norm():
  # b1 = b2 = 0 and a huge eps make the Adam step linear in the gradient:
  # update = -lr * g / (|g| + eps) ~= -lr * g / eps, so its norm shows the
  # (clipped) gradient norm.
  lr, eps = 1.0, 1e6
  params = _params(5)
  for max_norm, g_norm, want in [(1.0, 10.0, 1.0), (1.0, 0.5, 0.5),
                                 (0.0, 10.0, 10.0)]:
    cfg = _cfg(lr=lr, b1=0.0, b2=0.0, eps=eps, warmup_steps=0,
               schedule="constant", max_grad_norm=max_norm)
    g = jax.tree.map(jnp.ones_like, params)
    scale = g_norm / float(optax.tree.norm(g))
    g = jax.tree.map(lambda x: x * scale, g)
    tx = optim.make_optimizer(cfg, params)
    updates, _ = jax.jit(tx.update)(g, tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)) * eps / lr,
                               want, rtol=1e-4)


def test_grad_accum_multisteps_equals_one_step_on_mean():
  params = _params(6)
  g1 = jax.tree.map(jnp.ones_like, params)
  g2 = jax.tree.map(lambda p: -0.5 * jnp.ones_like(p) + p, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  base = dict(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.1)
  tx2 = optim.make_optimizer(_cfg(grad_accum=2, **base), params)
  state, update = tx2.init(params), jax.jit(tx2.update)
  u, state = update(g1, state, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
  u, state = update(g2, state, params)
  got = optax.apply_updates(params, u)
  want, _ = _apply(optim.make_optimizer(_cfg(**base), params), params, [mean])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_param_paths():
  paths = optim.param_paths(_params())
  assert paths["layers"]["attn"]["q"]["kernel"] == "layers/attn/q/kernel"
  assert paths["final_norm"]["scale"] == "final_norm/scale"
