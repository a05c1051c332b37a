"""Qwen2.5-VL in Flax NNX: a faithful, jit-friendly, shardable port of the HF model.

from pgpo_jax.models import qwen2_5_vl
model = qwen2_5_vl.from_pretrained(path, dtype="float32")
logits = qwen2_5_vl.forward(model, input_ids, attention_mask, pixel_values, image_grid_thw)
"""

from pgpo_jax.models.qwen2_5_vl.config import (
  PRESETS,
  Qwen25VLConfig,
  TextConfig,
  VisionConfig,
  tiny_config,
)
from pgpo_jax.models.qwen2_5_vl.loading import (
  abstract_model,
  count_params,
  flat_params,
  from_pretrained,
  init_model,
)
from pgpo_jax.models.qwen2_5_vl.model import (
  Qwen25VL,
  check_image_tokens,
  decode_step,
  embed_inputs,
  encode_images,
  forward,
  hidden_states,
  logits_from_hidden,
  prefill,
  run_decoder,
)
from pgpo_jax.models.qwen2_5_vl.rope import get_rope_index
from pgpo_jax.models.qwen2_5_vl.text import KVCache, init_cache
from pgpo_jax.models.qwen2_5_vl.vision import VisionInputs, prepare_vision, prepare_vision_rows
