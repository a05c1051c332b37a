"""Token scoring: log-probs, entropy and visual dependency S_t (docs/method.md §2).

Layout of this file:
  1. Pure estimators on per-token log-probs (`k3`).
  2. Chunked vocabulary reductions from hidden states (`token_logprobs_chunked`,
     `full_kl_chunked`): logits exist only as [B, chunk, V] at a time, in float32.
  3. Two-view dependency estimators from hidden states (`DEPENDENCY_ESTIMATORS`): one
     chunked pass gives the image view's log-probs (the old log-probs), the blind view's
     log-probs, S_t and the policy entropy.
  4. The model-dependent two-view forward passes live in `sequences.score_rollout` (padded)
     and `packing.score_rollout` (padding-free rows); `image_view_scores` serves runs without
     PGPO (no blind view).

Alignment: hidden_BxTxD[:, t] is the state that PREDICTS targets_BxT[:, t]; callers shift.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------- 1. k3


def k3_from_log_ratio(d: Array) -> Array:
  """e^{-d} - 1 + d >= 0 elementwise, d any shape; relatively accurate for every |d|.

  The direct form cancels for small |d| (in float32 it is 0 or rounding noise of either sign for
  |d| below ~3e-4), so |d| < 0.1 uses the Taylor series. Within 1e-5 relative of the exact value
  of the float32 d (tests/rl/test_scoring_pure.py). Also the k3 of `losses` (approx_kl, the KL
  term), whose ρ - 1 - log ρ is this at d = -log ρ.
  """
  # Taylor: d²/2 (1 - d/3 + d²/12 - d³/60 + d⁴/360); truncation < 5e-9 relative at |d| < 0.1.
  series = 0.5 * d * d * (1.0 + d * (-1.0 / 3 + d * (1.0 / 12 + d * (-1.0 / 60 + d / 360))))
  direct = jnp.expm1(-d) + d
  return jnp.maximum(jnp.where(jnp.abs(d) < 0.1, series, direct), 0.0)


def k3(
  logp_image_BxT: Array,
  logp_blind_BxT: Array,
  mask_BxT: Array | None = None,
  clamp_log_ratio: float | None = None,
) -> Array:
  """Sampled-token estimator of KL(π_I‖π_∅): d = log π_I(x) - log π_∅(x), S = e^{-d} - 1 + d.

  Args:
    logp_image_BxT: [B, T] log-probs of the sampled tokens with the image.
    logp_blind_BxT: [B, T] log-probs of the same tokens, visual tokens masked out.
    mask_BxT: [B, T] valid tokens or None; masked positions get 0.
    clamp_log_ratio: clamp d to ±value against low-precision outliers
      (`pgpo.clamp_log_ratio`); None = no clamp.
  Returns:
    dependency_BxT: [B, T] float32, >= 0, no gradient.
  """
  d_BxT = jnp.asarray(logp_image_BxT, jnp.float32) - jnp.asarray(logp_blind_BxT, jnp.float32)
  if mask_BxT is not None:
    d_BxT = jnp.where(jnp.asarray(mask_BxT).astype(bool), d_BxT, 0.0)
  if clamp_log_ratio is not None:
    d_BxT = jnp.clip(d_BxT, -clamp_log_ratio, clamp_log_ratio)
  return jax.lax.stop_gradient(k3_from_log_ratio(d_BxT))


# ----------------------------------------------------------------------------- 2. chunked reductions


def _logits_f32(hidden_BxCxD: Array, lm_head_DxV: Array, temperature: float) -> Array:
  logits_BxCxV = jnp.einsum(
    "bcd,dv->bcv", hidden_BxCxD, lm_head_DxV, preferred_element_type=jnp.float32
  )
  return logits_BxCxV.astype(jnp.float32) / temperature


def _target_logp_and_entropy(logits_BxCxV: Array, targets_BxC: Array) -> tuple[Array, Array]:
  logz_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  probs_BxCxV = jnp.exp(logits_BxCxV - logz_BxC[..., None])
  entropy_BxC = logz_BxC - jnp.sum(probs_BxCxV * logits_BxCxV, axis=-1)
  return target_logit_BxC - logz_BxC, entropy_BxC


def _map_chunks(
  chunk_fn: Callable[..., tuple[Array, ...]], chunk_size: int, *seq_args: Array
) -> tuple[Array, ...]:
  """Applies chunk_fn to [:, c*k:(c+1)*k] slices of each [B, T, ...] arg; concatenates outputs.

  chunk_fn maps [B, C, ...] slices to a tuple of [B, C] arrays. Full chunks run in a
  `lax.scan` whose body is rematerialised (`jax.checkpoint`), so neither the forward
  nor the backward pass keeps more than one chunk's [B, C, V] logits alive; a ragged
  tail (T % chunk_size) runs once on its own. No input is padded or copied.
  """
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  seq_len = seq_args[0].shape[1]
  chunk_size = min(chunk_size, seq_len)
  num_full, tail = divmod(seq_len, chunk_size)
  body = jax.checkpoint(chunk_fn)
  outs: list[tuple[Array, ...]] = []
  if num_full:

    def step(_, index):
      start = index * chunk_size
      sliced = [jax.lax.dynamic_slice_in_dim(x, start, chunk_size, axis=1) for x in seq_args]
      return None, body(*sliced)

    _, stacked = jax.lax.scan(step, None, jnp.arange(num_full))
    # [N, B, C] -> [B, N*C]
    outs.append(tuple(jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1) for y in stacked))
  if tail:
    outs.append(body(*[x[:, num_full * chunk_size :] for x in seq_args]))
  return tuple(
    jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0] for parts in zip(*outs)
  )


def token_logprobs_chunked(
  hidden_BxTxD: Array,
  lm_head_DxV: Array,
  targets_BxT: Array,
  chunk_size: int = 256,
  *,
  temperature: float = 1.0,
  return_entropy: bool = False,
) -> Array | tuple[Array, Array]:
  """log softmax(h W / temperature)[target] per token, chunked over T, in float32.

  Differentiable w.r.t. hidden and lm_head (chunks are recomputed in the backward pass).

  Args:
    hidden_BxTxD: [B, T, D] final hidden states (position t predicts targets[:, t]).
    lm_head_DxV: [D, V] output projection (the transposed embedding if tied).
    targets_BxT: [B, T] int token ids.
    chunk_size: tokens per chunk; peak logits memory is B * chunk_size * V floats.
    temperature: sampling temperature the log-probs refer to.
    return_entropy: also return the policy entropy per token.
  Returns:
    logp_BxT [B, T] float32, or (logp_BxT, entropy_BxT).
  """

  def chunk_fn(hidden_BxCxD, targets_BxC):
    return _target_logp_and_entropy(
      _logits_f32(hidden_BxCxD, lm_head_DxV, temperature), targets_BxC
    )

  logp_BxT, entropy_BxT = _map_chunks(
    chunk_fn, chunk_size, hidden_BxTxD, targets_BxT.astype(jnp.int32)
  )
  return (logp_BxT, entropy_BxT) if return_entropy else logp_BxT


def _full_kl_chunk(logits_image_BxCxV: Array, logits_blind_BxCxV: Array) -> Array:
  logp_i = jax.nn.log_softmax(logits_image_BxCxV, axis=-1)
  logp_b = jax.nn.log_softmax(logits_blind_BxCxV, axis=-1)
  return jnp.maximum(jnp.sum(jnp.exp(logp_i) * (logp_i - logp_b), axis=-1), 0.0)


def full_kl_chunked(
  hidden_image_BxTxD: Array,
  hidden_blind_BxTxD: Array,
  lm_head_DxV: Array,
  chunk_size: int = 256,
  *,
  mask_BxT: Array | None = None,
  temperature: float = 1.0,
  return_entropy: bool = False,
) -> Array | tuple[Array, Array]:
  """Exact KL(π_I‖π_∅) = Σ_v π_I(v) (log π_I(v) - log π_∅(v)) per token, chunked over T.

  Args:
    hidden_image_BxTxD, hidden_blind_BxTxD: [B, T, D] hidden states of the two views.
    lm_head_DxV: [D, V].
    chunk_size: tokens per chunk; peak memory is 2 * B * chunk_size * V floats.
    mask_BxT: optional [B, T] valid tokens; masked positions get 0.
    temperature: as in `token_logprobs_chunked`.
    return_entropy: also return the entropy of π_I per token.
  Returns:
    kl_BxT [B, T] float32 (>= 0), or (kl_BxT, entropy_image_BxT).
  """

  def chunk_fn(h_image_BxCxD, h_blind_BxCxD):
    logits_i = _logits_f32(h_image_BxCxD, lm_head_DxV, temperature)
    logits_b = _logits_f32(h_blind_BxCxD, lm_head_DxV, temperature)
    logp_i = jax.nn.log_softmax(logits_i, axis=-1)
    entropy_BxC = -jnp.sum(jnp.exp(logp_i) * logp_i, axis=-1)
    return _full_kl_chunk(logits_i, logits_b), entropy_BxC

  kl_BxT, entropy_BxT = _map_chunks(chunk_fn, chunk_size, hidden_image_BxTxD, hidden_blind_BxTxD)
  if mask_BxT is not None:
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    kl_BxT, entropy_BxT = jnp.where(mask_BxT, kl_BxT, 0.0), jnp.where(mask_BxT, entropy_BxT, 0.0)
  return (kl_BxT, entropy_BxT) if return_entropy else kl_BxT


# ----------------------------------------------------------------------------- 3. two-view estimators


class DependencyScores(NamedTuple):
  """One two-view scoring pass. All [B, T] float32, 0 at masked positions."""

  logp_image_BxT: Array  # log π_I(x_t): the old log-probs of the rollout
  logp_blind_BxT: Array  # log π_∅(x_t)
  dependency_BxT: Array  # S_t >= 0
  entropy_BxT: Array  # entropy of π_I, for logging (docs/method.md §6: entropy collapse)


def _two_view_chunk(lm_head_DxV, temperature, full_kl):
  def chunk_fn(h_image_BxCxD, h_blind_BxCxD, targets_BxC):
    logits_i = _logits_f32(h_image_BxCxD, lm_head_DxV, temperature)
    logits_b = _logits_f32(h_blind_BxCxD, lm_head_DxV, temperature)
    logp_i, entropy = _target_logp_and_entropy(logits_i, targets_BxC)
    logz_b = jax.nn.logsumexp(logits_b, axis=-1)
    logp_b = jnp.take_along_axis(logits_b, targets_BxC[..., None], axis=-1)[..., 0] - logz_b
    kl = _full_kl_chunk(logits_i, logits_b) if full_kl else jnp.zeros_like(logp_i)
    return logp_i, logp_b, entropy, kl

  return chunk_fn


def _two_view_scores(
  hidden_image_BxTxD,
  hidden_blind_BxTxD,
  lm_head_DxV,
  targets_BxT,
  mask_BxT,
  *,
  chunk_size,
  clamp_log_ratio,
  temperature,
  full_kl,
) -> DependencyScores:
  chunk_fn = _two_view_chunk(lm_head_DxV, temperature, full_kl)
  logp_i, logp_b, entropy, kl = _map_chunks(
    chunk_fn, chunk_size, hidden_image_BxTxD, hidden_blind_BxTxD, targets_BxT.astype(jnp.int32)
  )
  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  dependency = kl if full_kl else k3(logp_i, logp_b, mask_BxT, clamp_log_ratio)
  zero = lambda x: jax.lax.stop_gradient(jnp.where(mask_BxT, x, 0.0))  # noqa: E731
  return DependencyScores(zero(logp_i), zero(logp_b), zero(dependency), zero(entropy))


def k3_dependency(
  hidden_image_BxTxD: Array,
  hidden_blind_BxTxD: Array,
  lm_head_DxV: Array,
  targets_BxT: Array,
  mask_BxT: Array,
  *,
  chunk_size: int = 256,
  clamp_log_ratio: float | None = None,
  temperature: float = 1.0,
) -> DependencyScores:
  """S_t = k3 of the sampled token (paper default, `pgpo.dependency_estimator="k3"`).

  [B, T, D] hidden states of the two views, [D, V] head, [B, T] targets and mask
  -> DependencyScores of [B, T] arrays (no gradient).
  """
  return _two_view_scores(
    hidden_image_BxTxD,
    hidden_blind_BxTxD,
    lm_head_DxV,
    targets_BxT,
    mask_BxT,
    chunk_size=chunk_size,
    clamp_log_ratio=clamp_log_ratio,
    temperature=temperature,
    full_kl=False,
  )


def full_kl_dependency(
  hidden_image_BxTxD: Array,
  hidden_blind_BxTxD: Array,
  lm_head_DxV: Array,
  targets_BxT: Array,
  mask_BxT: Array,
  *,
  chunk_size: int = 256,
  clamp_log_ratio: float | None = None,
  temperature: float = 1.0,
) -> DependencyScores:
  """S_t = exact KL(π_I‖π_∅) over the vocabulary (`pgpo.dependency_estimator="full_kl"`).

  Same signature as `k3_dependency`; `clamp_log_ratio` does not apply and is ignored.
  """
  del clamp_log_ratio
  return _two_view_scores(
    hidden_image_BxTxD,
    hidden_blind_BxTxD,
    lm_head_DxV,
    targets_BxT,
    mask_BxT,
    chunk_size=chunk_size,
    clamp_log_ratio=None,
    temperature=temperature,
    full_kl=True,
  )


def image_view_scores(
  hidden_image_BxTxD: Array,
  lm_head_DxV: Array,
  targets_BxT: Array,
  mask_BxT: Array,
  *,
  chunk_size: int = 256,
  temperature: float = 1.0,
) -> DependencyScores:
  """The image view alone (GRPO/DAPO need only the old log-probs): blind log-probs = image ones, S = 0."""
  logp, entropy = token_logprobs_chunked(
    hidden_image_BxTxD,
    lm_head_DxV,
    targets_BxT,
    chunk_size,
    temperature=temperature,
    return_entropy=True,
  )
  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  logp = jax.lax.stop_gradient(jnp.where(mask_BxT, logp, 0.0))
  entropy = jax.lax.stop_gradient(jnp.where(mask_BxT, entropy, 0.0))
  return DependencyScores(logp, logp, jnp.zeros_like(logp), entropy)


DependencyEstimator = Callable[..., DependencyScores]

DEPENDENCY_ESTIMATORS: dict[str, DependencyEstimator] = {
  "k3": k3_dependency,
  "full_kl": full_kl_dependency,
}


def get_dependency_estimator(name: str) -> DependencyEstimator:
  """Looks up `pgpo.dependency_estimator` by name."""
  try:
    return DEPENDENCY_ESTIMATORS[name]
  except KeyError:
    raise ValueError(
      f"unknown dependency estimator {name!r}; valid: {sorted(DEPENDENCY_ESTIMATORS)}"
    ) from None
