"""Candidate PGPO signals (tools/signals.py) against references: the JAX weights, hand values, float64."""

import types

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pgpo_jax.rl import advantages
from pgpo_jax.tools import signals


@settings(max_examples=40, deadline=None)
@given(
  st.integers(2, 40),
  st.one_of(st.just(0.0), st.floats(1e-3, 1.0)),  # a float32 τ: no subnormals
  st.floats(0.0, 4.0),
  st.integers(0, 2**31 - 1),
)
def test_minmax_omega_equals_the_trainers_weights(L, tau, beta, seed):
  rng = np.random.default_rng(seed)
  S = rng.exponential(0.5, L) * (rng.random(L) < 0.5)
  got = signals.omega(S, tau, beta)
  want = np.asarray(
    advantages.pgpo_token_weights(S[None].astype(np.float32), np.ones((1, L), bool), tau, beta)
  )[0]
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(got.sum(), L, rtol=1e-9)


def test_rank_importance_and_rank_omega_by_hand():
  np.testing.assert_allclose(
    signals.rank_importance([5.0, 0.1, 9.0, 0.1]), [2 / 3, 1 / 6, 1, 1 / 6]
  )
  np.testing.assert_allclose(signals.rank_importance([3.0]), [0.0])
  # I = [0, .25, .5, .75, 1] whatever the spacing of x (one huge outlier does not squash the rest).
  x = np.array([0.0, 0.01, 0.02, 0.03, 500.0])
  tau, beta = 0.4, 2.0
  w = np.array([0.0, 0.25 / tau, 1 + beta * 0.1 / 0.6, 1 + beta * 0.35 / 0.6, 1 + beta])
  np.testing.assert_allclose(signals.omega(x, tau, beta, "rank"), w * 5 / w.sum(), rtol=1e-6)
  # Min-max on the same x puts nearly everything below τ: the outlier takes most of the mass.
  mm = signals.omega(x, tau, beta, "minmax")
  assert mm[-1] > 4.0 and mm[:-1].max() < 0.1


def test_k3_is_accurate_for_small_and_large_log_ratios():
  d = np.array([-10.0, -1.0, -1e-3, -1e-8, 0.0, 1e-8, 1e-4, 1.0, 10.0])
  want = np.array([np.exp(-v) - 1 + v if abs(v) > 1e-3 else v * v / 2 - v**3 / 6 for v in d])
  got = signals.k3(d)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert (got >= 0).all()


def _record(labels, logp_image, logp_blind, entropy, partial=None):
  d = np.asarray(logp_image) - np.asarray(logp_blind)
  return types.SimpleNamespace(
    labels=np.asarray(labels),
    logp_image=np.asarray(logp_image, float),
    logp_blind=np.asarray(logp_blind, float),
    entropy=np.asarray(entropy, float),
    dependency=np.expm1(-d) + d,
    logp_partial=None if partial is None else np.asarray(partial, float),
  )


def test_record_signals_derive_each_variant():
  rec = _record(
    [1, 0, 1, 2],
    [-0.1, -0.2, -2.0, -0.01],
    [-0.1, -3.0, -0.5, -0.01],
    [0.5, 1.0, 2.0, 0.1],
    partial=[[-0.1, -1.0, -2.0, -0.01], [-0.1, -0.5, -1.0, -0.01]],
  )
  s = signals.record_signals(rec, full_kl_L=[0.0, 1.0, 2.0, 3.0])
  np.testing.assert_allclose(s["S_x_entropy"], rec.dependency * rec.entropy)
  np.testing.assert_allclose(s["S_clamp10"], np.minimum(rec.dependency, 10))
  p0 = np.exp(-0.8) - 1 + 0.8  # d = -0.2 - (-1.0)
  p1 = np.exp(-0.3) - 1 + 0.3
  np.testing.assert_allclose(s["partial"][1], p0, rtol=1e-9)
  np.testing.assert_allclose(s["partial_min"][1], min(p0, p1), rtol=1e-9)
  np.testing.assert_allclose(s["partial_min"][2], 0.0, atol=1e-12)  # view 0 shows the same logp
  np.testing.assert_allclose(s["full_kl"], [0, 1, 2, 3])
  assert "partial" not in signals.record_signals(_record([0], [-1.0], [-1.0], [0.0]))


def test_signal_report_scores_a_perfect_and_a_useless_signal():
  rng = np.random.default_rng(0)
  recs = []
  for _ in range(6):
    L = 12
    lab = np.ones(L, int)
    lab[rng.choice(L, 2, replace=False)] = 0
    lab[-1] = 2
    lp_i = np.where(lab == 0, -0.05, -rng.uniform(0.5, 1.0, L))  # confident on perception tokens
    lp_b = np.where(lab == 0, -3.0, lp_i)  # and only there does the image matter
    recs.append(_record(lab, lp_i, lp_b, rng.uniform(0, 1, L)))
  rep = signals.signal_report(recs)
  assert rep["num_responses"] == 6
  assert rep["S"]["auc"] == 1.0 and rep["S"]["precision_at_r"] == 1.0
  assert abs(rep["S"]["share_of_signal"]["perception"] - 1.0) < 1e-12
  assert rep["uniform"]["auc"] == 0.5
  assert rep["uniform"]["mean_sum_omega_sq_over_L"] == 1.0
  assert rep["surprisal_image"]["auc"] == 0.0  # perception tokens are the least surprising here
  assert rep["S"]["share_of_omega"]["perception"] > 0.5
