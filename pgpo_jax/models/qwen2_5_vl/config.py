"""Qwen2.5-VL configuration: frozen dataclasses read from a Hugging Face `config.json`.

Both layouts of `config.json` are accepted (docs/qwen2_5_vl_port.md §5):
- the flat 4.x hub form (LM keys at the root, `rope_scaling={"type": "mrope", ...}`);
- the nested 5.x form (`text_config`, `rope_parameters`).
HF class defaults are never relied on for values that matter (eps, vision sizes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  tokens_per_second: int = 2
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6  # hard-coded in HF for the vision blocks and ln_q

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one row of `pixel_values`: C * T * P * P (1176 for the released models)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    """Patches merged into one LM token (4)."""
    return self.spatial_merge_size**2

  @property
  def window_merged(self) -> int:
    """Window side in merged tokens (112 / 2 / 14 = 4)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int = 151643
  eos_token_id: int = 151645
  pad_token_id: int = 151643
  # Compute settings (not part of the HF config).
  remat_policy: str = "none"  # none | full | dots | dots_no_batch (layers.maybe_remat)
  scan_layers: bool = True
  attention_chunk_size: int = 0  # >0: chunk queries of the attention to bound memory (xla only)
  # xla | splash (TPU Pallas) | cudnn (NVIDIA) | auto (by platform: layers.resolve_attention_impl).
  # On a mesh the fused kernels run per device under shard_map (`layers.on_mesh`).
  attention_impl: str = "xla"

  def replace(self, **kw) -> "Qwen25VLConfig":
    return dataclasses.replace(self, **kw)

  # --------------------------------------------------------------------------
  # HF config.json I/O
  # --------------------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "Qwen25VLConfig":
    """Builds a config from a parsed HF `config.json` (flat 4.x or nested 5.x)."""
    model_type = d.get("model_type")
    if model_type not in ("qwen2_5_vl", None):
      raise ValueError(
        f"not a Qwen2.5-VL config: model_type={model_type!r} (expected 'qwen2_5_vl')"
      )
    if "vision_config" not in d:
      raise ValueError("not a Qwen2.5-VL config: no 'vision_config' section")
    t = dict(d.get("text_config") or {})
    # Flat 4.x layout: LM keys live at the root; a nested text_config wins where present.
    for k in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "rms_norm_eps",
      "rope_theta",
      "rope_scaling",
      "rope_parameters",
      "max_position_embeddings",
      "head_dim",
      "tie_word_embeddings",
    ):
      if k not in t and k in d:
        t[k] = d[k]
    missing = [
      k
      for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
      )
      if k not in t
    ]
    if missing:
      raise ValueError(f"Qwen2.5-VL config is missing text keys {missing}")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
      raise ValueError(f"unsupported text rope type {rope_type!r} (expected default/mrope)")
    mrope = tuple(rope.get("mrope_section") or (16, 24, 24))
    theta = float(rope.get("rope_theta", t.get("rope_theta", 1e6)))
    heads = int(t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or t["hidden_size"] // heads)
    if sum(mrope) != head_dim // 2:
      raise ValueError(f"mrope_section {list(mrope)} must sum to head_dim/2 = {head_dim // 2}")
    tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    text = TextConfig(
      vocab_size=int(t["vocab_size"]),
      hidden_size=int(t["hidden_size"]),
      intermediate_size=int(t["intermediate_size"]),
      num_hidden_layers=int(t["num_hidden_layers"]),
      num_attention_heads=heads,
      num_key_value_heads=int(t.get("num_key_value_heads", heads)),
      head_dim=head_dim,
      rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      mrope_section=mrope,
      max_position_embeddings=int(t.get("max_position_embeddings", 128000)),
      tie_word_embeddings=bool(tie),
    )
    v = d["vision_config"]
    vrope = v.get("rope_parameters") or {}
    vision = VisionConfig(
      depth=int(v.get("depth", 32)),
      hidden_size=int(v.get("hidden_size", 1280)),
      intermediate_size=int(v.get("intermediate_size", 3420)),
      num_heads=int(v.get("num_heads", 16)),
      in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
      patch_size=int(v.get("patch_size", 14)),
      temporal_patch_size=int(v.get("temporal_patch_size", 2)),
      spatial_merge_size=int(v.get("spatial_merge_size", 2)),
      window_size=int(v.get("window_size", 112)),
      fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
      out_hidden_size=int(v.get("out_hidden_size", text.hidden_size)),
      tokens_per_second=int(v.get("tokens_per_second", 2)),
      rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    if vision.out_hidden_size != text.hidden_size:
      raise ValueError(
        f"vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}"
      )
    ids = {
      k: d.get(k, t.get(k))
      for k in (
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
      )
    }
    defaults = cls()
    ids = {k: int(val) if val is not None else getattr(defaults, k) for k, val in ids.items()}
    return cls(text=text, vision=vision, **ids)

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "Qwen25VLConfig":
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    try:
      with open(path, encoding="utf-8") as f:
        d = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f"no config.json at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(
        f"{path}: not a JSON config ({type(e).__name__}: {e}); expected the config.json of a "
        "Qwen2.5-VL checkpoint (or the checkpoint folder that holds it)"
      ) from None
    if not isinstance(d, dict):
      raise ValueError(
        f"{path}: not a JSON config object (got a JSON {type(d).__name__}); expected the "
        "config.json of a Qwen2.5-VL checkpoint"
      )
    try:
      return cls.from_hf_dict(d)
    except (ValueError, KeyError) as e:
      raise ValueError(f"{path}: {e}") from e

  def to_hf_dict(self) -> dict[str, Any]:
    """The nested 5.x `config.json` form that `transformers` 5.x reads."""
    t, v = self.text, self.vision
    return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "image_token_id": self.image_token_id,
      "video_token_id": self.video_token_id,
      "vision_start_token_id": self.vision_start_token_id,
      "vision_end_token_id": self.vision_end_token_id,
      "tie_word_embeddings": t.tie_word_embeddings,
      "text_config": {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": "silu",
        "rope_parameters": {
          "rope_type": "default",
          "rope_theta": t.rope_theta,
          "mrope_section": list(t.mrope_section),
        },
        "use_sliding_window": False,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
      },
      "vision_config": {
        "model_type": "qwen2_5_vl_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "out_hidden_size": v.out_hidden_size,
        "tokens_per_second": v.tokens_per_second,
        "hidden_act": "silu",
      },
    }


