"""Policy passes over [prompt | response]: teacher-forced log-probs and PGPO's two-view scoring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.rl import scoring, sequences
from tests.hf_utils import left_pad, make_ids, random_pixels

G, L = 2, 6


@pytest.fixture(scope="module")
def setup(tiny_hf):
  model = qwen.from_pretrained(tiny_hf[1])
  rng = np.random.default_rng(0)
  g0, g1 = [(1, 4, 8)], [(1, 6, 4)]
  ids, am = left_pad([make_ids(rng, g0), make_ids(rng, g1, pre=9)])
  grids = np.asarray(g0 + g1)
  pixels = random_pixels(rng, g0 + g1)
  response = rng.integers(10, 400, (2 * G, L)).astype(np.int32)
  rmask = np.ones((2 * G, L), bool)
  rmask[1, 4:] = False  # a response that ended early
  batch = sequences.make_sequence_batch(model.cfg, ids, am, pixels, grids, response, rmask)
  return model, batch, (ids, am, grids, pixels, response, rmask)


def _teacher_forced(model, ids, am, grids, pixels, response, rmask, key_mask_fn=None):
  """log-softmax of each response token from qwen.forward on the concatenated rows."""
  out = np.zeros(response.shape, np.float32)
  Tp = ids.shape[1]
  for n in range(response.shape[0]):
    p = n // G
    full = np.concatenate([ids[p], response[n]])[None]
    fam = np.concatenate([am[p], rmask[n].astype(am.dtype)])[None]
    g = grids[p:p + 1]  # one image per prompt in these tests
    start = sum(int(np.prod(x)) for x in grids[:p])
    pix = pixels[start:start + int(np.prod(grids[p]))]
    km = key_mask_fn(full, fam) if key_mask_fn else None
    logits = np.asarray(qwen.forward(model, full, fam, pix, g, key_mask=km))[0]
    logp = jax.nn.log_softmax(logits[Tp - 1:-1], -1)
    out[n] = np.take_along_axis(np.asarray(logp), response[n][:, None], -1)[:, 0]
  return out


def test_response_logprobs_equal_teacher_forced_forward(setup):
  model, batch, (ids, am, grids, pixels, response, rmask) = setup
  got = np.asarray(jax.jit(lambda m, b: sequences.response_logprobs(m, b, chunk_size=4))(model, batch))
  ref = _teacher_forced(model, ids, am, grids, pixels, response, rmask)
  np.testing.assert_allclose(got[rmask], ref[rmask], atol=1e-4)


def test_two_view_scoring(setup):
  model, batch, (ids, am, grids, pixels, response, rmask) = setup
  score = jax.jit(lambda m, b: sequences.score_rollout(m, b, chunk_size=4))
  s = score(model, batch)
  ref_img = _teacher_forced(model, ids, am, grids, pixels, response, rmask)
  ref_blind = _teacher_forced(model, ids, am, grids, pixels, response, rmask,
                              key_mask_fn=lambda f, fam: fam * (f != model.cfg.image_token_id))
  np.testing.assert_allclose(np.asarray(s.logp_image_BxT)[rmask], ref_img[rmask], atol=1e-4)
  np.testing.assert_allclose(np.asarray(s.logp_blind_BxT)[rmask], ref_blind[rmask], atol=1e-4)
  dep = np.asarray(s.dependency_BxT)
  assert (dep >= 0).all() and (dep[~rmask] == 0).all()
  # S = k3 of the two teacher-forced views, written out in float64: e^{-d} - 1 + d, d = log π_I - log π_∅.
  d = ref_img.astype(np.float64) - ref_blind
  np.testing.assert_allclose(dep[rmask], (np.expm1(-d) + d)[rmask], rtol=1e-3, atol=1e-4 * np.abs(d).max())
  # The model's text depends on the image, so the views differ …
  assert np.abs(ref_img - ref_blind)[rmask].max() > 1e-3 and dep[rmask].max() > 0
  # … and the blind view is blind: other pixels change the image view only.
  other = sequences.make_sequence_batch(model.cfg, ids, am, pixels * 2 - 1, grids, response, rmask)
  s2 = score(model, other)
  np.testing.assert_allclose(np.asarray(s2.logp_blind_BxT), np.asarray(s.logp_blind_BxT), atol=1e-6)
  assert np.abs(np.asarray(s2.logp_image_BxT) - np.asarray(s.logp_image_BxT)).max() > 1e-3


def test_full_kl_estimator_is_nonnegative_and_zero_without_images(setup):
  model, batch, _ = setup
  s = jax.jit(lambda m, b: sequences.score_rollout(m, b, estimator="full_kl", chunk_size=4))(model, batch)
  dep = np.asarray(s.dependency_BxT)
  assert (dep >= 0).all() and dep.max() > 0
  no_visual = batch.__class__(**{**batch.__dict__, "prompt_visual": np.zeros_like(batch.prompt_visual)})
  s0 = sequences.score_rollout(model, no_visual, estimator="full_kl", chunk_size=4)
  np.testing.assert_allclose(np.asarray(s0.dependency_BxT), 0, atol=1e-5)
