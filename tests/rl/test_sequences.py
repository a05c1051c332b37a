"""Policy passes over [prompt | response]: teacher-forced log-probs and PGPO's two-view scoring."""

import jax
import numpy as np
import pytest

from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.rl import scoring, sequences
from tests.hf_utils import left_pad, make_ids, random_pixels

G, L = 2, 6


PROMPT_GRIDS = ([(1, 4, 8)], [(1, 6, 4), (1, 2, 4)], [(1, 2, 2)])  # one prompt with two images


@pytest.fixture(scope="module")
def setup(tiny_hf):
  model = qwen.from_pretrained(tiny_hf[1])
  rng = np.random.default_rng(0)
  g0, g1, g2 = PROMPT_GRIDS
  ids, am = left_pad(
    [make_ids(rng, g0), make_ids(rng, g1, pre=9), make_ids(rng, g2, pre=1, post=2)]
  )
  grids = np.asarray(g0 + g1 + g2)
  pixels = random_pixels(rng, g0 + g1 + g2)
  P = len(PROMPT_GRIDS)
  response = rng.integers(10, 400, (P * G, L)).astype(np.int32)
  rmask = np.ones((P * G, L), bool)
  rmask[1, 4:] = False  # a response that ended early
  rmask[4, 1:] = False
  batch = sequences.make_sequence_batch(model.cfg, ids, am, pixels, grids, response, rmask)
  return model, batch, (ids, am, grids, pixels, response, rmask)


def _teacher_forced(model, ids, am, grids, pixels, response, rmask, key_mask_fn=None):
  """log-softmax of each response token from qwen.forward on the concatenated rows."""
  out = np.zeros(response.shape, np.float32)
  Tp = ids.shape[1]
  counts = [len(g) for g in PROMPT_GRIDS]
  sizes = [int(np.prod(x)) for x in grids]
  for n in range(response.shape[0]):
    p = n // G
    full = np.concatenate([ids[p], response[n]])[None]
    fam = np.concatenate([am[p], rmask[n].astype(am.dtype)])[None]
    first = sum(counts[:p])
    g = grids[first : first + counts[p]]
    start = sum(sizes[:first])
    pix = pixels[start : start + sum(sizes[first : first + counts[p]])]
    km = key_mask_fn(full, fam) if key_mask_fn else None
    logits = np.asarray(qwen.forward(model, full, fam, pix, g, key_mask=km))[0]
    logp = jax.nn.log_softmax(logits[Tp - 1 : -1], -1)
    out[n] = np.take_along_axis(np.asarray(logp), response[n][:, None], -1)[:, 0]
  return out


def test_response_logprobs_equal_teacher_forced_forward(setup):
  model, batch, (ids, am, grids, pixels, response, rmask) = setup
  got = np.asarray(
    jax.jit(lambda m, b: sequences.response_logprobs(m, b, chunk_size=4))(model, batch)
  )
  ref = _teacher_forced(model, ids, am, grids, pixels, response, rmask)
  np.testing.assert_allclose(got[rmask], ref[rmask], atol=1e-4)


def test_two_view_scoring(setup):
  model, batch, (ids, am, grids, pixels, response, rmask) = setup
  score = jax.jit(lambda m, b: sequences.score_rollout(m, b, chunk_size=4))
  s = score(model, batch)
  ref_img = _teacher_forced(model, ids, am, grids, pixels, response, rmask)
  ref_blind = _teacher_forced(
    model,
    ids,
    am,
    grids,
    pixels,
    response,
    rmask,
    key_mask_fn=lambda f, fam: fam * (f != model.cfg.image_token_id),
  )
  np.testing.assert_allclose(np.asarray(s.logp_image_BxT)[rmask], ref_img[rmask], atol=1e-4)
  np.testing.assert_allclose(np.asarray(s.logp_blind_BxT)[rmask], ref_blind[rmask], atol=1e-4)
  dep = np.asarray(s.dependency_BxT)
  assert (dep >= 0).all() and (dep[~rmask] == 0).all()
  # S = k3 of the two teacher-forced views, written out in float64: e^{-d} - 1 + d, d = log π_I - log π_∅.
  d = ref_img.astype(np.float64) - ref_blind
  np.testing.assert_allclose(
    dep[rmask], (np.expm1(-d) + d)[rmask], rtol=1e-3, atol=1e-4 * np.abs(d).max()
  )
  # The model's text depends on the image, so the views differ …
  assert np.abs(ref_img - ref_blind)[rmask].max() > 1e-3 and dep[rmask].max() > 0
  # … and the blind view is blind: other pixels change the image view only.
  other = sequences.make_sequence_batch(model.cfg, ids, am, pixels * 2 - 1, grids, response, rmask)
  s2 = score(model, other)
  np.testing.assert_allclose(np.asarray(s2.logp_blind_BxT), np.asarray(s.logp_blind_BxT), atol=1e-6)
  assert np.abs(np.asarray(s2.logp_image_BxT) - np.asarray(s.logp_image_BxT)).max() > 1e-3


