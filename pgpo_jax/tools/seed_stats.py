"""Across-seed summaries for experiment tables: mean ± 95% confidence interval, paired differences.

With n seeds the interval is the Student-t one, mean ± t(0.975, n-1) · sd / √n (sd with n-1 in the
denominator), i.e. it assumes the per-seed values are independent draws of a roughly normal quantity.
Paired differences (arm A − arm B on the same seed, hence the same data order and warm-up) remove the
seed-to-seed spread that both arms share, which is usually most of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% Student-t quantiles t(0.975, df), df = 1..30 (standard tables); above 30 the normal 1.96
# is within 4%.
_T975 = (
  12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
  2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
  2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
  """The 0.975 quantile of Student's t with `df` degrees of freedom (>= 1)."""
  if df < 1:
    raise ValueError(f"t975: df must be >= 1, got {df}")
  return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
  """{"mean", "ci95" (half-width; None for one value), "sd", "n"} of the finite `values`."""
  x = [float(v) for v in values if v is not None and math.isfinite(v)]
  n = len(x)
  if n == 0:
    return {"mean": None, "ci95": None, "sd": None, "n": 0}
  mean = sum(x) / n
  if n == 1:
    return {"mean": mean, "ci95": None, "sd": None, "n": 1}
  sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
  return {"mean": mean, "ci95": t975(n - 1) * sd / math.sqrt(n), "sd": sd, "n": n}


def paired_diff(a: dict[int, float], b: dict[int, float]) -> dict[str, object]:
  """mean_ci of a[seed] − b[seed] over the seeds both have, plus the per-seed differences."""
  seeds = sorted(set(a) & set(b))
  diffs = {s: a[s] - b[s] for s in seeds}
  return {**mean_ci(list(diffs.values())), "per_seed": diffs}
