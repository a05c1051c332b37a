"""Pure scoring maths: k3, chunked log-probs / entropy / full KL, two-view estimators."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgpo_jax.rl import scoring
from pgpo_jax.rl.scoring import (
  DEPENDENCY_ESTIMATORS,
  full_kl_chunked,
  get_dependency_estimator,
  k3,
  token_logprobs_chunked,
)

B, T, D, V = 2, 13, 8, 17


def _inputs(seed=0, t=T):
  k1, k2, k3_, k4 = jax.random.split(jax.random.key(seed), 4)
  h_img = jax.random.normal(k1, (B, t, D))
  h_blind = h_img + 0.5 * jax.random.normal(k2, (B, t, D))
  w = jax.random.normal(k3_, (D, V)) / np.sqrt(D) * 3
  targets = jax.random.randint(k4, (B, t), 0, V)
  return h_img, h_blind, w, targets


def _ref_logp_entropy(h, w, targets, temperature=1.0):
  logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w) / temperature, axis=-1)
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return tok, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _ref_kl(h_i, h_b, w):
  lp_i = jax.nn.log_softmax(h_i @ w, axis=-1)
  lp_b = jax.nn.log_softmax(h_b @ w, axis=-1)
  return jnp.sum(jnp.exp(lp_i) * (lp_i - lp_b), axis=-1)


# ----------------------------------------------------------------------------- k3

_logp = st.floats(-30.0, 0.0, width=32)


@given(
  hnp.arrays(np.float32, (4, 8), elements=_logp), hnp.arrays(np.float32, (4, 8), elements=_logp)
)
@settings(max_examples=60, deadline=None)
def test_k3_nonnegative_and_accurate(lp_i, lp_b):
  s = np.asarray(k3(jnp.asarray(lp_i), jnp.asarray(lp_b)))
  assert np.all(s >= 0.0) and np.all(np.isfinite(s))
  d = lp_i.astype(np.float64) - lp_b
  want = np.expm1(-d) + d
  np.testing.assert_allclose(s, want, rtol=2e-5, atol=1e-30 + 1e-6 * np.abs(d).max(initial=0) ** 2)


@given(hnp.arrays(np.float32, (4, 8), elements=_logp))
@settings(max_examples=30, deadline=None)
def test_k3_zero_when_views_agree(lp):
  assert np.all(np.asarray(k3(jnp.asarray(lp), jnp.asarray(lp))) == 0.0)


def test_k3_small_ratio_is_relatively_accurate():
  d = np.array([1e-5, -1e-4, 3e-3, -0.05, 0.099, 0.1, -0.2], np.float64)
  s = np.asarray(k3(jnp.asarray(d, jnp.float32), jnp.zeros(d.shape)))
  d32 = np.asarray(jnp.asarray(d, jnp.float32), np.float64)
  np.testing.assert_allclose(s, np.expm1(-d32) + d32, rtol=1e-5)


def test_k3_matches_float64_for_log_ratios_from_1e_8_to_10():
  """S = e^{-d} - 1 + d from float32 log-prob pairs (d = log π_I - log π_∅ as a difference of
  log-probs, at |log p| from 1e-3 to 20) against float64 on the same inputs: within 1e-5 relative,
  >= 0, for |d| from 1e-8 to 10 of either sign (the Taylor branch and the direct one)."""
  mag = np.logspace(-8, 1, 91)
  d = np.concatenate([mag, -mag])
  lp_b = np.repeat(np.array([-1e-3, -1.0, -5.0, -20.0]), d.size).astype(np.float32)
  lp_i = (lp_b.astype(np.float64) + np.tile(d, 4)).astype(np.float32)
  exact_d = lp_i.astype(np.float64) - lp_b.astype(np.float64)
  s = np.asarray(k3(jnp.asarray(lp_i[None]), jnp.asarray(lp_b[None]))[0], np.float64)
  assert np.all(s >= 0.0) and np.all(s[exact_d == 0.0] == 0.0)
  nz = exact_d != 0.0
  assert np.abs(exact_d[nz]).min() < 2e-8 and np.abs(exact_d).max() > 9.0
  want = np.expm1(-exact_d[nz]) + exact_d[nz]
  np.testing.assert_allclose(s[nz], want, rtol=1e-5, atol=0)


def test_k3_mask_and_clamp():
  lp_i = jnp.array([[-0.1, -5.0, -30.0, -1.0]])
  lp_b = jnp.array([[-0.2, -0.1, -0.1, jnp.nan]])
  mask = jnp.array([[1, 1, 1, 0]], bool)
  s = np.asarray(k3(lp_i, lp_b, mask))
  assert s[0, 3] == 0.0 and np.all(np.isfinite(s))
  s_c = np.asarray(k3(lp_i, lp_b, mask, clamp_log_ratio=2.0))
  np.testing.assert_allclose(s_c[0, 1:3], np.exp(2.0) - 1 - 2.0, rtol=1e-6)  # d clamped to -2
  np.testing.assert_allclose(s_c[0, 0], s[0, 0], rtol=1e-6)


# ----------------------------------------------------------------------------- chunked log-probs


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])
def test_chunked_logprobs_equal_unchunked(chunk_size):
  h, _, w, targets = _inputs()
  logp, ent = token_logprobs_chunked(h, w, targets, chunk_size, return_entropy=True)
  ref_logp, ref_ent = _ref_logp_entropy(h, w, targets)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
  assert logp.dtype == jnp.float32
  only = token_logprobs_chunked(h, w, targets, chunk_size)
  np.testing.assert_allclose(only, logp, rtol=1e-6)


def test_chunked_logprobs_temperature_bf16_and_jit():
  h, _, w, targets = _inputs(1)
  got = jax.jit(lambda *a: token_logprobs_chunked(*a, chunk_size=4, temperature=0.7))(h, w, targets)
  np.testing.assert_allclose(got, _ref_logp_entropy(h, w, targets, 0.7)[0], rtol=1e-5, atol=1e-5)
  got16 = token_logprobs_chunked(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), targets, 4)
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(got16, _ref_logp_entropy(h, w, targets)[0], atol=0.15)


def test_chunked_logprobs_gradient_equals_unchunked():
  h, _, w, targets = _inputs(2)
  weights = jax.random.normal(jax.random.key(9), targets.shape)
  f_chunk = lambda h, w: jnp.sum(weights * token_logprobs_chunked(h, w, targets, 4))  # noqa: E731
  f_ref = lambda h, w: jnp.sum(weights * _ref_logp_entropy(h, w, targets)[0])  # noqa: E731
  g_chunk = jax.grad(f_chunk, argnums=(0, 1))(h, w)
  g_ref = jax.grad(f_ref, argnums=(0, 1))(h, w)
  for a, b in zip(g_chunk, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _max_intermediate_elements(jaxpr) -> int:
  """Largest array (in elements) produced anywhere in a jaxpr, sub-jaxprs included."""
  biggest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = getattr(var.aval, "shape", ())
      biggest = max(biggest, int(np.prod(shape)) if shape else 1)
    for param in eqn.params.values():
      subs = param if isinstance(param, (tuple, list)) else [param]
      for sub in subs:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          biggest = max(biggest, _max_intermediate_elements(inner))
  return biggest


def test_full_logits_are_never_materialised():
  t, chunk = 64, 8
  h, h_b, w, targets = _inputs(3, t=t)
  full = B * t * V  # the [B, T, V] logits
  fwd_bwd = jax.make_jaxpr(
    jax.grad(lambda h, w: token_logprobs_chunked(h, w, targets, chunk).sum(), (0, 1))
  )(h, w)
  assert _max_intermediate_elements(fwd_bwd.jaxpr) < full // 2
  kl = jax.make_jaxpr(lambda a, b: full_kl_chunked(a, b, w, chunk, return_entropy=True))(h, h_b)
  assert _max_intermediate_elements(kl.jaxpr) < full // 2
  # sanity: the unchunked reference does materialise them (the check can fail)
  ref = jax.make_jaxpr(lambda h: _ref_logp_entropy(h, w, targets)[0])(h)
  assert _max_intermediate_elements(ref.jaxpr) >= full


# ----------------------------------------------------------------------------- full KL


@pytest.mark.parametrize("chunk_size", [3, 13, 100])
def test_full_kl_chunked_equals_reference(chunk_size):
  h_i, h_b, w, _ = _inputs(4)
  mask = jnp.ones((B, T), bool).at[1, 10:].set(False)
  kl, ent = full_kl_chunked(h_i, h_b, w, chunk_size, mask_BxT=mask, return_entropy=True)
  np.testing.assert_allclose(kl, jnp.where(mask, _ref_kl(h_i, h_b, w), 0.0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    ent,
    jnp.where(mask, _ref_logp_entropy(h_i, w, jnp.zeros((B, T), int))[1], 0.0),
    rtol=1e-5,
    atol=1e-5,
  )
  assert np.all(np.asarray(kl) >= 0.0) and np.all(np.asarray(kl)[mask] > 0.0)
  np.testing.assert_array_equal(full_kl_chunked(h_i, h_i, w, chunk_size), np.zeros((B, T)))


def test_k3_is_unbiased_for_full_kl():
  """E_{x ~ π_I}[k3(x)] = KL(π_I‖π_∅): enumerate every vocabulary item as the target."""
  h_i, h_b, w, _ = _inputs(5, t=3)
  targets = jnp.broadcast_to(jnp.arange(V)[:, None], (V, 3))  # row v scores token v everywhere
  rep = lambda h: jnp.broadcast_to(h[0], (V, 3, D))  # noqa: E731
  scores = DEPENDENCY_ESTIMATORS["k3"](
    rep(h_i), rep(h_b), w, targets, jnp.ones((V, 3), bool), chunk_size=2
  )
  p_img = jnp.exp(scores.logp_image_BxT)  # [V, 3]: π_I(v) at each position
  expectation = jnp.sum(p_img * scores.dependency_BxT, axis=0)
  np.testing.assert_allclose(expectation, _ref_kl(h_i, h_b, w)[0], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- two-view estimators


def test_two_view_estimators_match_references():
  """Each estimator's fields against full-logit references (log_softmax over [B, T, V]) in float64."""
  h_i, h_b, w, targets = _inputs(6)
  mask = jnp.ones((B, T), bool).at[0, 11:].set(False)
  m = np.asarray(mask)
  ref_i, ref_ent = (np.asarray(x, np.float64) for x in _ref_logp_entropy(h_i, w, targets))
  ref_b = np.asarray(_ref_logp_entropy(h_b, w, targets)[0], np.float64)
  z = lambda x: np.where(m, x, 0.0)  # noqa: E731
  k = get_dependency_estimator("k3")(h_i, h_b, w, targets, mask, chunk_size=5, clamp_log_ratio=None)
  np.testing.assert_allclose(k.logp_image_BxT, z(ref_i), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(k.logp_blind_BxT, z(ref_b), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(k.entropy_BxT, z(ref_ent), rtol=1e-5, atol=1e-5)
  d = ref_i - ref_b
  np.testing.assert_allclose(k.dependency_BxT, z(np.expm1(-d) + d), rtol=1e-4, atol=1e-5)
  f = get_dependency_estimator("full_kl")(h_i, h_b, w, targets, mask, chunk_size=5)
  np.testing.assert_allclose(
    f.dependency_BxT, z(np.asarray(_ref_kl(h_i, h_b, w))), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(f.logp_image_BxT, z(ref_i), rtol=1e-5, atol=1e-5)
  # scores are constants
  g = jax.grad(
    lambda h: get_dependency_estimator("k3")(h, h_b, w, targets, mask).dependency_BxT.sum()
  )(h_i)
  assert np.all(np.asarray(g) == 0.0)
  with pytest.raises(ValueError, match=r"valid: \['full_kl', 'k3'\]"):
    get_dependency_estimator("kl")
  assert set(scoring.DEPENDENCY_ESTIMATORS) == {"k3", "full_kl"}
