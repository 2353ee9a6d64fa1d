"""Routing: the fixed table, the learned router (features, one gradient step by hand,
save/load), the hashed hold-out."""

import zlib

import numpy as np
import pytest

from aya_jax.arbitrage import routing
from aya_jax.data import records


def _prompt(pid, lang, text):
  return records.PromptRecord(pid, lang, ({"role": "user", "content": text},))


def test_fixed_table_routes_by_language_and_names_the_unrouted():
  table = routing.parse_table(" fr:a, de:b ,")
  assert table == {"fr": "a", "de": "b"}
  prompts = [_prompt("1", "fr", "x"), _prompt("2", "de", "y"), _prompt("3", "ja", "z")]
  routes, problems = routing.fixed_routes(prompts, table)
  assert routes == {"1": "a", "2": "b"}
  assert problems == [{"id": "3", "problem": "no teacher for language 'ja'"}]
  routes, problems = routing.fixed_routes(prompts, table, default="c")
  assert routes == {"1": "a", "2": "b", "3": "c"} and problems == []


def test_features_are_hashed_grams_normalised_then_a_language_one_hot():
  dim = 64
  x = routing.features(_prompt("1", "fr", "Ab"), dim, ["en", "fr"])
  # 'ab' lower-cased: the word 'ab' and no trigram (2 characters): one bucket, norm 1
  want = np.zeros(dim + 2, np.float32)
  want[zlib.crc32(b"ab") % dim] = 1.0
  want[dim + 1] = 1.0
  np.testing.assert_array_equal(x, want)
  # 'abc': the word and its one trigram count 2 in one bucket, normalised to 1;
  # a language outside the list sets no bit
  x = routing.features(_prompt("2", "de", "abc"), dim, ["en", "fr"])
  assert x[dim:].sum() == 0 and x[zlib.crc32(b"abc") % dim] == pytest.approx(1.0)
  assert np.count_nonzero(x) == 1


def test_one_gradient_step_by_hand_then_separable_data_is_learned(tmp_path):
  prompts = [_prompt(str(i), lang, text) for i, (lang, text) in
             enumerate([("fr", "un"), ("fr", "deux"), ("de", "drei")])]
  labels = ["A", "A", "B"]
  router = routing.LearnedRouter(["A", "B"], ["fr", "de"], dim=32)
  x = router.featurize(prompts)
  router.fit(prompts, labels, steps=1, lr=2.0, l2=0.0)
  # from zero weights the softmax is uniform: grad = (0.5 - y) / n per row
  y = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
  g = (0.5 - y) / 3
  np.testing.assert_allclose(router.b, -2.0 * g.sum(0), atol=1e-7)
  np.testing.assert_allclose(router.w, -2.0 * x.T @ g, atol=1e-7)
  router = routing.LearnedRouter(["A", "B"], ["fr", "de"], dim=32).fit(prompts, labels)
  assert router.predict(prompts) == labels and router.predict([]) == []
  router.save(str(tmp_path / "router.npz"))
  again = routing.LearnedRouter.load(str(tmp_path / "router.npz"))
  assert (again.teachers, again.languages, again.dim) == (["A", "B"], ["fr", "de"], 32)
  np.testing.assert_array_equal(again.w, router.w)
  assert again.predict(prompts) == labels


def test_holdout_is_a_fixed_hash_fraction():
  ids = [f"p{i}" for i in range(4000)]
  held = [i for i in ids if routing.in_holdout(i, 0.2)]
  # Binomial(4000, 0.2): sd 25, so 800 +- 100 is 4 sd
  assert abs(len(held) - 800) < 100
  assert held == [i for i in ids if routing.in_holdout(i, 0.2)]  # the same on every run
  assert not any(routing.in_holdout(i, 0.0) for i in ids)
