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


def forward_flops(cfg, batch: int, seq_len: int, grid_thw: tuple[int, int, int]) -> dict:
  """Matmul FLOPs of one forward of `batch` rows of `seq_len` tokens, one image of `grid_thw`
  patches each: {"text", "vision", "total"}. Causal attention counts the keys at or before each
  query (T/2 on average); window attention the patches of each 112-px window.
  """
  t, v = cfg.text_config, cfg.vision_config
  D, H, N, I, V = (
    t.hidden_size,
    t.num_attention_heads,
    t.num_key_value_heads,
    t.intermediate_size,
    t.vocab_size,
  )
  K = D // H
  per_token = 2 * (D * H * K + 2 * D * N * K + H * K * D + 3 * D * I)
  attention = 2 * 2 * (seq_len + 1) / 2 * H * K  # q·k and p·v over (T+1)/2 keys on average
  text = batch * seq_len * (t.num_hidden_layers * (per_token + attention) + 2 * D * V)
  Dv, Iv = v.hidden_size, v.intermediate_size
  patches = grid_thw[0] * grid_thw[1] * grid_thw[2]
  window = (v.window_size // v.patch_size) ** 2
  per_patch = 2 * (4 * Dv * Dv + 3 * Dv * Iv)
  full = set(v.fullatt_block_indexes)
  att = sum(4 * (patches if i in full else window) * Dv for i in range(v.depth))
  embed = 2 * v.in_channels * v.temporal_patch_size * v.patch_size**2 * Dv
  mu = v.spatial_merge_size**2
  merger = patches // mu * 2 * (mu * Dv * mu * Dv + mu * Dv * v.out_hidden_size)
  vision = batch * (patches * (v.depth * per_patch + att + embed) + merger)
  return {"text": float(text), "vision": float(vision), "total": float(text + vision)}
