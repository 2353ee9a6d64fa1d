"""Model configs: parameter counts against the published sizes and the params tree,
FLOPs per token by hand, JSON round trip, errors that name the field."""

import json

import jax
import numpy as np
import pytest

from aya_jax.models import config as config_lib
from aya_jax.models import init_params, tiny


@pytest.mark.parametrize("name, published", [
    ("aya_expanse_8b", 8.03e9),   # CohereForAI/aya-expanse-8b model card: 8B
    ("llama3_8b", 8.03e9),        # Meta-Llama-3-8B: 8.03B
    ("gemma2_2b", 2.61e9),        # gemma-2-2b: 2.61B
    ("qwen2_0.5b", 0.494e9),      # Qwen2-0.5B: 0.49B
])
def test_preset_sizes_match_the_published_counts(name, published):
  # n_params counts the matmuls and embeddings, not norms or biases (< 0.1% here)
  assert config_lib.preset(name).n_params == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("family", config_lib.FAMILIES)
def test_n_params_counts_every_matrix_of_the_params_tree(family):
  cfg = tiny(family)
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  matrices = sum(int(np.prod(x.shape)) for path, x in flat
                 if jax.tree_util.keystr(path).endswith(("kernel']", "embedding']")))
  assert cfg.n_params == matrices


def test_train_flops_per_token_by_hand():
  cfg = tiny("llama", vocab_size=100, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
             head_dim=4, d_ff=16)
  per_layer = 8 * 4 * (2 + 2 * 1) + 2 * 4 * 8 + 3 * 8 * 16  # qkv + out + gate/up/down
  matmul = 2 * per_layer + 100 * 8  # + unembedding
  attn = 12 * 2 * 2 * 4 * 10 / 2    # causal: half of 12 L H Dh T at T = 10
  assert cfg.train_flops_per_token(10) == 6 * matmul + attn


def test_json_round_trip_keeps_tuples():
  cfg = tiny("gemma2", rope_scaling=("linear", 2.0), eos_ids=(2, 3))
  back = config_lib.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
  assert back == cfg and back.sliding_windows == (8, None)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="n_kv_heads"):
    tiny("llama", n_heads=3, n_kv_heads=2)
  with pytest.raises(ValueError, match="family"):
    tiny("llama").replace(family="gpt2")
  with pytest.raises(ValueError, match="sliding_windows"):
    tiny("gemma2", sliding_windows=(4,))
  with pytest.raises(ValueError, match="attention_chunk"):
    tiny("llama", attention_chunk=-1)
  with pytest.raises(ValueError, match="remat='some'"):
    tiny("llama", remat="some")
  with pytest.raises(ValueError, match="unknown model preset 'llama9'"):
    config_lib.preset("llama9")
