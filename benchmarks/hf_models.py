"""The small random Qwen2.5-VL that the side-by-side benchmarks build in HF transformers.

Token ids: image 4000, video 4001, vision start/end 4002/4003, vocabulary 4096. Heads of 64 dims.
"""

from __future__ import annotations

IMAGE, VIDEO, VSTART, VEND = 4000, 4001, 4002, 4003


def hf_config(
  hidden: int,
  layers: int,
  *,
  kv_groups: int,
  vision_depth: int,
  vision_hidden: int,
  vision_full_layers: tuple[int, ...],
):
  """A `Qwen2_5_VLConfig`: `hidden // 64` heads sharing KV heads in groups of `kv_groups`; a vision
  tower of `vision_depth` blocks (64-dim heads, 112-px windows) with full attention in
  `vision_full_layers`."""
  from transformers import Qwen2_5_VLConfig

  heads = hidden // 64
  return Qwen2_5_VLConfig(
    text_config=dict(
      vocab_size=4096,
      hidden_size=hidden,
      intermediate_size=4 * hidden,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=max(1, heads // kv_groups),
      rms_norm_eps=1e-6,
      max_position_embeddings=4096,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
      bos_token_id=0,
      eos_token_id=1,
      pad_token_id=0,
    ),
    vision_config=dict(
      depth=vision_depth,
      hidden_size=vision_hidden,
      intermediate_size=2 * vision_hidden,
      num_heads=vision_hidden // 64,
      patch_size=14,
      temporal_patch_size=2,
      spatial_merge_size=2,
      window_size=112,
      fullatt_block_indexes=list(vision_full_layers),
      out_hidden_size=hidden,
      tokens_per_second=2,
    ),
    image_token_id=IMAGE,
    video_token_id=VIDEO,
    vision_start_token_id=VSTART,
    vision_end_token_id=VEND,
  )