def _preset(hidden, layers, heads, kv, inter, vocab, tie, v_inter) -> Qwen25VLConfig:
  return Qwen25VLConfig(
    text=TextConfig(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=inter,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=kv,
      tie_word_embeddings=tie,
    ),
    vision=VisionConfig(intermediate_size=v_inter, out_hidden_size=hidden),
  )


# Released configs (docs/qwen2_5_vl_port.md §5). 72B is "very likely"; verify against its config.json.
PRESETS: dict[str, Qwen25VLConfig] = {
  "3b": _preset(2048, 36, 16, 2, 11008, 151936, True, 3420),
  "7b": _preset(3584, 28, 28, 4, 18944, 152064, False, 3420),
  "32b": _preset(5120, 64, 40, 8, 27648, 152064, False, 3456),
  "72b": _preset(8192, 80, 64, 8, 29568, 152064, False, 3456),
}


def tiny_config(**overrides) -> Qwen25VLConfig:
  """A tiny random-init-friendly config for tests and the CPU demo (docs/qwen2_5_vl_port.md §7)."""
  text_kw = {k: overrides.pop(k) for k in list(overrides) if k in TextConfig.__dataclass_fields__}
  vision_kw = {
    k[len("vision_") :]: overrides.pop(k)
    for k in list(overrides)
    if k.startswith("vision_") and k[len("vision_") :] in VisionConfig.__dataclass_fields__
  }
  text = TextConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    mrope_section=(2, 3, 3),
    max_position_embeddings=1024,
  )
  text = dataclasses.replace(text, **text_kw)
  vision = VisionConfig(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    window_size=56,
    fullatt_block_indexes=(1,),
    out_hidden_size=text.hidden_size,
  )
  vision = dataclasses.replace(vision, **vision_kw)
  base = dict(
    image_token_id=500,
    video_token_id=501,
    vision_start_token_id=502,
    vision_end_token_id=503,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=0,
  )
  base.update(overrides)
  return Qwen25VLConfig(text=text, vision=vision, **base)
