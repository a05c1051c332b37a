"""One table between HF Qwen2.5-VL state-dict names and our parameter paths, used both ways.

HF keys come in two spellings (docs/qwen2_5_vl_port.md §6): on disk `visual.*`, `model.layers.*`,
`model.embed_tokens.weight`; in memory `model.visual.*`, `model.language_model.*`. Both are
normalised to the on-disk form. Per-layer tensors are stacked on our leading `layers` axis.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterator

import numpy as np

from pgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Rule:
  """`hf` is a regex (with a `(\\d+)` layer group when `stacked`); `ours` are parameter paths.

  `to_ours(w, cfg) -> [arrays]` (one per path) and `to_hf([arrays], cfg) -> w` are inverses.
  """

  hf: str
  ours: tuple[tuple[str, ...], ...]
  to_ours: Callable[[Array, Qwen25VLConfig], list[Array]]
  to_hf: Callable[[list[Array], Qwen25VLConfig], Array]
  stacked: bool = False
  hf_template: str = ""  # name with `{i}` for export


def _ident():
  return (lambda w, c: [w]), (lambda ws, c: ws[0])


def _linear():
  return (lambda w, c: [w.T]), (lambda ws, c: ws[0].T)


def _in_heads(heads: Callable, hd: Callable):
  """[H*K, D] → [D, H, K]."""
  return (
    (lambda w, c: [w.T.reshape(w.shape[1], heads(c), hd(c))]),
    (lambda ws, c: ws[0].reshape(ws[0].shape[0], -1).T),
  )


def _bias_heads(heads: Callable, hd: Callable):
  return (lambda w, c: [w.reshape(heads(c), hd(c))]), (lambda ws, c: ws[0].reshape(-1))


def _out_heads(heads: Callable, hd: Callable):
  """[D, H*K] → [H, K, D]."""
  return (
    (lambda w, c: [w.T.reshape(heads(c), hd(c), w.shape[0])]),
    (lambda ws, c: ws[0].reshape(-1, ws[0].shape[-1]).T),
  )


def _patch():
  """Conv3d [Dv, C, T, P, P] → dense [C*T*P*P, Dv] (kernel == stride == one patch)."""

  def back(ws, c):
    v = c.vision
    return ws[0].T.reshape(
      v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
    )

  return (lambda w, c: [w.reshape(w.shape[0], -1).T]), back


def _qkv_weight():
  """Fused vision qkv [3Dv, Dv] → three [Dv, H, K] (columns q|k|v, head-major)."""
  H = lambda c: c.vision.num_heads
  K = lambda c: c.vision.head_dim
  fwd_one, back_one = _in_heads(H, K)
  return (
    (lambda w, c: [fwd_one(p, c)[0] for p in np.split(w, 3, axis=0)]),
    (lambda ws, c: np.concatenate([back_one([x], c) for x in ws], axis=0)),
  )


def _qkv_bias():
  H = lambda c: c.vision.num_heads
  K = lambda c: c.vision.head_dim
  return (
    (lambda w, c: [p.reshape(H(c), K(c)) for p in np.split(w, 3)]),
    (lambda ws, c: np.concatenate([x.reshape(-1) for x in ws])),
  )


def _rule(hf_template: str, ours, conv, stacked=False) -> Rule:
  ours = tuple(tuple(p.split("/")) for p in (ours if isinstance(ours, (list, tuple)) else [ours]))
  pattern = "^" + re.escape(hf_template).replace(r"\{i\}", r"(\d+)") + "$"
  return Rule(pattern, ours, conv[0], conv[1], stacked, hf_template)


_TQ = (lambda c: c.text.num_attention_heads, lambda c: c.text.head_dim)
_TKV = (lambda c: c.text.num_key_value_heads, lambda c: c.text.head_dim)

RULES: tuple[Rule, ...] = (
  _rule("visual.patch_embed.proj.weight", "visual/patch_embed", _patch()),
  _rule("visual.blocks.{i}.norm1.weight", "visual/blocks/norm1", _ident(), True),
  _rule("visual.blocks.{i}.norm2.weight", "visual/blocks/norm2", _ident(), True),
  _rule(
    "visual.blocks.{i}.attn.qkv.weight",
    ["visual/blocks/wq", "visual/blocks/wk", "visual/blocks/wv"],
    _qkv_weight(),
    True,
  ),
  _rule(
    "visual.blocks.{i}.attn.qkv.bias",
    ["visual/blocks/bq", "visual/blocks/bk", "visual/blocks/bv"],
    _qkv_bias(),
    True,
  ),
  _rule(
    "visual.blocks.{i}.attn.proj.weight",
    "visual/blocks/wo",
    _out_heads(lambda c: c.vision.num_heads, lambda c: c.vision.head_dim),
    True,
  ),
  _rule("visual.blocks.{i}.attn.proj.bias", "visual/blocks/bo", _ident(), True),
  _rule("visual.blocks.{i}.mlp.gate_proj.weight", "visual/blocks/w_gate", _linear(), True),
  _rule("visual.blocks.{i}.mlp.gate_proj.bias", "visual/blocks/b_gate", _ident(), True),
  _rule("visual.blocks.{i}.mlp.up_proj.weight", "visual/blocks/w_up", _linear(), True),
  _rule("visual.blocks.{i}.mlp.up_proj.bias", "visual/blocks/b_up", _ident(), True),
  _rule("visual.blocks.{i}.mlp.down_proj.weight", "visual/blocks/w_down", _linear(), True),
  _rule("visual.blocks.{i}.mlp.down_proj.bias", "visual/blocks/b_down", _ident(), True),
  _rule("visual.merger.ln_q.weight", "visual/ln_q", _ident()),
  _rule("visual.merger.mlp.0.weight", "visual/merger_w0", _linear()),
  _rule("visual.merger.mlp.0.bias", "visual/merger_b0", _ident()),
  _rule("visual.merger.mlp.2.weight", "visual/merger_w2", _linear()),
  _rule("visual.merger.mlp.2.bias", "visual/merger_b2", _ident()),
  _rule("model.embed_tokens.weight", "language_model/embed_tokens", _ident()),
  _rule(
    "model.layers.{i}.input_layernorm.weight", "language_model/layers/input_norm", _ident(), True
  ),
  _rule(
    "model.layers.{i}.post_attention_layernorm.weight",
    "language_model/layers/post_norm",
    _ident(),
    True,
  ),
  _rule(
    "model.layers.{i}.self_attn.q_proj.weight", "language_model/layers/wq", _in_heads(*_TQ), True
  ),
  _rule(
    "model.layers.{i}.self_attn.q_proj.bias", "language_model/layers/bq", _bias_heads(*_TQ), True
  ),
  _rule(
    "model.layers.{i}.self_attn.k_proj.weight", "language_model/layers/wk", _in_heads(*_TKV), True
  ),
  _rule(
    "model.layers.{i}.self_attn.k_proj.bias", "language_model/layers/bk", _bias_heads(*_TKV), True
  ),
  _rule(
    "model.layers.{i}.self_attn.v_proj.weight", "language_model/layers/wv", _in_heads(*_TKV), True
  ),
  _rule(
    "model.layers.{i}.self_attn.v_proj.bias", "language_model/layers/bv", _bias_heads(*_TKV), True
  ),
  _rule(
    "model.layers.{i}.self_attn.o_proj.weight", "language_model/layers/wo", _out_heads(*_TQ), True
  ),
  _rule("model.layers.{i}.mlp.gate_proj.weight", "language_model/layers/w_gate", _linear(), True),
  _rule("model.layers.{i}.mlp.up_proj.weight", "language_model/layers/w_up", _linear(), True),
  _rule("model.layers.{i}.mlp.down_proj.weight", "language_model/layers/w_down", _linear(), True),
  _rule("model.norm.weight", "language_model/norm", _ident()),
  _rule("lm_head.weight", "lm_head", _linear()),
)


def normalize_hf_key(key: str) -> str:
  """In-memory 5.x names (`model.visual.*`, `model.language_model.*`) → on-disk names."""
  if key.startswith("model.visual."):
    return key[len("model.") :]
  if key.startswith("model.language_model."):
    return "model." + key[len("model.language_model.") :]
  return key


def match(key: str) -> tuple[Rule, int | None] | None:
  key = normalize_hf_key(key)
  for r in RULES:
    m = re.match(r.hf, key)
    if m:
      return r, (int(m.group(1)) if r.stacked else None)
  return None


def num_layers(rule: Rule, cfg: Qwen25VLConfig) -> int:
  return cfg.vision.depth if rule.ours[0][0] == "visual" else cfg.text.num_hidden_layers


def expected_hf_keys(cfg: Qwen25VLConfig) -> list[str]:
  keys = []
  for r in RULES:
    if r.ours[0] == ("lm_head",) and cfg.text.tie_word_embeddings:
      continue
    if r.stacked:
      keys.extend(r.hf_template.format(i=i) for i in range(num_layers(r, cfg)))
    else:
      keys.append(r.hf_template)
  return keys


def iter_hf_tensors(
  params: dict[tuple[str, ...], Array], cfg: Qwen25VLConfig
) -> Iterator[tuple[str, Array]]:
  """Our flat params {path: array} → (on-disk HF name, array) one tensor at a time."""
  for r in RULES:
    if any(p not in params for p in r.ours):
      if r.ours[0] == ("lm_head",) and cfg.text.tie_word_embeddings:
        continue
      raise KeyError(f"parameter {'/'.join(r.ours[0])} missing for export")
    if r.stacked:
      for i in range(num_layers(r, cfg)):
        yield r.hf_template.format(i=i), r.to_hf([np.asarray(params[p][i]) for p in r.ours], cfg)
    else:
      yield r.hf_template, r.to_hf([np.asarray(params[p]) for p in r.ours], cfg)


# ------------------------------------------------------------------------------------------------
# Reading safetensors (single file or sharded with an index)
# ------------------------------------------------------------------------------------------------
def safetensors_files(model_dir: str) -> list[str]:
  index = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(model_dir, f))]
    if missing:
      raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
    return [os.path.join(model_dir, f) for f in files]
  single = os.path.join(model_dir, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, Array]]:
  """(name, numpy array) for every tensor, one at a time (bf16 comes back as ml_dtypes.bfloat16)."""
  from safetensors import safe_open

  for path in safetensors_files(model_dir):
    with safe_open(path, framework="flax") as f:
      for name in f.keys():
        yield name, np.asarray(f.get_tensor(name))


def load_hf_params(
  tensors: Iterator[tuple[str, Array]],
  cfg: Qwen25VLConfig,
  shapes: dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]],
  put: Callable[[tuple[str, ...], Array], object] = lambda path, a: a,
) -> dict[tuple[str, ...], object]:
  """Fills every parameter of `shapes` from HF tensors, converting each to the target dtype.

  Stacked parameters are assembled layer by layer into one preallocated buffer; `put(path, array)`
  places a finished parameter (e.g. `jax.device_put` into its sharding) so host memory holds at
  most one parameter at a time beyond the output. Raises a ValueError listing missing, unexpected
  and mis-shaped keys.
  """
  buffers: dict[tuple[str, ...], Array] = {}
  filled: dict[tuple[str, ...], set] = {}
  out: dict[tuple[str, ...], object] = {}
  unexpected, misshaped = [], []
  seen: set[str] = set()
  for name, w in tensors:
    key = normalize_hf_key(name)
    m = match(key)
    if m is None:
      unexpected.append(name)
      continue
    rule, layer = m
    if rule.ours[0] == ("lm_head",) and cfg.text.tie_word_embeddings:
      continue  # a tied checkpoint may still carry lm_head: the embedding is the truth
    seen.add(key)
    try:
      parts = rule.to_ours(np.asarray(w), cfg)
    except ValueError as e:
      misshaped.append(f"{name}: {tuple(np.shape(w))} ({e})")
      continue
    for path, part in zip(rule.ours, parts):
      shape, dtype = shapes[path]
      want = shape[1:] if rule.stacked else shape
      if tuple(part.shape) != tuple(want):
        misshaped.append(
          f"{name}: got {tuple(np.shape(w))} → {tuple(part.shape)}, expected {tuple(want)}"
        )
        continue
      if rule.stacked:
        if layer >= shape[0]:
          unexpected.append(name)
          continue
        buf = buffers.get(path)
        if buf is None:
          buf = buffers[path] = np.empty(shape, dtype)
        buf[layer] = part.astype(dtype)
        filled.setdefault(path, set()).add(layer)
        if len(filled[path]) == shape[0]:
          out[path] = put(path, buffers.pop(path))
      else:
        out[path] = put(path, part.astype(dtype))
  missing = [k for k in expected_hf_keys(cfg) if k not in seen]
  if missing or unexpected or misshaped:
    lines = []
    for label, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    ):
      if items:
        lines.append(
          f"{len(items)} {label} key(s): "
          + ", ".join(items[:20])
          + (" …" if len(items) > 20 else "")
        )
    raise ValueError("checkpoint does not match the Qwen2.5-VL config:\n  " + "\n  ".join(lines))
  return out
