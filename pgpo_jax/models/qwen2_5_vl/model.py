"""Qwen2.5-VL for conditional generation: vision tower + decoder + LM head, and its public API.

Two layers of API:
- pure, jit-friendly functions over the module (`encode_images`, `embed_inputs`, `hidden_states`,
  `logits_from_hidden`, `prefill`, `decode_step`) used by the rollout, scoring and training code;
- `forward(model, input_ids, attention_mask, pixel_values, image_grid_thw)`, which takes the HF
  processor's outputs, buckets/pads them on the host and runs one cached jitted program.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pgpo_jax.buckets import seq_bucket
from pgpo_jax.models.qwen2_5_vl import rope, text, vision
from pgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from pgpo_jax.models.qwen2_5_vl.layers import param


class Qwen25VL(nnx.Module):
  """`visual` (ViT + merger), `language_model` (decoder) and `lm_head` (absent when tied)."""

  def __init__(
    self, cfg: Qwen25VLConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None
  ):
    """`dtype`: the compute dtype (matmul inputs, activations, KV cache); `param_dtype`: the dtype
    the parameters are stored (and trained) in, default `dtype`. Training keeps float32 masters
    (`param_dtype="float32"`) and computes in bfloat16: each weight is cast where it is used."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.param_dtype = jnp.dtype(dtype if param_dtype is None else param_dtype)
    self.visual = vision.VisionTower(cfg.vision, self.dtype, rngs, self.param_dtype)
    self.language_model = text.TextModel(cfg.text, self.dtype, rngs, self.param_dtype)
    if not cfg.text.tie_word_embeddings:
      self.lm_head = param(
        rngs, (cfg.text.hidden_size, cfg.text.vocab_size), ("embed", "vocab"), self.param_dtype
      )

  def lm_head_weight(self) -> jnp.ndarray:
    """[D, V] output projection (the transposed embedding when tied), in the compute dtype."""
    if self.cfg.text.tie_word_embeddings:
      return self.language_model.embed_tokens[...].T.astype(self.dtype)
    return self.lm_head[...].astype(self.dtype)


def _kw(model: Qwen25VL) -> dict[str, Any]:
  c = model.cfg
  return dict(
    remat_policy=c.remat_policy,
    use_scan=c.scan_layers,
    attention_chunk_size=c.attention_chunk_size,
    attention_impl=c.attention_impl,
  )


# ------------------------------------------------------------------------------------------------
# Pure pieces (call under jit)
# ------------------------------------------------------------------------------------------------
def encode_images(model: Qwen25VL, vin: vision.VisionInputs) -> jnp.ndarray:
  """Merged image features in processor order (padding rows last): [U_pad, D] for packed inputs,
  [B, U_pad, D] for per-row inputs (`prepare_vision_rows`)."""
  return model.visual(vin, **_kw(model))


def embed_inputs(model: Qwen25VL, input_ids_BxT: jnp.ndarray, image_features=None) -> jnp.ndarray:
  """Token embeddings with the image features scattered into the `<|image_pad|>` slots.

  `image_features` is packed [U, D] (all images of the batch, consumed in row-major (batch,
  position) order, as HF does) or per-row [B, U, D] (row b's own images, from per-row vision
  inputs). The count check is done on the host (`check_image_tokens`).
  """
  x = model.language_model.embed(input_ids_BxT)
  if image_features is None:
    return x
  is_img = input_ids_BxT == model.cfg.image_token_id
  feats = image_features.astype(x.dtype)
  if feats.ndim == 3:  # per row: index within the row
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, feats.shape[1] - 1)
    gathered = jnp.take_along_axis(feats, idx[..., None], axis=1)
  else:
    idx = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
    gathered = jnp.take(feats, jnp.clip(idx, 0, feats.shape[0] - 1), axis=0)
  return jnp.where(is_img[..., None], gathered, x)


def hidden_states(
  model: Qwen25VL,
  input_ids_BxT,
  position_ids_3xBxT,
  key_mask_BxT,
  vin: vision.VisionInputs | None = None,
  image_features_UxD=None,
) -> jnp.ndarray:
  """Final-normed hidden states [B, T, D] of a full (uncached) causal pass.

  `key_mask_BxT` selects which tokens may be attended to: padding off, and for PGPO's blind view
  the visual tokens off too. Pass `image_features_UxD` to reuse an earlier `encode_images`.
  """
  if image_features_UxD is None and vin is not None:
    image_features_UxD = encode_images(model, vin)
  x = embed_inputs(model, input_ids_BxT, image_features_UxD)
  h, _ = model.language_model(x, position_ids_3xBxT, key_mask_BxT, None, **_kw(model))
  return h


def run_decoder(
  model: Qwen25VL,
  x_BxTxD: jnp.ndarray,
  position_ids_3xBxT,
  key_mask_BxT,
  cache: text.KVCache | None = None,
  *,
  segment_ids_BxT: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, text.KVCache | None]:
  """The decoder on given input embeddings [B, T, D], with the config's remat / scan / attention-chunk
  settings: final-normed hidden states [B, T, D] and the updated cache (None without one). For callers
  that build their own embeddings (e.g. prompt + response sequences in `rl/sequences.py`).
  `segment_ids_BxT` (packed rows, no cache): attention stays inside each segment (`rl/packing.py`)."""
  return model.language_model(
    x_BxTxD, position_ids_3xBxT, key_mask_BxT, cache, segment_ids_BxT=segment_ids_BxT, **_kw(model)
  )


