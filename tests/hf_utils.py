"""Tiny random Hugging Face Qwen2.5-VL references for parity tests (no downloads).

`make_hf_model` builds `Qwen2_5_VLForConditionalGeneration` from the verified tiny config of
docs/qwen2_5_vl_port.md §7, perturbs norms and biases (so that a port ignoring them fails), and saves it with
`save_pretrained`. Token ids: image 500, video 501, vision start/end 502/503, eos 1, pad 0.
"""

from __future__ import annotations

import numpy as np

IMAGE, VSTART, VEND = 500, 502, 503


def tiny_hf_config(
  *,
  tie: bool = False,
  num_heads: int = 4,
  num_kv_heads: int = 2,
  vocab: int = 512,
  hidden: int = 64,
  layers: int = 2,
):
  from transformers import Qwen2_5_VLConfig

  head_dim = hidden // num_heads
  quarter = head_dim // 2
  section = [quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8]
  return Qwen2_5_VLConfig(
    text_config=dict(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=2 * hidden,
      num_hidden_layers=layers,
      num_attention_heads=num_heads,
      num_key_value_heads=num_kv_heads,
      rms_norm_eps=1e-6,
      max_position_embeddings=1024,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
      bos_token_id=0,
      eos_token_id=1,
      pad_token_id=0,
      tie_word_embeddings=tie,
    ),
    vision_config=dict(
      depth=2,
      hidden_size=32,
      intermediate_size=64,
      num_heads=2,
      in_channels=3,
      patch_size=14,
      temporal_patch_size=2,
      spatial_merge_size=2,
      window_size=56,
      fullatt_block_indexes=[1],
      out_hidden_size=hidden,
      tokens_per_second=2,
    ),
    image_token_id=IMAGE,
    video_token_id=501,
    vision_start_token_id=VSTART,
    vision_end_token_id=VEND,
    tie_word_embeddings=tie,
  )


def make_hf_model(path, *, seed: int = 0, **cfg_kw):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(**cfg_kw)).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def make_ids(rng: np.random.Generator, grids, pre: int = 3, post: int = 4) -> list[int]:
  """Random text around `<vs><image_pad>*n<ve>` blocks, one per grid (t, h, w)."""
  ids = list(rng.integers(10, 400, pre))
  for t, h, w in grids:
    ids += [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND] + list(rng.integers(10, 400, 2))
  ids += list(rng.integers(10, 400, post))
  return [int(i) for i in ids]


def left_pad(rows: list[list[int]], pad: int = 0):
  T = max(len(r) for r in rows)
  ids = np.full((len(rows), T), pad, np.int64)
  am = np.zeros((len(rows), T), np.int64)
  for b, r in enumerate(rows):
    ids[b, T - len(r) :] = r
    am[b, T - len(r) :] = 1
  return ids, am


def random_pixels(rng: np.random.Generator, grids) -> np.ndarray:
  n = sum(t * h * w for t, h, w in grids)
  return rng.standard_normal((n, 1176)).astype(np.float32)


def hf_logits(model, ids, am=None, pixels=None, grids=None) -> np.ndarray:
  import torch

  kw = dict(
    input_ids=torch.tensor(ids),
    mm_token_type_ids=torch.tensor((np.asarray(ids) == IMAGE).astype(np.int64)),
  )
  if am is not None:
    kw["attention_mask"] = torch.tensor(am)
  if pixels is not None and len(pixels):
    kw["pixel_values"] = torch.tensor(pixels)
    kw["image_grid_thw"] = torch.tensor(np.asarray(grids))
  with torch.no_grad():
    return model(**kw).logits.float().numpy()
