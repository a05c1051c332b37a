"""The clipped policy loss against a NumPy transcription of verl's compute_policy_loss/agg_loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpo_jax.rl.losses import (
  LOSS_AGGREGATIONS,
  aggregate,
  kl_penalty,
  loss_normalizers,
  policy_loss,
)

MODES = sorted(LOSS_AGGREGATIONS)


# ----------------------------------------------------------------------------- NumPy reference


def np_agg(loss, mask, mode, horizon=None):
  loss, mask = np.asarray(loss, np.float64), np.asarray(mask, bool)
  lm = np.where(mask, loss, 0.0)
  nonempty = mask.any(-1)
  if mode == "token-mean":
    return lm.sum() / mask.sum()
  seq_sum = lm.sum(-1)
  if mode == "seq-mean-token-sum":
    return seq_sum[nonempty].mean()
  if mode == "seq-mean-token-mean":
    return (seq_sum[nonempty] / mask.sum(-1)[nonempty]).mean()
  if mode == "seq-mean-token-sum-norm":
    return seq_sum[nonempty].mean() / (mask.shape[-1] if horizon is None else horizon)
  raise AssertionError(mode)


def np_pg_tokens(logp, old, adv, clip_low, clip_high, dual_clip=None):
  logp, old, adv = (np.asarray(x, np.float64) for x in (logp, old, adv))
  ratio = np.exp(np.clip(logp - old, -20, 20))
  l1 = -adv * ratio
  l2 = -adv * np.clip(ratio, 1 - clip_low, 1 + clip_high)
  loss = np.maximum(l1, l2)
  if dual_clip is not None:
    loss = np.where(adv < 0, np.minimum(loss, -adv * dual_clip), loss)
  return loss, l2 > l1, ratio


def random_batch(seed, b=6, t=9, p_mask=0.75):
  rng = np.random.default_rng(seed)
  old = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32)
  logp = (old + rng.normal(0.0, 0.4, (b, t))).astype(np.float32)
  adv = rng.normal(0.0, 1.0, (b, t)).astype(np.float32)
  mask = rng.random((b, t)) < p_mask
  mask[0, :] = True
  mask[-1, :] = False  # a fully padded row
  return logp, old, adv, mask


# ----------------------------------------------------------------------------- loss values


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_numpy(mode, dual_clip):
  logp, old, adv, mask = random_batch(0)
  loss, metrics = policy_loss(
    jnp.asarray(logp),
    jnp.asarray(old),
    jnp.asarray(adv),
    jnp.asarray(mask),
    0.2,
    0.28,
    mode,
    dual_clip=dual_clip,
  )
  tok, clipped, ratio = np_pg_tokens(logp, old, adv, 0.2, 0.28, dual_clip)
  np.testing.assert_allclose(loss, np_agg(tok, mask, mode), rtol=1e-5)
  np.testing.assert_allclose(metrics["clip_frac"], clipped[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["ratio_mean"], ratio[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_max"], ratio[mask].max(), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_min"], ratio[mask].min(), rtol=1e-5)
  d = (logp - old).astype(np.float64)[mask]
  np.testing.assert_allclose(metrics["ppo_kl"], (-d).mean(), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(metrics["approx_kl"], (np.exp(d) - 1 - d).mean(), rtol=1e-4)


def test_seq_mean_token_sum_norm_horizon():
  logp, old, adv, mask = random_batch(1)
  args = [jnp.asarray(x) for x in (logp, old, adv, mask)]
  loss_t, _ = policy_loss(*args, agg="seq-mean-token-sum-norm")
  loss_h, _ = policy_loss(*args, agg="seq-mean-token-sum-norm", loss_horizon=2048)
  tok, _, _ = np_pg_tokens(logp, old, adv, 0.2, 0.28)
  np.testing.assert_allclose(loss_h, np_agg(tok, mask, "seq-mean-token-sum-norm", 2048), rtol=1e-5)
  np.testing.assert_allclose(loss_h * 2048, loss_t * mask.shape[1], rtol=1e-5)


def test_clip_regions_values_and_gradients():
  # one token per region; ε_low = 0.2, ε_high = 0.28, dual clip c = 3
  ratio = np.array([0.5, 0.5, 1.5, 1.5, 1.0, 1.1, 0.9, 5.0, 5.0, 1.2])
  adv = np.array([-1.0, 1.0, 1.0, -1.0, 0.7, 1.0, -1.0, -2.0, 2.0, 1.0])
  expect_clipped = np.array([1, 0, 1, 0, 0, 0, 0, 0, 1, 0], bool)  # constant surrogate selected
  expect_dual = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 0], bool)  # A < 0 and ρ > c
  old = np.log(np.full(10, 0.3))
  logp = old + np.log(ratio)
  mask = np.ones(10, bool)
  mask[-1] = False  # padding: no loss, no gradient
  to = lambda x: jnp.asarray(x, jnp.float32)[None]  # noqa: E731

  def f(lp):
    return policy_loss(lp, to(old), to(adv), jnp.asarray(mask)[None], dual_clip=3.0)

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(to(logp))
  n = mask.sum()
  tok, clipped, _ = np_pg_tokens(logp, old, adv, 0.2, 0.28, 3.0)
  np.testing.assert_array_equal(clipped[mask], expect_clipped[mask])
  np.testing.assert_allclose(loss, tok[mask].sum() / n, rtol=1e-6)
  # token-mean gradient: -A ρ / N where the ratio term is active, 0 where clipped / dual-clipped / padded
  active = mask & ~expect_clipped & ~expect_dual
  np.testing.assert_allclose(
    np.asarray(grad)[0], np.where(active, -adv * ratio / n, 0.0), rtol=1e-5, atol=1e-8
  )
  np.testing.assert_allclose(metrics["clip_frac"], expect_clipped[mask].mean())
  np.testing.assert_allclose(metrics["clip_frac_low"], 1 / n)
  np.testing.assert_allclose(metrics["clip_frac_high"], 2 / n)
  np.testing.assert_allclose(metrics["dual_clip_frac"], 1 / n)
  # the dual-clipped token's loss is -A·c
  np.testing.assert_allclose(tok[7], 2.0 * 3.0)


# The aggregation's weight on each valid token's loss, written out per mode (verl's agg_loss).
def np_agg_weight(mask, mode):
  mask = np.asarray(mask, bool)
  lengths = mask.sum(-1, keepdims=True)
  n_seq = mask.any(-1).sum()
  return {
    "token-mean": np.where(mask, 1.0 / mask.sum(), 0.0),
    "seq-mean-token-sum": np.where(mask, 1.0 / n_seq, 0.0),
    "seq-mean-token-mean": np.where(mask, 1.0 / np.maximum(lengths, 1) / n_seq, 0.0),
    "seq-mean-token-sum-norm": np.where(mask, 1.0 / n_seq / mask.shape[1], 0.0),
  }[mode]


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("mode", MODES)
def test_gradient_matches_finite_difference_weighting(mode, dual_clip):
  """jax.grad of the loss equals central finite differences of the float64 NumPy reference, and the
  closed form -A ρ · (aggregation weight) on tokens whose ratio term is active."""
  logp, old, adv, mask = random_batch(2)
  adv[
    1, :3
  ] = -4.0  # with logp - old ~ N(0, 0.4) a few ratios pass c = 3 only with large |A|: force some
  logp[1, :3] = old[1, :3] + np.log([3.5, 4.0, 0.5])
  mask[1, :3] = True
  grad = np.asarray(
    jax.grad(
      lambda lp: policy_loss(
        lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), agg=mode, dual_clip=dual_clip
      )[0]
    )(jnp.asarray(logp))
  )

  def ref_loss(lp):
    return np_agg(np_pg_tokens(lp, old, adv, 0.2, 0.28, dual_clip)[0], mask, mode)

  h = 1e-6
  lp64 = logp.astype(np.float64)
  fd = np.zeros(logp.shape)
  for idx in np.ndindex(logp.shape):
    step = np.zeros(logp.shape)
    step[idx] = h
    fd[idx] = (ref_loss(lp64 + step) - ref_loss(lp64 - step)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-7)

  tok, clipped, ratio = np_pg_tokens(logp, old, adv, 0.2, 0.28, dual_clip)
  dual = (adv < 0) & (tok == -adv * dual_clip) if dual_clip else np.zeros(mask.shape, bool)
  if dual_clip:
    assert dual[1, :2].all() and not dual[1, 2]  # the test does cover the dual-clipped branch
  want = np.where(mask & ~clipped & ~dual, -adv * ratio * np_agg_weight(mask, mode), 0.0)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)


def test_padding_garbage_does_not_leak():
  logp, old, adv, mask = random_batch(3)
  bad = lambda x: jnp.where(jnp.asarray(mask), jnp.asarray(x), jnp.nan)  # noqa: E731
  f = lambda lp: policy_loss(lp, bad(old), bad(adv), jnp.asarray(mask))[0]  # noqa: E731
  loss, grad = jax.value_and_grad(f)(bad(logp))
  clean_loss = policy_loss(*(jnp.asarray(x) for x in (logp, old, adv, mask)))[0]
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
  assert np.all(np.asarray(grad)[~mask] == 0.0)


# ----------------------------------------------------------------------------- KL and entropy terms


def test_kl_estimators_match_numpy():
  rng = np.random.default_rng(4)
  logp = np.log(rng.uniform(0.01, 1, (3, 7))).astype(np.float32)
  ref = (logp + rng.normal(0, 1.0, (3, 7))).astype(np.float32)
  d = logp.astype(np.float64) - ref
  k3 = np.clip(np.exp(-d) + d - 1, -10, 10)
  for name, want in (("k1", d), ("k2", 0.5 * d**2), ("k3", k3)):
    np.testing.assert_allclose(
      kl_penalty(jnp.asarray(logp), jnp.asarray(ref), name), want, rtol=1e-5, atol=1e-6
    )
  with pytest.raises(ValueError, match="valid"):
    kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "k4")


def test_kl_estimators_by_hand_with_verl_clamps():
  """π_θ(x) = 1/2, π_ref(x) = 1/4: k1 = ln 2, k2 = (ln 2)²/2, k3 = r - ln r - 1 with r = 1/2.
  k3 is verl/EasyR1's low_var_kl: log r clamped to [-20, 20], the value to [-10, 10]."""
  ln2 = float(np.log(2.0))
  logp = jnp.array([[np.log(0.5), 0.0, -30.0, -1.0]], jnp.float32)
  ref = jnp.array([[np.log(0.25), -30.0, 0.0, -1.0]], jnp.float32)
  k1, k2, k3 = (np.asarray(kl_penalty(logp, ref, e))[0] for e in ("k1", "k2", "k3"))
  np.testing.assert_allclose(k1, [ln2, 30.0, -30.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(k2, [ln2**2 / 2, 450.0, 450.0, 0.0], rtol=1e-6)
  # log r = -30 -> -20: e^-20 + 20 - 1 = 19.0 -> 10; log r = 30 -> 20: e^20 - 21 -> 10.
  np.testing.assert_allclose(k3, [0.5 + ln2 - 1.0, 10.0, 10.0, 0.0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_term_gradient_by_hand(estimator):
  """d/d log π_θ of kl_coef · token-mean(kl): k1 -> 1, k2 -> log π_θ - log π_ref, k3 -> 1 - r
  (r = π_ref/π_θ), 0 where the k3 value is clamped; each times kl_coef / N_tok. The advantage is 0,
  so the surrogate adds no gradient."""
  logp, old, _, mask = random_batch(11)
  rng = np.random.default_rng(12)
  ref = (logp + rng.normal(0, 0.5, logp.shape)).astype(np.float32)
  ref[0, 0] = logp[0, 0] + 15.0  # r = e^15: k3 = e^15 - 16 > 10 is clamped: no gradient
  zero_adv = jnp.zeros_like(jnp.asarray(logp))
  coef = 0.3

  def loss(lp):
    return policy_loss(
      lp,
      jnp.asarray(old),
      zero_adv,
      jnp.asarray(mask),
      ref_logp_BxT=jnp.asarray(ref),
      kl_coef=coef,
      kl_estimator=estimator,
    )[0]

  d = logp.astype(np.float64) - ref
  per_token = {
    "k1": np.ones_like(d),
    "k2": d,
    "k3": np.where(np.exp(-d) + d - 1 > 10, 0.0, 1 - np.exp(-d)),
  }
  want = np.where(mask, coef * per_token[estimator] / mask.sum(), 0.0)
  np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(logp)), want, rtol=1e-4, atol=1e-8)
  if estimator == "k3":
    assert want[0, 0] == 0.0 and mask[0, 0]


# ----------------------------------------------------------------------------- k3 numerics


def float32_log_prob_pairs():
  """(logp, base) float32 log-prob pairs [N] whose differences d = logp - base span ±1e-8 … ±10,
  at bases from -1e-3 to -20 (the further from 0, the coarser the float32 grid of d), and d as
  float64: the exact difference of the float32 inputs (Sterbenz), what float32 arithmetic sees."""
  magnitudes = np.logspace(-8, 1, 46)
  d = np.concatenate([magnitudes, -magnitudes])
  bases = np.array([-1e-3, -1.0, -5.0, -20.0])
  base = np.repeat(bases, d.size).astype(np.float32)
  logp = (base.astype(np.float64) + np.tile(d, bases.size)).astype(np.float32)
  return logp, base, logp.astype(np.float64) - base.astype(np.float64)


def test_approx_kl_is_relatively_accurate_and_nonnegative():
  """approx_kl = ρ - 1 - log ρ per token against float64 (rel. error < 1e-5, >= 0). The direct form
  in float32 is 0 for |log ρ| up to ~3e-4 at |log p| >= 1, and ±3e-8 of noise nearer 0."""
  logp, old, d = float32_log_prob_pairs()

  def one_token(lp, o):
    one = jnp.ones((1, 1))
    return policy_loss(lp[None, None], o[None, None], one, one.astype(bool))[1]["approx_kl"]

  got = np.asarray(jax.jit(jax.vmap(one_token))(jnp.asarray(logp), jnp.asarray(old)), np.float64)
  want = np.expm1(d) - d
  assert np.all(got >= 0.0)
  assert np.all(got[d == 0.0] == 0.0)
  nz = d != 0.0
  assert nz.sum() > 0.8 * d.size and np.abs(d[nz]).min() < 2e-8  # small nonzero ratios are tested
  np.testing.assert_allclose(got[nz], want[nz], rtol=1e-5, atol=0)


def test_kl_k3_is_relatively_accurate_with_verl_clamps_and_gradient_1_minus_r():
  """The k3 KL term r - log r - 1 (r = π_ref/π_θ) against float64: rel. error < 1e-5 below the value
  clamp (10), exactly 10 above it; its gradient in log π_θ is 1 - r where unclamped, 0 where the
  value or log r (±20) is clamped."""
  logp, ref, d = float32_log_prob_pairs()
  logp = np.concatenate([logp, np.float32([-1.0, -30.0])])
  ref = np.concatenate([ref, np.float32([-30.0, -1.0])])  # log r = -29 and 29: clamped to ±20
  d = logp.astype(np.float64) - ref
  value, grad = jax.vmap(jax.value_and_grad(lambda lp, r: kl_penalty(lp, r, "k3")))(
    jnp.asarray(logp), jnp.asarray(ref)
  )
  value, grad = np.asarray(value, np.float64), np.asarray(grad, np.float64)
  exact = np.expm1(-np.clip(d, -20, 20)) + np.clip(d, -20, 20)
  clamped = exact > 10.0
  assert clamped.sum() >= 10 and (~clamped).sum() > 300
  np.testing.assert_array_equal(value[clamped], 10.0)
  assert np.all(value >= 0.0)
  np.testing.assert_allclose(value[~clamped], exact[~clamped], rtol=1e-5, atol=0)
  np.testing.assert_array_equal(grad[clamped], 0.0)
  np.testing.assert_allclose(grad[~clamped], -np.expm1(-d[~clamped]), rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_and_entropy_terms(estimator):
  logp, old, adv, mask = random_batch(5)
  rng = np.random.default_rng(6)
  ref = (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32)
  ent = rng.uniform(0, 3, logp.shape).astype(np.float32)
  args = [jnp.asarray(x) for x in (logp, old, adv, mask)]
  base, _ = policy_loss(*args)
  loss, metrics = policy_loss(
    *args,
    ref_logp_BxT=jnp.asarray(ref),
    kl_coef=0.1,
    kl_estimator=estimator,
    entropy_BxT=jnp.asarray(ent),
    entropy_coef=0.01,
  )
  kl_tok = np.asarray(kl_penalty(jnp.asarray(logp), jnp.asarray(ref), estimator))
  np.testing.assert_allclose(
    metrics["kl_loss"], np_agg(kl_tok, mask, "token-mean"), rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(metrics["entropy"], ent[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(
    loss, base + 0.1 * metrics["kl_loss"] - 0.01 * metrics["entropy"], rtol=1e-5
  )
  # gradient of the entropy bonus w.r.t. the entropy input: -coef / N on valid tokens
  g = jax.grad(lambda e: policy_loss(*args, entropy_BxT=e, entropy_coef=0.01)[0])(jnp.asarray(ent))
  np.testing.assert_allclose(g, np.where(mask, -0.01 / mask.sum(), 0.0), rtol=1e-5)


def test_options_off_by_default_and_validated():
  logp, old, adv, mask = random_batch(7)
  args = [jnp.asarray(x) for x in (logp, old, adv, mask)]
  _, metrics = policy_loss(*args)
  assert "kl_loss" not in metrics and "entropy" not in metrics and "dual_clip_frac" not in metrics
  with pytest.raises(ValueError, match="ref_logp"):
    policy_loss(*args, kl_coef=0.1)
  with pytest.raises(ValueError, match="dual_clip"):
    policy_loss(*args, dual_clip=0.5)
  with pytest.raises(ValueError, match=r"valid: \['seq-mean-token-mean'"):
    policy_loss(*args, agg="sum")


# ----------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("mode", MODES)
def test_microbatch_normalisers_make_accumulation_exact(mode):
  logp, old, adv, mask = random_batch(8, b=8, t=7, p_mask=0.6)
  mask[3] = False  # an empty sequence inside one micro-batch
  norms = loss_normalizers(jnp.asarray(mask))

  def full(lp):
    return policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), agg=mode)[0]

  def accumulated(lp):
    total = 0.0
    for k in range(4):  # strided micro-batches, as the train step makes them
      rows = slice(k, None, 4)
      total += policy_loss(
        lp[rows],
        jnp.asarray(old[rows]),
        jnp.asarray(adv[rows]),
        jnp.asarray(mask[rows]),
        agg=mode,
        **norms,
      )[0]
    return total

  lp = jnp.asarray(logp)
  np.testing.assert_allclose(accumulated(lp), full(lp), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(accumulated)(lp), jax.grad(full)(lp), rtol=1e-6, atol=1e-9)

  # without the global normalisers the micro-batch means do NOT add up (the test can fail)
  def naive(lp):
    return (
      sum(
        policy_loss(
          lp[k::4],
          jnp.asarray(old[k::4]),
          jnp.asarray(adv[k::4]),
          jnp.asarray(mask[k::4]),
          agg=mode,
        )[0]
        for k in range(4)
      )
      / 4
    )

  assert not np.allclose(jax.grad(naive)(lp), jax.grad(full)(lp), rtol=1e-3)


def test_loss_normalizers():
  mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], bool)
  norms = loss_normalizers(mask)
  assert float(norms["token_normalizer"]) == 3.0 and float(norms["seq_normalizer"]) == 2.0


def test_jitted_loss_matches_numpy():
  logp, old, adv, mask = random_batch(9)
  args = [jnp.asarray(x) for x in (logp, old, adv, mask)]
  tok, clipped, _ = np_pg_tokens(logp, old, adv, 0.2, 0.28, 3.0)
  for mode in MODES:
    loss, metrics = jax.jit(lambda *a: policy_loss(*a, agg=mode, dual_clip=3.0))(*args)
    np.testing.assert_allclose(loss, np_agg(tok, mask, mode), rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_frac"], clipped[mask].mean(), rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_packed_rows_with_sequence_lengths_match_numpy(mode):
  """Sequences laid back to back in rows (packing): with each token's sequence length, every mode
  gives the per-sequence (one per row) NumPy reference."""
  logp, old, adv, mask = random_batch(4, b=7, t=6)
  mask = np.arange(6)[None] < np.array([6, 2, 0, 5, 1, 3, 4])[:, None]  # prefix masks, one empty
  pg, _, _ = np_pg_tokens(logp, old, adv, 0.2, 0.28)
  want = np_agg(pg, mask, mode, horizon=6.0)
  # Pack the valid tokens of all sequences into 2 rows of 16 (order: sequences 0..6).
  lengths = mask.sum(-1)
  flat = lambda x: np.concatenate([x[i, :n] for i, n in enumerate(lengths)])  # noqa: E731
  n_tok = int(lengths.sum())
  rows = lambda x, fill: np.concatenate([x, np.full(32 - n_tok, fill, x.dtype)]).reshape(2, 16)  # noqa: E731
  seq_len = rows(np.repeat(lengths, lengths).astype(np.float32), 0.0)
  loss, _ = policy_loss(
    jnp.asarray(rows(flat(logp), 0.0)),
    jnp.asarray(rows(flat(old), 0.0)),
    jnp.asarray(rows(flat(adv), 0.0)),
    jnp.asarray(rows(flat(mask), False)),
    agg=mode,
    loss_horizon=6.0,
    seq_length_BxT=jnp.asarray(seq_len),
  )
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  if mode == "seq-mean-token-sum-norm":
    with pytest.raises(ValueError, match="loss_horizon"):
      aggregate(jnp.ones((2, 3)), jnp.ones((2, 3), bool), mode, seq_length_BxT=jnp.ones((2, 3)))