def _masked_blind_view(model, b: sequences.SequenceBatch, chunk_size=4):
  """The blind view as first implemented, kept as a reference: the full sequence with the visual
  tokens masked out of attention (same ids and positions), then k3."""
  x, pos, key_mask, visual = sequences._embed_and_positions(model, b)
  kw = qwen.model._kw(model)
  h_img, _ = model.language_model(x, pos, key_mask, None, **kw)
  h_bl, _ = model.language_model(x, pos, key_mask & ~visual, None, **kw)
  Tp = b.prompt_ids.shape[1]
  return scoring.k3_dependency(
    sequences._response_hidden(h_img, Tp),
    sequences._response_hidden(h_bl, Tp),
    model.lm_head_weight(),
    b.flat_response,
    b.flat_response_mask,
    chunk_size=chunk_size,
  )


@pytest.mark.parametrize("mask_vision_markers", [False, True])
def test_blind_view_without_visual_tokens_equals_masked_view(setup, mask_vision_markers):
  """Left-padded prompts with one, two and one small image: dropping the visual tokens (positions
  kept) gives the masked view's numbers; the blind prompt is much shorter than the prompt."""
  model, _, (ids, am, grids, pixels, response, rmask) = setup
  visual = sequences.visual_token_mask(ids, model.cfg, mask_vision_markers)
  tight = int((am.astype(bool) & ~visual).sum(1).max())  # no padding in the longest blind prompt
  b = sequences.make_sequence_batch(
    model.cfg,
    ids,
    am,
    pixels,
    grids,
    response,
    rmask,
    mask_vision_markers=mask_vision_markers,
    blind_prompt_len=tight,
  )
  assert b.blind_index.shape[1] < b.prompt_ids.shape[1]
  got = jax.jit(lambda m, b: sequences.score_rollout(m, b, chunk_size=4))(model, b)
  ref = jax.jit(_masked_blind_view)(model, b)
  for name in ("logp_image_BxT", "logp_blind_BxT", "dependency_BxT", "entropy_BxT"):
    np.testing.assert_allclose(
      np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)), atol=2e-5, err_msg=name
    )


