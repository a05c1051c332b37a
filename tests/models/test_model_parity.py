"""Flax Qwen2.5-VL vs the HF PyTorch reference: logits, vision tower, M-RoPE ids (float32)."""

import numpy as np
import pytest
import torch

from pgpo_jax.models import qwen2_5_vl as qwen
from tests.hf_utils import IMAGE, hf_logits, left_pad, make_ids, random_pixels

TOL = 1e-4


@pytest.fixture(scope="module")
def ours(tiny_hf):
  return qwen.from_pretrained(tiny_hf[1], dtype="float32")


def _compare(hf, model, ids, am, pixels, grids):
  ref = hf_logits(hf, ids, am, pixels, grids)
  got = np.asarray(
    qwen.forward(model, ids, am, pixels, None if grids is None else np.asarray(grids))
  )
  valid = np.ones(ids.shape, bool) if am is None else am.astype(bool)
  assert got.shape == ref.shape
  diff = np.abs(got - ref)[valid].max()
  assert diff <= TOL, f"max abs diff {diff}"
  return diff


def test_text_only(tiny_hf, ours):
  rng = np.random.default_rng(0)
  ids = np.array([make_ids(rng, [], pre=20, post=10)])
  _compare(tiny_hf[0], ours, ids, None, None, None)


def test_one_image(tiny_hf, ours):
  rng = np.random.default_rng(1)
  grids = [(1, 8, 12)]
  _compare(
    tiny_hf[0], ours, np.array([make_ids(rng, grids)]), None, random_pixels(rng, grids), grids
  )


def test_two_images_of_different_sizes_in_one_example(tiny_hf, ours):
  rng = np.random.default_rng(2)
  grids = [(1, 8, 12), (1, 6, 4)]
  _compare(
    tiny_hf[0], ours, np.array([make_ids(rng, grids)]), None, random_pixels(rng, grids), grids
  )


def test_left_padded_batch_with_different_image_sizes(tiny_hf, ours):
  rng = np.random.default_rng(3)
  g0, g1 = [(1, 4, 4)], [(1, 10, 6), (1, 4, 8)]
  ids, am = left_pad([make_ids(rng, g0, pre=9, post=7), make_ids(rng, g1)])
  grids = g0 + g1
  _compare(tiny_hf[0], ours, ids, am, random_pixels(rng, grids), grids)


def test_ragged_windows_and_grid_divisible_by_window(tiny_hf, ours):
  """10x14 patches → 5x7 merged: ragged 2x2 windows; 8x8 → divisible (HF adds empty windows)."""
  rng = np.random.default_rng(4)
  grids = [(1, 10, 14), (1, 8, 8)]
  _compare(
    tiny_hf[0], ours, np.array([make_ids(rng, grids)]), None, random_pixels(rng, grids), grids
  )


def test_tied_head_without_gqa(tiny_hf_tied):
  hf, path = tiny_hf_tied
  from safetensors import safe_open

  with safe_open(str(path / "model.safetensors"), "np") as f:
    assert "lm_head.weight" not in f.keys()  # what makes the tied case special
  model = qwen.from_pretrained(path)
  assert not hasattr(model, "lm_head")
  rng = np.random.default_rng(5)
  grids = [(1, 6, 6)]
  _compare(hf, model, np.array([make_ids(rng, grids)]), None, random_pixels(rng, grids), grids)


