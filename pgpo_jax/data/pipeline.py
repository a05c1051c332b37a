"""The prompt input pipeline: files -> shuffled, sharded, repeated rows -> `PromptBatch`es (grain).

    reader = DatasetReader(spec)                       # reads files, checks columns: errors here
    _EpochShardIndices(len(reader), seed, epochs, shard)   # row ids: per-epoch global shuffle,
                                                           # this host's slice of each epoch
      .map(reader.load)       # RawRow | SkippedRow      (image decode)         } grain threads,
      .map(PromptEncoder)     # EncodedPrompt | SkippedRow (HF processor, RoPE) } ordered
      .to_iter_dataset(ReadOptions(num_threads, prefetch_buffer_size))
    _BatchPrompts             # counts skips, collates B prompts -> PromptBatch (single thread)

Sharding: every host draws the same permutation of all rows for epoch e (grain's index shuffle,
seeded per epoch) and takes positions `shard_index, shard_index + shard_count, ...` of it. So the
shards of one epoch are disjoint and (with `even_shards=False`) cover the data; with
`even_shards=True` (default) each epoch drops its last `num_rows % shard_count` positions so all
hosts get the same number of rows. Skipped rows still differ between hosts; a multi-host trainer
should run with `num_epochs=None` and a step budget rather than wait for the end of the data.

Checkpointing: `PromptIterator.get_state()` is a small JSON-able dict (next row position, skip
counts, a fingerprint of the sharding/shuffle); `set_state` on a fresh iterator resumes with the
next unseen batch. Skips are counted where batches are assembled, so counts are exact for what
was consumed, independent of read-ahead.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import grain
import numpy as np

from pgpo_jax.buckets import default_length_buckets
from pgpo_jax.data.prompts import PaddingSpec, PromptBatch, PromptEncoder, PromptFormat, collate
from pgpo_jax.data.reader import DatasetReader, DatasetSpec, SkippedRow, SkipStats


class _EpochShardIndices(grain.MapDataset):
  """Global row ids in the order this shard reads them; element k is row `perm_e[p]` with
  `e = k // L`, `p = shard_index + (k % L) * shard_count`, L = rows per shard and epoch."""

  def __init__(
    self,
    num_rows: int,
    *,
    seed: int,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
    even_shards: bool,
  ):
    super().__init__()
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    self._num_rows = num_rows
    self._shard_index = shard_index
    self._shard_count = shard_count
    if even_shards:
      self._per_epoch = num_rows // shard_count
    else:
      self._per_epoch = len(range(shard_index, num_rows, shard_count))
    if self._per_epoch == 0:
      raise ValueError(f"{num_rows} rows cannot feed shard {shard_index} of {shard_count}")
    self._length = sys.maxsize if num_epochs is None else self._per_epoch * num_epochs
    # Index k of this view lies in epoch k // num_rows and is shuffled with seed + epoch.
    self._perm = grain.MapDataset.range(num_rows).shuffle(seed=seed)

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return (
      f"EpochShardIndices(rows={self._num_rows}, shard={self._shard_index}/"
      f"{self._shard_count}, per_epoch={self._per_epoch})"
    )

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, j = divmod(int(index), self._per_epoch)
    return self._perm[epoch * self._num_rows + self._shard_index + j * self._shard_count]


class PromptIterator(grain.DatasetIterator):
  """Iterator of `PromptBatch` with checkpointable state and skip statistics."""

  def __init__(
    self,
    parent: grain.DatasetIterator,
    padding: PaddingSpec,
    drop_remainder: bool,
    fingerprint: str,
  ):
    super().__init__(parent)
    self._padding = padding
    self._drop_remainder = drop_remainder
    self._fingerprint = fingerprint
    self._skips = SkipStats()

  @property
  def stats(self) -> SkipStats:
    """Rows read, prompts emitted and skipped rows by reason (live, cumulative over resumes)."""
    return self._skips

  def __next__(self) -> PromptBatch:
    examples = []
    while len(examples) < self._padding.batch_size:
      try:
        item = next(self._parent)
      except StopIteration:
        break
      if isinstance(item, SkippedRow):
        self._skips.add_skip(item)
      else:
        self._skips.add_prompt()
        examples.append(item)
    if not examples or (self._drop_remainder and len(examples) < self._padding.batch_size):
      raise StopIteration
    return collate(examples, self._padding)

  def get_state(self) -> dict[str, Any]:
    return {
      "rows": self._parent.get_state(),
      "stats": self._skips.as_dict(),
      "fingerprint": self._fingerprint,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("fingerprint") != self._fingerprint:
      raise ValueError(
        "data iterator state was saved by a different pipeline: "
        f"{state.get('fingerprint')!r} != {self._fingerprint!r}"
      )
    self._parent.set_state(state["rows"])
    self._skips = SkipStats.from_dict(state["stats"])

  def __str__(self) -> str:
    return f"PromptIterator(batch_size={self._padding.batch_size})"


class _BatchPrompts(grain.IterDataset):
  """Counts `SkippedRow`s and collates `EncodedPrompt`s into `PromptBatch`es."""

  def __init__(
    self, parent: grain.IterDataset, padding: PaddingSpec, drop_remainder: bool, fingerprint: str
  ):
    super().__init__(parent)
    self._padding = padding
    self._drop_remainder = drop_remainder
    self._fingerprint = fingerprint

  def __iter__(self) -> PromptIterator:
    return PromptIterator(
      self._parent.__iter__(), self._padding, self._drop_remainder, self._fingerprint
    )

  def __str__(self) -> str:
    return f"BatchPrompts(batch_size={self._padding.batch_size})"


def _shuffle_seed(seed: int) -> int:
  # Hash the user seed: grain seeds epoch e with `seed + e`, so seeds s and s+1 would otherwise
  # replay each other's epochs shifted by one.
  return int(np.random.SeedSequence(int(seed)).generate_state(1)[0])


def make_prompt_dataset(
  spec: DatasetSpec,
  processor,
  *,
  batch_size: int,
  seed: int,
  num_epochs: int | None,
  max_prompt_length: int,
  shard_index: int | None = None,
  shard_count: int | None = None,
  prompt_format: PromptFormat = PromptFormat(),
  length_buckets: Sequence[int] | None = None,
  patch_buckets: Sequence[int] | None = None,
  image_buckets: Sequence[int] | None = None,
  drop_remainder: bool = False,
  even_shards: bool = True,
  num_threads: int | None = None,
  prefetch_buffer_size: int | None = None,
) -> grain.IterDataset:
  """The grain dataset behind `make_prompt_iterator` (same arguments); `iter()` it to read."""
  if shard_index is None or shard_count is None:
    import jax  # Only for the default host sharding.

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  reader = DatasetReader(spec)
  encoder = PromptEncoder(processor, prompt_format, max_prompt_length=max_prompt_length)
  length_buckets = tuple(length_buckets or default_length_buckets(max_prompt_length))
  if max(length_buckets) < max_prompt_length:
    raise ValueError(
      f"largest length bucket {max(length_buckets)} < max_prompt_length {max_prompt_length}"
    )
  padding = PaddingSpec(
    batch_size=batch_size,
    length_buckets=length_buckets,
    pad_token_id=encoder.pad_token_id,
    patch_buckets=None if patch_buckets is None else tuple(patch_buckets),
    image_buckets=None if image_buckets is None else tuple(image_buckets),
  )
  if num_threads is None:
    num_threads = min(8, os.cpu_count() or 1)
  if prefetch_buffer_size is None:
    prefetch_buffer_size = max(2 * num_threads, batch_size)
  # What fixes the row order; num_epochs does not (a run may be resumed with more epochs).
  fingerprint = (
    f"rows={len(reader)} seed={seed} shard={shard_index}/{shard_count} even={even_shards}"
  )
  indices = _EpochShardIndices(
    len(reader),
    seed=_shuffle_seed(seed),
    num_epochs=num_epochs,
    shard_index=shard_index,
    shard_count=shard_count,
    even_shards=even_shards,
  )
  rows = (
    indices.map(reader.load)
    .map(encoder)
    .to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    )
  )
  return _BatchPrompts(rows, padding, drop_remainder, fingerprint)


def make_prompt_iterator(
  spec: DatasetSpec,
  processor,
  *,
  batch_size: int,
  seed: int,
  num_epochs: int | None,
  max_prompt_length: int,
  shard_index: int | None = None,
  shard_count: int | None = None,
  **kwargs,
) -> PromptIterator:
  """An iterator of `PromptBatch` over this host's shard of `spec`'s rows.

  Args:
    spec: the files and columns; all files are read and checked here (missing file or column
      raises ValueError/FileNotFoundError naming both).
    processor: a `Qwen2_5_VLProcessor` (e.g. `pgpo_jax.data.hf_processor.load_processor(dir)`).
    batch_size: prompts per batch, B. A short last batch is filled (`prompt_valid=False`)
      unless `drop_remainder=True`.
    seed: shuffle seed; epoch e uses its own permutation.
    num_epochs: passes over the data; None repeats forever.
    max_prompt_length: prompts longer than this (after image-token expansion) are skipped and
      counted as `prompt_too_long`; never truncated.
    shard_index / shard_count: this host's shard; default `jax.process_index()` /
      `jax.process_count()`.
    **kwargs: `prompt_format`, `length_buckets`, `patch_buckets`, `image_buckets`,
      `drop_remainder`, `even_shards`, `num_threads`, `prefetch_buffer_size` (see
      `make_prompt_dataset` and `PaddingSpec`).
  Returns:
    A `PromptIterator`: `next()` gives a `PromptBatch`; `get_state()`/`set_state()` checkpoint
    it; `.stats` reports rows read and skips by reason.
  """
  ds = make_prompt_dataset(
    spec,
    processor,
    batch_size=batch_size,
    seed=seed,
    num_epochs=num_epochs,
    max_prompt_length=max_prompt_length,
    shard_index=shard_index,
    shard_count=shard_count,
    **kwargs,
  )
  return iter(ds)
