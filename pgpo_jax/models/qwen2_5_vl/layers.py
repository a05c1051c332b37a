"""Building blocks shared by the vision tower and the decoder: parameters, RMSNorm, attention, remat.

Every parameter is an `nnx.Param` carrying `axes`, a tuple of logical axis names (one per dim);
`pgpo_jax.sharding` maps those names to mesh axes. Stacked (scanned) layers put `layers` /
`vision_layers` first.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INIT_STD = 0.02  # HF `initializer_range`


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str], dtype,
          init: str = "normal") -> nnx.Param:
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


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
  """HF RMSNorm: normalise in float32, cast back to the input dtype, then scale by `weight`."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


def masked_softmax_attention(q_BxTxNxGxK: jnp.ndarray, k_BxSxNxK: jnp.ndarray, v_BxSxNxK: jnp.ndarray,
                             mask_BxTxS: jnp.ndarray, scale: float) -> jnp.ndarray:
  """Grouped attention: N kv heads, G query heads per kv head. Softmax in float32.

  A query row with every key masked attends uniformly (no NaN); callers ignore such rows.
  Returns [B, T, N, G, K] in the dtype of `v`.
  """
  B, T, N, G, K = q_BxTxNxGxK.shape
  # Both products as plain [.., T, K] @ [.., K, S] / [.., T, S] @ [.., S, K] batched matmuls: XLA:CPU
  # runs a dot contracting the minor dim of both operands (q·kᵀ as written) about 2x slower.
  q_BxNxGTxK = q_BxTxNxGxK.transpose(0, 2, 3, 1, 4).reshape(B, N, G * T, K)
  scores = jnp.matmul(q_BxNxGTxK, k_BxSxNxK.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
  scores = scores.reshape(B, N, G, T, -1) * scale
  big_neg = jnp.finfo(jnp.float32).min
  scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, big_neg)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxNxK.dtype).reshape(B, N, G * T, -1)
  out = jnp.matmul(probs, v_BxSxNxK.transpose(0, 2, 1, 3))  # [B, N, G*T, K]
  return out.reshape(B, N, G, T, K).transpose(0, 3, 1, 2, 4)


def chunked_attention(q_BxTxNxGxK, k_BxSxNxK, v_BxSxNxK, mask_BxTxS, scale: float,
                      chunk: int) -> jnp.ndarray:
  """`masked_softmax_attention` over query chunks of `chunk` rows (bounds the score memory)."""
  T = q_BxTxNxGxK.shape[1]
  if chunk <= 0 or T <= chunk or T % chunk:
    return masked_softmax_attention(q_BxTxNxGxK, k_BxSxNxK, v_BxSxNxK, mask_BxTxS, scale)
  n = T // chunk
  qc = q_BxTxNxGxK.reshape(q_BxTxNxGxK.shape[0], n, chunk, *q_BxTxNxGxK.shape[2:]).swapaxes(0, 1)
  mc = mask_BxTxS.reshape(mask_BxTxS.shape[0], n, chunk, mask_BxTxS.shape[-1]).swapaxes(0, 1)
  out = jax.lax.map(lambda a: masked_softmax_attention(a[0], k_BxSxNxK, v_BxSxNxK, a[1], scale), (qc, mc))
  return out.swapaxes(0, 1).reshape(q_BxTxNxGxK.shape[:2] + out.shape[3:])


_REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(fn: Callable, policy: str) -> Callable:
  """Wraps a scan body in `jax.checkpoint` with a named policy ('none' disables remat)."""
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