def logits_from_hidden(model: Qwen25VL, h_BxTxD: jnp.ndarray) -> jnp.ndarray:
  """float32 logits [B, T, V]."""
  return jnp.einsum(
    "btd,dv->btv", h_BxTxD, model.lm_head_weight(), preferred_element_type=jnp.float32
  ).astype(jnp.float32)


def prefill(
  model: Qwen25VL,
  input_ids_BxT,
  position_ids_3xBxT,
  key_mask_BxT,
  cache: text.KVCache,
  vin: vision.VisionInputs | None = None,
) -> tuple[jnp.ndarray, text.KVCache]:
  """Writes the prompt into an empty cache; returns float32 logits of the LAST slot [B, V]."""
  feats = encode_images(model, vin) if vin is not None else None
  x = embed_inputs(model, input_ids_BxT, feats)
  h, cache = model.language_model(x, position_ids_3xBxT, key_mask_BxT, cache, **_kw(model))
  return logits_from_hidden(model, h[:, -1:])[:, 0], cache


def decode_step(
  model: Qwen25VL,
  token_B: jnp.ndarray,
  position_B: jnp.ndarray,
  cache: text.KVCache,
  chunk: int = text.DECODE_CHUNK,
) -> tuple[jnp.ndarray, text.KVCache]:
  """One cached step: token [B] at text position [B] (same on all 3 M-RoPE axes) → logits [B, V].

  Writes only slot `cache.index` of each layer (in place when the caller donates the cache) and
  attends over the slots written so far, `chunk` slots at a time (`text.decode`)."""
  B = token_B.shape[0]
  slot = cache.index
  key_mask = jax.lax.dynamic_update_slice(cache.key_mask, jnp.ones((B, 1), bool), (0, slot))
  x = model.language_model.embed(token_B)
  h, k, v = text.decode(
    model.language_model,
    x,
    position_B,
    jnp.broadcast_to(slot, (B,)),
    cache.k,
    cache.v,
    row_mask_RxS=key_mask,
    filled=slot + 1,
    chunk=chunk,
  )
  return logits_from_hidden(model, h[:, None])[:, 0], text.KVCache(
    k=k, v=v, key_mask=key_mask, index=slot + 1
  )


# ------------------------------------------------------------------------------------------------
# Host-facing API
# ------------------------------------------------------------------------------------------------
def check_image_tokens(input_ids_BxT: np.ndarray, image_grid_thw, cfg: Qwen25VLConfig) -> None:
  """The number of `<|image_pad|>` tokens must equal sum(t*h*w)/merge_unit (HF raises too)."""
  grids = rope.valid_grids(image_grid_thw)
  want = int(grids.prod(axis=1).sum()) // cfg.vision.merge_unit if len(grids) else 0
  have = int((np.asarray(input_ids_BxT) == cfg.image_token_id).sum())
  if want != have:
    raise ValueError(
      f"image features and image tokens do not match: {have} <|image_pad|> tokens "
      f"(id {cfg.image_token_id}) but image_grid_thw {grids.tolist()} gives {want}"
    )


@functools.lru_cache(maxsize=None)
def _jitted_forward(graphdef):
  def fn(state, ids, pos, mask, vin):
    model = nnx.merge(graphdef, state)
    h = hidden_states(model, ids, pos, mask, vin)
    return logits_from_hidden(model, h)

  return jax.jit(fn)


def forward(
  model: Qwen25VL,
  input_ids,
  attention_mask=None,
  pixel_values=None,
  image_grid_thw=None,
  *,
  position_ids=None,
  key_mask=None,
) -> jnp.ndarray:
  """float32 logits [B, T, V] for inputs exactly as the HF processor returns them.

  Args:
    input_ids, attention_mask: [B, T] (left or right padded); numpy, jax or torch-converted arrays.
    pixel_values: [N_patches, 1176] of all images in order, or None.
    image_grid_thw: [N_images, 3], or None.
    position_ids: optional [3, B, T]; computed with `get_rope_index` when omitted.
    key_mask: optional [B, T] attention mask over keys that overrides `attention_mask` for
      attention only (positions still come from `attention_mask`), e.g. to drop visual tokens.
  Sequences are padded to a bucket of 32 and patches to a patch bucket, so calls with different
  image sizes in the same buckets reuse one compiled program.
  """
  cfg = model.cfg
  ids = np.asarray(input_ids).astype(np.int32)
  B, T = ids.shape
  am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
  check_image_tokens(ids, image_grid_thw, cfg)
  if position_ids is None:
    position_ids, _ = rope.get_rope_index(
      ids,
      am,
      image_grid_thw,
      image_token_id=cfg.image_token_id,
      spatial_merge_size=cfg.vision.spatial_merge_size,
    )
  km = am if key_mask is None else np.asarray(key_mask).astype(np.int32)
  Tp = seq_bucket(T)
  pad = ((0, 0), (0, Tp - T))
  ids_p = np.pad(ids, pad)
  km_p = np.pad(km, pad)
  pos_p = np.pad(np.asarray(position_ids, np.int32), ((0, 0),) + pad)
  pixels = np.zeros((0, cfg.vision.patch_dim), np.float32) if pixel_values is None else pixel_values
  has_images = len(rope.valid_grids(image_grid_thw)) > 0
  # Per-row patches: attention never spans rows, so B·N² rather than (B·N)² vision scores.
  vin = (
    vision.prepare_vision_rows(pixels, image_grid_thw, ids_p, cfg.vision, cfg.image_token_id)
    if has_images
    else None
  )
  graphdef, state = nnx.split(model)
  logits = _jitted_forward(graphdef)(state, ids_p, pos_p, km_p.astype(bool), vin)
  return logits[:, :T]
