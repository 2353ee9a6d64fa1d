"""Sampling: batched prefill + while-loop decode (sampler) and methods."""

from aya_jax.sampling.methods import (Chain, Greedy, Sampling, Temperature, TopK, TopP,
                                      filtered_logits, from_config, sample)
from aya_jax.sampling.sampler import SampleResult, bucket_batch, bucket_length, generate

__all__ = ["Chain", "Greedy", "Sampling", "Temperature", "TopK", "TopP", "SampleResult",
           "bucket_batch", "bucket_length", "filtered_logits", "from_config", "generate",
           "sample"]
