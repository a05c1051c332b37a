"""Group advantages (GRPO) and PGPO perception-grounded token weights (docs/method.md §1, §3).

Layout: responses are group-major, rows [g*G:(g+1)*G] are the G responses of prompt g.
All functions are pure `jnp`, jit-friendly, and take boolean or 0/1 float masks.

Choices where the paper is open (docs/method.md §9; all defaults reproduce the paper exactly, except that a
response whose S is constant up to 1% counts as constant: see `degenerate_rtol`):
- Zero-std group (all rewards equal, by exact max == min): advantages are exactly 0
  (the formula gives 0 up to float noise divided by eps = 1e-6; we remove the noise).
- `min_weight` / `max_weight` bound the FINAL weights ω̃, and renormalisation is
  solved jointly with the bounds: ω̃_t = clip(λ_i ω_t, min_weight, max_weight) with λ_i
  chosen so that Σ_t ω̃_t = L_i (a monotone 1-D root, found by bisection in log λ then
  an exact closed-form step). So a cap is a hard cap AND mass is conserved, as long as
  that is feasible; if not (e.g. a cap c with fewer than L_i / c tokens of non-zero ω),
  the bounds win and the response carries less than L_i mass. Without bounds this is
  exactly ω·L/Σω. With renormalize=False the bounds clip ω directly.
- "Constant S" in the degenerate fallback is judged with a relative tolerance: a response is
  degenerate when max S̃ − min S̃ ≤ `degenerate_rtol` · max S̃ (default 1e-2; 0 is the paper's exact
  rule, range = 0). Min-max normalisation maps any range onto [0, 1], so without a tolerance a
  spread that is only rounding noise takes all the credit: with S = 1e-3 on 2,047 tokens and
  1e-3 + 1e-6 on one, that one token would get weight 2,048 and the rest 0. 1e-2 is about three
  bfloat16 roundings (2^-8 each): a spread below 1% of the response's own dependency is not a
  signal a bfloat16 scoring pass resolves. The tolerance is relative because the scale of S varies
  by orders of magnitude (~1e-6 to ~10 nats across tokens and checkpoints); it does not catch a
  response whose every S is absolutely tiny but relatively spread (that spread is kept, as in the
  paper). Config key `pgpo.degenerate_rtol`.
  `pgpo_diagnostics` reports the share of responses that fell back (`degenerate_frac`).
- The degenerate fallback (uniform ω̃ = 1 for L_i ≤ 1, (near-)constant S or Σω = 0) also applies
  with renormalize=False: otherwise a constant-S response would get zero advantage.
- Dependencies are clamped to [0, float32 max] before log(1 + S) (S ≥ 0 in exact
  arithmetic; k3 can round to -1e-9 or overflow to +inf); masked positions are sanitised
  before any arithmetic, so padding may hold garbage.
- ω is evaluated with I clipped to [0, 1] and the gate denominators as max(τ, 0) + ε and
  max(1 - τ, 0) + ε (same values; keeps XLA from reassociating 1 - τ + ε to 0 at τ = 1).
- `min_weight`, `max_weight`, `renormalize`, `threshold_mode` are static Python values;
  `tau` and `beta` may be traced.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array

THRESHOLD_MODES = ("absolute", "quantile")
DEGENERATE_RTOL = 1e-2  # see the module docstring
_BISECTION_STEPS = 64


# ----------------------------------------------------------------------------- GRPO


def grpo(rewards_B: Array, group_size: int, eps: float = 1e-6) -> Array:
  """GRPO group-normalised advantages A_i = (R_i - mean_g R) / (std_g R + eps).

  Args:
    rewards_B: [B] scalar rewards, group-major (B = num_prompts * group_size).
    group_size: G, responses per prompt (>= 2: the sample std needs two samples).
    eps: guards a zero std.
  Returns:
    adv_B: [B] float32. std is the Bessel-corrected sample std (as verl/EasyR1/TRL);
    a group whose rewards are all equal gets exactly 0.
  """
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  if rewards_B.ndim != 1:
    raise ValueError(f"grpo: rewards must be [B], got shape {rewards_B.shape}")
  if group_size < 2:
    raise ValueError(f"grpo: group_size must be >= 2 for a sample std, got {group_size}")
  if rewards_B.shape[0] % group_size:
    raise ValueError(
      f"grpo: batch of {rewards_B.shape[0]} rewards is not a multiple of group_size={group_size}"
    )
  r_NxG = rewards_B.reshape(-1, group_size)
  mean_Nx1 = r_NxG.mean(axis=1, keepdims=True)
  std_Nx1 = jnp.std(r_NxG, axis=1, ddof=1, keepdims=True)
  adv_NxG = (r_NxG - mean_Nx1) / (std_Nx1 + eps)
  constant_Nx1 = r_NxG.max(axis=1, keepdims=True) == r_NxG.min(axis=1, keepdims=True)
  return jnp.where(constant_Nx1, 0.0, adv_NxG).reshape(-1)


# ----------------------------------------------------------------------------- PGPO weights


def _check_static_range(name: str, value: Any, lo: float, hi: float) -> None:
  """Validates a Python-number hyper-parameter (traced values are not checked)."""
  if isinstance(value, (int, float)) and not lo <= value <= hi:
    raise ValueError(f"pgpo: {name}={value} must lie in [{lo}, {hi}]")


def _masked_quantile(x_BxT: Array, mask_BxT: Array, q: float | Array) -> Array:
  """Per-row q-quantile of x over masked-in entries (numpy 'linear' method) -> [B, 1].

  Rows without valid entries get 0.
  """
  sorted_BxT = jnp.sort(jnp.where(mask_BxT, x_BxT, jnp.inf), axis=-1)
  n_B = mask_BxT.sum(axis=-1)
  pos_B = jnp.asarray(q, jnp.float32) * jnp.maximum(n_B - 1, 0).astype(jnp.float32)
  lo_B = jnp.floor(pos_B).astype(jnp.int32)
  hi_B = jnp.minimum(lo_B + 1, jnp.maximum(n_B - 1, 0))
  v_lo = jnp.take_along_axis(sorted_BxT, lo_B[:, None], axis=-1)
  v_hi = jnp.take_along_axis(sorted_BxT, hi_B[:, None], axis=-1)
  frac_Bx1 = (pos_B - lo_B)[:, None]
  value_Bx1 = v_lo + frac_Bx1 * (v_hi - v_lo)
  return jnp.where(n_B[:, None] > 0, value_Bx1, 0.0)


def _gate(importance_BxT: Array, tau: Array, beta: float, eps: float) -> Array:
  """docs/method.md §3 step 3: suppression branch below τ (0 -> ≈1), boost branch above (1 -> ≈1+β)."""
  # max(·, 0) pins the evaluation order: XLA otherwise reassociates (1 - τ) + ε into
  # 1 + (ε - τ), which is exactly 0 in float32 at τ = 1 (then 0/0 = NaN).
  suppress = importance_BxT / (jnp.maximum(tau, 0.0) + eps)
  boost = 1.0 + beta * (importance_BxT - tau) / (jnp.maximum(1.0 - tau, 0.0) + eps)
  return jnp.where(importance_BxT < tau, suppress, boost)


def _bounded_renormalise(
  omega_BxT: Array, mask_BxT: Array, length_Bx1: Array, lo: float, hi: float | None
) -> Array:
  """ω̃ = clip(λ ω, lo, hi) per row with λ solving Σ_t ω̃_t = L (when feasible).

  g(λ) = Σ clip(λ ω, lo, hi) is non-decreasing in λ, so bisect in log λ on a bracket
  that provably contains the root, then take one exact step on the resulting active set.
  Requires 0 <= lo <= 1 <= hi. Rows with Σω = 0 are handled by the caller.
  """
  hi_val = jnp.inf if hi is None else float(hi)
  total_Bx1 = jnp.sum(omega_BxT, axis=-1, keepdims=True)
  lam0_Bx1 = length_Bx1 / jnp.maximum(total_Bx1, 1e-30)  # the unbounded answer
  # g(λ) <= λΣω + L·lo <= L for λ <= λ0(1 - lo): a lower end of the bracket.
  lam_lo_Bx1 = lam0_Bx1 * max(1.0 - lo, 1e-12)
  if hi is None:
    lam_hi_Bx1 = lam0_Bx1  # g(λ0) >= λ0 Σω = L with only a floor.
  else:
    # At λ = hi / min positive ω every non-zero token sits at the cap: g is maximal.
    pos_min_Bx1 = jnp.min(
      jnp.where(mask_BxT & (omega_BxT > 0), omega_BxT, jnp.inf), -1, keepdims=True
    )
    lam_hi_Bx1 = jnp.maximum(lam0_Bx1, hi_val / jnp.minimum(pos_min_Bx1, 1e30))

  def mass(lam_Bx1):
    w_BxT = jnp.clip(lam_Bx1 * omega_BxT, lo, hi_val)
    return jnp.sum(jnp.where(mask_BxT, w_BxT, 0.0), axis=-1, keepdims=True)

  def bisect(_, bracket):
    log_lo, log_hi = bracket
    mid = 0.5 * (log_lo + log_hi)
    below = mass(jnp.exp(mid)) < length_Bx1
    return jnp.where(below, mid, log_lo), jnp.where(below, log_hi, mid)

  log_lo, log_hi = jax.lax.fori_loop(
    0, _BISECTION_STEPS, bisect, (jnp.log(lam_lo_Bx1), jnp.log(lam_hi_Bx1))
  )
  lam_Bx1 = jnp.exp(log_hi)
  # Exact step: with the active set fixed, the free tokens solve a linear equation.
  w_BxT = lam_Bx1 * omega_BxT
  at_lo = mask_BxT & (w_BxT <= lo)
  at_hi = mask_BxT & (w_BxT >= hi_val)
  free = mask_BxT & ~at_lo & ~at_hi
  fixed_Bx1 = lo * at_lo.sum(-1, keepdims=True) + jnp.where(at_hi, hi_val, 0.0).sum(
    -1, keepdims=True
  )
  free_sum_Bx1 = jnp.sum(jnp.where(free, omega_BxT, 0.0), axis=-1, keepdims=True)
  lam_exact_Bx1 = jnp.maximum(length_Bx1 - fixed_Bx1, 0.0) / jnp.maximum(free_sum_Bx1, 1e-30)
  lam_Bx1 = jnp.where(free_sum_Bx1 > 0, lam_exact_Bx1, lam_Bx1)
  return jnp.clip(lam_Bx1 * omega_BxT, lo, hi_val)


def pgpo_token_weights(
  dependency_BxT: Array,
  mask_BxT: Array,
  tau: float = 0.4,
  beta: float = 2.0,
  *,
  renormalize: bool = True,
  threshold_mode: str = "absolute",
  min_weight: float = 0.0,
  max_weight: float | None = None,
  eps: float = 1e-8,
  degenerate_rtol: float = DEGENERATE_RTOL,
) -> Array:
  """PGPO token weights ω̃ from visual dependency S (docs/method.md §3), per response.

  1. S̃ = log(1 + S);  2. I = (S̃ - min S̃) / (max S̃ - min S̃ + eps) over valid tokens;
  3. ω = I/(τ+eps) if I < τ else 1 + β (I - τ)/(1 - τ + eps);
  4. ω̃ = ω · L / Σω  (Σ_t ω̃ = L, the number of valid tokens).
  Degenerate responses (L <= 1, near-constant S: max S̃ - min S̃ <= degenerate_rtol · max S̃,
  Σω = 0) get ω̃ = 1; masked tokens get 0.

  Args:
    dependency_BxT: [B, T] visual dependency S >= 0 (k3 or full KL).
    mask_BxT: [B, T] valid response tokens (bool or 0/1).
    tau: threshold τ in [0, 1] ("absolute"), or the quantile level q in [0, 1]
      ("quantile": τ_i is the per-response q-quantile of I over valid tokens).
    beta: boost strength β >= 0.
    renormalize: step 4 (ablation switch `pgpo.renormalize`).
    threshold_mode: "absolute" | "quantile".
    min_weight: floor on ω̃ (0 <= min_weight <= 1), see module docstring.
    max_weight: cap on ω̃ (>= 1) or None, see module docstring.
    eps: ε of the min-max normalisation and the gate.
    degenerate_rtol: relative tolerance of "constant S", in [0, 1) (module docstring).
  Returns:
    weights_BxT: [B, T] float32, constants (wrapped in stop_gradient).
  """
  return _token_weights(
    dependency_BxT,
    mask_BxT,
    tau,
    beta,
    renormalize=renormalize,
    threshold_mode=threshold_mode,
    min_weight=min_weight,
    max_weight=max_weight,
    eps=eps,
    degenerate_rtol=degenerate_rtol,
  )[0]


def _token_weights(
  dependency_BxT: Array,
  mask_BxT: Array,
  tau: float = 0.4,
  beta: float = 2.0,
  *,
  renormalize: bool = True,
  threshold_mode: str = "absolute",
  min_weight: float = 0.0,
  max_weight: float | None = None,
  eps: float = 1e-8,
  degenerate_rtol: float = DEGENERATE_RTOL,
) -> tuple[Array, Array]:
  """`pgpo_token_weights` and the [B] bool mask of responses that got the uniform fallback."""
  if threshold_mode not in THRESHOLD_MODES:
    raise ValueError(f"pgpo: threshold_mode={threshold_mode!r}; valid: {THRESHOLD_MODES}")
  _check_static_range("tau", tau, 0.0, 1.0)
  _check_static_range("beta", beta, 0.0, float("inf"))
  _check_static_range("min_weight", min_weight, 0.0, 1.0)
  _check_static_range("degenerate_rtol", degenerate_rtol, 0.0, 1.0 - 1e-12)
  if max_weight is not None:
    _check_static_range("max_weight", max_weight, 1.0, float("inf"))
  if dependency_BxT.shape != mask_BxT.shape or dependency_BxT.ndim != 2:
    raise ValueError(
      f"pgpo: dependency {dependency_BxT.shape} and mask {mask_BxT.shape} must be equal [B, T] shapes"
    )

  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  dep_BxT = jnp.where(mask_BxT, jnp.asarray(dependency_BxT, jnp.float32), 0.0)
  dep_BxT = jax.lax.stop_gradient(dep_BxT)
  length_Bx1 = mask_BxT.sum(axis=-1, keepdims=True).astype(jnp.float32)

  # +inf (k3 overflows for d < -88 in float32) becomes the largest float: a finite, maximal
  # S̃ = 88.7. NaN is kept on purpose: it reaches the loss and the step is skipped.
  compressed_BxT = jnp.log1p(jnp.clip(dep_BxT, 0.0, jnp.finfo(jnp.float32).max))
  s_min_Bx1 = jnp.min(jnp.where(mask_BxT, compressed_BxT, jnp.inf), axis=-1, keepdims=True)
  s_max_Bx1 = jnp.max(jnp.where(mask_BxT, compressed_BxT, -jnp.inf), axis=-1, keepdims=True)
  s_range_Bx1 = jnp.where(length_Bx1 > 0, s_max_Bx1 - s_min_Bx1, 0.0)
  importance_BxT = (compressed_BxT - jnp.where(length_Bx1 > 0, s_min_Bx1, 0.0)) / (
    s_range_Bx1 + eps
  )
  # I lies in [0, 1) exactly; clip float rounding (x/(x+ε) can round above 1 when the
  # division is lowered to a reciprocal), which the 1/(1-τ+ε) factor would amplify at τ≈1.
  importance_BxT = jnp.where(mask_BxT, jnp.clip(importance_BxT, 0.0, 1.0), 0.0)

  if threshold_mode == "quantile":
    tau_arr = _masked_quantile(importance_BxT, mask_BxT, tau)
  else:
    tau_arr = jnp.asarray(tau, jnp.float32)
  omega_BxT = jnp.where(mask_BxT, _gate(importance_BxT, tau_arr, beta, eps), 0.0)

  total_Bx1 = jnp.sum(omega_BxT, axis=-1, keepdims=True)
  flat_Bx1 = s_range_Bx1 <= degenerate_rtol * jnp.where(length_Bx1 > 0, s_max_Bx1, 0.0)
  degenerate_Bx1 = (length_Bx1 <= 1) | flat_Bx1 | (total_Bx1 <= 0)
  bounded = min_weight > 0 or max_weight is not None
  hi = float("inf") if max_weight is None else max_weight
  if renormalize and bounded:
    weights_BxT = _bounded_renormalise(omega_BxT, mask_BxT, length_Bx1, min_weight, max_weight)
  elif renormalize:
    weights_BxT = omega_BxT * (length_Bx1 / jnp.where(degenerate_Bx1, 1.0, total_Bx1))
  else:
    weights_BxT = jnp.clip(omega_BxT, min_weight, hi) if bounded else omega_BxT
  weights_BxT = jnp.where(degenerate_Bx1, 1.0, weights_BxT)
  fallback_B = degenerate_Bx1[:, 0] & (length_Bx1[:, 0] > 0)
  return jax.lax.stop_gradient(jnp.where(mask_BxT, weights_BxT, 0.0)), fallback_B


def pgpo_diagnostics(
  weights_BxT: Array, mask_BxT: Array, tol: float = 1e-6, fallback_B: Array | None = None
) -> dict[str, Array]:
  """Scalar summaries of the token weights ω̃ for logging (over valid tokens).

  Args:
    weights_BxT: [B, T] token weights ω̃.
    mask_BxT: [B, T] valid response tokens.
    tol: |ω̃ - 1| <= tol counts as neutral (renormalisation leaves ~1e-7 noise).
    fallback_B: [B] bool, responses that got the degenerate fallback (None: no fallback ran).
  Returns: dict of float32 scalars:
    degenerate_frac: share of responses with a valid token that got the uniform fallback
      (L = 1, near-constant S or Σω = 0); 0 without `fallback_B` (GRPO);
    frac_boosted / frac_suppressed: fraction of valid tokens with ω̃ > 1 / ω̃ < 1;
    frac_zero: ω̃ <= tol (tokens whose gradient is switched off);
    max_weight / min_weight / mean_weight / std_weight over valid tokens;
    norm_entropy: mean over responses with L >= 2 of H(ω̃/Σω̃) / log L, in [0, 1]
      (1 = uniform, i.e. plain GRPO; low = credit concentrated on few tokens);
    mean_sq_weight: mean over responses of Σ_t ω̃_t² / L: the factor by which the weights scale a
      response's squared gradient contribution when token gradients are alike (1 for uniform weights;
      mass conservation fixes Σω̃, not Σω̃²).
  """
  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  w_BxT = jnp.where(mask_BxT, jnp.asarray(weights_BxT, jnp.float32), 0.0)
  n = jnp.maximum(mask_BxT.sum(), 1).astype(jnp.float32)
  any_valid = mask_BxT.any()

  def frac(cond_BxT):
    return jnp.sum(mask_BxT & cond_BxT) / n

  mean = jnp.sum(w_BxT) / n
  var = jnp.sum(jnp.where(mask_BxT, (w_BxT - mean) ** 2, 0.0)) / n
  length_B = mask_BxT.sum(-1).astype(jnp.float32)
  p_BxT = w_BxT / jnp.maximum(jnp.sum(w_BxT, -1, keepdims=True), 1e-30)
  plogp_BxT = jnp.where(p_BxT > 0, p_BxT * jnp.log(jnp.where(p_BxT > 0, p_BxT, 1.0)), 0.0)
  multi_B = length_B >= 2
  h_B = -plogp_BxT.sum(-1) / jnp.log(jnp.where(multi_B, length_B, 2.0))
  norm_entropy = jnp.where(
    multi_B.any(), jnp.sum(jnp.where(multi_B, h_B, 0.0)) / jnp.maximum(multi_B.sum(), 1), 1.0
  )
  n_resp = jnp.maximum(mask_BxT.any(-1).sum(), 1).astype(jnp.float32)
  sq_B = jnp.sum(w_BxT**2, -1) / jnp.maximum(length_B, 1.0)
  mean_sq_weight = jnp.where(any_valid, jnp.sum(jnp.where(length_B > 0, sq_B, 0.0)) / n_resp, 1.0)
  degenerate_frac = 0.0 if fallback_B is None else jnp.sum(jnp.asarray(fallback_B, bool)) / n_resp
  return {
    "degenerate_frac": jnp.asarray(degenerate_frac, jnp.float32),
    "mean_sq_weight": mean_sq_weight,
    "frac_boosted": frac(w_BxT > 1.0 + tol),
    "frac_suppressed": frac(w_BxT < 1.0 - tol),
    "frac_zero": frac(w_BxT <= tol),
    "max_weight": jnp.where(any_valid, jnp.max(jnp.where(mask_BxT, w_BxT, -jnp.inf)), 0.0),
    "min_weight": jnp.where(any_valid, jnp.min(jnp.where(mask_BxT, w_BxT, jnp.inf)), 0.0),
    "mean_weight": mean,
    "std_weight": jnp.sqrt(var),
    "norm_entropy": norm_entropy,
  }


def pgpo(
  rewards_B: Array,
  dependency_BxT: Array,
  mask_BxT: Array,
  group_size: int,
  tau: float = 0.4,
  beta: float = 2.0,
  *,
  renormalize: bool = True,
  threshold_mode: str = "absolute",
  min_weight: float = 0.0,
  max_weight: float | None = None,
  eps: float = 1e-8,
  degenerate_rtol: float = DEGENERATE_RTOL,
  adv_eps: float = 1e-6,
) -> Array:
  """PGPO token advantages Ã_{i,t} = A_i · ω̃_{i,t} (docs/method.md §3 step 5), whatever the sign of A_i.

  Args:
    rewards_B: [B] rewards, group-major.
    dependency_BxT, mask_BxT: [B, T] visual dependency and valid-token mask.
    group_size: G.
    tau, beta, renormalize, threshold_mode, min_weight, max_weight, eps, degenerate_rtol: see
      `pgpo_token_weights`.
    adv_eps: the eps of `grpo`.
  Returns:
    adv_BxT: [B, T] float32, 0 at masked tokens; weights are stop-gradient.
  """
  weights_BxT = pgpo_token_weights(
    dependency_BxT,
    mask_BxT,
    tau,
    beta,
    renormalize=renormalize,
    threshold_mode=threshold_mode,
    min_weight=min_weight,
    max_weight=max_weight,
    eps=eps,
    degenerate_rtol=degenerate_rtol,
  )
  return grpo(rewards_B, group_size, adv_eps)[:, None] * weights_BxT


# ----------------------------------------------------------------------------- registry

# Keys every estimator accepts, so one config block serves both (pgpo.enabled=False -> "grpo").
_PGPO_KEYS = (
  "tau",
  "beta",
  "renormalize",
  "threshold_mode",
  "min_weight",
  "max_weight",
  "eps",
  "degenerate_rtol",
)
_ESTIMATOR_KEYS = ("adv_eps",) + _PGPO_KEYS

Estimator = Callable[..., tuple[Array, dict[str, Array]]]


def _check_cfg(name: str, cfg: dict[str, Any]) -> None:
  unknown = sorted(set(cfg) - set(_ESTIMATOR_KEYS))
  if unknown:
    raise TypeError(
      f"advantage estimator {name!r}: unknown option(s) {unknown}; valid: {list(_ESTIMATOR_KEYS)}"
    )


def _grpo_estimator(
  rewards_B: Array, dependency_BxT: Array | None, mask_BxT: Array, group_size: int, **cfg: Any
) -> tuple[Array, dict[str, Array]]:
  """Plain GRPO/DAPO (ω̃ ≡ 1). Ignores the PGPO options and the dependency."""
  _check_cfg("grpo", cfg)
  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  adv_BxT = jnp.where(mask_BxT, grpo(rewards_B, group_size, cfg.get("adv_eps", 1e-6))[:, None], 0.0)
  return adv_BxT, pgpo_diagnostics(mask_BxT.astype(jnp.float32), mask_BxT)


def _pgpo_estimator(
  rewards_B: Array, dependency_BxT: Array, mask_BxT: Array, group_size: int, **cfg: Any
) -> tuple[Array, dict[str, Array]]:
  """PGPO: GRPO advantage times perception-grounded token weights."""
  _check_cfg("pgpo", cfg)
  if dependency_BxT is None:
    raise ValueError("advantage estimator 'pgpo' needs dependency_BxT (got None)")
  weight_cfg = {k: v for k, v in cfg.items() if k in _PGPO_KEYS}
  weights_BxT, fallback_B = _token_weights(dependency_BxT, mask_BxT, **weight_cfg)
  adv_BxT = grpo(rewards_B, group_size, cfg.get("adv_eps", 1e-6))[:, None] * weights_BxT
  return adv_BxT, pgpo_diagnostics(weights_BxT, mask_BxT, fallback_B=fallback_B)


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
  "grpo": _grpo_estimator,
  "pgpo": _pgpo_estimator,
}


def get_estimator(name: str) -> Estimator:
  """Returns `estimator(rewards_B, dependency_BxT, mask_BxT, group_size, **cfg) -> (adv_BxT, diag)`."""
  try:
    return ADVANTAGE_ESTIMATORS[name]
  except KeyError:
    raise ValueError(
      f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}"
    ) from None
