"""Row -> model inputs: parity with the HF processor, is_visual, M-RoPE ids, padding round trips.

The tokenizer/processor is the tiny demo folder (`tiny_tokenizer.build_tiny_model_folder`), loaded
with `processor.load_processor` exactly as the trainer loads a real checkpoint folder.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pgpo_jax.buckets import bucket_size, default_length_buckets
from pgpo_jax.data import reader as reader_lib
from pgpo_jax.data.prompts import (
  DEFAULT_PROMPT_TEMPLATE,
  PaddingSpec,
  PromptEncoder,
  PromptFormat,
  build_messages,
  collate,
  unpad,
)
from pgpo_jax.data.reader import RawRow, RowError, SkippedRow
from pgpo_jax.models.qwen2_5_vl.rope import get_rope_index

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
  from pgpo_jax.demo_task.tiny_tokenizer import build_tiny_model_folder

  d = tmp_path_factory.mktemp("tiny_model")
  # 56..224 px images: 4..64 image tokens, enough to exercise non-square grids.
  build_tiny_model_folder(d, min_pixels=56 * 56, max_pixels=224 * 224)
  return d


@pytest.fixture(scope="session")
def processor(model_dir):
  from pgpo_jax.data.hf_processor import load_processor

  return load_processor(model_dir)


def noise_image(h: int, w: int, seed: int) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def raw(question: str, images, answer: str = "4", row: int = 0) -> RawRow:
  return RawRow(question, answer, tuple(images), "mem.parquet", row)


def instruction(question: str) -> str:
  return DEFAULT_PROMPT_TEMPLATE.replace("{question}", question)


# ------------------------------------------------------------------------------------------------
# Prompt format and HF parity
# ------------------------------------------------------------------------------------------------
def test_prompt_string_is_the_papers_format(processor):
  enc = PromptEncoder(processor, max_prompt_length=4096)
  text = enc.render("What is the area?", 1)
  assert text == (
    SYSTEM + "<|im_start|>user\n" + VISION + "What is the area? You FIRST think "
    "about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The "
    "final answer MUST BE put in \\boxed{}." + ASSISTANT
  )
  custom = PromptEncoder(
    processor,
    PromptFormat(template="Q: {question} A:", system_prompt="Sys."),
    max_prompt_length=4096,
  )
  assert custom.render("why?", 2) == (
    "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\n" + VISION * 2 + "Q: why? A:" + ASSISTANT
  )


def test_image_placeholders_map_to_images_in_order(processor):
  enc = PromptEncoder(processor, PromptFormat(template="{question}"), max_prompt_length=4096)
  assert enc.render("<image>Which is larger, <image> or the first?", 2) == (
    SYSTEM
    + "<|im_start|>user\n"
    + VISION
    + "Which is larger, "
    + VISION
    + " or the first?"
    + ASSISTANT
  )
  with pytest.raises(RowError) as e:
    build_messages("<image> and <image>", 1, PromptFormat())
  assert e.value.reason == reader_lib.IMAGE_PLACEHOLDER_MISMATCH
  skipped = enc(raw("<image><image>?", [noise_image(56, 56, 0)]))
  assert isinstance(skipped, SkippedRow) and skipped.reason == reader_lib.IMAGE_PLACEHOLDER_MISMATCH


@pytest.mark.parametrize(
  "sizes,question",
  [
    ([(100, 150)], "How many circles?"),
    ([(56, 56), (200, 90)], "Compare the two figures."),
    ([(120, 64), (64, 120)], "<image>left and <image>right: same shape?"),
  ],
)
def test_encoding_equals_hf_processor(processor, sizes, question):
  images = [noise_image(h, w, i) for i, (h, w) in enumerate(sizes)]
  enc = PromptEncoder(processor, max_prompt_length=4096)
  got = enc.encode(raw(question, images))

  # Reference: the HF processor on the hand-written prompt string.
  text = instruction(question)
  if "<image>" in text:
    text = text.replace("<image>", VISION)
  else:
    text = VISION * len(images) + text
  ref = processor(
    text=[SYSTEM + "<|im_start|>user\n" + text + ASSISTANT], images=images, return_tensors="np"
  )
  np.testing.assert_array_equal(got.input_ids, ref["input_ids"][0])
  np.testing.assert_array_equal(got.pixel_values, ref["pixel_values"])
  np.testing.assert_array_equal(got.image_grid_thw, ref["image_grid_thw"])
  assert got.input_ids.dtype == np.int32 and got.pixel_values.dtype == np.float32
  # is_visual marks exactly the <|image_pad|> tokens, t*h*w/4 of them per image.
  image_id = processor.image_token_id
  np.testing.assert_array_equal(got.is_visual, ref["input_ids"][0] == image_id)
  np.testing.assert_array_equal(got.is_visual, ref["mm_token_type_ids"][0] == 1)
  assert got.is_visual.sum() == ref["image_grid_thw"].prod(axis=1).sum() // 4
  pos, delta = get_rope_index(
    ref["input_ids"], None, ref["image_grid_thw"], image_token_id=image_id
  )
  np.testing.assert_array_equal(got.position_ids, pos[:, 0])
  assert got.rope_delta == delta[0] < 0


def test_min_max_pixels_override(processor):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

  def grid(h, w, lo, hi):
    rh, rw = smart_resize(h, w, 28, min_pixels=lo, max_pixels=hi)
    return [[1, rh // 14, rw // 14]]

  img = noise_image(300, 400, 0)
  default = PromptEncoder(processor, max_prompt_length=4096)  # The folder's bounds: 56^2..224^2.
  assert default.encode(raw("q", [img])).image_grid_thw.tolist() == grid(300, 400, 56**2, 224**2)
  small = PromptEncoder(processor, PromptFormat(max_pixels=56 * 56), max_prompt_length=4096)
  assert small.encode(raw("q", [img])).image_grid_thw.tolist() == grid(300, 400, 56**2, 56**2)
  assert grid(300, 400, 56**2, 56**2) != grid(300, 400, 56**2, 224**2)
  big = PromptEncoder(
    processor, PromptFormat(min_pixels=280 * 280, max_pixels=280 * 280), max_prompt_length=4096
  )
  got = big.encode(raw("q", [noise_image(56, 56, 1)]))
  assert got.image_grid_thw.tolist() == [[1, 20, 20]]
  assert got.is_visual.sum() == 100
  assert processor.image_processor.size["longest_edge"] == 224 * 224  # Not mutated.


def test_over_long_prompt_is_skipped_not_truncated(processor):
  enc = PromptEncoder(processor, max_prompt_length=200)
  img = noise_image(56, 56, 0)
  short = enc.encode(raw("Count.", [img]))
  assert short.length <= 200
  long_row = raw("Count the shapes. " * 100, [img], row=7)
  with pytest.raises(RowError) as e:
    enc.encode(long_row)
  assert e.value.reason == reader_lib.PROMPT_TOO_LONG
  out = enc(long_row)
  assert isinstance(out, SkippedRow) and (out.reason, out.row_index) == (
    reader_lib.PROMPT_TOO_LONG,
    7,
  )
  # Exactly at the limit is kept.
  assert (
    PromptEncoder(processor, max_prompt_length=short.length).encode(raw("Count.", [img])).length
    == short.length
  )


def test_processor_errors_become_skips(processor):
  out = PromptEncoder(processor, max_prompt_length=4096)(
    raw("stray <|image_pad|> token", [noise_image(56, 56, 0)])
  )
  assert isinstance(out, SkippedRow) and out.reason == reader_lib.PROCESSOR_ERROR


# ------------------------------------------------------------------------------------------------
# Collation
# ------------------------------------------------------------------------------------------------
def encoded_examples(processor):
  enc = PromptEncoder(processor, max_prompt_length=4096)
  rows = [
    raw("How many circles?", [noise_image(100, 150, 0)], answer="3", row=0),
    raw("Compare.", [noise_image(56, 56, 1), noise_image(200, 90, 2)], answer="a", row=1),
    raw(
      "A much longer question about the figure, its angles and its sides?",
      [noise_image(64, 120, 3)],
      answer="yes",
      row=2,
    ),
  ]
  return [enc.encode(r) for r in rows]


def test_collate_pads_left_to_buckets_and_unpad_round_trips(processor):
  examples = encoded_examples(processor)
  spec = PaddingSpec(batch_size=4, length_buckets=(64, 128, 256, 512), pad_token_id=7)
  batch = collate(examples, spec)
  B, T = batch.input_ids.shape
  assert B == 4 and T == bucket_size(max(e.length for e in examples), spec.length_buckets)
  patches = sum(e.pixel_values.shape[0] for e in examples + examples[:1])  # + the filler row
  assert batch.pixel_values.shape == (bucket_size(patches, None, minimum=4), 1176)
  assert batch.image_grid_thw.shape == (8, 3)  # 4 real + 1 filler image -> 8
  for name, dtype in [
    ("input_ids", np.int32),
    ("attention_mask", np.int32),
    ("position_ids", np.int32),
    ("rope_deltas", np.int32),
    ("is_visual", np.bool_),
    ("pixel_values", np.float32),
    ("image_grid_thw", np.int32),
    ("prompt_valid", np.bool_),
  ]:
    assert getattr(batch, name).dtype == dtype, name
  assert batch.position_ids.shape == (3, B, T)
  np.testing.assert_array_equal(batch.prompt_valid, [True, True, True, False])
  assert batch.num_valid == 3 and batch.answers[:3] == ("3", "a", "yes")

  # Left padding: every row ends at T-1; pads carry pad id, mask 0, position 0, not visual.
  for b, e in enumerate(examples):
    n = e.length
    np.testing.assert_array_equal(batch.attention_mask[b], [0] * (T - n) + [1] * n)
    assert (batch.input_ids[b, : T - n] == 7).all()
    assert (batch.position_ids[:, b, : T - n] == 0).all() and not batch.is_visual[b, : T - n].any()
  # Padding images are zero rows; padding patches are zeros.
  used = int(batch.image_grid_thw.prod(axis=1).sum())
  assert (batch.image_grid_thw[5:] == 0).all() and (batch.pixel_values[used:] == 0).all()
  np.testing.assert_array_equal(batch.is_visual, batch.input_ids == processor.image_token_id)

  back = unpad(batch)
  assert len(back) == 3
  for e, u in zip(examples, back):
    for field in ("input_ids", "is_visual", "position_ids", "pixel_values", "image_grid_thw"):
      np.testing.assert_array_equal(getattr(u, field), getattr(e, field), err_msg=field)
    assert (u.rope_delta, u.question, u.answer, u.row_index) == (
      e.rope_delta,
      e.question,
      e.answer,
      e.row_index,
    )
  assert len(unpad(batch, include_filler=True)) == 4


def test_batch_position_ids_equal_rope_index_of_padded_batch_and_hf(processor):
  """Per-row ids placed under left padding == ids of the padded batch == HF get_rope_index."""
  examples = encoded_examples(processor)
  batch = collate(examples, PaddingSpec(batch_size=3, length_buckets=(512,), pad_token_id=0))
  grid = batch.image_grid_thw
  pos, deltas = get_rope_index(
    batch.input_ids, batch.attention_mask, grid, image_token_id=processor.image_token_id
  )
  np.testing.assert_array_equal(batch.position_ids, pos)
  np.testing.assert_array_equal(batch.rope_deltas, deltas)

  torch = pytest.importorskip("torch")
  from transformers import Qwen2_5_VLConfig
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

  from pgpo_jax.data.hf_processor import special_token_ids

  ids = special_token_ids(processor.tokenizer)
  cfg = Qwen2_5_VLConfig(
    text_config=dict(
      vocab_size=ids["vocab_size"],
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
      bos_token_id=0,
      eos_token_id=1,
      pad_token_id=0,
    ),
    vision_config=dict(
      depth=1, hidden_size=16, intermediate_size=16, num_heads=1, out_hidden_size=16
    ),
    image_token_id=ids["image_token_id"],
    video_token_id=ids["video_token_id"],
    vision_start_token_id=ids["vision_start_token_id"],
    vision_end_token_id=ids["vision_end_token_id"],
  )
  model = Qwen2_5_VLModel(cfg)
  valid = grid.prod(axis=1) > 0
  hf_pos, hf_deltas = model.get_rope_index(
    input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
    mm_token_type_ids=torch.tensor(batch.is_visual.astype(np.int64)),
    image_grid_thw=torch.tensor(grid[valid], dtype=torch.long),
    attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
  )
  np.testing.assert_array_equal(batch.position_ids, hf_pos.numpy())
  np.testing.assert_array_equal(batch.rope_deltas, hf_deltas.numpy().reshape(-1))


def test_collate_rejects_bad_sizes(processor):
  examples = encoded_examples(processor)
  with pytest.raises(ValueError, match="largest bucket"):
    collate(examples, PaddingSpec(batch_size=3, length_buckets=(16,), pad_token_id=0))
  with pytest.raises(ValueError, match="examples for batch_size"):
    collate(examples, PaddingSpec(batch_size=2, length_buckets=(512,), pad_token_id=0))
  with pytest.raises(ValueError, match="multiples of 4"):
    PaddingSpec(batch_size=2, length_buckets=(512,), pad_token_id=0, patch_buckets=(30,))


def test_text_only_rows_collate_to_empty_vision_inputs(processor):
  enc = PromptEncoder(processor, max_prompt_length=4096)
  e = enc.encode(raw("What is 2 + 2?", []))
  assert not e.is_visual.any() and e.image_grid_thw.shape == (0, 3)
  np.testing.assert_array_equal(e.position_ids, np.broadcast_to(np.arange(e.length), (3, e.length)))
  batch = collate([e], PaddingSpec(batch_size=2, length_buckets=(256,), pad_token_id=0))
  assert (batch.image_grid_thw == 0).all() and (batch.pixel_values == 0).all()
  assert batch.num_images.tolist() == [0, 0]


@settings(max_examples=200, deadline=None)
@given(
  n=st.integers(0, 5000),
  buckets=st.one_of(st.none(), st.lists(st.integers(1, 6000), min_size=1, max_size=6)),
)
def test_bucket_size_is_the_smallest_fitting_bucket(n, buckets):
  if buckets is not None and max(buckets) < n:
    with pytest.raises(ValueError):
      bucket_size(n, buckets)
    return
  b = bucket_size(n, buckets)
  assert b >= n
  if buckets is None:
    assert b & (b - 1) == 0 and (b == 1 or b // 2 < n)
  else:
    assert b in buckets and not any(n <= c < b for c in buckets)


def test_default_length_buckets():
  assert default_length_buckets(1024) == (64, 128, 256, 512, 1024)
  assert default_length_buckets(1000) == (64, 128, 256, 512, 1000)
  assert default_length_buckets(40) == (40,)