def test_blind_prompt_index_keeps_text_in_order_left_padded():
  mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], bool)
  visual = np.array([[0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(
    sequences.blind_prompt_index(mask, visual, 5), [[-1, -1, 2, 5, 6], [-1, 0, 4, 5, 6]]
  )
  with pytest.raises(ValueError, match="ends with a visual token"):
    sequences.blind_prompt_index(mask, np.array([[0, 0, 0, 0, 0, 0, 1], [0] * 7], bool))
  with pytest.raises(ValueError, match="blind prompt length 2"):
    sequences.blind_prompt_index(mask, visual, 2)


def test_full_kl_estimator_is_nonnegative_and_zero_without_images(setup):
  model, batch, _ = setup
  s = jax.jit(lambda m, b: sequences.score_rollout(m, b, estimator="full_kl", chunk_size=4))(
    model, batch
  )
  dep = np.asarray(s.dependency_BxT)
  assert (dep >= 0).all() and dep.max() > 0
  rng = np.random.default_rng(1)
  ids, am = left_pad([make_ids(rng, [], pre=7), make_ids(rng, [], pre=12)])  # text-only prompts
  response = rng.integers(10, 400, (2 * G, L)).astype(np.int32)
  text_only = sequences.make_sequence_batch(
    model.cfg, ids, am, None, None, response, np.ones_like(response, bool)
  )
  assert text_only.vision is None and text_only.blind_index.shape == ids.shape
  s0 = sequences.score_rollout(model, text_only, estimator="full_kl", chunk_size=4)
  np.testing.assert_allclose(np.asarray(s0.dependency_BxT), 0, atol=1e-5)


def test_without_pgpo_the_scoring_pass_runs_the_image_view_only(setup):
  """pgpo.enabled=False (GRPO/DAPO): old log-probs and entropy as with two views, no dependency."""
  model, batch, _ = setup
  two = jax.jit(lambda m, b: sequences.score_rollout(m, b, chunk_size=4))(model, batch)
  one = jax.jit(lambda m, b: sequences.score_rollout(m, b, chunk_size=4, blind=False))(model, batch)
  np.testing.assert_allclose(
    np.asarray(one.logp_image_BxT), np.asarray(two.logp_image_BxT), atol=1e-6
  )
  np.testing.assert_allclose(np.asarray(one.entropy_BxT), np.asarray(two.entropy_BxT), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(one.logp_blind_BxT), np.asarray(one.logp_image_BxT))
  assert not np.asarray(one.dependency_BxT).any()


def test_blind_response_logprobs_are_the_scoring_pass_blind_view(setup):
  """What the warm-up trains under `warmup.blind_fraction` is what scoring calls the blind view."""
  model, batch, (ids, am, grids, pixels, response, rmask) = setup
  got = np.asarray(
    jax.jit(lambda m, b: sequences.blind_response_logprobs(m, b, chunk_size=4))(model, batch)
  )
  s = jax.jit(lambda m, b: sequences.score_rollout(m, b, chunk_size=4))(model, batch)
  np.testing.assert_allclose(got[rmask], np.asarray(s.logp_blind_BxT)[rmask], atol=1e-5)
  image = np.asarray(s.logp_image_BxT)[rmask]
  assert np.abs(got[rmask] - image).max() > 1e-3  # the image matters in this model: views differ
  # Differentiable, and the images get no gradient through it (the blind view never sees them).
  grads = jax.grad(
    lambda m: sequences.blind_response_logprobs(m, batch, chunk_size=4)[rmask].sum()
  )(model)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  vis = [np.abs(np.asarray(g)).max() for p, g in leaves if "visual" in jax.tree_util.keystr(p)]
  txt = [
    np.abs(np.asarray(g)).max() for p, g in leaves if "language_model" in jax.tree_util.keystr(p)
  ]
  assert vis and max(vis) == 0.0 and max(txt) > 0


def test_partial_view_hides_exactly_the_given_prompt_tokens(setup):
  """A random half of the visual tokens hidden equals a forward whose key mask drops them; all
  hidden is the scoring pass's blind view, none hidden its image view."""
  model, batch, (ids, am, grids, pixels, response, rmask) = setup
  rng = np.random.default_rng(5)
  visual = ids == model.cfg.image_token_id
  half = visual & (rng.random(ids.shape) < 0.5)
  fn = jax.jit(lambda m, b, h: sequences.partial_view_logprobs(m, b, h, chunk_size=4))
  got = np.asarray(fn(model, batch, half))
  Tp = ids.shape[1]

  def drop_half(full, fam):
    p = next(p for p in range(ids.shape[0]) if np.array_equal(full[0, :Tp], ids[p]))
    return fam * np.concatenate([~half[p], np.ones(full.shape[1] - Tp, bool)])[None]

  ref = _teacher_forced(model, ids, am, grids, pixels, response, rmask, key_mask_fn=drop_half)
  np.testing.assert_allclose(got[rmask], ref[rmask], atol=1e-4)
  s = jax.jit(lambda m, b: sequences.score_rollout(m, b, chunk_size=4))(model, batch)
  blind = np.asarray(fn(model, batch, visual))
  np.testing.assert_allclose(blind[rmask], np.asarray(s.logp_blind_BxT)[rmask], atol=1e-4)
  none = np.asarray(fn(model, batch, np.zeros_like(visual)))
  np.testing.assert_allclose(none[rmask], np.asarray(s.logp_image_BxT)[rmask], atol=1e-5)
  assert np.abs(got[rmask] - blind[rmask]).max() > 1e-3  # half the image is not none of it
