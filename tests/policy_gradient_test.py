"""RLOO's data plumbing: rows of prompt + sample with the loss on the sample, shuffled
epochs that resume exactly, every row's log-probs gathered in wrapped batches."""

import jax
import numpy as np

from aya_jax import sharding
from aya_jax.models import init_params, tiny
from aya_jax.train import policy_gradient, steps


def test_sample_rows_put_the_loss_on_the_sampled_ids_only():
  prompts = [[5, 6, 7], [8]]
  samples = [[1, 2], [3], [4, 4, 4], [9, 9, 9, 9, 9]]  # k = 2 per prompt
  rows = policy_gradient.sample_rows(prompts, samples, 2, 6, 0)
  # row 3: prompt [8] + 5 sampled ids, cut to 6 tokens; the targets are shifted by one
  want_tokens = [[5, 6, 7, 1, 2], [5, 6, 7, 3], [8, 4, 4, 4], [8, 9, 9, 9, 9, 9]]
  for i, want in enumerate(want_tokens):
    full = np.asarray(want)
    n = len(full) - 1
    np.testing.assert_array_equal(rows["tokens"][i, :n], full[:-1])
    np.testing.assert_array_equal(rows["targets"][i, :n], full[1:])
    start = len(prompts[i // 2]) - 1  # the first target that is a sampled id
    want_mask = np.zeros(6, np.int32)
    want_mask[start:n] = 1
    np.testing.assert_array_equal(rows["loss_mask"][i], want_mask, err_msg=str(i))


def test_epochs_are_permutations_and_the_iterator_resumes_exactly():
  arrays = {"x": np.arange(10), "y": np.arange(10) * 2}
  it = policy_gradient.ArrayIterator(arrays, 4, seed=3)
  seen = np.concatenate([next(it)["x"] for _ in range(5)])  # 20 rows: two whole epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  assert list(seen[:10]) != list(seen[10:])  # each epoch its own order
  again = policy_gradient.ArrayIterator(arrays, 4, seed=3)
  again.set_state({"position": 8})
  later = policy_gradient.ArrayIterator(arrays, 4, seed=3)
  for _ in range(2):
    next(later)
  assert later.get_state() == {"position": 8}
  b1, b2 = next(again), next(later)
  np.testing.assert_array_equal(b1["x"], b2["x"])
  np.testing.assert_array_equal(b1["y"], b1["x"] * 2)  # the arrays stay aligned
  np.testing.assert_array_equal(b1["x"], seen[8:12])


def test_token_logps_cover_every_row_once_with_a_wrapped_last_batch():
  cfg = tiny("llama", vocab_size=64, d_model=32, head_dim=8, n_heads=2, n_kv_heads=1, d_ff=64)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  rows = policy_gradient.sample_rows([list(rng.integers(3, 64, 4)) for _ in range(5)],
                          [list(rng.integers(3, 64, 3)) for _ in range(5)], 1, 8, 0)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  fn = policy_gradient.masked_token_logps_fn(cfg, mesh)
  got = policy_gradient.token_logps(fn, params, rows, 2, mesh)
  ref = np.asarray(steps.token_logps_fn(cfg)(params, rows)) * rows["loss_mask"]
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert (got[rows["loss_mask"] == 0] == 0).all()


def test_advantages_of_each_algorithm_by_hand():
  """RLOO: the KL-shaped reward, leave-one-out; GRPO: the score, group-normalised;
  Dr. GRPO: the score, centred."""
  scores = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
  pol = np.array([-1.0, -2.0, -3.0, -1.0, -1.0, -1.0])
  ref = np.array([-1.5, -2.0, -2.0, -1.0, -1.0, -1.0])
  rewards, adv = policy_gradient.advantages("rloo", scores, pol, ref, 0.2)
  np.testing.assert_allclose(rewards, [0.9, 0.0, 0.2, 0.5, 0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(adv, [0.9 - 0.1, 0.0 - 0.55, 0.2 - 0.45, 0, 0, 0], atol=1e-6)
  rewards, adv = policy_gradient.advantages("grpo", scores, pol, ref, 0.2)
  std = np.std([1.0, 0.0, 0.0], ddof=1)
  np.testing.assert_allclose(rewards, scores.reshape(-1))
  np.testing.assert_allclose(adv, np.array([2, -1, -1, 0, 0, 0]) / 3 / (std + 1e-4), rtol=1e-6)
  _, adv = policy_gradient.advantages("dr_grpo", scores, pol, ref, 0.2)
  np.testing.assert_allclose(adv, np.array([2, -1, -1, 0, 0, 0]) / 3, rtol=1e-6)
