"""Does a per-token score find the perception tokens? ROC-AUC and precision@k against known labels.

The chain task (`demo_task/chain.py`) knows which response tokens state image facts. Given per-token
scores (the dependency S, the PGPO weight ω̃, or a baseline) and those labels, this module says how well
each score ranks perception tokens above the rest:

- `roc_auc`: the probability that a random perception token outscores a random other token, ties
  counting one half (the Mann-Whitney statistic from average ranks). 0.5 = chance.
- `precision_at_k`: the share of perception tokens among the k highest-scoring tokens, ties at the
  k-th place broken uniformly at random (the expectation, so it is deterministic).
- `ground_truth_report`: both, per scorer, pooled over all tokens and per response (k = the
  response's number of perception tokens, "R-precision"), plus the S and ω̃ mass held by each label.

Scorers (higher = "more likely perception"): `S`, `omega` (ω̃), and the baselines `uniform` (a
constant: AUC 0.5, precision = base rate), `entropy` (of π_I), `surprisal_image` (−log π_I(x_t), the
image view alone) and `surprisal_blind` (−log π_∅(x_t), the blind view alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pgpo_jax.demo_task.chain import LABELS, PERCEPTION

SCORERS: tuple[str, ...] = (
  "S",
  "omega",
  "uniform",
  "entropy",
  "surprisal_image",
  "surprisal_blind",
)


def average_ranks(x_N: np.ndarray) -> np.ndarray:
  """[N] 1-based ranks of `x_N`, tied values sharing the mean of their ranks."""
  _, inverse, counts = np.unique(x_N, return_inverse=True, return_counts=True)
  last = np.cumsum(counts)  # rank of each distinct value's last copy
  return (last - (counts - 1) / 2)[inverse.reshape(-1)]


def roc_auc(score_N: np.ndarray, positive_N: np.ndarray) -> float:
  """ROC-AUC of `score_N` for the boolean `positive_N` (ties count 1/2); NaN without both classes."""
  score = np.asarray(score_N, np.float64).reshape(-1)
  pos = np.asarray(positive_N, bool).reshape(-1)
  if score.shape != pos.shape:
    raise ValueError(f"roc_auc: score shape {score.shape} != positive shape {pos.shape}")
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = average_ranks(score)
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(score_N: np.ndarray, positive_N: np.ndarray, k: int) -> float:
  """Expected share of positives among the top `k` scores, ties at the cut broken at random."""
  score = np.asarray(score_N, np.float64).reshape(-1)
  pos = np.asarray(positive_N, bool).reshape(-1)
  if score.shape != pos.shape:
    raise ValueError(f"precision_at_k: score shape {score.shape} != positive shape {pos.shape}")
  if not 1 <= k <= score.size:
    raise ValueError(f"precision_at_k: k must be in [1, {score.size}], got {k}")
  cut = np.sort(score)[::-1][k - 1]
  above, tied = score > cut, score == cut
  take = k - int(above.sum())  # how many of the tied scores make the top k
  return float((pos[above].sum() + take * pos[tied].mean()) / k)


def _scores(rec: Any) -> dict[str, np.ndarray]:
  """The scorers' per-token values of one inspector record (`inspect_dependency.ResponseRecord`)."""
  dep = np.asarray(rec.dependency, np.float64)
  return {
    "S": dep,
    "omega": np.asarray(rec.weights, np.float64),
    "uniform": np.zeros_like(dep),
    "entropy": np.asarray(rec.entropy, np.float64),
    "surprisal_image": -np.asarray(rec.logp_image, np.float64),
    "surprisal_blind": -np.asarray(rec.logp_blind, np.float64),
  }


def _nanmean(x: Sequence[float]) -> float | None:
  x = [v for v in x if not np.isnan(v)]
  return float(np.mean(x)) if x else None


# Why a response adds nothing to the per-response AUC (`label_coverage`), and what each means.
UNSCORED_REASONS: dict[str, str] = {
  "unlabelled": "no labels (no labeler)",
  "empty": "no tokens",
  "no_perception_token": "no perception token (the labeler recognised no image-fact statement)",
  "only_perception_tokens": "only perception tokens (nothing to rank them against)",
}


def label_coverage(records: Sequence[Any]) -> dict[str, Any]:
  """How many responses the ground-truth numbers rest on, and why the others add nothing.

  Returns {"num_records", "num_scored" (labelled, with perception and other tokens: the responses
  of `auc_per_response`), "unscored": {reason: count} over `UNSCORED_REASONS`, every reason listed}.
  """
  unscored = dict.fromkeys(UNSCORED_REASONS, 0)
  for r in records:
    labels = getattr(r, "labels", None)
    if labels is None:
      reason = "unlabelled"
    else:
      pos = np.asarray(labels) == PERCEPTION
      reason = (
        "empty"
        if pos.size == 0
        else "no_perception_token"
        if not pos.any()
        else "only_perception_tokens"
        if pos.all()
        else None
      )
    if reason is not None:
      unscored[reason] += 1
  return {
    "num_records": len(records),
    "num_scored": len(records) - sum(unscored.values()),
    "unscored": unscored,
  }


