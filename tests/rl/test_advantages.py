"""GRPO advantages and PGPO token weights against docs/method.md §1/§3/§7 and a NumPy reference."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from pgpo_jax.rl import advantages as adv_lib
from pgpo_jax.rl.advantages import get_estimator, grpo, pgpo, pgpo_diagnostics, pgpo_token_weights

B, T = 4, 16  # fixed shapes so every hypothesis example reuses one compilation
HYP = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- NumPy reference


def np_grpo(rewards, group_size, eps=1e-6):
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  out = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)
  return out.reshape(-1)


def np_weights(
  dep, mask, tau=0.4, beta=2.0, eps=1e-8, renormalize=True, mode="absolute", rtol=1e-2, cap=None
):
  """Loop-per-response float64 transcription of docs/method.md §3 (+ the relative "constant S" tolerance
  and, with `cap`, the mass-conserving cap solved by water-filling: the largest ω go to the cap
  one by one until the rest, scaled to the remaining mass, stay below it)."""
  dep, mask = np.asarray(dep, np.float64), np.asarray(mask, bool)
  out = np.zeros_like(dep)
  for i in range(dep.shape[0]):
    valid = mask[i]
    n = valid.sum()
    if n == 0:
      continue
    s = np.log1p(dep[i, valid])
    rng = s.max() - s.min()
    imp = (s - s.min()) / (rng + eps)
    t = np.quantile(imp, tau) if mode == "quantile" else tau
    w = np.where(imp < t, imp / (t + eps), 1 + beta * (imp - t) / (1 - t + eps))
    if n <= 1 or rng <= rtol * s.max() or w.sum() == 0:
      w = np.ones(n)
    elif renormalize and cap is None:
      w = w * n / w.sum()
    elif renormalize:
      order = np.argsort(-w, kind="stable")
      for k in range(n + 1):  # k largest at the cap
        rest = order[k:]
        lam = (n - k * cap) / max(w[rest].sum(), 1e-300)
        if k == n or lam * w[rest].max() <= cap:
          break
      w = (
        np.where(np.isin(np.arange(n), order[:k]), cap, lam * w)
        if w[order[k:]].sum() > 0
        else np.where(w > 0, cap, 0.0)
      )
    out[i, valid] = w
  return out


# ----------------------------------------------------------------------------- strategies

# Dependencies on a 0.01 grid: well separated, so float32 vs float64 min-max is well conditioned.
_dep = hnp.arrays(
  np.float32, (B, T), elements=st.integers(0, 3000).map(lambda k: np.float32(k / 100))
)
_mask = hnp.arrays(np.bool_, (B, T), elements=st.booleans())
_STATIC = ("renormalize", "threshold_mode", "min_weight", "max_weight")
_jit_weights = jax.jit(pgpo_token_weights, static_argnames=_STATIC)
_jit_pgpo = jax.jit(pgpo, static_argnames=("group_size",) + _STATIC)


# ----------------------------------------------------------------------------- worked example


def test_worked_example_pgpo_md_section_7():
  dep = jnp.array([[0, 0.01, 0.02, 0.05, 0.30, 2.0, 0.10, 0]])
  mask = jnp.ones_like(dep, bool)
  w = np.asarray(_jit_weights(dep, mask, 0.4, 2.0))
  np.testing.assert_allclose(w, [[0, 0.045, 0.090, 0.222, 1.196, 6.01, 0.435, 0]], atol=2e-3)
  np.testing.assert_allclose(w.sum(), 8.0, rtol=1e-6)
  # the unrenormalised ω of the example
  omega = np.asarray(_jit_weights(dep, mask, 0.4, 2.0, renormalize=False))
  np.testing.assert_allclose(omega, [[0, 0.023, 0.045, 0.111, 0.597, 3.0, 0.217, 0]], atol=2e-3)
  diag = pgpo_diagnostics(w, mask)
  assert diag["frac_boosted"] == pytest.approx(2 / 8) and diag["frac_suppressed"] == pytest.approx(
    6 / 8
  )
  assert diag["frac_zero"] == pytest.approx(2 / 8)
  assert diag["max_weight"] == pytest.approx(6.01, abs=2e-3) and diag[
    "mean_weight"
  ] == pytest.approx(1.0)
  assert 0.0 < diag["norm_entropy"] < 1.0
  want = (0.045**2 + 0.090**2 + 0.222**2 + 1.196**2 + 6.01**2 + 0.435**2) / 8  # by hand
  assert diag["mean_sq_weight"] == pytest.approx(want, rel=2e-3)


def test_mean_sq_weight_averages_per_response_and_is_one_for_uniform_weights():
  w = jnp.array([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
  mask = jnp.array([[True, True, False, False], [True, True, True, False]])
  # response 0: (4 + 0) / 2 = 2; response 1: 3 / 3 = 1; mean over the two responses.
  assert float(pgpo_diagnostics(w, mask)["mean_sq_weight"]) == pytest.approx(1.5)
  ones = jnp.ones((3, 5))
  assert float(pgpo_diagnostics(ones, ones.astype(bool))["mean_sq_weight"]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- GRPO


@given(
  hnp.arrays(np.float32, (12,), elements=st.sampled_from([0.0, 0.1, 0.9, 1.0])),
  st.sampled_from([2, 3, 4, 6]),
)
@HYP
def test_grpo_matches_numpy(rewards, group_size):
  got = np.asarray(grpo(jnp.asarray(rewards), group_size))
  want = np_grpo(rewards, group_size)
  const = (np.ptp(rewards.reshape(-1, group_size), axis=1) == 0).repeat(group_size)
  want[const] = 0.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_grpo_zero_std_group_is_exactly_zero_and_std_is_bessel():
  rewards = jnp.array([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 0.0])
  a = np.asarray(grpo(rewards, 4))
  assert np.all(a[:4] == 0.0)
  # sample std of [1,0,0,0] = 0.5 -> A = (1 - .25)/.5 = 1.5 (population std would give 1.732)
  np.testing.assert_allclose(a[4:], [1.5, -0.5, -0.5, -0.5], rtol=1e-5)


def test_grpo_rejects_bad_shapes():
  with pytest.raises(ValueError, match="multiple of group_size"):
    grpo(jnp.zeros(7), 4)
  with pytest.raises(ValueError, match="group_size"):
    grpo(jnp.zeros(4), 1)


# ----------------------------------------------------------------------------- weight properties


@given(_dep, _mask)
@HYP
def test_weights_match_reference_and_conserve_mass(dep, mask):
  w = np.asarray(_jit_weights(jnp.asarray(dep), jnp.asarray(mask)))
  np.testing.assert_allclose(w, np_weights(dep, mask), rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(w.sum(-1), mask.sum(-1), rtol=1e-5)
  assert np.all(w >= 0.0)
  assert np.all(w[~mask] == 0.0)


@given(
  _dep, _mask, st.sampled_from([0.0, 0.2, 0.4, 0.7, 1.0]), st.sampled_from(["absolute", "quantile"])
)
@HYP
def test_weights_are_order_preserving_within_a_response(dep, mask, tau, mode):
  w = np.asarray(_jit_weights(jnp.asarray(dep), jnp.asarray(mask), tau, threshold_mode=mode))
  for i in range(B):
    s, wi = dep[i, mask[i]], w[i, mask[i]]
    order = np.argsort(s, kind="stable")
    s, wi = s[order], wi[order]
    # S_a <= S_b  =>  w_a <= w_b (tiny slack for transcendental rounding)
    assert np.all(np.diff(wi) >= -1e-5 * np.maximum(wi[1:], 1.0)), (s, wi)


@given(_dep, _mask)
@HYP
def test_tau_edges(dep, mask):
  dep_j, mask_j = jnp.asarray(dep), jnp.asarray(mask)
  varies = np.array([mask[i].any() and np.ptp(dep[i, mask[i]]) > 0 for i in range(B)])
  nondegenerate = (mask.sum(-1) > 1) & varies
  boost_only = np.asarray(_jit_weights(dep_j, mask_j, 0.0, renormalize=False))
  supp_only = np.asarray(_jit_weights(dep_j, mask_j, 1.0, renormalize=False))
  m = mask & nondegenerate[:, None]
  assert np.all(boost_only[m] >= 1.0)  # τ = 0: boosting only
  assert np.all(supp_only[m] <= 1.0 + 1e-6)  # τ = 1: suppression only
  for tau in (0.0, 1.0):
    w = np.asarray(_jit_weights(dep_j, mask_j, tau))
    np.testing.assert_allclose(w, np_weights(dep, mask, tau=tau), rtol=2e-4, atol=2e-5)


@given(
  st.integers(0, 1000),
  _mask,
  hnp.arrays(np.float32, (B,), elements=st.sampled_from([0.0, 0.5, 1.0])),
)
@HYP
def test_constant_dependency_gives_uniform_weights_and_pgpo_equals_grpo(level, mask, rewards):
  dep = jnp.full((B, T), level / 100.0)
  w = np.asarray(_jit_weights(dep, jnp.asarray(mask)))
  np.testing.assert_array_equal(w, mask.astype(np.float32))
  adv = _jit_pgpo(jnp.asarray(rewards), dep, jnp.asarray(mask), group_size=2)
  np.testing.assert_allclose(
    adv, np.asarray(grpo(jnp.asarray(rewards), 2))[:, None] * mask, atol=1e-7
  )


def test_degenerate_responses():
  dep = jnp.array([[0.3, 0, 0, 0], [0.5, 0.5, 0.5, 0], [0, 0, 0, 0], [0.2, 0.9, 0.1, 5.0]])
  mask = jnp.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  for renorm in (True, False):
    w = np.asarray(_jit_weights(dep, mask, renormalize=renorm))
    np.testing.assert_array_equal(w[0], [1, 0, 0, 0])  # L = 1
    np.testing.assert_array_equal(w[1], [1, 1, 1, 0])  # constant S
    np.testing.assert_array_equal(w[2], [0, 0, 0, 0])  # no valid token
  # Σω = 0 only happens for the whole response at I = 0, i.e. constant S; already covered.


def test_near_constant_dependency_is_degenerate_issue_example():
  """S = 1e-3 on 2,047 tokens and 1e-3 + 1e-6 on one: uniform weights, not all mass on one token."""
  dep = np.full((1, 2048), 1e-3, np.float32)
  dep[0, 1000] = 1e-3 + 1e-6
  mask = np.ones_like(dep, bool)
  w = np.asarray(jax.jit(pgpo_token_weights)(jnp.asarray(dep), jnp.asarray(mask)))
  np.testing.assert_array_equal(w, np.ones_like(w))
  # The paper's exact rule (tolerance 0) is what the issue saw: one token takes everything.
  w0 = np.asarray(pgpo_token_weights(jnp.asarray(dep), jnp.asarray(mask), degenerate_rtol=0.0))
  assert w0[0, 1000] == pytest.approx(2048, rel=1e-4) and np.all(np.delete(w0[0], 1000) == 0.0)
  # The estimator counts the fallback.
  rewards = jnp.array([1.0, 0.0])
  adv, diag = get_estimator("pgpo")(
    rewards, jnp.asarray(np.repeat(dep, 2, 0)), jnp.ones((2, 2048), bool), 2
  )
  assert float(diag["degenerate_frac"]) == 1.0
  np.testing.assert_allclose(
    adv, np.asarray(grpo(rewards, 2))[:, None] * np.ones((2, 2048)), rtol=1e-6
  )


def test_spread_above_tolerance_keeps_min_max_weights():
  dep = jnp.array([[1.0, 1.0, 1.0, 1.05]])  # S̃ spread 1.2% of max S̃: a signal
  w = np.asarray(pgpo_token_weights(dep, jnp.ones((1, 4), bool)))
  np.testing.assert_allclose(w, np_weights(dep, np.ones((1, 4), bool)), rtol=1e-4)
  assert w[0, 3] > 1.0 and w[0, 0] == 0.0
  wide = np.asarray(pgpo_token_weights(dep, jnp.ones((1, 4), bool), degenerate_rtol=0.5))
  np.testing.assert_array_equal(wide, np.ones((1, 4)))


def test_degenerate_frac_counts_each_fallback_kind():
  dep = jnp.array(
    [
      [0.3, 0, 0, 0],  # L = 1
      [0.5, 0.5, 0.5, 0],  # constant
      [1.0, 1.0001, 1.0, 1.0],  # near-constant
      [0.2, 0.9, 0.1, 5.0],  # varied
      [0.0, 0.0, 0.0, 0.0],
    ]
  )  # no valid token: not counted
  mask = jnp.array([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  _, diag = get_estimator("pgpo")(jnp.zeros(5), dep, mask, 5)
  assert float(diag["degenerate_frac"]) == pytest.approx(3 / 4)
  _, diag_g = get_estimator("grpo")(jnp.zeros(5), dep, mask, 5)
  assert float(diag_g["degenerate_frac"]) == 0.0


@given(
  st.integers(1, 3000),
  st.floats(0.0, 0.4),
  _mask,
  hnp.arrays(np.float32, (B, T), elements=st.floats(-1, 1)),
)
@HYP
def test_spread_within_tolerance_is_uniform_and_mass_is_kept(level, share, mask, noise):
  """Any S whose log(1+S) varies by less than the tolerance times its maximum gives ω̃ = 1."""
  base = np.log1p(level / 100.0)
  compressed = base * (1.0 + share * 1e-2 * noise)  # spread <= 0.8% of the level, under 1e-2
  dep = np.expm1(compressed).astype(np.float32)
  w = np.asarray(_jit_weights(jnp.asarray(dep), jnp.asarray(mask)))
  np.testing.assert_array_equal(w, mask.astype(np.float32))
  np.testing.assert_allclose(w.sum(-1), mask.sum(-1))


def test_infinite_dependency_is_the_maximum_and_finite():
  dep = jnp.array([[0.1, jnp.inf, 0.5, 0.0]])
  w = np.asarray(_jit_weights(dep, jnp.ones((1, 4), bool)))
  assert np.all(np.isfinite(w)) and w.argmax() == 1 and w.sum() == pytest.approx(4.0, rel=1e-6)


def test_masked_tokens_do_not_influence_weights():
  dep = jnp.array([[0.1, 0.5, 2.0, 0.0, 0.2]])
  mask = jnp.array([[1, 1, 1, 1, 0]], bool)
  w1 = _jit_weights(dep, mask)
  w2 = _jit_weights(dep.at[0, 4].set(1e6), mask)
  w3 = _jit_weights(dep.at[0, 4].set(jnp.nan), mask)
  np.testing.assert_array_equal(w1, w2)
  np.testing.assert_array_equal(w1, w3)


@given(_dep, _mask)
@HYP
def test_renormalize_false_is_raw_omega(dep, mask):
  w = np.asarray(_jit_weights(jnp.asarray(dep), jnp.asarray(mask), renormalize=False))
  np.testing.assert_allclose(w, np_weights(dep, mask, renormalize=False), rtol=2e-4, atol=2e-5)


@given(_dep, _mask, st.sampled_from([0.1, 0.3, 0.5, 0.9]))
@HYP
def test_quantile_mode_matches_numpy_quantile(dep, mask, q):
  w = np.asarray(_jit_weights(jnp.asarray(dep), jnp.asarray(mask), q, threshold_mode="quantile"))
  np.testing.assert_allclose(w, np_weights(dep, mask, tau=q, mode="quantile"), rtol=2e-4, atol=2e-5)


def test_quantile_helper_matches_numpy():
  x = np.random.default_rng(0).random((5, 9)).astype(np.float32)
  mask = np.random.default_rng(1).random((5, 9)) < 0.7
  mask[0] = False
  for q in (0.0, 0.25, 0.5, 0.9, 1.0):
    got = np.asarray(adv_lib._masked_quantile(jnp.asarray(x), jnp.asarray(mask), q))[:, 0]
    want = [np.quantile(x[i, mask[i]], q) if mask[i].any() else 0.0 for i in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ----------------------------------------------------------------------------- floor / cap


@given(_dep, _mask, st.sampled_from([0.0, 0.05, 0.3]), st.sampled_from([None, 1.5, 3.0, 8.0]))
@HYP
def test_bounds_are_hard_and_mass_is_conserved_when_feasible(dep, mask, lo, hi):
  w = np.asarray(_jit_weights(jnp.asarray(dep), jnp.asarray(mask), min_weight=lo, max_weight=hi))
  plain = np_weights(dep, mask)
  cap = np.inf if hi is None else hi
  for i in range(B):
    v = mask[i]
    if not v.any():
      continue
    wi = w[i, v]
    assert np.all(wi >= lo - 1e-6) and np.all(wi <= cap + 1e-5)
    n, n_pos = v.sum(), (plain[i, v] > 0).sum()
    max_mass = n_pos * cap + (n - n_pos) * lo  # every token at its largest reachable value
    if max_mass >= n * (1 + 1e-4):
      np.testing.assert_allclose(wi.sum(), n, rtol=1e-5)
    else:
      assert wi.sum() <= n * (1 + 1e-5)
    # still monotone in S
    order = np.argsort(dep[i, v], kind="stable")
    assert np.all(np.diff(wi[order]) >= -1e-5 * np.maximum(wi[order][1:], 1.0))


def test_inactive_bounds_equal_plain_weights():
  dep = jnp.array([[0, 0.01, 0.02, 0.05, 0.30, 2.0, 0.10, 0]])
  mask = jnp.ones_like(dep, bool)
  plain = _jit_weights(dep, mask)
  np.testing.assert_allclose(_jit_weights(dep, mask, max_weight=100.0), plain, rtol=1e-5)


def test_cap_on_worked_example():
  dep = jnp.array([[0, 0.01, 0.02, 0.05, 0.30, 2.0, 0.10, 0]])
  mask = jnp.ones_like(dep, bool)
  w = np.asarray(_jit_weights(dep, mask, max_weight=3.0))[0]
  assert w.max() == pytest.approx(3.0, abs=1e-6) and w.sum() == pytest.approx(8.0, rel=1e-6)
  # the uncapped tokens share the freed mass proportionally to ω
  omega = np.array([0, 0.0226, 0.045, 0.111, 0.597, 3.0, 0.217, 0])
  free = (w < 3.0 - 1e-6) & (omega > 0)
  ratio = w[free] / np.asarray(_jit_weights(dep, mask, renormalize=False))[0][free]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
  # floor: zero-ω tokens are lifted to the floor
  wf = np.asarray(_jit_weights(dep, mask, min_weight=0.2))[0]
  assert (
    wf[0] == pytest.approx(0.2)
    and wf[-1] == pytest.approx(0.2)
    and wf.sum() == pytest.approx(8.0, rel=1e-6)
  )


def test_infeasible_cap_keeps_bound():
  # one token carries all of ω: a cap of 2 cannot hold 4 tokens of mass -> bound wins.
  dep = jnp.array([[0.0, 0.0, 0.0, 5.0]])
  mask = jnp.ones_like(dep, bool)
  w = np.asarray(_jit_weights(dep, mask, max_weight=2.0))[0]
  np.testing.assert_allclose(w, [0, 0, 0, 2.0], atol=1e-6)


def test_bounds_without_renormalisation_clip_omega():
  dep = jnp.array([[0, 0.01, 0.02, 0.05, 0.30, 2.0, 0.10, 0]])
  mask = jnp.ones_like(dep, bool)
  omega = np_weights(dep, mask, renormalize=False)
  w = np.asarray(_jit_weights(dep, mask, renormalize=False, min_weight=0.1, max_weight=2.0))
  np.testing.assert_allclose(w, np.clip(omega, 0.1, 2.0), rtol=1e-5)


def test_invalid_hyperparameters_raise():
  dep, mask = jnp.zeros((1, 3)), jnp.ones((1, 3), bool)
  with pytest.raises(ValueError, match="tau"):
    pgpo_token_weights(dep, mask, tau=1.5)
  with pytest.raises(ValueError, match="max_weight"):
    pgpo_token_weights(dep, mask, max_weight=0.5)
  with pytest.raises(ValueError, match="min_weight"):
    pgpo_token_weights(dep, mask, min_weight=1.5)
  with pytest.raises(ValueError, match="threshold_mode"):
    pgpo_token_weights(dep, mask, threshold_mode="relative")


# ----------------------------------------------------------------------------- pgpo, registry, jit


def test_pgpo_is_grpo_times_weights_with_sign():
  rewards = np.array([1.0, 0.0, 0.0, 1.0])
  dep = jnp.abs(jax.random.normal(jax.random.key(0), (4, 6)))
  mask = jnp.ones((4, 6), bool).at[1, 4:].set(False)
  adv = np.asarray(_jit_pgpo(jnp.asarray(rewards), dep, mask, 2))
  # Two groups [1, 0], [0, 1]: mean 0.5, sample std 1/√2, so A = ±(0.5 / (1/√2 + 1e-6)) = ±0.7071.
  a = 0.5 / (np.sqrt(0.5) + 1e-6)
  np.testing.assert_allclose(np_grpo(rewards, 2), [a, -a, -a, a], rtol=1e-12)
  want = np.array([a, -a, -a, a])[:, None] * np_weights(dep, mask)
  np.testing.assert_allclose(adv, want, rtol=2e-4, atol=2e-5)
  assert np.all(adv[1] <= 0) and np.all(adv[0] >= 0)  # negative advantages keep their sign
  np.testing.assert_allclose(adv.sum(-1), [a * 6, -a * 4, -a * 6, a * 6], rtol=1e-5)  # A_i · L_i
  # weights are constants: no gradient flows into the dependency
  g = jax.grad(lambda d: _jit_pgpo(jnp.asarray(rewards), d, mask, 2).sum())(dep)
  assert np.all(np.asarray(g) == 0.0)


def test_registry():
  rewards = jnp.array([1.0, 0.0, 0.5, 0.5])
  dep = jnp.abs(jax.random.normal(jax.random.key(1), (4, 5)))
  mask = jnp.ones((4, 5), bool)
  cfg = dict(tau=0.3, beta=1.5, renormalize=True, threshold_mode="absolute", adv_eps=1e-6)
  adv_p, diag_p = get_estimator("pgpo")(rewards, dep, mask, 2, **cfg)
  want = np_grpo(rewards, 2)[:, None] * np_weights(dep, mask, tau=0.3, beta=1.5)
  np.testing.assert_allclose(adv_p, want, rtol=2e-4, atol=2e-5)
  adv_g, diag_g = get_estimator("grpo")(rewards, dep, mask, 2, **cfg)  # same cfg, PGPO keys ignored
  np.testing.assert_allclose(
    adv_g, np.asarray(grpo(rewards, 2))[:, None] * np.ones((4, 5)), rtol=1e-6
  )
  assert set(diag_p) == set(diag_g)
  assert float(diag_g["frac_boosted"]) == 0.0 and float(diag_g["norm_entropy"]) == pytest.approx(
    1.0
  )
  with pytest.raises(ValueError, match=r"valid: \['grpo', 'pgpo'\]"):
    get_estimator("ppo")
  with pytest.raises(TypeError, match="taus"):
    get_estimator("pgpo")(rewards, dep, mask, 2, taus=0.3)


class PgpoJitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("absolute", None), ("quantile", None), ("absolute", 2.5))
  def test_jit_and_eager_agree(self, mode, cap):
    key_d, key_m, key_r = jax.random.split(jax.random.key(3), 3)
    dep = jnp.square(jax.random.normal(key_d, (6, 11)))
    mask = jax.random.bernoulli(key_m, 0.8, (6, 11))
    rewards = jax.random.bernoulli(key_r, 0.5, (6,)).astype(jnp.float32)
    fn = self.variant(functools.partial(pgpo, group_size=3, threshold_mode=mode, max_weight=cap))
    got = fn(rewards, dep, mask)
    want = np_grpo(rewards, 3)[:, None] * np_weights(dep, mask, mode=mode, cap=cap)
    want[np.repeat(np.ptp(np.asarray(rewards).reshape(-1, 3), 1) == 0, 3)] = 0.0
    chex.assert_trees_all_close(got, want.astype(np.float32), rtol=2e-4, atol=2e-5)
    chex.assert_shape(got, (6, 11))
