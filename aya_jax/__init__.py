"""aya_jax: the Aya Expanse multilingual post-training recipe in JAX/Flax."""
