"""Sampling and inpainting an autoregressive prior over raster-ordered code maps (pure JAX functions).

`sampling`: the `Decoder` interface (built from a GPT by `gpt_decoder`), teacher-forced log-probabilities,
logit filtering and ancestral / prefix-forced sampling. `reweight`: inpainting under any mask by
sampling-importance-resampling of prefix-forced completions.
"""
from __future__ import annotations

from vqddm_jax.autoregressive import reweight, sampling
from vqddm_jax.autoregressive.reweight import effective_sample_size, inpaint_reweighted, log_weights
from vqddm_jax.autoregressive.sampling import (Decoder, filter_logits, gpt_decoder, log_probs, sample,
                                               shifted_inputs)

__all__ = [
    "Decoder", "effective_sample_size", "filter_logits", "gpt_decoder", "inpaint_reweighted", "log_probs",
    "log_weights", "reweight", "sample", "sampling", "shifted_inputs",
]
