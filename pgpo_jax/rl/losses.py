"""Clipped policy-gradient loss with verl-compatible aggregation (docs/method.md §4).

The default is the paper's DAPO recipe: asymmetric clip (ε_low = 0.2, ε_high = 0.28),
"token-mean" over all valid tokens of the mini-batch, no KL-to-reference, no entropy term.

Aggregation modes mean what verl's `agg_loss` means (its current, global-batch-aware form):
  token-mean               Σ_{i,t} m ℓ / N_tok                     (N_tok = Σ m, DAPO)
  seq-mean-token-sum       Σ_i (Σ_t m ℓ) / N_seq
  seq-mean-token-mean      Σ_i (Σ_t m ℓ / L_i) / N_seq              (GRPO as written)
  seq-mean-token-sum-norm  Σ_i (Σ_t m ℓ) / N_seq / H                (Dr. GRPO, H = horizon)
N_seq counts sequences with at least one valid token; H = `loss_horizon` or the padded T.

Packed rows (several sequences back to back in one row, `rl.packing`): pass `seq_length_BxT`, each
token's sequence length L_i (its sequence's valid-token count), and every mode gives the numbers
of the same sequences one per row (L_i and N_seq come from it instead of from the rows).

Gradient accumulation: every mode is a sum over tokens/sequences divided by a batch-level
normaliser. Pass the FULL mini-batch's `token_normalizer` (N_tok) / `seq_normalizer`
(N_seq) to each micro-batch (see `loss_normalizers`) and the sum of micro-batch losses
(and gradients) equals the full mini-batch loss (and gradient) exactly.

Numerics follow verl: log-ratios are clamped to ±20 before exp; the k3 KL estimator
clamps its log-ratio to ±20 and its value to [-10, 10]. Every k3-type value (the KL term's k3,
the approx_kl metric) is computed from the log-ratio as a difference of log-probs by
`scoring.k3_from_log_ratio`, which does not cancel for small log-ratios as r - log r - 1 does in
float32 (exactly 0, or ±3e-8 of noise, for |log r| up to ~3e-4). Masked positions are sanitised
before any arithmetic, so padding may hold garbage (inf/NaN) without poisoning gradients.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pgpo_jax.rl.scoring import k3_from_log_ratio

Array = jax.Array

_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------- aggregation


def loss_normalizers(mask_BxT: Array) -> dict[str, Array]:
  """Normalisers of a full mini-batch, to hand to each of its micro-batches.

  Returns: {"token_normalizer": Σ m (valid tokens), "seq_normalizer": #sequences with
  a valid token}, float32 scalars.
  """
  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  return {
    "token_normalizer": mask_BxT.sum().astype(jnp.float32),
    "seq_normalizer": mask_BxT.any(axis=-1).sum().astype(jnp.float32),
  }


def _seq_count(
  mask_BxT: Array, seq_normalizer: Array | None, seq_length_BxT: Array | None = None
) -> Array:
  if seq_normalizer is None:
    if seq_length_BxT is None:
      seq_normalizer = mask_BxT.any(axis=-1).sum()
    else:  # the L_i tokens of sequence i count 1/L_i each
      seq_normalizer = jnp.sum(jnp.where(mask_BxT, 1.0 / jnp.maximum(seq_length_BxT, 1.0), 0.0))
  return jnp.maximum(jnp.asarray(seq_normalizer, jnp.float32), 1.0)


def _token_mean(loss_BxT, mask_BxT, token_normalizer, seq_normalizer, loss_horizon, seq_length_BxT):
  del seq_normalizer, loss_horizon, seq_length_BxT
  if token_normalizer is None:
    token_normalizer = mask_BxT.sum()
  return jnp.sum(loss_BxT) / jnp.maximum(jnp.asarray(token_normalizer, jnp.float32), 1.0)


def _seq_mean_token_sum(
  loss_BxT, mask_BxT, token_normalizer, seq_normalizer, loss_horizon, seq_length_BxT
):
  del token_normalizer, loss_horizon
  return jnp.sum(loss_BxT) / _seq_count(mask_BxT, seq_normalizer, seq_length_BxT)


def _seq_mean_token_mean(
  loss_BxT, mask_BxT, token_normalizer, seq_normalizer, loss_horizon, seq_length_BxT
):
  del token_normalizer, loss_horizon
  count = _seq_count(mask_BxT, seq_normalizer, seq_length_BxT)
  if seq_length_BxT is not None:
    return jnp.sum(loss_BxT / jnp.maximum(seq_length_BxT, 1.0)) / count
  length_B = jnp.maximum(mask_BxT.sum(axis=-1), 1).astype(jnp.float32)
  return jnp.sum(loss_BxT.sum(axis=-1) / length_B) / count


def _seq_mean_token_sum_norm(
  loss_BxT, mask_BxT, token_normalizer, seq_normalizer, loss_horizon, seq_length_BxT
):
  del token_normalizer
  if loss_horizon is None and seq_length_BxT is not None:
    raise ValueError(
      "seq-mean-token-sum-norm on packed rows needs loss_horizon (the padded response length)"
    )
  horizon = mask_BxT.shape[-1] if loss_horizon is None else loss_horizon
  return jnp.sum(loss_BxT) / _seq_count(mask_BxT, seq_normalizer, seq_length_BxT) / horizon


Aggregation = Callable[
  [Array, Array, "Array | None", "Array | None", "float | None", "Array | None"], Array
]

LOSS_AGGREGATIONS: dict[str, Aggregation] = {
  "token-mean": _token_mean,
  "seq-mean-token-sum": _seq_mean_token_sum,
  "seq-mean-token-mean": _seq_mean_token_mean,
  "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(
  loss_BxT: Array,
  mask_BxT: Array,
  mode: str = "token-mean",
  *,
  token_normalizer: Array | float | None = None,
  seq_normalizer: Array | float | None = None,
  loss_horizon: float | None = None,
  seq_length_BxT: Array | None = None,
) -> Array:
  """Reduces a per-token loss [B, T] to a scalar with a verl `agg_loss` mode.

  Args:
    loss_BxT: [B, T] per-token loss (masked positions are ignored, may be garbage).
    mask_BxT: [B, T] valid tokens.
    mode: a key of LOSS_AGGREGATIONS.
    token_normalizer: global N_tok for "token-mean" (default: this batch's Σ m).
    seq_normalizer: global N_seq for the seq-* modes (default: this batch's count).
    loss_horizon: H for "seq-mean-token-sum-norm" (default: padded length T; required with
      `seq_length_BxT`).
    seq_length_BxT: [B, T] packed rows only: the valid-token count L_i of each token's sequence.
  Returns: scalar float32.
  """
  if mode not in LOSS_AGGREGATIONS:
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {sorted(LOSS_AGGREGATIONS)}")
  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  loss_BxT = jnp.where(mask_BxT, loss_BxT, 0.0)
  if seq_length_BxT is not None:
    seq_length_BxT = jnp.asarray(seq_length_BxT, jnp.float32)
  return LOSS_AGGREGATIONS[mode](
    loss_BxT, mask_BxT, token_normalizer, seq_normalizer, loss_horizon, seq_length_BxT
  )


# ----------------------------------------------------------------------------- KL estimators


def _kl_k1(logp_BxT: Array, ref_logp_BxT: Array) -> Array:
  return logp_BxT - ref_logp_BxT


def _kl_k2(logp_BxT: Array, ref_logp_BxT: Array) -> Array:
  return 0.5 * jnp.square(logp_BxT - ref_logp_BxT)


def _kl_k3(logp_BxT: Array, ref_logp_BxT: Array) -> Array:
  # Schulman's low-variance estimator of KL(π_θ‖π_ref) from x ~ π_θ: r - log r - 1,
  # r = π_ref/π_θ; clamps as verl's "low_var_kl". r - log r - 1 = k3_from_log_ratio(-log r), with
  # the same gradient 1 - r in log π_θ (0 where a clamp is active).
  log_r = jnp.clip(ref_logp_BxT - logp_BxT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  return jnp.clip(k3_from_log_ratio(-log_r), -10.0, 10.0)


KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {
  "k1": _kl_k1,
  "k2": _kl_k2,
  "k3": _kl_k3,
}


def kl_penalty(logp_BxT: Array, ref_logp_BxT: Array, estimator: str = "k3") -> Array:
  """Per-token estimate of KL(π_θ‖π_ref) at sampled tokens -> [B, T] (k1 | k2 | k3)."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown kl_estimator {estimator!r}; valid: {sorted(KL_ESTIMATORS)}")
  return KL_ESTIMATORS[estimator](logp_BxT, ref_logp_BxT)


# ----------------------------------------------------------------------------- policy loss


def _masked_mean(x_BxT: Array, mask_BxT: Array) -> Array:
  return jnp.sum(jnp.where(mask_BxT, x_BxT, 0.0)) / jnp.maximum(mask_BxT.sum(), 1)


def policy_loss(
  logp_BxT: Array,
  old_logp_BxT: Array,
  adv_BxT: Array,
  mask_BxT: Array,
  clip_low: float = 0.2,
  clip_high: float = 0.28,
  agg: str = "token-mean",
  *,
  dual_clip: float | None = None,
  ref_logp_BxT: Array | None = None,
  kl_coef: float = 0.0,
  kl_estimator: str = "k3",
  entropy_BxT: Array | None = None,
  entropy_coef: float = 0.0,
  loss_horizon: float | None = None,
  token_normalizer: Array | float | None = None,
  seq_normalizer: Array | float | None = None,
  seq_length_BxT: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """PPO/DAPO clipped surrogate, L = agg(-min(ρÃ, clip(ρ, 1-ε_low, 1+ε_high)Ã)) (+ options).

  Args:
    logp_BxT: [B, T] log π_θ of the sampled tokens (differentiated).
    old_logp_BxT: [B, T] log π_old (constant).
    adv_BxT: [B, T] token advantages Ã (constant).
    mask_BxT: [B, T] valid response tokens.
    clip_low, clip_high: ε_low, ε_high.
    agg: aggregation mode, a key of LOSS_AGGREGATIONS (applies to every term).
    dual_clip: c > 1 enables dual-clip for Ã < 0: the per-token loss is capped at -c·Ã
      (verl's `clip_ratio_c`). None (default) disables it.
    ref_logp_BxT, kl_coef, kl_estimator: optional KL(π_θ‖π_ref) penalty,
      + kl_coef · agg(kl); off unless ref_logp_BxT is given.
    entropy_BxT, entropy_coef: optional entropy bonus, - entropy_coef · agg(H).
    loss_horizon: H for "seq-mean-token-sum-norm".
    token_normalizer, seq_normalizer: full mini-batch normalisers for gradient
      accumulation (see `loss_normalizers`); default: this batch's own.
    seq_length_BxT: packed rows (several sequences a row): each token's sequence length,
      see `aggregate`.
  Returns:
    loss: scalar.
    metrics: float32 scalars (no gradient), averaged over this batch's valid tokens:
      loss, pg_loss; clip_frac (clipped term selected, i.e. zero gradient),
      clip_frac_high (Ã>0, ρ>1+ε_high), clip_frac_low (Ã<0, ρ<1-ε_low), dual_clip_frac;
      ratio_mean/max/min; ppo_kl = mean(log π_old - log π_θ) (verl's k1);
      approx_kl = mean(ρ - 1 - log ρ) (k3 of KL(π_old‖π_θ), >= 0, unbiased since
      tokens are sampled from π_old; computed from log ρ without cancellation, see
      `scoring.k3_from_log_ratio`); kl_loss / entropy when those terms are given.
  """
  if dual_clip is not None and isinstance(dual_clip, (int, float)) and dual_clip <= 1.0:
    raise ValueError(f"policy_loss: dual_clip must be > 1 (verl's clip_ratio_c), got {dual_clip}")
  if ref_logp_BxT is None and isinstance(kl_coef, (int, float)) and kl_coef != 0.0:
    raise ValueError("policy_loss: kl_coef != 0 needs ref_logp_BxT")
  if entropy_BxT is None and isinstance(entropy_coef, (int, float)) and entropy_coef != 0.0:
    raise ValueError("policy_loss: entropy_coef != 0 needs entropy_BxT")
  if agg not in LOSS_AGGREGATIONS:
    raise ValueError(f"unknown loss aggregation {agg!r}; valid: {sorted(LOSS_AGGREGATIONS)}")

  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  # Sanitise padding first (a NaN there would leak into the gradient through `where`).
  logp_BxT = jnp.where(mask_BxT, logp_BxT, 0.0)
  old_logp_BxT = jax.lax.stop_gradient(jnp.where(mask_BxT, old_logp_BxT, 0.0))
  adv_BxT = jax.lax.stop_gradient(jnp.where(mask_BxT, adv_BxT, 0.0))
  agg_kw = dict(
    token_normalizer=token_normalizer,
    seq_normalizer=seq_normalizer,
    loss_horizon=loss_horizon,
    seq_length_BxT=seq_length_BxT,
  )

  log_ratio_BxT = jnp.clip(logp_BxT - old_logp_BxT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  unclipped_BxT = -adv_BxT * ratio_BxT
  clipped_BxT = -adv_BxT * jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
  is_clipped_BxT = clipped_BxT > unclipped_BxT  # the constant branch is selected
  pg_BxT = jnp.where(is_clipped_BxT, clipped_BxT, unclipped_BxT)
  if dual_clip is not None:
    dual_BxT = -adv_BxT * dual_clip
    is_dual_BxT = (adv_BxT < 0) & (pg_BxT > dual_BxT)
    pg_BxT = jnp.where(is_dual_BxT, dual_BxT, pg_BxT)
  pg_loss = aggregate(pg_BxT, mask_BxT, agg, **agg_kw)
  loss = pg_loss

  sg = jax.lax.stop_gradient
  metrics = {
    "pg_loss": sg(pg_loss),
    "clip_frac": _masked_mean(is_clipped_BxT, mask_BxT),
    "clip_frac_high": _masked_mean(is_clipped_BxT & (adv_BxT > 0), mask_BxT),
    "clip_frac_low": _masked_mean(is_clipped_BxT & (adv_BxT < 0), mask_BxT),
    "ratio_mean": sg(_masked_mean(ratio_BxT, mask_BxT)),
    "ratio_max": sg(jnp.max(jnp.where(mask_BxT, ratio_BxT, 1.0))),
    "ratio_min": sg(jnp.min(jnp.where(mask_BxT, ratio_BxT, 1.0))),
    "ppo_kl": sg(_masked_mean(-log_ratio_BxT, mask_BxT)),
    "approx_kl": sg(_masked_mean(k3_from_log_ratio(-log_ratio_BxT), mask_BxT)),
  }
  if dual_clip is not None:
    metrics["dual_clip_frac"] = _masked_mean(is_dual_BxT, mask_BxT)
  if ref_logp_BxT is not None:
    ref_logp_BxT = jax.lax.stop_gradient(jnp.where(mask_BxT, ref_logp_BxT, 0.0))
    kl_loss = aggregate(kl_penalty(logp_BxT, ref_logp_BxT, kl_estimator), mask_BxT, agg, **agg_kw)
    loss = loss + kl_coef * kl_loss
    metrics["kl_loss"] = sg(kl_loss)
  if entropy_BxT is not None:
    entropy_BxT = jnp.where(mask_BxT, entropy_BxT, 0.0)
    entropy_loss = aggregate(entropy_BxT, mask_BxT, agg, **agg_kw)
    loss = loss - entropy_coef * entropy_loss
    metrics["entropy"] = sg(_masked_mean(entropy_BxT, mask_BxT))
  metrics["loss"] = sg(loss)
  return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
