"""Rotary embeddings of Qwen2.5-VL: M-RoPE for the LM and 2-D axial RoPE for the ViT.

Host-side (numpy): `get_rope_index` builds the 3-D (temporal, height, width) position ids of a batch
with images, HF 5.24 semantics (docs/qwen2_5_vl_port.md §2.3). Device-side (jnp): cos/sin tables and
`apply_rotary` (rotate-half, non-interleaved).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def inv_freq(dim: int, theta: float) -> np.ndarray:
  """`1 / theta^(arange(0, dim, 2) / dim)` in float32, bit-compatible with torch.

  torch evaluates the exponent in fp32 and the power in fp32; computing the power in float64 from
  the fp32 exponent, rounding to fp32 and then taking the fp32 reciprocal reproduces it
  (docs/qwen2_5_vl_port.md §8, item 6).
  """
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
  return (np.float32(1.0) / power).astype(np.float32)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(
  x_BxTxHxK: jnp.ndarray, cos_BxTxK: jnp.ndarray, sin_BxTxK: jnp.ndarray
) -> jnp.ndarray:
  """`x * cos + rotate_half(x) * sin`, broadcast over heads."""
  cos = cos_BxTxK[..., None, :]
  sin = sin_BxTxK[..., None, :]
  return x_BxTxHxK * cos + rotate_half(x_BxTxHxK) * sin


def mrope_cos_sin(
  position_ids_3xBxT: jnp.ndarray, head_dim: int, theta: float, mrope_section: tuple[int, int, int]
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos/sin [B, T, head_dim] of M-RoPE, float32.

  Frequency slots [0, s0) rotate with the temporal ids, [s0, s0+s1) with height, the rest with
  width; the 64 angles are then duplicated to 128 (`[f, f]`), as HF does.
  """
  freqs = jnp.asarray(inv_freq(head_dim, theta))  # [K/2]
  angles = position_ids_3xBxT.astype(jnp.float32)[..., None] * freqs  # [3, B, T, K/2]
  s0, s1, _ = mrope_section
  picked = jnp.concatenate(
    [angles[0, ..., :s0], angles[1, ..., s0 : s0 + s1], angles[2, ..., s0 + s1 :]], axis=-1
  )
  emb = jnp.concatenate([picked, picked], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(
  hw_pos_Nx2: jnp.ndarray, head_dim: int, theta: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos/sin [N, head_dim] of the ViT's 2-D RoPE: angles `[h(hd/4), w(hd/4)]` duplicated."""
  freqs = jnp.asarray(inv_freq(head_dim // 2, theta))  # [hd/4]
  ang = hw_pos_Nx2.astype(jnp.float32)[:, :, None] * freqs  # [N, 2, hd/4]
  ang = ang.reshape(ang.shape[0], -1)  # [N, hd/2]: h block then w block
  emb = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


# ----------------------------------------------------------------------------------------------
# get_rope_index (host side)
# ----------------------------------------------------------------------------------------------
def valid_grids(image_grid_thw: np.ndarray | None) -> np.ndarray:
  """Drops the all-zero padding rows of `image_grid_thw`; returns int64 [N_img, 3]."""
  if image_grid_thw is None:
    return np.zeros((0, 3), np.int64)
  g = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  return g[g.prod(axis=1) > 0]


def get_rope_index(
  input_ids_BxT,
  attention_mask_BxT,
  image_grid_thw_Nx3,
  *,
  image_token_id: int,
  spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
  """3-D M-RoPE position ids for a batch of prompts with images (HF 5.24 semantics).

  Args:
    input_ids_BxT: token ids (left or right padded).
    attention_mask_BxT: 1 for real tokens; padded slots get position 0.
    image_grid_thw_Nx3: (t, h, w) per image in patch units, in order of appearance across the
      batch; all-zero rows are padding and ignored.
  Returns:
    position_ids [3, B, T] int32 and rope_deltas [B] int32, where
    `rope_delta = max(position) + 1 - num_valid_tokens` (so decode position = length + delta).
  """
  ids = np.asarray(input_ids_BxT)
  mask = np.ones_like(ids) if attention_mask_BxT is None else np.asarray(attention_mask_BxT)
  grids = valid_grids(image_grid_thw_Nx3)
  B, T = ids.shape
  pos = np.zeros((3, B, T), np.int64)
  deltas = np.zeros((B,), np.int64)
  next_img = 0
  m = spatial_merge_size
  for b in range(B):
    slots = np.nonzero(mask[b] != 0)[0]
    row = ids[b, slots]
    out = np.zeros((3, len(slots)), np.int64)
    cur, i, n = 0, 0, len(row)
    while i < n:
      if row[i] != image_token_id:
        j = i
        while j < n and row[j] != image_token_id:
          j += 1
        out[:, i:j] = cur + np.arange(j - i)
        cur += j - i
        i = j
        continue
      if next_img >= len(grids):
        raise ValueError(
          f"row {b}: more image token groups than image_grid_thw rows ({len(grids)})"
        )
      t, h, w = (int(x) for x in grids[next_img])
      next_img += 1
      hm, wm = h // m, w // m
      count = t * hm * wm
      if i + count > n or not np.all(row[i : i + count] == image_token_id):
        raise ValueError(
          f"row {b}: image {next_img - 1} with grid {(t, h, w)} needs {count} "
          f"consecutive image tokens at offset {i}"
        )
      tt, hh, ww = np.meshgrid(np.arange(t), np.arange(hm), np.arange(wm), indexing="ij")
      out[0, i : i + count] = cur  # images: constant temporal row
      out[1, i : i + count] = cur + hh.ravel()
      out[2, i : i + count] = cur + ww.ravel()
      cur += max(hm, wm)
      i += count
    pos[:, b, slots] = out
    deltas[b] = (out.max() + 1 - n) if n else 0
  if next_img != len(grids):
    raise ValueError(f"image_grid_thw has {len(grids)} images but the input ids hold {next_img}")
  return pos.astype(np.int32), deltas.astype(np.int32)
