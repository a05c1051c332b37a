"""Groups: one prompt with its G sampled responses, host-side, collected across rollout rounds.

`Group` is what rollouts and the SFT warm-up produce and what `trainer.collate_groups` turns into
one padded `SequenceBatch`; `split_prompt_batch` cuts a `PromptBatch` back into its prompts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pgpo_jax.data.prompts import PromptBatch
from pgpo_jax.models import qwen2_5_vl as qwen


@dataclasses.dataclass
class Group:
  """One prompt (unpadded) and its G sampled responses, host-side."""

  prompt_ids: np.ndarray  # [t] int32
  pixel_values: np.ndarray  # [n_patches, 1176]
  grids: np.ndarray  # [n_images, 3]
  answer: str
  tokens: np.ndarray  # [G, L] int32
  mask: np.ndarray  # [G, L] bool
  rewards: np.ndarray  # [G] overall reward
  accuracy: np.ndarray  # [G]
  format: np.ndarray  # [G]
  truncated: np.ndarray  # [G] bool


def split_prompt_batch(pb: PromptBatch) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Per valid prompt: (unpadded ids, its pixel rows, its grid rows)."""
  grids = qwen.rope.valid_grids(pb.image_grid_thw)
  sizes = grids.prod(axis=1)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  out, g = [], 0
  for b in range(pb.batch_size):
    k = int(pb.num_images[b])
    if pb.prompt_valid[b]:
      ids = pb.input_ids[b][pb.attention_mask[b].astype(bool)]
      out.append(
        (ids.astype(np.int32), pb.pixel_values[starts[g] : starts[g + k]], grids[g : g + k])
      )
    g += k
  return out
