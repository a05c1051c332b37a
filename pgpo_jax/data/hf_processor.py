"""The Qwen2.5-VL processor everyone uses: a real HF checkpoint folder or the tiny demo folder.

Two fixes over `transformers.Qwen2_5_VLProcessor` (5.24):
- No video processor: the stock processor validates a `video_processor` slot whose base class needs
  torchvision (not installed here), so construction fails. `Qwen25VLProcessorNoVideo` drops the slot; the
  processor's sub-components are derived from the `__init__` signature, so `from_pretrained` /
  `save_pretrained` then handle only the image processor and the tokenizer.
- Deterministic pixels: the image processor is always the PIL backend (`Qwen2VLImageProcessorPil`, bicubic
  with a=-0.5), never the torchvision one `AutoImageProcessor` would pick if torchvision were installed.

`min_pixels` / `max_pixels` come from the folder (`preprocessor_config.json` of a released checkpoint, or
`processor_config.json` written by `save_pretrained`); `load_processor` can override them.
"""

from __future__ import annotations

import math
import os

import transformers
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
  Qwen2VLImageProcessorPil,
  smart_resize,
)

# Qwen2.5 added tokens in id order. The first 14 are "special" (never split, skipped when decoding with
# skip_special_tokens); the last 8 are plain added tokens (never split, but decoded).
SPECIAL_TOKENS: tuple[str, ...] = (
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|object_ref_start|>",
  "<|object_ref_end|>",
  "<|box_start|>",
  "<|box_end|>",
  "<|quad_start|>",
  "<|quad_end|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|vision_pad|>",
  "<|image_pad|>",
  "<|video_pad|>",
)
NONSPECIAL_ADDED_TOKENS: tuple[str, ...] = (
  "<tool_call>",
  "</tool_call>",
  "<|fim_prefix|>",
  "<|fim_middle|>",
  "<|fim_suffix|>",
  "<|fim_pad|>",
  "<|repo_name|>",
  "<|file_sep|>",
)
# Token -> the Qwen2_5_VLConfig field its id fills.
_CONFIG_FIELDS: dict[str, str] = {
  "<|image_pad|>": "image_token_id",
  "<|video_pad|>": "video_token_id",
  "<|vision_start|>": "vision_start_token_id",
  "<|vision_end|>": "vision_end_token_id",
  "<|vision_pad|>": "vision_token_id",
  "<|im_start|>": "im_start_token_id",
  "<|im_end|>": "im_end_token_id",
  "<|endoftext|>": "endoftext_token_id",
}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class Qwen25VLProcessorNoVideo(transformers.Qwen2_5_VLProcessor):
  """`Qwen2_5_VLProcessor` without the video slot (works without torchvision); images and text only."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
    super().__init__(
      image_processor=image_processor,
      tokenizer=tokenizer,
      video_processor=None,
      chat_template=chat_template,
      **kwargs,
    )


def _check_model_dir(model_dir: str | os.PathLike, need: tuple[str, ...], what: str) -> str:
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"{what}: model folder {model_dir!r} does not exist")
  if not any(os.path.isfile(os.path.join(model_dir, f)) for f in need):
    raise FileNotFoundError(
      f"{what}: {model_dir!r} has none of {list(need)}; expected a Qwen2.5-VL checkpoint folder or one "
      f"written by pgpo_jax.demo_task.tiny_tokenizer.build_tiny_model_folder"
    )
  return model_dir


def load_tokenizer(model_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """The folder's tokenizer (`Qwen2Tokenizer`, fast), chat template included; checks the vision tokens."""
  model_dir = _check_model_dir(model_dir, _TOKENIZER_FILES, "load_tokenizer")
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  special_token_ids(tok, source=model_dir)  # Fails loudly when a Qwen vision token is missing.
  return tok


