"""Rows -> model inputs: the paper's prompt, the HF processor, M-RoPE ids, and static-shape batches.

Tokenization, image resizing and patchifying are the HF processor's (`Qwen2_5_VLProcessor`, PIL
backend); nothing here re-implements them. Per row, `PromptEncoder` renders the chat prompt

  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
  <|im_start|>user\\n<|vision_start|><|image_pad|>...<|vision_end|>{question + instruction}<|im_end|>\\n
  <|im_start|>assistant\\n

calls `processor(text=[prompt], images=[...])` and derives the per-token `is_visual` mask and the
3-D position ids (`rope.get_rope_index`). `collate` pads a list of encoded prompts to bucketed
static shapes (`PromptBatch`); `unpad` inverts it.

Image placement: if the (templated) question contains EasyR1 `<image>` placeholders, the images
are put there, in order; with no placeholder the images come first (the paper's format); any other
placeholder count skips the row (`image_placeholder_mismatch`).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from typing import Any, Sequence

import numpy as np

from pgpo_jax.buckets import bucket_size
from pgpo_jax.data import reader as reader_lib
from pgpo_jax.data.layouts import IMAGE_PLACEHOLDER
from pgpo_jax.data.reader import RawRow, RowError, SkippedRow
from pgpo_jax.models.qwen2_5_vl.rope import get_rope_index

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# `{question}` is substituted with str.replace (not str.format), so `\boxed{}` needs no escaping.
DEFAULT_PROMPT_TEMPLATE = (
  "{question} You FIRST think about the reasoning process as an internal monologue and then "
  "provide the final answer. The reasoning process MUST BE enclosed within <think> </think> "
  "tags. The final answer MUST BE put in \\boxed{}."
)
PATCH_DIM = 3 * 2 * 14 * 14  # C * temporal_patch_size * patch_size^2 = 1176


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a question becomes a prompt.

  Attributes:
    system_prompt: system turn; None renders none (the Qwen template then inserts its default).
    template: user text; `{question}` is replaced by the row's question.
    min_pixels / max_pixels: override the processor's resize bounds (smart_resize); None keeps
      the checkpoint's `preprocessor_config.json` values.
  """

  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
  template: str = DEFAULT_PROMPT_TEMPLATE
  min_pixels: int | None = None
  max_pixels: int | None = None

  def __post_init__(self):
    if "{question}" not in self.template:
      raise ValueError(f"PromptFormat.template must contain '{{question}}': {self.template!r}")


def build_messages(question: str, num_images: int, fmt: PromptFormat) -> list[dict[str, Any]]:
  """Chat messages for one row: optional system turn, then a user turn of image and text items.

  Raises:
    RowError(IMAGE_PLACEHOLDER_MISMATCH) when the text holds `<image>` placeholders but not
    exactly `num_images` of them.
  """
  text = fmt.template.replace("{question}", question)
  pieces = text.split(IMAGE_PLACEHOLDER)
  content: list[dict[str, Any]] = []
  if len(pieces) == 1:  # No placeholder: images first.
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
  elif len(pieces) - 1 == num_images:
    for i, piece in enumerate(pieces):
      if i:
        content.append({"type": "image"})
      if piece:
        content.append({"type": "text", "text": piece})
  else:
    raise RowError(
      reader_lib.IMAGE_PLACEHOLDER_MISMATCH,
      f"{len(pieces) - 1} '{IMAGE_PLACEHOLDER}' placeholders for {num_images} images",
    )
  messages = [{"role": "user", "content": content}]
  if fmt.system_prompt is not None:
    messages.insert(0, {"role": "system", "content": fmt.system_prompt})
  return messages


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
  """One prompt, unpadded. T = prompt length, P = patches of its images, I = its images."""

  input_ids: np.ndarray  # [T] int32
  is_visual: np.ndarray  # [T] bool, True on <|image_pad|>
  position_ids: np.ndarray  # [3, T] int32 (M-RoPE t/h/w)
  rope_delta: int  # max(position) + 1 - T
  pixel_values: np.ndarray  # [P, 1176] float32
  image_grid_thw: np.ndarray  # [I, 3] int32
  question: str
  answer: str
  source: str
  row_index: int

  @property
  def length(self) -> int:
    return int(self.input_ids.shape[0])


