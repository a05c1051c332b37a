"""Checkpoint conversion between Hugging Face safetensors and our Orbax layout (see `hf.py`)."""

from pgpo_jax.convert.hf import (
  DEFAULT_MAX_SHARD_BYTES,
  ConvertSummary,
  hf_to_orbax,
  orbax_to_hf,
  params_to_hf,
)

__all__ = [
  "DEFAULT_MAX_SHARD_BYTES",
  "ConvertSummary",
  "hf_to_orbax",
  "orbax_to_hf",
  "params_to_hf",
]