def load_image_processor(
  model_dir: str | os.PathLike, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> Qwen2VLImageProcessorPil:
  """The folder's image processor on the PIL backend, with optional pixel-budget overrides."""
  model_dir = _check_model_dir(model_dir, _IMAGE_PROCESSOR_FILES, "load_image_processor")
  overrides = {
    k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None
  }
  ip = Qwen2VLImageProcessorPil.from_pretrained(model_dir, **overrides)
  lo, hi = ip.size["shortest_edge"], ip.size["longest_edge"]
  if not 0 < lo <= hi:
    raise ValueError(
      f"load_image_processor({model_dir!r}): need 0 < min_pixels <= max_pixels, "
      f"got min_pixels={lo}, max_pixels={hi}"
    )
  return ip


def load_processor(
  model_dir: str | os.PathLike, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> Qwen25VLProcessorNoVideo:
  """Loads tokenizer + PIL image processor + chat template from `model_dir`.

  Works for a released Qwen2.5-VL folder (`preprocessor_config.json`, tokenizer files, `chat_template.json`)
  and for the tiny folder of `tiny_tokenizer.build_tiny_model_folder`. `min_pixels` / `max_pixels` override
  the folder's pixel budget (`smart_resize` bounds, in pixels).
  """
  model_dir = _check_model_dir(model_dir, _TOKENIZER_FILES, "load_processor")
  proc = Qwen25VLProcessorNoVideo.from_pretrained(model_dir)
  # `from_pretrained` picks the image backend through AutoImageProcessor (torchvision when installed):
  # always swap in the PIL one from the same config so pixels never depend on the environment.
  proc.image_processor = load_image_processor(
    model_dir, min_pixels=min_pixels, max_pixels=max_pixels
  )
  special_token_ids(proc.tokenizer, source=model_dir)
  if not proc.chat_template:
    raise ValueError(
      f"load_processor({model_dir!r}): no chat template found (looked for "
      f"chat_template.jinja, chat_template.json and tokenizer_config.json)"
    )
  return proc


def special_token_ids(
  tokenizer: transformers.PreTrainedTokenizerBase, source: str = "tokenizer"
) -> dict[str, int]:
  """Ids needed to build a model config, keyed like `Qwen2_5_VLConfig` fields.

  Returns `image_token_id`, `video_token_id`, `vision_start_token_id`, `vision_end_token_id`,
  `vision_token_id`, `im_start_token_id`, `im_end_token_id`, `endoftext_token_id`, the HF-config aliases
  `eos_token_id` (= `<|im_end|>`), `pad_token_id` and `bos_token_id` (= `<|endoftext|>`, as in the released
  configs), and `vocab_size` (= len(tokenizer), added tokens included).
  """
  ids: dict[str, int] = {}
  for token, field in _CONFIG_FIELDS.items():
    tid = tokenizer.convert_tokens_to_ids(token)
    if (
      tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token
    ):
      raise ValueError(f"{source}: tokenizer has no token {token!r} (needed for {field})")
    ids[field] = int(tid)
  ids["eos_token_id"] = ids["im_end_token_id"]
  ids["pad_token_id"] = ids["endoftext_token_id"]
  ids["bos_token_id"] = ids["endoftext_token_id"]
  ids["vocab_size"] = len(tokenizer)
  return ids


def image_grid_thw(
  image_processor: Qwen2VLImageProcessorPil, height: int, width: int
) -> tuple[int, int, int]:
  """(t, h, w) patch grid of one still image of `height` x `width` px after `smart_resize`."""
  factor = image_processor.patch_size * image_processor.merge_size
  h, w = smart_resize(
    height,
    width,
    factor=factor,
    min_pixels=image_processor.size["shortest_edge"],
    max_pixels=image_processor.size["longest_edge"],
  )
  return 1, h // image_processor.patch_size, w // image_processor.patch_size


def num_image_tokens(image_processor: Qwen2VLImageProcessorPil, height: int, width: int) -> int:
  """Number of `<|image_pad|>` tokens for one still image: t*h*w / merge_size^2."""
  return math.prod(image_grid_thw(image_processor, height, width)) // image_processor.merge_size**2