class PromptEncoder:
  """Encodes `RawRow`s with an HF processor; callable from several threads at once.

  Each thread works on its own copy of the processor: a fast tokenizer shared across threads can
  fail with "Already borrowed" when its padding/truncation state is touched concurrently.
  """

  def __init__(self, processor, fmt: PromptFormat = PromptFormat(), *, max_prompt_length: int):
    self.fmt = fmt
    self.max_prompt_length = int(max_prompt_length)
    self._processor = processor
    self._local = threading.local()
    tok = processor.tokenizer
    self.image_token_id = int(processor.image_token_id)
    self.pad_token_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    self.spatial_merge_size = int(processor.image_processor.merge_size)
    self._call_kwargs: dict[str, Any] = {}
    if fmt.min_pixels is not None or fmt.max_pixels is not None:
      bounds = processor.image_processor.size  # The checkpoint's smart_resize bounds.
      self._call_kwargs["size"] = {
        "shortest_edge": int(fmt.min_pixels or bounds["shortest_edge"]),
        "longest_edge": int(fmt.max_pixels or bounds["longest_edge"]),
      }

  def _thread_processor(self):
    proc = getattr(self._local, "processor", None)
    if proc is None:
      proc = self._local.processor = copy.deepcopy(self._processor)
    return proc

  def render(self, question: str, num_images: int) -> str:
    """The chat-templated prompt string (one `<|image_pad|>` per image, before expansion)."""
    messages = build_messages(question, num_images, self.fmt)
    return self._thread_processor().apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True
    )

  def processor_inputs(self, row: RawRow) -> dict[str, np.ndarray]:
    """`processor(text=[prompt], images=row.images)` as numpy, batch of one."""
    text = self.render(row.question, len(row.images))
    images = list(row.images) or None
    return dict(
      self._thread_processor()(text=[text], images=images, return_tensors="np", **self._call_kwargs)
    )

  def encode(self, row: RawRow) -> EncodedPrompt:
    """Encodes one row. Raises RowError for prompts over `max_prompt_length` (never truncated)."""
    try:
      out = self.processor_inputs(row)
    except RowError:
      raise
    except Exception as e:  # The processor's own validation (e.g. a stray <|image_pad|>).
      raise RowError(reader_lib.PROCESSOR_ERROR, f"{type(e).__name__}: {e}") from e
    ids_T = np.asarray(out["input_ids"][0], np.int32)
    if ids_T.shape[0] > self.max_prompt_length:
      raise RowError(
        reader_lib.PROMPT_TOO_LONG,
        f"{ids_T.shape[0]} tokens > max_prompt_length={self.max_prompt_length}",
      )
    if row.images:
      pixels_PxD = np.asarray(out["pixel_values"], np.float32)
      grid_Ix3 = np.asarray(out["image_grid_thw"], np.int32).reshape(-1, 3)
    else:
      pixels_PxD = np.zeros((0, PATCH_DIM), np.float32)
      grid_Ix3 = np.zeros((0, 3), np.int32)
    pos_3x1xT, delta_1 = get_rope_index(
      ids_T[None],
      np.ones_like(ids_T)[None],
      grid_Ix3,
      image_token_id=self.image_token_id,
      spatial_merge_size=self.spatial_merge_size,
    )
    return EncodedPrompt(
      input_ids=ids_T,
      is_visual=ids_T == self.image_token_id,
      position_ids=pos_3x1xT[:, 0],
      rope_delta=int(delta_1[0]),
      pixel_values=pixels_PxD,
      image_grid_thw=grid_Ix3,
      question=row.question,
      answer=row.answer,
      source=row.source,
      row_index=row.row_index,
    )

  def __call__(self, row: RawRow | SkippedRow) -> EncodedPrompt | SkippedRow:
    """Pipeline stage: passes `SkippedRow`s through, turns row errors into `SkippedRow`s."""
    if isinstance(row, SkippedRow):
      return row
    try:
      return self.encode(row)
    except RowError as e:
      return SkippedRow(e.reason, row.source, row.row_index, e.detail)


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """A static-shape batch of prompts (host numpy). B = batch size, T = bucketed prompt length.

  Prompts are LEFT-padded, so every prompt ends at column T-1 and generation appends at T.
  Vision inputs of all B rows are packed in row order: `pixel_values` rows follow
  `image_grid_thw` rows, which follow the order of the `<|image_pad|>` runs in `input_ids`
  (batch-major). Padding images have an all-zero grid row; padding patches (beyond
  sum(t*h*w)) are zeros. Rows with `prompt_valid == False` are filler copies of a real prompt
  (short last batch) and must be masked out of rewards and losses.

  Not a registered pytree: the strings stay on the host; `model_inputs()` gives the arrays.
  """

  input_ids: np.ndarray  # [B, T] int32, pad_token_id on the left
  attention_mask: np.ndarray  # [B, T] int32, 1 on real tokens
  position_ids: np.ndarray  # [3, B, T] int32, 0 on padding (HF 5.24)
  rope_deltas: np.ndarray  # [B] int32; decode position of new token k = T_b + k + delta_b
  is_visual: np.ndarray  # [B, T] bool, True on <|image_pad|>
  pixel_values: np.ndarray  # [N_pad, 1176] float32
  image_grid_thw: np.ndarray  # [I_pad, 3] int32, zero rows are padding
  num_images: np.ndarray  # [B] int32, images of each row
  prompt_valid: np.ndarray  # [B] bool
  questions: tuple[str, ...]  # [B]
  answers: tuple[str, ...]  # [B]
  sources: tuple[str, ...]  # [B] data file
  row_indices: np.ndarray  # [B] int64, row within the data file

  @property
  def batch_size(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def num_valid(self) -> int:
    return int(self.prompt_valid.sum())

  def model_inputs(self) -> dict[str, np.ndarray]:
    """The array fields the model and rollout consume (ready for `jax.device_put`)."""
    return {
      k: getattr(self, k)
      for k in (
        "input_ids",
        "attention_mask",
        "position_ids",
        "rope_deltas",
        "is_visual",
        "pixel_values",
        "image_grid_thw",
        "prompt_valid",
      )
    }


@dataclasses.dataclass(frozen=True)
class PaddingSpec:
  """Static shapes of a `PromptBatch`.

  Attributes:
    batch_size: B; a short batch is filled with copies of its first prompt (`prompt_valid=False`).
    length_buckets: allowed T.
    patch_buckets: allowed N_pad (multiples of 4 = merge_size^2); None: powers of two >= 4.
    image_buckets: allowed I_pad; None: powers of two.
    pad_token_id: id written into the left padding.
  """

  batch_size: int
  length_buckets: tuple[int, ...]
  pad_token_id: int
  patch_buckets: tuple[int, ...] | None = None
  image_buckets: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.patch_buckets is not None and any(b % 4 for b in self.patch_buckets):
      raise ValueError(
        f"patch_buckets must be multiples of 4 (2x2 merge units): {self.patch_buckets}"
      )


def collate(examples: Sequence[EncodedPrompt], spec: PaddingSpec) -> PromptBatch:
  """Left-pads `examples` (1 <= len <= batch_size) into one `PromptBatch` of bucketed shape."""
  if not 1 <= len(examples) <= spec.batch_size:
    raise ValueError(f"collate: got {len(examples)} examples for batch_size {spec.batch_size}")
  valid = [True] * len(examples) + [False] * (spec.batch_size - len(examples))
  examples = list(examples) + [examples[0]] * (spec.batch_size - len(examples))
  B = spec.batch_size
  T = bucket_size(max(e.length for e in examples), spec.length_buckets)
  P = sum(e.pixel_values.shape[0] for e in examples)
  I = sum(e.image_grid_thw.shape[0] for e in examples)
  P_pad = bucket_size(P, spec.patch_buckets, minimum=4)
  I_pad = bucket_size(I, spec.image_buckets)

  ids_BxT = np.full((B, T), spec.pad_token_id, np.int32)
  mask_BxT = np.zeros((B, T), np.int32)
  pos_3xBxT = np.zeros((3, B, T), np.int32)
  visual_BxT = np.zeros((B, T), bool)
  for b, e in enumerate(examples):
    s = T - e.length
    ids_BxT[b, s:] = e.input_ids
    mask_BxT[b, s:] = 1
    pos_3xBxT[:, b, s:] = e.position_ids
    visual_BxT[b, s:] = e.is_visual
  pixels_NxD = np.empty((P_pad, PATCH_DIM), np.float32)  # ~5 MB per 448px image: write once.
  np.concatenate([e.pixel_values for e in examples], out=pixels_NxD[:P])
  pixels_NxD[P:] = 0
  grid_Ix3 = np.zeros((I_pad, 3), np.int32)
  if I:
    grid_Ix3[:I] = np.concatenate([e.image_grid_thw for e in examples])
  return PromptBatch(
    input_ids=ids_BxT,
    attention_mask=mask_BxT,
    position_ids=pos_3xBxT,
    rope_deltas=np.array([e.rope_delta for e in examples], np.int32),
    is_visual=visual_BxT,
    pixel_values=pixels_NxD,
    image_grid_thw=grid_Ix3,
    num_images=np.array([e.image_grid_thw.shape[0] for e in examples], np.int32),
    prompt_valid=np.array(valid, bool),
    questions=tuple(e.question for e in examples),
    answers=tuple(e.answer for e in examples),
    sources=tuple(e.source for e in examples),
    row_indices=np.array([e.row_index for e in examples], np.int64),
  )


def unpad(batch: PromptBatch, *, include_filler: bool = False) -> list[EncodedPrompt]:
  """Inverse of `collate`: the valid prompts (all B with `include_filler`), unpadded."""
  grids_Ix3 = batch.image_grid_thw
  patches_I = grids_Ix3.prod(axis=1)
  out, img, patch = [], 0, 0
  for b in range(batch.batch_size):
    n_img = int(batch.num_images[b])
    n_patch = int(patches_I[img : img + n_img].sum())
    keep = batch.attention_mask[b].astype(bool)
    if include_filler or batch.prompt_valid[b]:
      out.append(
        EncodedPrompt(
          input_ids=batch.input_ids[b, keep],
          is_visual=batch.is_visual[b, keep],
          position_ids=batch.position_ids[:, b, keep],
          rope_delta=int(batch.rope_deltas[b]),
          pixel_values=batch.pixel_values[patch : patch + n_patch],
          image_grid_thw=grids_Ix3[img : img + n_img],
          question=batch.questions[b],
          answer=batch.answers[b],
          source=batch.sources[b],
          row_index=int(batch.row_indices[b]),
        )
      )
    img += n_img
    patch += n_patch
  return out
