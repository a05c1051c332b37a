"""Model features beyond parity: KV cache, bf16, static shapes (no retrace), released configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import model as model_lib
from tests.hf_utils import left_pad, make_ids, random_pixels


@pytest.fixture(scope="module")
def ours(tiny_hf):
  return qwen.from_pretrained(tiny_hf[1], dtype="float32")


@pytest.mark.parametrize("chunk", [0, 8])
def test_cached_decode_equals_full_forward(ours, chunk):
  """Prefill + cached decode steps == one uncached forward. chunk=8: the decode attention reads the
  cache 8 slots at a time, only up to the last written slot (cache longer than needed, 8 | S)."""
  rng = np.random.default_rng(0)
  g0, g1 = [(1, 6, 8)], [(1, 4, 4)]
  ids, am = left_pad([make_ids(rng, g0), make_ids(rng, g1, pre=11)])
  grids = np.asarray(g0 + g1)
  pixels = random_pixels(rng, g0 + g1)
  B, T = ids.shape
  steps = 8
  pos, _ = qwen.get_rope_index(ids, am, grids, image_token_id=ours.cfg.image_token_id)
  vin = qwen.prepare_vision(pixels, grids, ours.cfg.vision)
  S = -(-(T + steps + 9) // 8) * 8  # unwritten slots at the end: never read (chunk) or masked
  cache = qwen.init_cache(ours.cfg.text, B, S, jnp.float32)
  logits, cache = qwen.prefill(
    ours, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(am, bool), cache, vin
  )
  next_pos = jnp.asarray(pos.max(axis=(0, 2)) + 1)
  step_logits, tokens = [logits], []
  step = jax.jit(lambda m, tok, p, c: qwen.decode_step(m, tok, p, c, chunk=chunk))
  for _ in range(steps):
    tok = jnp.argmax(step_logits[-1], -1).astype(jnp.int32)
    tokens.append(tok)
    logits, cache = step(ours, tok, next_pos, cache)
    next_pos = next_pos + 1
    step_logits.append(logits)
  full_ids = np.concatenate([ids, np.stack(tokens, 1)], 1)
  full_am = np.concatenate([am, np.ones((B, steps), am.dtype)], 1)
  full = np.asarray(qwen.forward(ours, full_ids, full_am, pixels, grids))
  for s in range(steps + 1):
    np.testing.assert_allclose(
      np.asarray(step_logits[s]), full[:, T - 1 + s], atol=1e-4, rtol=0, err_msg=f"decode step {s}"
    )


def test_key_mask_drops_tokens_but_keeps_positions(ours):
  """Masking keys ≠ deleting tokens: same logits as HF would give only if positions are kept."""
  rng = np.random.default_rng(1)
  grids = np.asarray([(1, 4, 4)])
  ids = np.array([make_ids(rng, grids)])
  pixels = random_pixels(rng, grids)
  km = (ids != ours.cfg.image_token_id).astype(np.int32)
  blind = np.asarray(qwen.forward(ours, ids, None, pixels, grids, key_mask=km))
  seeing = np.asarray(qwen.forward(ours, ids, None, pixels, grids))
  last_img = np.nonzero(ids[0] == ours.cfg.image_token_id)[0].max()
  # Text after the image sees the image only in the seeing view.
  assert np.abs(blind[0, last_img + 1 :] - seeing[0, last_img + 1 :]).max() > 1e-3
  # Text before the image is unaffected.
  first_img = np.nonzero(ids[0] == ours.cfg.image_token_id)[0].min()
  np.testing.assert_allclose(blind[0, :first_img], seeing[0, :first_img], atol=1e-6)
  # The blind view does not depend on the pixels at all.
  blind2 = np.asarray(qwen.forward(ours, ids, None, pixels * 3 + 1, grids, key_mask=km))
  np.testing.assert_allclose(blind[0, last_img + 1 :], blind2[0, last_img + 1 :], atol=1e-6)


def test_bf16_forward_is_finite_and_close_to_f32(tiny_hf, ours):
  model16 = qwen.from_pretrained(tiny_hf[1], dtype="bfloat16")
  assert model16.language_model.layers.wq[...].dtype == jnp.bfloat16
  rng = np.random.default_rng(2)
  grids = np.asarray([(1, 8, 8)])
  ids = np.array([make_ids(rng, grids)])
  pixels = random_pixels(rng, grids)
  f32 = np.asarray(qwen.forward(ours, ids, None, pixels, grids))
  b16 = np.asarray(qwen.forward(model16, ids, None, pixels, grids))
  assert b16.dtype == np.float32 and np.isfinite(b16).all()
  rel = np.abs(b16 - f32).max() / np.abs(f32).max()
  assert rel <= 2e-2, rel


def test_no_recompile_within_a_bucket(tiny_hf):
  # A config field that changes nothing numerically gives a graph of its own, so a fresh jit cache.
  ours = qwen.from_pretrained(
    tiny_hf[1], config=qwen.Qwen25VLConfig.from_json(tiny_hf[1]).replace(attention_chunk_size=4096)
  )
  rng = np.random.default_rng(3)
  graphdef, _ = nnx.split(ours)
  jitted = model_lib._jitted_forward(graphdef)
  before = jitted._cache_size()
  assert before == 0
  # Different image sizes, counts and sequence lengths that fall in the same buckets.
  for grids, pre in (([(1, 4, 8)], 3), ([(1, 6, 4), (1, 2, 4)], 5), ([(1, 4, 6)], 8)):
    ids = np.array([make_ids(rng, grids, pre=pre)])
    assert ids.shape[1] <= 32 and sum(t * h * w for t, h, w in grids) <= 64
    qwen.forward(ours, ids, None, random_pixels(rng, grids), np.asarray(grids))
  assert jitted._cache_size() == before + 1
  grids = [(1, 10, 14)]  # a bigger patch bucket compiles once more
  qwen.forward(
    ours, np.array([make_ids(rng, grids)]), None, random_pixels(rng, grids), np.asarray(grids)
  )
  assert jitted._cache_size() == before + 2


def test_scan_and_unrolled_layers_agree(tiny_hf, ours):
  cfg = ours.cfg.replace(scan_layers=False, remat_policy="full")
  unrolled = qwen.from_pretrained(tiny_hf[1], config=cfg)
  rng = np.random.default_rng(4)
  grids = np.asarray([(1, 4, 4)])
  ids = np.array([make_ids(rng, grids)])
  pixels = random_pixels(rng, grids)
  np.testing.assert_allclose(
    np.asarray(qwen.forward(unrolled, ids, None, pixels, grids)),
    np.asarray(qwen.forward(ours, ids, None, pixels, grids)),
    atol=1e-5,
  )


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_released_configs_build_abstractly_with_hf_parameter_counts(size):
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  cfg = qwen.PRESETS[size]
  with torch.device("meta"):
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg.to_hf_dict()))
  want = sum(p.numel() for p in hf.parameters())
  abstract = qwen.abstract_model(cfg, "bfloat16")
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert qwen.count_params(abstract) == want
  # HF's own names map one-to-one onto ours (every tensor has a rule, every rule a tensor).
  from pgpo_jax.models.qwen2_5_vl import weights

  hf_names = {weights.normalize_hf_key(n) for n, _ in hf.named_parameters()}
  assert hf_names == set(weights.expected_hf_keys(cfg))


def test_config_reads_flat_4x_layout():
  flat = {
    "model_type": "qwen2_5_vl",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "image_token_id": 290,
    "vision_config": {
      "depth": 2,
      "hidden_size": 32,
      "intermediate_size": 64,
      "num_heads": 2,
      "out_hidden_size": 64,
      "fullatt_block_indexes": [1],
      "model_type": "qwen2_5_vl",
    },
  }
  cfg = qwen.Qwen25VLConfig.from_hf_dict(flat)
  assert (
    cfg.text.mrope_section == (2, 3, 3)
    and cfg.text.tie_word_embeddings
    and cfg.image_token_id == 290
  )
  assert qwen.Qwen25VLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  bad = dict(flat, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
  with pytest.raises(ValueError, match="mrope_section"):
    qwen.Qwen25VLConfig.from_hf_dict(bad)


def test_per_row_vision_inputs_equal_packed(ours):
  """Rows encoded separately (micro-batch / data-shard layout) == one packed sequence."""
  rng = np.random.default_rng(5)
  g0, g2 = [(1, 4, 8), (1, 2, 4)], [(1, 6, 4)]
  ids, am = left_pad([make_ids(rng, g0), make_ids(rng, [], pre=9), make_ids(rng, g2)])
  grids = np.asarray(g0 + g2)
  pixels = random_pixels(rng, g0 + g2)
  packed = np.asarray(qwen.encode_images(ours, qwen.prepare_vision(pixels, grids, ours.cfg.vision)))
  rows = qwen.prepare_vision_rows(pixels, grids, ids, ours.cfg.vision, ours.cfg.image_token_id)
  per_row = np.asarray(qwen.encode_images(ours, rows))
  n0 = (8 * 4 + 2 * 4) // 4
  np.testing.assert_allclose(per_row[0, :n0], packed[:n0], atol=1e-5)
  np.testing.assert_allclose(per_row[2, :6], packed[n0 : n0 + 6], atol=1e-5)
  pos, _ = qwen.get_rope_index(ids, am, grids, image_token_id=ours.cfg.image_token_id)
  x_packed = qwen.embed_inputs(ours, jnp.asarray(ids), jnp.asarray(packed))
  x_rows = qwen.embed_inputs(ours, jnp.asarray(ids), jnp.asarray(per_row))
  np.testing.assert_allclose(np.asarray(x_rows), np.asarray(x_packed), atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(units=st.lists(st.integers(1, 4), min_size=1, max_size=40), spare=st.integers(0, 20))
def test_window_blocks_hold_any_windows_of_a_patch_budget(units, spare):
  """First-fit packing never needs more than the static block count of the budget; every window
  lies whole in one block and the slot maps are inverse to each other."""
  cfg = qwen.tiny_config().vision  # window 2x2 merge units = 16 patches a block, merge unit 4
  mu, S = cfg.merge_unit, qwen.vision.window_block(cfg)
  sizes = [u * mu for u in units]
  n_pad = sum(sizes) + spare * mu
  window_seg = np.concatenate(
    [np.full(s, w) for w, s in enumerate(sizes)] + [np.full(spare * mu, -1)]
  )
  nb = qwen.vision.num_window_blocks(n_pad, cfg)
  index, seg, slot = qwen.vision._pack_windows(window_seg.astype(np.int32), S, nb)
  real = np.nonzero(window_seg >= 0)[0]
  np.testing.assert_array_equal(index[slot[real]], real)
  np.testing.assert_array_equal(seg[slot[real]], window_seg[real])
  assert (seg >= 0).sum() == len(real)
  for w in range(len(sizes)):
    assert len(set(np.nonzero(seg == w)[0] // S)) == 1, f"window {w} split over blocks"
