"""Synthetic task (determinism, answers checked against the pixels), the tiny tokenizer/processor folder,
and `scripts/make_demo_data.py`."""

import hashlib
import io
import json
import os
import pathlib
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.ndimage
from PIL import Image

from pgpo_jax.data.hf_processor import (
  NONSPECIAL_ADDED_TOKENS,
  SPECIAL_TOKENS,
  load_processor,
  load_tokenizer,
  num_image_tokens,
)
from pgpo_jax.demo_task import synthetic
from pgpo_jax.demo_task.tiny_tokenizer import CHAT_TEMPLATE, build_tiny_model_folder

# docs/qwen2_5_vl_port.md §3, rendered by the real Qwen2.5-VL template.
QWEN_RENDERED = (
  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
  "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
  "<|im_start|>assistant\n"
)
DESCRIBE_MSGS = [
  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}
]


def _files_digest(folder) -> dict[str, str]:
  return {
    f: hashlib.sha256((pathlib.Path(folder) / f).read_bytes()).hexdigest()
    for f in sorted(os.listdir(folder))
  }


def _image(row) -> Image.Image:
  return Image.open(io.BytesIO(row["images"][0]["bytes"]))


# --------------------------------------------------------------------------------------------- the task


def test_make_split_is_deterministic():
  a = synthetic.make_split(30, seed=3, image_size=84)
  assert a == synthetic.make_split(30, seed=3, image_size=84)  # Byte-identical PNGs included.
  assert synthetic.make_split(10, seed=3, image_size=84) == a[:10]  # Row i does not depend on n.
  assert synthetic.make_split(30, seed=4, image_size=84) != a
  other_stream = synthetic.make_split(30, seed=3, image_size=84, stream=1)
  assert not {r["images"][0]["bytes"] for r in a} & {r["images"][0]["bytes"] for r in other_stream}


def test_rows_have_easyr1_layout():
  rows = synthetic.make_split(12, seed=0, image_size=56)
  for r in rows:
    assert r["problem"].startswith("<image>") and r["problem"].count("<image>") == 1
    assert isinstance(r["answer"], str) and r["answer"]
    assert len(r["images"]) == 1 and _image(r).size == (56, 56) and _image(r).mode == "RGB"
    assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}") and r["solution"].startswith(
      "<think>"
    )
    assert r["qtype"] in synthetic.QTYPES


def test_write_parquet_roundtrip_and_bytes(tmp_path):
  rows = synthetic.make_split(16, seed=1, image_size=56)
  synthetic.write_parquet(rows, tmp_path / "a.parquet")
  synthetic.write_parquet(rows, tmp_path / "b.parquet")
  assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
  back = pq.read_table(tmp_path / "a.parquet").to_pylist()
  assert back == rows
  with pytest.raises(KeyError, match="row 1 lacks field 'answer'"):
    synthetic.write_parquet([rows[0], {"problem": "x", "images": []}], tmp_path / "c.parquet")


def _perceive(img: Image.Image) -> list[dict]:
  """Shapes read back from the pixels alone: color by exact palette match, kind by bbox fill ratio."""
  arr = np.asarray(img.convert("RGB"))
  known = np.all(arr == synthetic.BACKGROUND, axis=-1)
  shapes = []
  for color, rgb in synthetic.COLORS.items():
    mask = np.all(arr == rgb, axis=-1)
    known |= mask
    labels, n = scipy.ndimage.label(mask)
    for k in range(1, n + 1):
      ys, xs = np.nonzero(labels == k)
      h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
      fill = len(ys) / (h * w)
      kind = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
      shapes.append(
        dict(
          color=color,
          kind=kind,
          area=len(ys),
          x0=int(xs.min()),
          y0=int(ys.min()),
          w=int(w),
          h=int(h),
          cx=(xs.min() + xs.max()) / 2,
          cy=(ys.min() + ys.max()) / 2,
        )
      )
  assert known.all(), "pixels outside background + palette (anti-aliasing?)"
  return shapes


