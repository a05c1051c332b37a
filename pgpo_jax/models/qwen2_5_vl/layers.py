"""Building blocks shared by the vision tower and the decoder: parameters, RMSNorm, attention, remat.

Every parameter is an `nnx.Param` carrying `axes`, a tuple of logical axis names (one per dim);
`pgpo_jax.sharding` maps those names to mesh axes. Stacked (scanned) layers put `layers` /
`vision_layers` first.

Mixed precision: parameters live in their own dtype (float32 masters for training) and are cast to
the compute dtype where they are used (`cast`, inside each scanned layer, so only one layer's copy
exists at a time); RMSNorm statistics, softmax and the logits stay float32.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from pgpo_jax.logical_axes import current_rules, logical_to_spec

INIT_STD = 0.02  # HF `initializer_range`


def param(
  rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str], dtype, init: str = "normal"
) -> nnx.Param:
  """A parameter with logical axes; `init` is normal(0.02) | zeros | ones."""
  assert len(shape) == len(axes), (shape, axes)
  shape = tuple(int(s) for s in shape)
  if init == "normal":
    value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    raise ValueError(f"unknown init {init!r}")
  return nnx.Param(value.astype(dtype), axes=tuple(axes))


def cast(tree, dtype):
  """Floating leaves of `tree` cast to `dtype` (the compute dtype); a no-op where they already are."""
  return jax.tree.map(
    lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
  )


def dot(spec: str, a: jnp.ndarray, w: jnp.ndarray, name: str | None = None) -> jnp.ndarray:
  """`jnp.einsum(spec, a, w)` of two operands, accumulated in float32 and rounded once to `a`'s dtype.

  In float32 this is the plain einsum. In a lower dtype (bfloat16 compute) it rounds once, as a
  bfloat16 MXU or torch matmul does, and it is what lets XLA:CPU use its bfloat16 kernels: a
  bf16 x bf16 -> bf16 dot is rewritten there to a float32 dot on upcast inputs (~2x slower than
  bf16 x bf16 -> f32). The gradient keeps the same form (`_rounded_dot`'s VJP): the cotangent is
  rounded to the compute dtype, so the backward matmuls stay bf16 x bf16 with float32 accumulation
  instead of float32 x float32 (what differentiating the float32 result would give; 3-6x slower on
  TPU). Every index of `spec` must appear in two of its three terms (no summed-away free index).

  `name` (one of `REMAT_NAMES`) tags the result with `checkpoint_name`, outside the custom VJP: a
  remat policy sees the name where it cannot see the dot inside `_rounded_dot` (JAX's dot-based
  policies save nothing of it). Outside `jax.checkpoint` the name is the identity.
  """
  if a.dtype == jnp.float32 and w.dtype == jnp.float32:
    out = jnp.einsum(spec, a, w)
  else:
    out = _rounded_dot(spec, a, w)
  return out if name is None else checkpoint_name(out, name)


def _dot_terms(spec: str) -> tuple[str, str, str]:
  ins, out = spec.replace(" ", "").split("->")
  a, w = ins.split(",")
  for c in set(a + w + out):
    if (c in a) + (c in w) + (c in out) < 2:
      raise ValueError(f"layers.dot: index {c!r} of {spec!r} appears in only one term")
  return a, w, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rounded_dot(spec: str, a: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  _dot_terms(spec)
  return jnp.einsum(spec, a, w, preferred_element_type=jnp.float32).astype(a.dtype)


def _rounded_dot_fwd(spec, a, w):
  return _rounded_dot(spec, a, w), (a, w)


def _rounded_dot_bwd(spec, res, g):
  a, w = res
  ta, tw, to = _dot_terms(spec)
  g = g.astype(a.dtype)
  da = jnp.einsum(f"{to},{tw}->{ta}", g, w, preferred_element_type=jnp.float32)
  dw = jnp.einsum(f"{ta},{to}->{tw}", a, g, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), dw.astype(w.dtype)


_rounded_dot.defvjp(_rounded_dot_fwd, _rounded_dot_bwd)


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
  """HF RMSNorm: normalise in float32, cast back to the input dtype, then scale by `weight`.

  `weight` is cast to the input (compute) dtype first, so float32 masters computing in bfloat16
  give exactly what a bfloat16 model (HF's `weight * x.to(bf16)`) gives.
  """
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * xf.astype(x.dtype)


def masked_softmax_attention(
  q_BxTxNxGxK: jnp.ndarray,
  k_BxSxNxK: jnp.ndarray,
  v_BxSxNxK: jnp.ndarray,
  mask_BxTxS: jnp.ndarray,
  scale: float,
  *,
  named: bool = True,
) -> jnp.ndarray:
  """Grouped attention: N kv heads, G query heads per kv head. Softmax in float32.

  A query row with every key masked attends uniformly (no NaN); callers ignore such rows.
  `named`: tag the scores and the context (`ATTENTION_MATMULS`) for the remat policies (`dots`
  saves them); the query-chunked map turns it off, or `dots` would keep every chunk's float32
  scores, the whole [T, S] the chunks are there to avoid. Returns [B, T, N, G, K] in the dtype of `v`.
  """
  tag = (lambda x, name: checkpoint_name(x, name)) if named else (lambda x, name: x)
  B, T, N, G, K = q_BxTxNxGxK.shape
  # Both products as plain [.., T, K] @ [.., K, S] / [.., T, S] @ [.., S, K] batched matmuls: XLA:CPU
  # runs a dot contracting the minor dim of both operands (q·kᵀ as written) about 2x slower.
  q_BxNxGTxK = q_BxTxNxGxK.transpose(0, 2, 3, 1, 4).reshape(B, N, G * T, K)
  scores = tag(
    jnp.matmul(q_BxNxGTxK, k_BxSxNxK.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32),
    "attn_scores",
  )
  # The mask as an additive float32 bias: XLA:CPU fuses the add into the softmax that feeds the P·V
  # matmul, where a select on the broadcast mask is a pass of its own over the scores (~1.5x
  # slower attention). A masked score becomes finfo.min (the score is below its resolution).
  bias_BxTxS = jnp.where(mask_BxTxS, 0.0, jnp.finfo(jnp.float32).min)
  scores = scores.reshape(B, N, G, T, -1) * scale + bias_BxTxS[:, None, None, :, :]
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxNxK.dtype).reshape(B, N, G * T, -1)
  # [B, N, G*T, K]: float32 accumulation rounded to v's dtype, also in the gradient (`dot`).
  out = tag(dot("bnts,bnsk->bntk", probs, v_BxSxNxK.transpose(0, 2, 1, 3)), "attn_context")
  return out.reshape(B, N, G, T, K).transpose(0, 3, 1, 2, 4)


CAUSAL_BLOCK = 128  # query rows per block of `causal_block_attention` when no chunk size is set


def causal_block_attention(
  q_BxTxNxGxK: jnp.ndarray,
  k_BxTxNxK: jnp.ndarray,
  v_BxTxNxK: jnp.ndarray,
  mask_BxTxT: jnp.ndarray,
  scale: float,
  block: int,
) -> jnp.ndarray:
  """`masked_softmax_attention` for a causal self-attention mask, about half the work.

  Query rows [a, a+block) read only keys [0, a+block): the keys after them are masked anyway, so
  their scores (half of the [T, T] square) are never computed. The blocks are a static Python
  loop (T // block + 1 score tiles of [block, <= T], no [T, T] array). Equal to the dense call on
  every query row that sees at least one key; a row that sees none (callers ignore those) attends
  uniformly over its block's key prefix instead of over all T keys. Returns [B, T, N, G, K].
  """
  T = q_BxTxNxGxK.shape[1]
  outs = [
    masked_softmax_attention(
      q_BxTxNxGxK[:, a : a + block],
      k_BxTxNxK[:, : a + block],
      v_BxTxNxK[:, : a + block],
      mask_BxTxT[:, a : a + block, : a + block],
      scale,
    )
    for a in range(0, T, block)
  ]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")


def resolve_attention_impl(impl: str, platform: str | None = None) -> str:
  """`auto` → splash on TPU, cudnn on NVIDIA GPUs, xla elsewhere (CPU); others pass through."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; valid: {', '.join(ATTENTION_IMPLS)}")
  if impl != "auto":
    return impl
  if platform is None:
    # The platform of the mesh a program is traced for (a TPU topology on a CPU host), else local.
    ctx = current_rules()
    platform = ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()
  return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")


def segment_mask(q_seg_BxT: jnp.ndarray, kv_seg_BxS: jnp.ndarray, causal: bool) -> jnp.ndarray:
  """[B, T, S] bool: same segment id, and (if causal) key index <= query index (T == S)."""
  mask = q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :]
  if causal:
    T, S = mask.shape[1:]
    mask = mask & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])[None]
  return mask


