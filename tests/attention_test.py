"""The attention kernels: chunked (flash-style) attention against dense, values and
gradients, and the memory its backward pass keeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aya_jax.models import attention
from conftest import close_to_float32


@pytest.mark.parametrize("window,cap", [(attention.NO_WINDOW, None), (4, 0.7)])
def test_chunked_attention_kernel_equals_dense(window, cap):
  """The kernel alone, with batch != kv heads != groups (3, 2, 4) so no axis
  can stand in for another; gradients for q, k and v."""
  rng = np.random.default_rng(8)
  b, t, k, g, d = 3, 11, 2, 4, 8
  q = jnp.asarray(rng.normal(size=(b, t, k, g, d)), jnp.float32)
  kv = [jnp.asarray(rng.normal(size=(b, t, k, d)), jnp.float32) for _ in range(2)]
  seg = jnp.asarray([[1] * 4 + [2] * 5 + [0] * 2, [1] * 11, [0] * 3 + [1] * 8], jnp.int32)
  pos = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0], list(range(11)),
                     [0, 0, 0] + list(range(8))], jnp.int32)
  slot = jnp.arange(t)
  w = jnp.int32(window)
  mask = attention.attention_mask(seg, seg, slot, slot, pos, pos, w)
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  fns = [lambda *a: attention.dense_attention(*a, mask, 0.3, cap)] + [
      (lambda c: lambda *a: attention.chunked_attention(*a, seg, pos, w, 0.3, cap, c))(c)
      for c in (3, 4, 16)]  # 16 > T: one tile of T
  outs = [jax.value_and_grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, *kv)
          for f in fns]
  for out in outs[1:]:
    jax.tree.map(close_to_float32, out, outs[0])


def test_chunked_attention_backward_keeps_no_t_by_t_buffer():
  """Compiled temporaries of value_and_grad at T = 2048: the dense path holds
  [G, T, T] float32 logits/probabilities (16 MiB each here); the chunked path
  only O(T * chunk) tiles."""
  b, t, k, g, d = 1, 2048, 1, 1, 16
  q = jax.ShapeDtypeStruct((b, t, k, g, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, t, k, d), jnp.float32)
  seg = jnp.ones((b, t), jnp.int32)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  slot = jnp.arange(t)
  mask = attention.attention_mask(seg, seg, slot, slot, pos, pos, attention.NO_WINDOW)

  def temp_bytes(fn):
    grad = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
  dense = temp_bytes(lambda *a: attention.dense_attention(*a, mask, 0.25, None))
  chunked = temp_bytes(lambda *a: attention.chunked_attention(
      *a, seg, pos, attention.NO_WINDOW, 0.25, None, 128))
  assert dense >= t * t * 4  # at least one [T, T] float32 buffer
  assert chunked < t * t * 4 / 8, (chunked, dense)