def _answer_from_pixels(question: str, shapes: list[dict]) -> str:
  """Answers the question from perceived shapes, with its own parsing of the question text."""
  if question == "How many shapes are there?":
    return str(len(shapes))
  if m := re.fullmatch(r"How many (red|green|blue|yellow) shapes are there\?", question):
    return str(sum(s["color"] == m[1] for s in shapes))
  if m := re.fullmatch(r"How many (circle|square|triangle)s are there\?", question):
    return str(sum(s["kind"] == m[1] for s in shapes))
  if question == "What color is the largest shape?":
    areas = sorted((s["area"], s["color"]) for s in shapes)
    assert areas[-1][0] > areas[-2][0]
    return areas[-1][1]
  if m := re.fullmatch(r"Which shape is (\w+)\?", question):
    (hit,) = [s for s in shapes if s["color"] == m[1]]
    return hit["kind"]
  m = re.fullmatch(
    r"Is the (?:(\w+) )?(\w+) (left of|right of|above|below) the (?:(\w+) )?(\w+)\?", question
  )
  assert m, f"unparsed question {question!r}"

  def find(color, kind):
    (hit,) = [s for s in shapes if s["kind"] == kind and (color is None or s["color"] == color)]
    return hit

  a, b = find(m[1], m[2]), find(m[4], m[5])
  truth = {
    "left of": a["cx"] < b["cx"],
    "right of": a["cx"] > b["cx"],
    "above": a["cy"] < b["cy"],
    "below": a["cy"] > b["cy"],
  }[m[3]]
  return "yes" if truth else "no"


@pytest.mark.parametrize("image_size,n", [(84, 300), (56, 150), (112, 60)])
def test_answers_match_the_pixels(image_size, n):
  rows = synthetic.make_split(n, seed=11, image_size=image_size)
  for i, r in enumerate(rows):
    seen = _perceive(_image(r))
    scene = synthetic.Scene.from_json(r["scene"])
    drawn = sorted((s.color, s.kind, s.x0, s.y0, s.size, s.size) for s in scene.shapes)
    assert (
      sorted((s["color"], s["kind"], s["x0"], s["y0"], s["w"], s["h"]) for s in seen) == drawn
    ), i
    question = r["problem"].removeprefix("<image>")
    assert _answer_from_pixels(question, seen) == r["answer"], (i, question, r["answer"])
  assert {r["qtype"] for r in rows} == set(synthetic.QTYPES)


def test_render_example_and_sizes():
  img, question, answer = synthetic.render_example(np.random.default_rng(0), image_size=112)
  assert img.size == (112, 112) and question.endswith("?") and answer
  with pytest.raises(ValueError, match="image_size"):
    synthetic.sample_scene(np.random.default_rng(0), image_size=20)


# -------------------------------------------------------------------------------- tiny tokenizer folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny") / "model"
  ids = build_tiny_model_folder(folder)
  return folder, ids


def test_tiny_folder_is_deterministic(tiny, tmp_path):
  folder, ids = tiny
  assert build_tiny_model_folder(tmp_path / "again") == ids
  assert _files_digest(tmp_path / "again") == _files_digest(folder)


def test_tiny_special_token_ids(tiny):
  folder, ids = tiny
  tok = load_tokenizer(folder)
  assert 1000 <= ids["vocab_size"] == len(tok) <= 2000
  added = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + NONSPECIAL_ADDED_TOKENS]
  first = ids["vocab_size"] - len(added)
  assert added == list(range(first, ids["vocab_size"]))  # Qwen order, after the BPE ids.
  assert ids["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>") == first + 12
  assert ids["vision_start_token_id"] == first + 9 and ids["vision_end_token_id"] == first + 10
  assert ids["eos_token_id"] == ids["im_end_token_id"] == tok.eos_token_id == first + 2
  assert ids["pad_token_id"] == ids["endoftext_token_id"] == tok.pad_token_id == first
  assert tok.bos_token is None
  assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
  assert not set(NONSPECIAL_ADDED_TOKENS) & set(tok.all_special_tokens)


def test_chat_template_renders_qwen_string(tiny):
  folder, _ = tiny
  proc, tok = load_processor(folder), load_tokenizer(folder)
  assert (
    proc.apply_chat_template(DESCRIBE_MSGS, add_generation_prompt=True, tokenize=False)
    == QWEN_RENDERED
  )
  assert (
    tok.apply_chat_template(DESCRIBE_MSGS, add_generation_prompt=True, tokenize=False)
    == QWEN_RENDERED
  )
  with_system = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
  ]
  assert tok.apply_chat_template(with_system, tokenize=False) == (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello<|im_end|>\n"
  )
  two = [
    {
      "role": "user",
      "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}],
    }
  ]
  assert tok.apply_chat_template(two, tokenize=False, add_vision_id=True).endswith(
    "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
    "Picture 2: <|vision_start|><|image_pad|><|vision_end|>x<|im_end|>\n"
  )