def test_vision_tower_output_matches_hf(tiny_hf, ours):
  hf, _ = tiny_hf
  rng = np.random.default_rng(6)
  grids = [(1, 10, 14), (1, 4, 4)]
  pixels = random_pixels(rng, grids)
  with torch.no_grad():
    ref = hf.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids))
  ref = (ref.pooler_output if hasattr(ref, "pooler_output") else ref).float().numpy()
  vin = qwen.prepare_vision(pixels, np.asarray(grids), ours.cfg.vision)
  got = np.asarray(qwen.encode_images(ours, vin))[: ref.shape[0]]
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_vision_tower_with_small_windows_sharing_blocks(tiny_hf, ours):
  """Many small images in one row: edge windows of 1-3 merge units share attention blocks, and
  patch padding fills the budget; HF attends each window on its own."""
  hf, _ = tiny_hf
  rng = np.random.default_rng(8)
  grids = [(1, 6, 6), (1, 2, 2), (1, 6, 2), (1, 4, 6), (1, 2, 10)]
  pixels = random_pixels(rng, grids)
  with torch.no_grad():
    ref = hf.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids))
  ref = (ref.pooler_output if hasattr(ref, "pooler_output") else ref).float().numpy()
  vin = qwen.prepare_vision(pixels, np.asarray(grids), ours.cfg.vision, num_patches=160)
  S = qwen.vision.window_block(ours.cfg.vision)
  windows_per_block = [len(set(b[b >= 0].tolist())) for b in vin.block_seg.reshape(-1, S)]
  assert max(windows_per_block) > 1  # what this test is about
  got = np.asarray(qwen.encode_images(ours, vin))[: ref.shape[0]]
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_mrope_position_ids_match_hf(tiny_hf):
  hf, _ = tiny_hf
  rng = np.random.default_rng(7)
  g0, g1 = [(1, 8, 12)], [(1, 6, 4), (1, 4, 4)]
  ids, am = left_pad([make_ids(rng, g0, pre=12), make_ids(rng, g1)])
  grids = np.asarray(g0 + g1)
  ref_pos, ref_delta = hf.model.get_rope_index(
    torch.tensor(ids),
    mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
    image_grid_thw=torch.tensor(grids),
    attention_mask=torch.tensor(am),
  )
  pos, delta = qwen.get_rope_index(ids, am, grids, image_token_id=IMAGE)
  valid = am.astype(bool)
  np.testing.assert_array_equal(pos[:, valid], ref_pos.numpy()[:, valid])
  np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


def test_checklist_position_example():
  """docs/qwen2_5_vl_port.md §2.3: [a,b,c,<vs>] + image (1,8,12) + [<ve>,d,e,f] → delta -18."""
  ids = np.array([[7, 8, 9, 502] + [IMAGE] * 24 + [503, 10, 11, 12]])
  pos, delta = qwen.get_rope_index(ids, None, np.array([[1, 8, 12]]), image_token_id=IMAGE)
  np.testing.assert_array_equal(pos[0, 0, 4:28], 4)
  np.testing.assert_array_equal(pos[1, 0, 4:28], np.repeat(np.arange(4, 8), 6))
  np.testing.assert_array_equal(pos[2, 0, 4:28], np.tile(np.arange(4, 10), 4))
  np.testing.assert_array_equal(pos[:, 0, 28:], np.tile(np.arange(10, 14), (3, 1)))
  assert delta[0] == -18


def test_image_token_count_mismatch_is_a_clear_error(ours):
  ids = np.array([[3, 502] + [IMAGE] * 5 + [503]])
  with pytest.raises(ValueError, match="image tokens do not match"):
    qwen.forward(ours, ids, None, np.zeros((16, 1176), np.float32), np.array([[1, 4, 4]]))


def test_loading_reports_missing_and_misshaped_keys(tmp_path, tiny_hf):
  import json
  import shutil

  from safetensors.numpy import load_file, save_file

  src = tiny_hf[1]
  tensors = load_file(str(src / "model.safetensors"))
  tensors.pop("model.norm.weight")
  tensors["visual.merger.ln_q.weight"] = np.ones(7, np.float32)
  tensors["extra.weight"] = np.ones(3, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(src / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError) as e:
    qwen.from_pretrained(tmp_path)
  msg = str(e.value)
  assert "missing key(s): model.norm.weight" in msg
  assert "unexpected key(s): extra.weight" in msg
  assert "mis-shaped" in msg and "visual.merger.ln_q.weight" in msg
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match="not a Qwen2.5-VL config"):
    qwen.from_pretrained(tmp_path)
