"""Candidate per-token signals for PGPO's weights, computed from inspector records (NumPy).

The paper's signal is the k3 dependency S at the sampled token, min-max normalised after log(1 + S).
To ask which signal finds the perception tokens of the chain task (`tools/label_metrics.py`), this module
derives the alternatives from what `tools.inspect_dependency` records for each response:

- `S`: the paper's k3 estimate, exp(−d) − 1 + d with d = log π_I(x_t) − log π_∅(x_t).
- `full_kl`: the exact KL over the vocabulary (a record scored with `estimator="full_kl"`).
- `S_clamp10`: min(S, 10), VPPO's clamp of the dependency.
- `S_rank`: S, but the importance I is its rank within the response instead of min-max (ties share
  their mean rank, I = (rank − 1) / (L − 1)): a single outlier no longer sets the scale.
- `S_x_entropy`: S × H(π_I), dependency where the policy is also uncertain.
- `partial`: k3 against a partial blind view hiding a random half of the visual tokens (VPPO's
  p = 0.5 patch masking); `partial_min`: the minimum over two such views (stable under the
  choice of patches).
- baselines `uniform`, `entropy`, `surprisal_image` (−log π_I(x_t)), `surprisal_blind` (−log π_∅(x_t)).

`omega(signal, ...)` turns any signal into PGPO's token weights ω̃ with the paper's transform
(log(1 + x), min-max or rank normalisation, the τ/β gate, mass-conserving renormalisation), a NumPy
restatement of `rl.advantages.pgpo_token_weights` without its options (tests check the two agree).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# name -> normalisation its ω̃ uses
SIGNALS: dict[str, str] = {
  "S": "minmax",
  "full_kl": "minmax",
  "S_clamp10": "minmax",
  "S_rank": "rank",
  "S_x_entropy": "minmax",
  "partial": "minmax",
  "partial_min": "minmax",
  "uniform": "minmax",
  "entropy": "minmax",
  "surprisal_image": "minmax",
  "surprisal_blind": "minmax",
}


def k3(d_L: np.ndarray) -> np.ndarray:
  """[L] exp(−d) − 1 + d (≥ 0), through expm1 so small |d| does not cancel."""
  d = np.asarray(d_L, np.float64)
  return np.maximum(np.expm1(-d) + d, 0.0)


def rank_importance(x_L: np.ndarray) -> np.ndarray:
  """[L] (average rank − 1) / (L − 1) in [0, 1]; ties share their mean rank; [0.0] for L = 1."""
  x = np.asarray(x_L, np.float64)
  if x.size <= 1:
    return np.zeros_like(x)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  last = np.cumsum(counts)
  ranks = (last - (counts - 1) / 2)[inverse.reshape(-1)]
  return (ranks - 1) / (x.size - 1)


def omega(
  signal_L: np.ndarray,
  tau: float = 0.4,
  beta: float = 2.0,
  normalization: str = "minmax",
  eps: float = 1e-8,
  degenerate_rtol: float = 1e-2,
) -> np.ndarray:
  """[L] PGPO weights ω̃ of one response from a non-negative signal (docs/method.md §3).

  minmax: I = (x̃ − min x̃) / (max x̃ − min x̃ + ε) with x̃ = log(1 + x), as the paper; rank: I =
  `rank_importance(x)`. Then ω = I/(τ+ε) below τ, 1 + β(I − τ)/(1 − τ + ε) above, ω̃ = ω·L/Σω.
  Uniform 1 for L ≤ 1, a (near-)constant x̃ (spread ≤ degenerate_rtol · max x̃) or Σω = 0.
  """
  x = np.log1p(np.maximum(np.asarray(signal_L, np.float64), 0.0))
  L = x.size
  if L <= 1:
    return np.ones(L)
  spread = x.max() - x.min()
  if spread <= degenerate_rtol * x.max():
    return np.ones(L)
  if normalization == "minmax":
    imp = np.clip((x - x.min()) / (spread + eps), 0.0, 1.0)
  elif normalization == "rank":
    imp = rank_importance(x)
  else:
    raise ValueError(f"normalization must be 'minmax' or 'rank', got {normalization!r}")
  w = np.where(imp < tau, imp / (tau + eps), 1.0 + beta * (imp - tau) / (1.0 - tau + eps))
  total = w.sum()
  return np.ones(L) if total <= 0 else w * L / total


def record_signals(rec: Any, full_kl_L: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """{signal name: [L] per-token values} of one inspector record (`ResponseRecord`). `full_kl` needs
  the same response's full-vocabulary KL (`full_kl_L`, else `rec.full_kl`); `partial*` need
  `rec.logp_partial` ([K, L], K ≥ 1, and ≥ 2 for `partial_min`). Missing inputs leave the signal out."""
  S = np.asarray(rec.dependency, np.float64)
  lp_i = np.asarray(rec.logp_image, np.float64)
  ent = np.asarray(rec.entropy, np.float64)
  out = {
    "S": S,
    "S_clamp10": np.minimum(S, 10.0),
    "S_rank": S,
    "S_x_entropy": S * ent,
    "uniform": np.zeros_like(S),
    "entropy": ent,
    "surprisal_image": -lp_i,
    "surprisal_blind": -np.asarray(rec.logp_blind, np.float64),
  }
  if full_kl_L is None:
    full_kl_L = getattr(rec, "full_kl", None)
  if full_kl_L is not None:
    out["full_kl"] = np.asarray(full_kl_L, np.float64)
  partial = getattr(rec, "logp_partial", None)
  if partial is not None and len(partial) >= 1:
    views = [k3(lp_i - np.asarray(p, np.float64)) for p in partial]
    out["partial"] = views[0]
    if len(views) >= 2:
      out["partial_min"] = np.minimum(views[0], views[1])
  return out


def signal_report(
  records: list[Any],
  full_kl: list[np.ndarray] | None = None,
  tau: float = 0.4,
  beta: float = 2.0,
) -> dict[str, Any]:
  """How well each signal (and the ω̃ it would give) finds the perception tokens of labelled records.

  records: inspector records with `labels` (unlabelled ones are left out); full_kl: each record's
  full-vocabulary KL, aligned with `records`, or None. Per signal: `auc` (pooled ROC-AUC of the signal
  for perception tokens), `auc_omega` (of its ω̃), `precision_at_r` (mean over responses of the
  precision of its top-R tokens, R = the response's perception tokens), `share_of_signal` and
  `share_of_omega` per label, `mean_omega` per label, and `mean_sum_omega_sq_over_L` (Σω̃²/L per
  response: the gradient-scale factor mass conservation does not hold fixed; 1 for uniform weights).
  """
  from pgpo_jax.demo_task.chain import LABELS, PERCEPTION
  from pgpo_jax.tools.label_metrics import precision_at_k, roc_auc

  rows = []
  for i, r in enumerate(records):
    if getattr(r, "labels", None) is None:
      continue
    sig = record_signals(r, None if full_kl is None else full_kl[i])
    rows.append((sig, np.asarray(r.labels, np.int64)))
  out: dict[str, Any] = {"num_responses": len(rows)}
  if not rows:
    return out
  lab = np.concatenate([lb for _, lb in rows])
  pos = lab == PERCEPTION
  names = [n for n in SIGNALS if all(n in s for s, _ in rows)]
  for name in names:
    x = np.concatenate([s[name] for s, _ in rows])
    om_rows = [omega(s[name], tau, beta, SIGNALS[name]) for s, _ in rows]
    om = np.concatenate(om_rows)
    precs = [
      precision_at_k(s[name], lb == PERCEPTION, int((lb == PERCEPTION).sum()))
      for s, lb in rows
      if (lb == PERCEPTION).any()
    ]
    out[name] = {
      "auc": roc_auc(x, pos),
      "auc_omega": roc_auc(om, pos),
      "precision_at_r": float(np.mean(precs)) if precs else None,
      "share_of_signal": {
        n: float(x[lab == i].sum() / x.sum()) if x.sum() > 0 else None for i, n in enumerate(LABELS)
      },
      "share_of_omega": {n: float(om[lab == i].sum() / om.sum()) for i, n in enumerate(LABELS)},
      "mean_omega": {
        n: float(om[lab == i].mean()) if (lab == i).any() else None for i, n in enumerate(LABELS)
      },
      "mean_sum_omega_sq_over_L": float(np.mean([np.mean(w**2) for w in om_rows])),
    }
  return out
