"""The Qwen2.5-VL vision tower with static shapes.

All images of a batch run as one packed, padded patch sequence of static length N_pad (a bucket).
Window attention is block-diagonal: the host lays every window's patches into one of a fixed number
of blocks of `window_block` slots (small windows share a block, told apart by a window id), and the
windowed layers attend within blocks only, O(N·S) rather than O(N²). The few full-attention layers
attend densely over the row with a per-image segment mask (docs/qwen2_5_vl_port.md §1.3). Block counts
depend on N_pad only, so one compiled program serves every mix of image sizes within a bucket. The
host computes the index arrays (`VisionInputs`) from `image_grid_thw`; the device does dense math.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pgpo_jax.buckets import patch_bucket
from pgpo_jax.models.qwen2_5_vl import layers, rope
from pgpo_jax.models.qwen2_5_vl.config import VisionConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionInputs:
  """Padded patches plus host-computed index arrays. U_pad = N_pad / merge_unit.

  pixel_values: [N_pad, C*T*P*P] patches in processor order, zero padded.
  unit_order:   [U_pad] int32, merge units gathered into window order (padding units last).
  unit_restore: [U_pad] int32, inverse permutation (back to processor order).
  hw_pos:       [N_pad, 2] int32, (row, col) of each patch, already in window order.
  window_seg:   [N_pad] int32, window id per patch in window order (-1 = padding).
  image_seg:    [N_pad] int32, image-frame id per patch in window order (-1 = padding).
  block_index:  [Nb*S] int32, the window-order patch held by each block slot (0 in empty slots);
                Nb = `num_window_blocks(N_pad)`, S = `window_block`.
  block_seg:    [Nb*S] int32, window id of each block slot (-1 = empty slot).
  block_slot:   [N_pad] int32, the slot holding each window-order patch (padding patches: 0).
  """

  pixel_values: jnp.ndarray
  unit_order: jnp.ndarray
  unit_restore: jnp.ndarray
  hw_pos: jnp.ndarray
  window_seg: jnp.ndarray
  image_seg: jnp.ndarray
  block_index: jnp.ndarray
  block_seg: jnp.ndarray
  block_slot: jnp.ndarray


def window_block(cfg: VisionConfig) -> int:
  """Slots per attention block S: the patches of one full window (window_merged² · merge_unit)."""
  return cfg.window_merged**2 * cfg.merge_unit


def num_window_blocks(num_patches: int, cfg: VisionConfig) -> int:
  """Static block count Nb for a patch budget: enough for ANY set of windows of that many patches.

  Windows are placed first-fit, so any two used blocks together hold more than S patches (the
  later one's first window did not fit into the earlier one): k blocks hold > k·S/2 patches, so
  k < 2·N/S. Typical images (mostly full windows) use about half of them.
  """
  return max(1, -(-2 * int(num_patches) // window_block(cfg)))


def input_shapes(cfg: VisionConfig, num_patches: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """{field: (shape, dtype)} of one row of `VisionInputs` for a patch budget (abstract inputs)."""
  n, u = int(num_patches), int(num_patches) // cfg.merge_unit
  slots = num_window_blocks(n, cfg) * window_block(cfg)
  return dict(
    pixel_values=((n, cfg.patch_dim), "float32"),
    unit_order=((u,), "int32"),
    unit_restore=((u,), "int32"),
    hw_pos=((n, 2), "int32"),
    window_seg=((n,), "int32"),
    image_seg=((n,), "int32"),
    block_index=((slots,), "int32"),
    block_seg=((slots,), "int32"),
    block_slot=((n,), "int32"),
  )


def _pack_windows(window_seg: np.ndarray, block: int, n_blocks: int) -> tuple[np.ndarray, ...]:
  """First-fit of the windows (contiguous runs of `window_seg`, in order) into `n_blocks` blocks.

  Returns (block_index, block_seg, block_slot) as documented on `VisionInputs`.
  """
  sizes = (
    np.bincount(window_seg[window_seg >= 0]) if (window_seg >= 0).any() else np.zeros(0, np.int64)
  )
  block_index = np.zeros(n_blocks * block, np.int32)
  block_seg = np.full(n_blocks * block, -1, np.int32)
  block_slot = np.zeros(len(window_seg), np.int32)
  fill = np.zeros(n_blocks, np.int64)
  start = 0
  for w, size in enumerate(sizes):
    if size > block:
      raise ValueError(f"window {w} has {size} patches, more than a block of {block}")
    fits = np.nonzero(fill + size <= block)[0]
    if not len(fits):  # cannot happen for n_blocks = num_window_blocks(len(window_seg))
      raise ValueError(f"{len(sizes)} windows do not fit into {n_blocks} blocks of {block} patches")
    b = fits[0]
    slots = b * block + fill[b] + np.arange(size)
    block_index[slots] = start + np.arange(size)
    block_seg[slots] = w
    block_slot[start : start + size] = slots
    fill[b] += size
    start += size
  return block_index, block_seg, block_slot


def prepare_vision(
  pixel_values, image_grid_thw, cfg: VisionConfig, num_patches: int | None = None
) -> VisionInputs:
  """Host side: pads the patches to `num_patches` (default: a bucket) and builds index arrays.

  `image_grid_thw` rows that are all zero are padding; patches beyond sum(t*h*w) are padding.
  """
  grids = rope.valid_grids(image_grid_thw)
  pix = np.asarray(pixel_values, np.float32).reshape(-1, cfg.patch_dim)
  n_real = int(grids.prod(axis=1).sum()) if len(grids) else 0
  if pix.shape[0] < n_real:
    raise ValueError(f"pixel_values has {pix.shape[0]} patches but image_grid_thw needs {n_real}")
  mu, m, ws = cfg.merge_unit, cfg.spatial_merge_size, cfg.window_merged
  n_pad = patch_bucket(n_real) if num_patches is None else int(num_patches)
  if n_pad < n_real or n_pad % mu:
    raise ValueError(f"num_patches={n_pad} must be a multiple of {mu} and >= {n_real}")
  u_pad = n_pad // mu

  unit_order, window_of_unit, image_of_unit, hw_unit = [], [], [], []
  unit_base, window_id, frame_id = 0, 0, 0
  for t, h, w in grids:
    hm, wm = h // m, w // m
    # (row, col) of every patch of one frame, in processor (merge-block-major) order.
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blk = lambda a: a.reshape(hm, m, wm, m).transpose(0, 2, 1, 3).reshape(-1, mu)
    rc = np.stack([blk(rr), blk(cc)], -1)  # [hm*wm, mu, 2] per merge unit
    ids = np.arange(hm * wm).reshape(hm, wm)
    ph, pw = ws - hm % ws, ws - wm % ws  # HF pads a full empty window when divisible; harmless
    padded = np.full((hm + ph, wm + pw), -1)
    padded[:hm, :wm] = ids
    nh, nw = padded.shape[0] // ws, padded.shape[1] // ws
    wins = padded.reshape(nh, ws, nw, ws).transpose(0, 2, 1, 3).reshape(nh * nw, ws * ws)
    for f in range(t):
      for win in wins:
        members = win[win >= 0]
        if not len(members):
          continue  # empty padded window (HF `unique_consecutive`)
        unit_order.extend(unit_base + f * hm * wm + members)
        window_of_unit.extend([window_id] * len(members))
        image_of_unit.extend([frame_id] * len(members))
        hw_unit.extend(rc[members])
        window_id += 1
      frame_id += 1
    unit_base += t * hm * wm
  n_units = unit_base
  pad_units = np.arange(n_units, u_pad)
  order = np.concatenate([np.asarray(unit_order, np.int64), pad_units]).astype(np.int32)
  restore = np.argsort(order).astype(np.int32)
  per_patch = lambda a: np.repeat(np.asarray(a, np.int64), mu)
  window_seg = np.concatenate([per_patch(window_of_unit), -np.ones(len(pad_units) * mu, np.int64)])
  image_seg = np.concatenate([per_patch(image_of_unit), -np.ones(len(pad_units) * mu, np.int64)])
  hw = np.concatenate(
    [np.asarray(hw_unit, np.int64).reshape(-1, 2), np.zeros((len(pad_units) * mu, 2), np.int64)]
  )
  pix_pad = np.zeros((n_pad, cfg.patch_dim), np.float32)
  pix_pad[:n_real] = pix[:n_real]
  window_seg = window_seg.astype(np.int32)
  block_index, block_seg, block_slot = _pack_windows(
    window_seg, window_block(cfg), num_window_blocks(n_pad, cfg)
  )
  return VisionInputs(
    pixel_values=pix_pad,
    unit_order=order,
    unit_restore=restore,
    hw_pos=hw.astype(np.int32),
    window_seg=window_seg,
    image_seg=image_seg.astype(np.int32),
    block_index=block_index,
    block_seg=block_seg,
    block_slot=block_slot,
  )


def images_per_row(
  input_ids_BxT, image_grid_thw, cfg_merge_unit: int, image_token_id: int
) -> list[int]:
  """How many of the (in-order) images each row holds, from its `<|image_pad|>` count."""
  grids = rope.valid_grids(image_grid_thw)
  tokens = [int(x) for x in (np.asarray(input_ids_BxT) == image_token_id).sum(axis=1)]
  counts, g = [], 0
  for b, need in enumerate(tokens):
    k = 0
    while need > 0:
      if g >= len(grids):
        raise ValueError(f"row {b}: more <|image_pad|> tokens than image_grid_thw provides")
      need -= int(grids[g].prod()) // cfg_merge_unit
      g, k = g + 1, k + 1
    if need:
      raise ValueError(f"row {b}: <|image_pad|> count does not match its images' grids")
    counts.append(k)
  if g != len(grids):
    raise ValueError(f"image_grid_thw has {len(grids)} images but the rows hold {g}")
  return counts


def prepare_vision_rows(
  pixel_values,
  image_grid_thw,
  input_ids_BxT,
  cfg: VisionConfig,
  image_token_id: int,
  num_patches: int | None = None,
) -> VisionInputs:
  """Per-row VisionInputs ([B, N_pad, ...] leaves): row b holds only its own images' patches.

  `num_patches` is the per-row budget (default: a bucket of the largest row). Rows without
  images are all padding. Used where batches are split by rows (micro-batches, data sharding).
  """
  grids = rope.valid_grids(image_grid_thw)
  counts = images_per_row(input_ids_BxT, grids, cfg.merge_unit, image_token_id)
  pix = np.asarray(pixel_values, np.float32).reshape(-1, cfg.patch_dim) if len(grids) else None
  sizes = grids.prod(axis=1) if len(grids) else np.zeros(0, np.int64)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  row_grids, row_pix, g = [], [], 0
  for k in counts:
    row_grids.append(grids[g : g + k])
    row_pix.append(
      pix[starts[g] : starts[g + k]] if k else np.zeros((0, cfg.patch_dim), np.float32)
    )
    g += k
  need = max([int(r.prod(axis=1).sum()) if len(r) else 0 for r in row_grids] + [0])
  n_pad = patch_bucket(need) if num_patches is None else int(num_patches)
  rows = [prepare_vision(p, r, cfg, n_pad) for p, r in zip(row_pix, row_grids)]
  return jax.tree.map(lambda *a: np.stack(a), *rows)


class VisionBlocks(nnx.Module):
  """`depth` pre-norm ViT blocks, parameters stacked on a leading `vision_layers` axis."""

  NAMES = (
    "norm1",
    "wq",
    "bq",
    "wk",
    "bk",
    "wv",
    "bv",
    "wo",
    "bo",
    "norm2",
    "w_gate",
    "b_gate",
    "w_up",
    "b_up",
    "w_down",
    "b_down",
  )

  def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs):
    L, D, H, K, I = cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    p = lambda shape, axes, init="normal": layers.param(rngs, shape, axes, dtype, init)
    ax_l, ax_d, ax_h, ax_k, ax_i = (
      "vision_layers",
      "vision_embed",
      "vision_heads",
      "vision_head_dim",
      "vision_mlp",
    )
    self.norm1 = p((L, D), (ax_l, ax_d), "ones")
    for n in ("q", "k", "v"):
      setattr(self, f"w{n}", p((L, D, H, K), (ax_l, ax_d, ax_h, ax_k)))
      setattr(self, f"b{n}", p((L, H, K), (ax_l, ax_h, ax_k), "zeros"))
    self.wo = p((L, H, K, D), (ax_l, ax_h, ax_k, ax_d))
    self.bo = p((L, D), (ax_l, ax_d), "zeros")
    self.norm2 = p((L, D), (ax_l, ax_d), "ones")
    self.w_gate = p((L, D, I), (ax_l, ax_d, ax_i))
    self.b_gate = p((L, I), (ax_l, ax_i), "zeros")
    self.w_up = p((L, D, I), (ax_l, ax_d, ax_i))
    self.b_up = p((L, I), (ax_l, ax_i), "zeros")
    self.w_down = p((L, I, D), (ax_l, ax_i, ax_d))
    self.b_down = p((L, D), (ax_l, ax_d), "zeros")


class VisionTower(nnx.Module):
  """Patch embedding → windowed/full blocks → PatchMerger; emits LM-sized features per merge unit."""

  def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs, param_dtype=None):
    """`dtype`: compute dtype; `param_dtype`: parameters (default `dtype`)."""
    self.cfg = cfg
    self.dtype = dtype
    pdt = dtype if param_dtype is None else param_dtype
    D, mu = cfg.hidden_size, cfg.merge_unit
    self.patch_embed = layers.param(rngs, (cfg.patch_dim, D), ("vision_patch", "vision_embed"), pdt)
    self.blocks = VisionBlocks(cfg, pdt, rngs)
    self.ln_q = layers.param(rngs, (D,), ("vision_embed",), pdt, "ones")
    self.merger_w0 = layers.param(rngs, (mu * D, mu * D), ("vision_merge", "vision_merge_out"), pdt)
    self.merger_b0 = layers.param(rngs, (mu * D,), ("vision_merge_out",), pdt, "zeros")
    self.merger_w2 = layers.param(
      rngs, (mu * D, cfg.out_hidden_size), ("vision_merge_out", "embed"), pdt
    )
    self.merger_b2 = layers.param(rngs, (cfg.out_hidden_size,), ("embed",), pdt, "zeros")

  def __call__(
    self,
    vin: VisionInputs,
    *,
    remat_policy: str = "none",
    use_scan: bool = True,
    attention_chunk_size: int = 0,
    attention_impl: str = "xla",
  ) -> jnp.ndarray:
    """Merged features in processor order, padding units last.

    Packed inputs ([N_pad, ...] leaves, from `prepare_vision`) give [U_pad, out_hidden]; per-row
    inputs ([P, N_pad, ...] leaves, from `prepare_vision_rows`) give [P, U_pad, out_hidden] and
    attention never crosses rows (full layers: P·N² rather than (P·N)² attention scores; windowed
    layers: P·Nb·S², Nb·S ≤ 2N + S).
    """
    if vin.pixel_values.ndim == 2:
      one = jax.tree.map(lambda a: a[None], vin)
      return self(
        one,
        remat_policy=remat_policy,
        use_scan=use_scan,
        attention_chunk_size=attention_chunk_size,
        attention_impl=attention_impl,
      )[0]
    cfg, dt = self.cfg, self.dtype
    mu, D = cfg.merge_unit, cfg.hidden_size
    x = layers.dot("pnc,cd->pnd", vin.pixel_values.astype(dt), self.patch_embed[...].astype(dt))
    P, n = x.shape[:2]
    take_rows = lambda a, idx: jnp.take_along_axis(a, idx[:, :, None, None], axis=1)
    x = take_rows(x.reshape(P, n // mu, mu, D), vin.unit_order).reshape(P, n, D)  # window order
    cos, sin = jax.vmap(lambda hw: rope.vision_cos_sin(hw, cfg.head_dim, cfg.rope_theta))(
      vin.hw_pos
    )
    S = window_block(cfg)
    nb = vin.block_seg.shape[1] // S
    block_seg = vin.block_seg.reshape(P, nb, S)
    # [P*Nb, S, S]: a block may hold several small windows; empty slots only see each other.
    block_mask = (block_seg[..., :, None] == block_seg[..., None, :]).reshape(P * nb, S, S)
    full_mask = vin.image_seg[:, :, None] == vin.image_seg[:, None, :]  # [P, N, N]
    is_full = np.zeros(cfg.depth, bool)
    is_full[[i for i in cfg.fullatt_block_indexes if i < cfg.depth]] = True
    scale = cfg.head_dim**-0.5

    def full_attention(
      q, k, v
    ):  # [P, N, H, K] each; the per-image mask as segment ids for fused kernels
      return layers.chunked_attention(
        q[:, :, :, None, :],
        k,
        v,
        full_mask,
        scale,
        attention_chunk_size,
        impl=attention_impl,
        q_seg_BxT=vin.image_seg,
        kv_seg_BxS=vin.image_seg,
      )[:, :, :, 0, :]

    def window_attention(q, k, v):
      blocks = lambda a: take_rows(a, vin.block_index).reshape(P * nb, S, *a.shape[2:])
      att = layers.masked_softmax_attention(
        blocks(q)[:, :, :, None, :], blocks(k), blocks(v), block_mask, scale
      )[:, :, :, 0, :]
      return take_rows(
        att.reshape(P, nb * S, *att.shape[2:]), vin.block_slot
      )  # back to window order

    def block(x, xs):
      p, full = xs
      p = layers.cast(p, dt)  # this block's weights in the compute dtype
      h = layers.rms_norm(x, p["norm1"], cfg.rms_norm_eps)
      # Matmul outputs carry the names the remat policies save by (`layers.REMAT_SAVED`).
      proj = lambda n: layers.dot("pnd,dhk->pnhk", h, p[f"w{n}"], f"{n}_proj") + p[f"b{n}"]
      q, k, v = proj("q"), proj("k"), proj("v")
      # HF applies the vision rotary in float32, then casts back.
      q = rope.apply_rotary(q.astype(jnp.float32), cos, sin).astype(dt)
      k = rope.apply_rotary(k.astype(jnp.float32), cos, sin).astype(dt)
      if isinstance(full, (bool, np.bool_)):  # unrolled layers: the kind is known statically
        att = full_attention(q, k, v) if full else window_attention(q, k, v)
      else:  # scanned layers: only the taken branch runs
        att = jax.lax.cond(full, full_attention, window_attention, q, k, v)  # [P, N, H, K]
      x = x + layers.dot("pnhk,hkd->pnd", att, p["wo"], "o_proj") + p["bo"]
      h = layers.rms_norm(x, p["norm2"], cfg.rms_norm_eps)
      gate = jax.nn.silu(layers.dot("pnd,di->pni", h, p["w_gate"], "mlp_gate") + p["b_gate"])
      up = layers.dot("pnd,di->pni", h, p["w_up"], "mlp_up") + p["b_up"]
      x = x + layers.dot("pni,id->pnd", gate * up, p["w_down"], "mlp_down") + p["b_down"]
      return x, None

    body = layers.maybe_remat(block, remat_policy)
    params = layers.values(self.blocks, VisionBlocks.NAMES)
    x, _ = layers.scan_layers(
      body, x, (params, jnp.asarray(is_full) if use_scan else is_full), cfg.depth, use_scan
    )

    h = layers.rms_norm(x, self.ln_q[...], cfg.rms_norm_eps).reshape(P, n // mu, mu * D)
    w0, b0, w2, b2 = layers.cast(
      (self.merger_w0[...], self.merger_b0[...], self.merger_w2[...], self.merger_b2[...]), dt
    )
    h = jax.nn.gelu(layers.dot("pud,de->pue", h, w0) + b0, approximate=False)  # exact GELU
    h = layers.dot("pue,eo->puo", h, w2) + b2
    return jnp.take_along_axis(h, vin.unit_restore[:, :, None], axis=1)  # processor order
