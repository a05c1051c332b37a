"""Packed (padding-free) sequences give the padded layout's numbers: scoring, log-probs, every loss
aggregation and a micro-batched optimizer step. The padded layout is the reference (it is itself
checked against teacher-forced HF-parity forwards in test_sequences.py)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from pgpo_jax import config as config_lib
from pgpo_jax import programs
from pgpo_jax import train_step as train_step_lib
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.rl import losses, packed_passes, packing, sequences
from tests.hf_utils import left_pad, make_ids, random_pixels

G, L = 2, 7
PROMPT_GRIDS = ([(1, 4, 8)], [(1, 6, 4), (1, 2, 4)], [(1, 2, 2)], [(1, 4, 4)])
LENGTHS = [7, 3, 0, 5, 1, 6, 7, 7]  # valid tokens per response; one empty (a filler row)
ROW = 48  # packed row length: 2-3 sequences a row


@pytest.fixture(scope="module")
def setup(tiny_hf):
  model = qwen.from_pretrained(tiny_hf[1])
  rng = np.random.default_rng(0)
  g0, g1, g2, g3 = PROMPT_GRIDS
  ids, am = left_pad(
    [
      make_ids(rng, g0),
      make_ids(rng, g1, pre=9),
      make_ids(rng, g2, pre=1, post=2),
      make_ids(rng, g3, pre=2),
    ]
  )
  grids = np.asarray(g0 + g1 + g2 + g3)
  pixels = random_pixels(rng, g0 + g1 + g2 + g3)
  response = rng.integers(10, 400, (len(LENGTHS), L)).astype(np.int32)
  rmask = np.arange(L)[None] < np.asarray(LENGTHS)[:, None]
  batch = sequences.make_sequence_batch(model.cfg, ids, am, pixels, grids, response, rmask)
  return model, batch


def _pack(model, batch, units, blind=True):
  return packing.pack_sequences(batch, model.cfg.image_token_id, units, ROW, blind=blind)


def test_units_are_balanced_by_length():
  assign = packing._assign_units(np.array([10.0, 1, 9, 8, 1, 1]), 3, balance=True)
  assert sorted(assign.reshape(-1).tolist()) == list(range(6))
  assert sorted(map(sorted, assign.tolist())) == [[0, 5], [1, 3], [2, 4]]  # loads 11, 9, 10
  np.testing.assert_array_equal(
    packing._assign_units(np.ones(6), 3, balance=False), [[0, 1], [2, 3], [4, 5]]
  )


@pytest.mark.parametrize("units", [1, 2, 4])
@pytest.mark.parametrize("estimator", ["k3", "full_kl"])
def test_packed_scoring_equals_padded(setup, units, estimator):
  """Units of 4, 2 (prompts dealt out of order: each segment must find its own prompt's image
  features) and 1 prompt."""
  model, batch = setup
  packed, slot = _pack(model, batch, units)
  if units == 2:
    load = [sum(LENGTHS[p * G : (p + 1) * G]) + 2 * batch.prompt_mask[p].sum() for p in range(4)]
    assert not (packing._assign_units(np.array(load, float), 2, True) == [[0, 1], [2, 3]]).all()
  assert packed.image.ids.shape[0] == units and packed.image.ids.shape[2] == ROW
  # Several sequences share a row: packing does something.
  assert (packed.image.segment.max(axis=-1) > 1).any()
  ref = jax.jit(lambda m, b: sequences.score_rollout(m, b, estimator=estimator, chunk_size=4))(
    model, batch
  )
  got = jax.jit(lambda m, b: packing.score_rollout(m, b, estimator=estimator, chunk_size=4))(
    model, packed
  )
  rmask = np.asarray(batch.flat_response_mask)
  for name in ("logp_image_BxT", "logp_blind_BxT", "dependency_BxT", "entropy_BxT"):
    g = packing.unpack(getattr(got, name), slot)
    np.testing.assert_allclose(
      g, np.where(rmask, np.asarray(getattr(ref, name)), 0), atol=2e-5, err_msg=name
    )


def test_packed_image_view_only_equals_padded(setup):
  model, batch = setup
  packed, slot = _pack(model, batch, 2, blind=False)
  ref = jax.jit(lambda m, b: sequences.score_rollout(m, b, chunk_size=4, blind=False))(model, batch)
  got = jax.jit(lambda m, b: packing.score_rollout(m, b, chunk_size=4, blind=False))(model, packed)
  rmask = np.asarray(batch.flat_response_mask)
  for name in ("logp_image_BxT", "entropy_BxT"):
    np.testing.assert_allclose(
      packing.unpack(getattr(got, name), slot),
      np.where(rmask, np.asarray(getattr(ref, name)), 0),
      atol=2e-5,
      err_msg=name,
    )


def test_segments_do_not_see_each_other(setup):
  """Changing one sequence's response changes no other sequence's scores (the rows are shared)."""
  model, batch = setup
  packed, slot = _pack(model, batch, 1)
  score = jax.jit(lambda m, b: packing.score_rollout(m, b, chunk_size=4))
  base = packing.unpack(score(model, packed).logp_image_BxT, slot)
  other = np.array(batch.response)
  other[0, 0, :] = (other[0, 0, :] + 17) % 400 + 10  # response 0 only
  packed2, slot2 = _pack(model, dataclass_replace(batch, response=other), 1)
  np.testing.assert_array_equal(slot2, slot)
  changed = packing.unpack(score(model, packed2).logp_image_BxT, slot)
  assert np.abs(changed[0] - base[0]).max() > 1e-3
  np.testing.assert_allclose(changed[1:], base[1:], atol=1e-6)


def dataclass_replace(b, **kw):
  return b.__class__(**{**b.__dict__, **kw})


def _padded_loss(c_agg, horizon):
  def loss_fn(model, b):
    seq = b["seq"]
    logp = sequences.response_logprobs(model, seq, chunk_size=4)
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    return losses.policy_loss(
      logp,
      flat(b["old_logp"]),
      flat(b["adv"]),
      seq.flat_response_mask,
      agg=c_agg,
      loss_horizon=horizon,
      token_normalizer=b["token_normalizer"],
      seq_normalizer=b["seq_normalizer"],
    )

  return loss_fn


def _packed_loss(c_agg, horizon):
  def loss_fn(model, b):
    pb = b["packed"]
    logp = packing.response_logprobs(model, pb, chunk_size=4)
    return losses.policy_loss(
      logp,
      b["old_logp"],
      b["adv"],
      pb.mask,
      agg=c_agg,
      loss_horizon=horizon,
      token_normalizer=b["token_normalizer"],
      seq_normalizer=b["seq_normalizer"],
      seq_length_BxT=pb.seq_len,
    )

  return loss_fn


def _batches(model, batch, units):
  rng = np.random.default_rng(3)
  N = len(LENGTHS)
  old = rng.normal(-3.0, 0.5, (N, L)).astype(np.float32)
  adv = (rng.normal(size=(N, 1)) * rng.uniform(0.5, 1.5, (N, L))).astype(np.float32)
  norms = {k: np.asarray(v) for k, v in losses.loss_normalizers(batch.flat_response_mask).items()}
  padded = {"seq": batch, "old_logp": old.reshape(-1, G, L), "adv": adv.reshape(-1, G, L), **norms}
  pb, slot = _pack(model, batch, units, blind=False)
  shape = pb.target.shape
  packed = {
    "packed": pb,
    "old_logp": packing.pack_like(old, slot, shape),
    "adv": packing.pack_like(adv, slot, shape),
    **norms,
  }
  return padded, packed


def test_one_loss_aggregation_and_its_parameter_gradient_are_the_same_packed_and_padded(setup):
  """The whole loss through the model, packed vs padded: value, metrics and parameter gradient."""
  model, batch = setup
  padded, packed = _batches(model, batch, units=2)
  graphdef, state = nnx.split(model)

  def value_and_grad(loss_fn, b):
    f = lambda s: loss_fn(nnx.merge(graphdef, s), b)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, has_aux=True))(state)

  agg = "seq-mean-token-mean"
  (l_pad, m_pad), g_pad = value_and_grad(_padded_loss(agg, float(L)), padded)
  (l_pk, m_pk), g_pk = value_and_grad(_packed_loss(agg, float(L)), packed)
  assert abs(float(l_pad)) > 1e-4
  np.testing.assert_allclose(float(l_pk), float(l_pad), rtol=1e-5, atol=1e-7)
  for k in ("clip_frac", "ratio_mean", "approx_kl"):
    np.testing.assert_allclose(float(m_pk[k]), float(m_pad[k]), rtol=1e-5, atol=1e-7, err_msg=k)
  assert max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(g_pad)) > 1e-6
  for a, b in zip(jax.tree.leaves(g_pk), jax.tree.leaves(g_pad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def response_logps(setup):
  """(padded [N, L], packed [units, ROW], slot) response log-probs of one batch, both layouts."""
  model, batch = setup
  padded, packed = _batches(model, batch, units=2)
  _, slot = _pack(model, batch, 2, blind=False)
  lp_pad = jax.jit(lambda m, s: sequences.response_logprobs(m, s, chunk_size=4))(
    model, padded["seq"]
  )
  lp_pk = jax.jit(lambda m, b: packing.response_logprobs(m, b, chunk_size=4))(
    model, packed["packed"]
  )
  return padded, packed, np.asarray(lp_pad), np.asarray(lp_pk), slot


@pytest.mark.parametrize("agg", sorted(losses.LOSS_AGGREGATIONS))
def test_every_loss_aggregation_is_the_same_packed_and_padded(response_logps, agg):
  """Per aggregation: the loss, its metrics and its gradient with respect to the response log-probs.
  The parameter gradient is that gradient through the log-probs' VJP, which the test above checks
  through the whole model for one aggregation and which no aggregation changes, so the parameter
  gradients agree for every aggregation (without compiling the model's backward pass for each)."""
  padded, packed, lp_pad, lp_pk, slot = response_logps
  rmask = np.asarray(padded["seq"].flat_response_mask)
  np.testing.assert_allclose(packing.unpack(lp_pk, slot), np.where(rmask, lp_pad, 0), atol=2e-5)
  flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731

  def loss_pad(lp):
    return losses.policy_loss(
      lp,
      flat(padded["old_logp"]),
      flat(padded["adv"]),
      padded["seq"].flat_response_mask,
      agg=agg,
      loss_horizon=float(L),
      token_normalizer=padded["token_normalizer"],
      seq_normalizer=padded["seq_normalizer"],
    )

  def loss_pk(lp):
    pb = packed["packed"]
    return losses.policy_loss(
      lp,
      packed["old_logp"],
      packed["adv"],
      pb.mask,
      agg=agg,
      loss_horizon=float(L),
      token_normalizer=packed["token_normalizer"],
      seq_normalizer=packed["seq_normalizer"],
      seq_length_BxT=pb.seq_len,
    )

  (l_pad, m_pad), g_pad = jax.jit(jax.value_and_grad(loss_pad, has_aux=True))(lp_pad)
  (l_pk, m_pk), g_pk = jax.jit(jax.value_and_grad(loss_pk, has_aux=True))(lp_pk)
  assert abs(float(l_pad)) > 1e-4
  np.testing.assert_allclose(float(l_pk), float(l_pad), rtol=1e-5, atol=1e-7)
  for k in ("clip_frac", "ratio_mean", "approx_kl"):
    np.testing.assert_allclose(float(m_pk[k]), float(m_pad[k]), rtol=1e-5, atol=1e-7, err_msg=k)
  g_pad = np.asarray(g_pad)
  assert np.abs(g_pad).max() > 1e-6 and (g_pad[~rmask] == 0).all()
  np.testing.assert_allclose(packing.unpack(np.asarray(g_pk), slot), g_pad, rtol=1e-5, atol=1e-8)
  pk_mask = np.asarray(packed["packed"].mask)
  assert (np.asarray(g_pk)[~pk_mask] == 0).all()  # no gradient reaches padding or prompt slots


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_trainer_loss_with_kl_and_temperature_is_the_same_packed_and_padded(setup, kl_estimator):
  """`programs.rl_loss_fn` (the trainer's loss) at a rollout temperature != 1 with a KL term to π_ref:
  the packed update batch (`packed_passes.update_batch`, ref log-probs packed alongside) gives the
  padded batch's loss, `kl` and gradient."""
  model, batch = setup
  c = config_lib.base_config()
  c.rollout.temperature, c.loss.logprob_chunk, c.loss.agg = 0.7, 4, "seq-mean-token-mean"
  c.loss.kl_coef, c.loss.kl_estimator = 0.3, kl_estimator
  padded, _ = _batches(model, batch, units=2)
  rng = np.random.default_rng(5)
  padded["ref_logp"] = rng.normal(-3.0, 0.5, padded["old_logp"].shape).astype(np.float32)
  packed = packed_passes.update_batch(
    dict(padded),
    units=2,
    row_len=ROW,
    image_token_id=model.cfg.image_token_id,
    agree=lambda *sizes: sizes,
  )
  assert packed["ref_logp"].shape == packed["packed"].target.shape
  graphdef, state = nnx.split(model)
  loss_fn = programs.rl_loss_fn(c)

  def value_and_grad(b):
    f = lambda s: loss_fn(nnx.merge(graphdef, s), b)  # noqa: E731
    return jax.value_and_grad(f, has_aux=True)(state)

  (l_pad, m_pad), g_pad = value_and_grad(padded)
  (l_pk, m_pk), g_pk = value_and_grad(packed)
  assert abs(float(m_pad["kl"])) > 1e-3
  np.testing.assert_allclose(float(l_pk), float(l_pad), rtol=1e-5, atol=1e-7)
  for k in ("kl", "pg_loss", "entropy", "ratio_mean"):
    np.testing.assert_allclose(float(m_pk[k]), float(m_pad[k]), rtol=1e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(g_pk), jax.tree.leaves(g_pad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_micro_batched_update_is_the_same_packed_and_padded(setup, tiny_hf):
  """Two micro-batches (one packing unit each) vs two padded micro-batches: same step."""
  model, batch = setup
  padded, packed = _batches(model, batch, units=2)
  results = []
  for loss_fn, b in (
    (_padded_loss("seq-mean-token-mean", float(L)), padded),
    (_packed_loss("seq-mean-token-mean", float(L)), packed),
  ):
    fresh = qwen.from_pretrained(tiny_hf[1])
    # Plain SGD at lr 1: the step is minus the accumulated gradient, so the two layouts must agree to
    # float rounding everywhere. (Adam's first step is ~lr·sign(g): where g is ~0 its rounding
    # decides the sign, which a fixed tolerance on the parameters cannot tell from a bug.)
    opt = optax.sgd(1.0)
    graphdef, state = train_step_lib.init_train_state(fresh, opt)
    init = jax.tree.map(lambda x: np.array(x, copy=True), state.params)  # before donation
    step = programs.make_train_step(graphdef, lambda m, mb: loss_fn(m, mb), opt, num_microbatches=2)
    state, metrics = step(state, b)
    delta = jax.tree.map(lambda p, p0: np.asarray(p) - p0, state.params, init)
    results.append((delta, jax.device_get(metrics)))
  (d_pad, m_pad), (d_pk, m_pk) = results
  np.testing.assert_allclose(m_pk["loss"], m_pad["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_pk["grad_norm"], m_pad["grad_norm"], rtol=1e-4)
  assert max(np.abs(d).max() for d in jax.tree.leaves(d_pad)) > 1e-4  # the step moved the weights
  for a, b in zip(jax.tree.leaves(d_pk), jax.tree.leaves(d_pad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_pack_like_and_unpack_are_inverse(setup):
  model, batch = setup
  pb, slot = _pack(model, batch, 2)
  x = np.random.default_rng(0).normal(size=slot.shape).astype(np.float32)
  mask = np.asarray(batch.flat_response_mask)
  np.testing.assert_array_equal(
    packing.unpack(packing.pack_like(x, slot, pb.target.shape), slot), np.where(mask, x, 0)
  )
  assert pb.mask.sum() == mask.sum() and (pb.seq_len[pb.mask] > 0).all()


def test_pack_errors_name_the_problem(setup):
  model, batch = setup
  with pytest.raises(ValueError, match="packed_row_length"):
    packing.pack_sequences(batch, model.cfg.image_token_id, 1, 20)
  holes = np.array(batch.response_mask)
  holes[0, 0, 2] = False
  with pytest.raises(ValueError, match="prefix"):
    packing.pack_sequences(
      dataclass_replace(batch, response_mask=holes), model.cfg.image_token_id, 1, ROW
    )
  with pytest.raises(ValueError, match="packing units"):
    packing.pack_sequences(batch, model.cfg.image_token_id, 3, ROW)
  small = packing.PackedSizes(rows=1, blind_rows=1, tokens=4)
  with pytest.raises(ValueError, match="needs"):
    packing.pack_sequences(batch, model.cfg.image_token_id, 1, ROW, sizes=small)


def test_size_bucket():
  assert [packing.size_bucket(n) for n in (0, 1, 7, 8, 9, 11, 17, 100)] == [
    1,
    1,
    7,
    8,
    10,
    12,
    20,
    112,
  ]


def test_reference_program_on_the_packed_slice_equals_padded(setup):
  """π_ref's program (`programs.make_reference_program`, the KL term's log π_ref at the rollout
  temperature) on the scoring pass's packed slice (both views packed, as the score program gets it)
  gives the padded rows' numbers; `packed_passes.score(reference=...)` runs it on each packed slice
  and returns them unpacked, equal to the image view's old log-probs (same weights)."""
  model, batch = setup
  graphdef, state = nnx.split(model)
  program = programs.make_reference_program(graphdef, temperature=0.7, chunk_size=4)
  rmask = np.asarray(batch.flat_response_mask)
  want = np.where(rmask, np.asarray(program(state, batch)), 0)
  packed, slot = _pack(model, batch, 2)
  assert packed.blind is not None and (packed.image.segment.max(axis=-1) > 1).any()
  got = program(state, packed)
  assert got.shape == packed.target.shape  # [U, M]: the response-token layout
  np.testing.assert_allclose(packing.unpack(got, slot), want, atol=2e-5)

  score_fn = jax.jit(
    lambda s, b: packing.score_rollout(nnx.merge(graphdef, s), b, chunk_size=4, temperature=0.7)
  )
  seen = []

  def reference(pb):
    seen.append(type(pb))
    return program(state, pb)

  scores, ref_logp = packed_passes.score(
    score_fn,
    state,
    batch,
    slice_prompts=2,
    units=1,
    row_len=ROW,
    image_token_id=model.cfg.image_token_id,
    put=lambda x: x,
    get=lambda x: jax.tree.map(np.asarray, x),
    agree=lambda *sizes: sizes,
    reference=reference,
  )
  assert seen == [packing.PackedBatch] * 2  # one call per scoring slice, on its packed rows
  np.testing.assert_allclose(ref_logp, want, atol=2e-5)
  np.testing.assert_allclose(scores.logp_image_BxT, want, atol=2e-5)