@pytest.mark.parametrize("image_size,grid", [(84, (1, 6, 6)), (56, (1, 4, 4)), (112, (1, 8, 8))])
def test_processor_image_tokens_on_synthetic_rows(tiny, image_size, grid):
  folder, ids = tiny
  proc = load_processor(folder)
  assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil"
  row = synthetic.make_split(1, seed=0, image_size=image_size)[0]
  msgs = [
    {
      "role": "user",
      "content": [
        {"type": "image"},
        {"type": "text", "text": row["problem"].removeprefix("<image>")},
      ],
    }
  ]
  text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  out = proc(text=[text], images=[_image(row)], return_tensors="np")
  t, h, w = grid
  assert out["image_grid_thw"].tolist() == [list(grid)]
  assert out["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
  assert int((out["input_ids"] == ids["image_token_id"]).sum()) == t * h * w // 4
  assert num_image_tokens(proc.image_processor, image_size, image_size) == t * h * w // 4
  assert out["mm_token_type_ids"].sum() == t * h * w // 4


def test_processor_pixel_overrides(tiny):
  folder, _ = tiny
  img = Image.new("RGB", (112, 112), (0, 0, 0))
  proc = load_processor(folder, max_pixels=56 * 56)
  assert proc(text=["<|image_pad|>"], images=[img], return_tensors="np")[
    "image_grid_thw"
  ].tolist() == [[1, 4, 4]]
  with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
    load_processor(folder, min_pixels=100_000)


def test_tokenizer_roundtrip_and_compactness(tiny):
  folder, _ = tiny
  tok = load_tokenizer(folder)
  rows = synthetic.make_split(50, seed=5, image_size=56)
  texts = (
    [r["problem"] for r in rows]
    + [r["solution"] for r in rows]
    + [
      "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n",
      "Ünïcödé 汉字 🙂 \\frac{1}{\\sqrt{2}}  two  spaces\n\nnewlines\t<tool_call>{}</tool_call>",
    ]
  )
  for s in texts:
    ids = tok(s)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == s
  assert len(tok("How many red shapes are there?")["input_ids"]) <= 8
  assert len(tok("<think>")["input_ids"]) <= 3 and len(tok("\\boxed{12}")["input_ids"]) <= 6
  assert max(len(tok(r["solution"])["input_ids"]) for r in rows) <= 48
  assert len(tok("<|vision_start|><|image_pad|><|vision_end|>")["input_ids"]) == 3


def test_load_errors_name_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
    load_processor(tmp_path)


def test_load_processor_hf_checkpoint_layout(tiny, tmp_path):
  """A released-checkpoint layout: preprocessor_config.json with min/max_pixels + chat_template.json."""
  folder, ids = tiny
  tok = load_tokenizer(folder)
  tok.chat_template = None
  tok.save_pretrained(tmp_path)
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
  (tmp_path / "preprocessor_config.json").write_text(
    json.dumps(
      {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
      }
    )
  )
  proc = load_processor(tmp_path)
  assert (
    proc.apply_chat_template(DESCRIBE_MSGS, add_generation_prompt=True, tokenize=False)
    == QWEN_RENDERED
  )
  # Port notes §3-4: a 100x150 (h x w) image is resized to 112x140 -> grid (1, 8, 10), 20 image tokens.
  out = proc(
    text=[QWEN_RENDERED], images=[Image.new("RGB", (150, 100), (9, 99, 199))], return_tensors="np"
  )
  assert out["image_grid_thw"].tolist() == [[1, 8, 10]]
  assert int((out["input_ids"] == ids["image_token_id"]).sum()) == 20
  assert (
    load_processor(tmp_path, max_pixels=56 * 56).image_processor.size["longest_edge"] == 56 * 56
  )


# --------------------------------------------------------------------------------------------- the script


def test_make_demo_data_script_is_idempotent(tmp_path):
  from pgpo_jax.cli import make_demo_data as script

  argv = [
    "--out_dir",
    str(tmp_path / "demo"),
    "--n_train",
    "12",
    "--n_test",
    "6",
    "--image_size",
    "56",
  ]
  ids = script.run(argv)
  first = {
    **_files_digest(tmp_path / "demo" / "model"),
    **{
      f: hashlib.sha256((tmp_path / "demo" / f).read_bytes()).hexdigest()
      for f in ("train.parquet", "test.parquet")
    },
  }
  assert script.run(argv) == ids
  again = {
    **_files_digest(tmp_path / "demo" / "model"),
    **{
      f: hashlib.sha256((tmp_path / "demo" / f).read_bytes()).hexdigest()
      for f in ("train.parquet", "test.parquet")
    },
  }
  assert again == first
  train = pq.read_table(tmp_path / "demo" / "train.parquet").to_pylist()
  test = pq.read_table(tmp_path / "demo" / "test.parquet").to_pylist()
  assert len(train) == 12 and len(test) == 6
  assert not {r["images"][0]["bytes"] for r in train} & {r["images"][0]["bytes"] for r in test}
  assert (
    load_processor(tmp_path / "demo" / "model").tokenizer.convert_tokens_to_ids("<|image_pad|>")
    == ids["image_token_id"]
  )
