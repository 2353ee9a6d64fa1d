"""Weight search: it recovers a known mixture and the densities a TIES objective wants."""

import json

import numpy as np
import pytest

from aya_jax.merging import search as merge_search


A = np.float32


# ---------------------------------------------------------------------------
# weight search
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["differential_evolution", "random"])
def test_search_recovers_known_mixture(optimizer, tmp_path):
  rng = np.random.default_rng(0)
  models = [{"w": rng.normal(size=(40,)).astype(A)} for _ in range(3)]
  target = 0.7 * models[0]["w"] + 0.3 * models[1]["w"]  # model 2 gets no weight
  score = lambda p: -float(np.sum((np.asarray(p["w"]) - target) ** 2))
  res = merge_search.search_weights(models, score, budget=240, optimizer=optimizer, seed=1,
                                    log_path=str(tmp_path / "log.jsonl"))
  tol = 0.05 if optimizer == "differential_evolution" else 0.1
  np.testing.assert_allclose(res.weights, [0.7, 0.3, 0.0], atol=tol)
  assert res.nonzero == [0, 1]
  assert len(res.history) <= 240
  lines = (tmp_path / "log.jsonl").read_text().splitlines()
  assert len(lines) == len(res.history) and json.loads(lines[0])["score"] <= res.score
  assert res.score == max(h["score"] for h in res.history)


def test_search_densities_for_ties():
  b = {"w": np.zeros(20, A)}
  rng = np.random.default_rng(2)
  x = {"w": rng.normal(size=(20,)).astype(A)}
  y = {"w": rng.normal(size=(20,)).astype(A)}
  # the objective wants x's delta untrimmed: density -> 1 for model 0
  score = lambda p: -float(np.sum((np.asarray(p["w"]) - x["w"]) ** 2))
  res = merge_search.search_weights([x, y], score, method="ties", base=b, budget=120,
                                    search_density=True, seed=0)
  assert res.weights[0] > 0.9 and res.densities[0] > 0.9 and res.score > -0.5