SPLASH_LANES = 128  # the kernel's sequence tiles are multiples of this


def _splash_block(n: int, largest: int) -> int:
  """The largest tile of (512, 256, 128) <= `largest` that divides n (a multiple of 128)."""
  for b in (512, 256, 128):
    if b <= largest and n % b == 0:
      return b
  raise ValueError(f"splash attention: length {n} is not a multiple of {SPLASH_LANES}")


def _pad_to_lanes(x, seg, axis: int):
  """Pads a sequence axis of `x` (and its [B, n] segment ids) up to a multiple of 128. Padded
  slots get a segment id no real token has: padded queries see only padded keys (never an empty
  row), real queries never see them."""
  n = x.shape[axis]
  pad = -n % SPLASH_LANES
  if not pad:
    return x, seg
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  fill = jnp.iinfo(jnp.int32).min
  return jnp.pad(x, widths), jnp.pad(
    seg.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=fill
  )


def splash_operands(q_BxTxNxGxK, k_BxSxNxK, scale: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The splash kernel's q and k operands [.., Q], chosen so its logits are the xla path's scores.

  The kernel takes no scale: its logits are q'·k' accumulated in float32. The xla path
  (`masked_softmax_attention`) multiplies float32 scores q·k by the scale, so its scores carry only
  float32 rounding. In float32, q' = q·scale does the same (Q = K). In bfloat16, q·scale rounded to
  bfloat16 (as it was; rounding the scale first or not makes little difference, it is each scaled
  element's ~2^-9 relative rounding that counts) moves every logit by ~1e-3 of its size, a rounding
  the xla path does not have. So q·scale, in float32, goes in as two bfloat16 terms side by side
  along the head dim, hi = round(q·scale) and lo = round(q·scale - hi), against two copies of k
  (Q = 2K): hi·k + lo·k = (q·scale)·k to ~2^-17 relative, the xla path's scores up to float32
  rounding. The operands stay bfloat16 (the kernel's one-pass MXU path; float32 operands would
  take several). Cost: the kernel's q·k products (forward; recomputed, and dq, dk, in the backward
  pass) are over 2K, and q, k twice the size; P·V and the softmax are unchanged. `lo` is a rounding
  remainder and carries no gradient: dq = scale · (hi's half of dq'); dk = the sum of its halves.
  """
  scaled = q_BxTxNxGxK.astype(jnp.float32) * scale
  if q_BxTxNxGxK.dtype == jnp.float32:
    return scaled, k_BxSxNxK
  hi = scaled.astype(q_BxTxNxGxK.dtype)
  lo = jax.lax.stop_gradient(scaled - hi.astype(jnp.float32)).astype(hi.dtype)
  return jnp.concatenate([hi, lo], axis=-1), jnp.concatenate([k_BxSxNxK, k_BxSxNxK], axis=-1)


def splash_attention(
  q_BxTxNxGxK,
  k_BxSxNxK,
  v_BxSxNxK,
  q_seg_BxT,
  kv_seg_BxS,
  scale: float,
  *,
  causal: bool,
  interpret: bool = False,
  block: int = 512,
) -> jnp.ndarray:
  """TPU Pallas splash (flash) attention, GQA as one MQA kernel per KV head. Returns [B, T, N, G, K].

  Query t attends key s iff their segment ids match (and s <= t if causal); scores live only as
  [block, block] tiles (`_splash_block`). Lengths that are not a multiple of 128 are padded
  (`_pad_to_lanes`) and the padding dropped from the output. The scale is applied as the xla path
  applies it, to float32 scores (`splash_operands`). `interpret` runs the kernel in Pallas
  interpret mode (CPU tests).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  T0 = q_BxTxNxGxK.shape[1]
  q_BxTxNxGxK, q_seg_BxT = _pad_to_lanes(q_BxTxNxGxK, q_seg_BxT, 1)
  v_BxSxNxK = _pad_to_lanes(v_BxSxNxK, kv_seg_BxS, 1)[0]
  k_BxSxNxK, kv_seg_BxS = _pad_to_lanes(k_BxSxNxK, kv_seg_BxS, 1)
  B, T, N, G, K = q_BxTxNxGxK.shape
  S = k_BxSxNxK.shape[1]
  bq, bkv = _splash_block(T, block), _splash_block(S, block)
  base = sm.CausalMask((T, S)) if causal else sm.FullMask((T, S))
  sizes = sk.BlockSizes(
    block_q=bq,
    block_kv=bkv,
    block_kv_compute=bkv,
    block_q_dkv=bq,
    block_kv_dkv=bkv,
    block_kv_dkv_compute=bkv,
    block_q_dq=bq,
    block_kv_dq=bkv,
  )
  kernel = sk.make_splash_mqa_single_device(
    sm.MultiHeadMask([base] * G), block_sizes=sizes, interpret=interpret
  )
  q_BxTxNxGxQ, k_BxSxNxQ = splash_operands(q_BxTxNxGxK, k_BxSxNxK, scale)
  q_BxNxGxTxQ = q_BxTxNxGxQ.transpose(0, 2, 3, 1, 4)
  k_BxNxSxQ, v_BxNxSxK = k_BxSxNxQ.transpose(0, 2, 1, 3), v_BxSxNxK.transpose(0, 2, 1, 3)

  def row(q_NxGxTxQ, k_NxSxQ, v_NxSxK, q_seg_T, kv_seg_S):
    seg = sk.SegmentIds(q=q_seg_T.astype(jnp.int32), kv=kv_seg_S.astype(jnp.int32))
    return jax.vmap(lambda qn, kn, vn: kernel(qn, kn, vn, segment_ids=seg))(
      q_NxGxTxQ, k_NxSxQ, v_NxSxK
    )

  out = jax.vmap(row)(q_BxNxGxTxQ, k_BxNxSxQ, v_BxNxSxK, q_seg_BxT, kv_seg_BxS)
  return out.transpose(0, 3, 1, 2, 4)[:, :T0].astype(v_BxSxNxK.dtype)


def fused_specs(mesh: jax.sharding.Mesh, rules, B: int, N: int, G: int) -> tuple[P, P, P]:
  """shard_map specs (q [B,T,N,G,K], k/v [B,S,N,K], segment ids [B,T]) for a fused kernel.

  Rows split like the activations' `batch`; heads split over the mesh axis of `act_kv_heads` when
  it divides the KV heads, else over the query groups G when it divides those (K/V then replicated
  over that axis: each shard attends its query heads to every KV head), else heads stay whole.
  Sequence dims are never split (the kernels need whole rows).
  """
  shape = (B, 1, N, G, 1)
  q = logical_to_spec(("batch", None, "act_kv_heads", None, None), rules, mesh, shape)
  if len(q) < 3 or q[2] is None:  # the KV heads do not split: try the query groups
    q = logical_to_spec(("batch", None, None, "act_kv_heads", None), rules, mesh, shape)
  q = tuple(q) + (None,) * (5 - len(q))
  return P(*q), P(q[0], None, q[2], None), P(q[0], None)


def on_mesh(kernel: Callable, q_BxTxNxGxK, k_BxSxNxK, v_BxSxNxK, q_seg_BxT, kv_seg_BxS):
  """Runs a fused attention `kernel(q, k, v, q_seg, kv_seg)` per device under `shard_map`.

  A Pallas/custom-call kernel is opaque to XLA's partitioner, which would otherwise gather its
  operands onto every device (or fail to partition it). Outside `use_rules` / `rules_in_effect`
  (one device, no mesh) the kernel runs as it is.
  """
  ctx = current_rules()
  if ctx is None or ctx[0].size == 1:
    return kernel(q_BxTxNxGxK, k_BxSxNxK, v_BxSxNxK, q_seg_BxT, kv_seg_BxS)
  mesh, rules = ctx
  B, _, N, G, _ = q_BxTxNxGxK.shape
  q_spec, kv_spec, seg_spec = fused_specs(mesh, rules, B, N, G)
  return jax.shard_map(
    kernel,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
    out_specs=q_spec,
    check_vma=False,
  )(q_BxTxNxGxK, k_BxSxNxK, v_BxSxNxK, q_seg_BxT, kv_seg_BxS)


def cudnn_attention(
  q_BxTxNxGxK, k_BxSxNxK, v_BxSxNxK, q_seg_BxT, kv_seg_BxS, scale: float, *, causal: bool
) -> jnp.ndarray:
  """`jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA GPUs), GQA natively.

  The mask goes to cuDNN as the [B, 1, T, S] segment mask (cuDNN makes it an additive bias in the
  input dtype; no float32 score tensor). Not a [B, 1, 1, S] key mask: with left padding some query
  rows would see no key at all, and cuDNN's output there is undefined (NaN would then reach every
  row through P·V); under the segment mask every row sees at least itself. Returns [B, T, N, G, K].
  """
  B, T, N, G, K = q_BxTxNxGxK.shape
  mask = segment_mask(q_seg_BxT, kv_seg_BxS, causal)[:, None]
  out = jax.nn.dot_product_attention(
    q_BxTxNxGxK.reshape(B, T, N * G, K),
    k_BxSxNxK,
    v_BxSxNxK,
    mask=mask,
    scale=scale,
    implementation="cudnn",
  )
  return out.reshape(B, T, N, G, K)


def chunked_attention(
  q_BxTxNxGxK,
  k_BxSxNxK,
  v_BxSxNxK,
  mask_BxTxS,
  scale: float,
  chunk: int,
  *,
  impl: str = "xla",
  causal: bool = False,
  q_seg_BxT=None,
  kv_seg_BxS=None,
  interpret: bool = False,
) -> jnp.ndarray:
  """Grouped attention [B, T, N, G, K] by `impl` (`ATTENTION_IMPLS`); the one attention entry point.

  xla: `masked_softmax_attention` over query chunks of `chunk` rows (bounds the score memory), on
  `mask_BxTxS` (or, when it is None, the mask the segment ids give). With `causal` and T == S
  (self-attention whose mask never lets query t see a key s > t), query blocks of `chunk` rows
  (`CAUSAL_BLOCK` if 0) skip the keys after them (`causal_block_attention`). splash / cudnn: fused
  kernels that never build [T, S] float32 scores; they need the structured form of the mask:
  `causal` and segment ids (query t sees key s iff q_seg[t] == kv_seg[s]). Callers pass both forms;
  a caller without segment ids (the KV-cached decode step) gets xla.
  """
  impl = resolve_attention_impl(impl)
  if impl != "xla" and q_seg_BxT is not None and kv_seg_BxS is not None:
    if impl == "splash":
      kernel = functools.partial(splash_attention, scale=scale, causal=causal, interpret=interpret)
    else:
      kernel = functools.partial(cudnn_attention, scale=scale, causal=causal)
    return on_mesh(kernel, q_BxTxNxGxK, k_BxSxNxK, v_BxSxNxK, q_seg_BxT, kv_seg_BxS)
  if mask_BxTxS is None:
    mask_BxTxS = segment_mask(q_seg_BxT, kv_seg_BxS, causal)
  T = q_BxTxNxGxK.shape[1]
  if causal and T == k_BxSxNxK.shape[1] and (chunk <= 0 or T <= chunk):
    # No memory bound asked for: causal blocks of `CAUSAL_BLOCK` rows skip the keys after them
    # (about half the score work). With a chunk size, the sequential map below, whose memory the
    # compile check has measured (a Python loop of rematerialised blocks leaves the order of the
    # recomputed blocks to the scheduler; not yet checked on TPU).
    return causal_block_attention(
      q_BxTxNxGxK, k_BxSxNxK, v_BxSxNxK, mask_BxTxS, scale, CAUSAL_BLOCK
    )
  if chunk <= 0 or T <= chunk or T % chunk:
    return masked_softmax_attention(q_BxTxNxGxK, k_BxSxNxK, v_BxSxNxK, mask_BxTxS, scale)
  n = T // chunk
  qc = q_BxTxNxGxK.reshape(q_BxTxNxGxK.shape[0], n, chunk, *q_BxTxNxGxK.shape[2:]).swapaxes(0, 1)
  mc = mask_BxTxS.reshape(mask_BxTxS.shape[0], n, chunk, mask_BxTxS.shape[-1]).swapaxes(0, 1)
  # Each chunk is rematerialised in the backward pass: differentiating the map would otherwise keep
  # every chunk's [chunk, S] float32 probabilities at once, i.e. the whole [T, S] the chunking is
  # meant to avoid (2.2 GiB per layer at 5 x 4,096 tokens and 7 heads per device: the 7B update on
  # v5e-256 did not fit without this). Cost: the scores once more per chunk in the backward pass.
  # The chunks' scores carry no checkpoint name (an enclosing remat policy sees into this
  # checkpoint and would keep them all); the context, as a whole, does.
  one_chunk = jax.checkpoint(
    lambda a: masked_softmax_attention(a[0], k_BxSxNxK, v_BxSxNxK, a[1], scale, named=False)
  )
  out = checkpoint_name(jax.lax.map(one_chunk, (qc, mc)), "attn_context")
  return out.swapaxes(0, 1).reshape(q_BxTxNxGxK.shape[:2] + out.shape[3:])


# The values a remat policy chooses among, by `checkpoint_name` (set in the decoder and vision
# blocks, on what `dot` returns): the weight matmuls' outputs (before any bias), and attention's own
# two matmuls where attention runs as XLA ops (`masked_softmax_attention`: the float32 scores q·kᵀ
# and the context P·V; a fused kernel's insides carry no names).
WEIGHT_MATMULS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down")
ATTENTION_MATMULS = ("attn_scores", "attn_context")
REMAT_NAMES = WEIGHT_MATMULS + ATTENTION_MATMULS

# `model.remat_policy` -> the names its backward pass keeps (everything else in a layer is recomputed
# there from the layer's input); `none` (no `jax.checkpoint` at all) keeps every intermediate.
REMAT_SAVED: dict[str, tuple[str, ...]] = {
  "full": (),
  "dots": REMAT_NAMES,
  "dots_no_batch": WEIGHT_MATMULS,
}
_REMAT_POLICIES: dict[str, Callable] = {
  policy: jax.checkpoint_policies.save_only_these_names(*names)
  for policy, names in REMAT_SAVED.items()
}


def maybe_remat(fn: Callable, policy: str) -> Callable:
  """Wraps a scan body (one decoder layer or vision block) in `jax.checkpoint` with a named policy.

  none: no remat; the backward pass keeps every intermediate of every layer.
  full: keeps only each layer's input; the layer's forward runs again in the backward pass (all
    but its last matmul, mlp_down, whose output the layer's own backward never reads).
  dots_no_batch: also keeps the weight matmuls' outputs (`WEIGHT_MATMULS`: q/k/v/o projections,
    MLP gate/up/down); recomputed: norms, RoPE, elementwise ops and attention (the scores and P·V,
    or a fused kernel's forward).
  dots: `dots_no_batch` plus xla attention's scores and context (`ATTENTION_MATMULS`): no matmul
    runs again, except a fused kernel's forward (splash/cudnn: its insides carry no names) and each
    chunk's scores in query-chunked xla attention (each chunk is its own checkpoint). The scores are
    float32 [T, S] per head and layer (in the vision tower, under `lax.cond`, those of both the
    windowed and the full-attention branch): for short sequences.

  The policies go by name (`REMAT_SAVED`), not by primitive: `dot`'s custom VJP hides its dot from
  `jax.checkpoint_policies.dots_*`, under which bfloat16 `dots*` kept no more than `full` (until
  issue 23; float32 has no custom VJP and they worked there). `compile_check.remat_recompute_flops`
  counts what each policy recomputes.
  """
  if policy == "none":
    return fn
  if policy not in _REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {policy!r}; valid: none, {', '.join(_REMAT_POLICIES)}")
  return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy])


def scan_layers(body: Callable, carry, xs, length: int, use_scan: bool):
  """`lax.scan(body, carry, xs)` or the same thing unrolled in Python (debugging, tiny models)."""
  if use_scan:
    return jax.lax.scan(body, carry, xs, length=length)
  ys = []
  for i in range(length):
    carry, y = body(carry, jax.tree.map(lambda a: a[i], xs))
    ys.append(y)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys and ys[0] is not None else None
  return carry, stacked


def values(module: nnx.Module, names: Sequence[str]) -> dict[str, jnp.ndarray]:
  """The raw arrays of some `nnx.Param` attributes, as a dict (a scan-able pytree)."""
  return {n: getattr(module, n)[...] for n in names}


def np_dtype(dtype) -> np.dtype:
  return np.dtype(jnp.dtype(dtype))
