"""Bucket sizes: the static shapes that host data is padded to, in one place.

Device programs compile once per input shape, so every variable size is rounded up to a bucket:
prompt lengths (`seq_bucket`, or the configured `default_length_buckets`), patches per row
(`patch_bucket`), prompts per call (`batch_bucket`). Few buckets mean few compiles; fine buckets
mean little padding. Pure Python: used by the model's host API, the data pipeline and the rollout.
"""

from __future__ import annotations

from typing import Sequence


def seq_bucket(t: int, multiple: int = 32) -> int:
  """Sequence length t rounded up to a multiple of `multiple` (at least one multiple)."""
  return max(multiple, -(-int(t) // multiple) * multiple)


def patch_bucket(n: int, minimum: int = 64) -> int:
  """Static patch budget for n patches: 4 buckets per octave, multiple of 16 (≤ 25% waste)."""
  n = max(int(n), minimum)
  step = max(16, 1 << max(0, (n - 1).bit_length() - 3))
  return -(-n // step) * step


def batch_bucket(n: int, multiple: int = 1) -> int:
  """n rounded up to a multiple of `multiple` (the batch shards): no power-of-two padding, which
  would decode up to ~2x the rows; each distinct batch size compiles once."""
  return max(-(-int(n) // multiple) * multiple, multiple)


def bucket_size(n: int, buckets: Sequence[int] | None, *, minimum: int = 1) -> int:
  """The smallest allowed size >= n: from `buckets`, or the next power of two (>= minimum)."""
  if buckets is None:
    return max(int(minimum), 1 << max(int(n) - 1, 0).bit_length())
  for b in sorted(buckets):
    if b >= n:
      return int(b)
  raise ValueError(f"size {n} exceeds the largest bucket {max(buckets)} of {tuple(buckets)}")


def default_length_buckets(max_prompt_length: int, smallest: int = 64) -> tuple[int, ...]:
  """Powers of two from `smallest` below `max_prompt_length`, then `max_prompt_length` itself."""
  out, b = [], smallest
  while b < max_prompt_length:
    out.append(b)
    b *= 2
  return tuple(out) + (int(max_prompt_length),)
