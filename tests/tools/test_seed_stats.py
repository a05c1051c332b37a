"""Mean ± 95% CI and paired differences against hand-computed values."""

import pytest

from pgpo_jax.tools import seed_stats


def test_mean_ci_by_hand():
  # values 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.732
  r = seed_stats.mean_ci([1.0, 2.0, 3.0])
  assert r["mean"] == 2.0 and r["sd"] == 1.0 and r["n"] == 3
  assert r["ci95"] == pytest.approx(4.303 / 3**0.5)
  assert seed_stats.mean_ci([5.0])["ci95"] is None
  assert seed_stats.mean_ci([])["mean"] is None
  assert seed_stats.mean_ci([1.0, float("nan"), 3.0])["n"] == 2


def test_paired_diff_uses_common_seeds():
  r = seed_stats.paired_diff({0: 0.5, 1: 0.6, 2: 0.9}, {0: 0.4, 1: 0.4, 3: 0.0})
  assert r["per_seed"] == pytest.approx({0: 0.1, 1: 0.2})
  assert r["mean"] == pytest.approx(0.15)
  assert r["ci95"] == pytest.approx(12.706 * (0.05**2 * 2) ** 0.5 / 2**0.5)
  with pytest.raises(ValueError, match="df"):
    seed_stats.t975(0)