def coverage_text(coverage: dict[str, Any]) -> str:
  """One sentence for the report: the responses the scores rest on, then each reason with a count,
  e.g. "1 of 3 responses scored; not scored: 2 with no perception token (...)"."""
  n, k = coverage["num_records"], coverage["num_scored"]
  why = [f"{c} with {UNSCORED_REASONS[r]}" for r, c in coverage["unscored"].items() if c]
  return f"{k} of {n} responses scored" + ("; not scored: " + ", ".join(why) if why else "")


def ground_truth_report(records: Sequence[Any]) -> dict[str, Any]:
  """AUC and precision of every scorer for perception tokens, and S / ω̃ per label.

  records: inspector records with `labels` (per-token label ids, `chain.LABELS`); records without
  labels (None) are left out and counted. Returns {"num_responses", "num_unlabelled", "coverage"
  (`label_coverage`), "num_tokens", "num_perception", "scorers": {name: {"auc_pooled",
  "auc_per_response", "precision_at_r", "precision_at_r_pooled"}}, "by_label": {label: {"count",
  "share_of_tokens", "mean_S", "mean_omega", "share_of_S", "share_of_omega"}}}.
  `precision_at_r` is the mean over responses of p@k with k = that response's perception tokens;
  `precision_at_r_pooled` uses all tokens and k = all perception tokens. Values that cannot be
  computed are None, never NaN. When no labelled token is perception (or every one is), no score
  can be ranked: "scorers" is left out and "unscored_reason" says why.
  """
  labelled = [r for r in records if getattr(r, "labels", None) is not None]
  coverage = label_coverage(records)
  out: dict[str, Any] = {
    "num_responses": len(labelled),
    "num_unlabelled": len(records) - len(labelled),
    "coverage": coverage,
  }
  if not labelled:
    out["unscored_reason"] = f"no response is labelled: {coverage_text(coverage)}"
    return out
  per = [(_scores(r), np.asarray(r.labels, np.int64)) for r in labelled]
  for s, lab in per:
    if any(len(v) != len(lab) for v in s.values()):
      raise ValueError("ground_truth_report: a record's labels and scores differ in length")
  lab_all = np.concatenate([lab for _, lab in per])
  pos_all = lab_all == PERCEPTION
  out["num_tokens"] = int(lab_all.size)
  out["num_perception"] = int(pos_all.sum())
  out["by_label"] = _by_label(per, lab_all)
  if pos_all.all() or not pos_all.any():
    what = "every" if pos_all.any() else "no"
    out["unscored_reason"] = (
      f"{what} labelled token is a perception token, so no score can rank them: "
      + coverage_text(coverage)
    )
    return out
  scorers = {}
  for name in SCORERS:
    x_all = np.concatenate([s[name] for s, _ in per])
    aucs, precs = [], []
    for s, lab in per:
      pos = lab == PERCEPTION
      aucs.append(roc_auc(s[name], pos))
      if pos.any():
        precs.append(precision_at_k(s[name], pos, int(pos.sum())))
    n_pos = int(pos_all.sum())
    scorers[name] = {
      "auc_pooled": roc_auc(x_all, pos_all),
      "auc_per_response": _nanmean(aucs),
      "precision_at_r": _nanmean(precs),
      "precision_at_r_pooled": precision_at_k(x_all, pos_all, n_pos),
    }
  out["scorers"] = scorers
  return out


def _by_label(per: list[tuple[dict[str, np.ndarray], np.ndarray]], lab_all: np.ndarray) -> dict:
  dep = np.concatenate([s["S"] for s, _ in per])
  w = np.concatenate([s["omega"] for s, _ in per])
  by_label = {}
  for i, name in enumerate(LABELS):
    sel = lab_all == i
    by_label[name] = {
      "count": int(sel.sum()),
      "share_of_tokens": float(sel.mean()) if lab_all.size else None,
      "mean_S": float(dep[sel].mean()) if sel.any() else None,
      "mean_omega": float(w[sel].mean()) if sel.any() else None,
      "share_of_S": float(dep[sel].sum() / dep.sum()) if dep.sum() > 0 else None,
      "share_of_omega": float(w[sel].sum() / w.sum()) if w.sum() > 0 else None,
    }
  return by_label
