"""Rollout: greedy == HF generate, log-probs == teacher forcing, sampling statistics, RNG streams
independent of batch composition and sharding, one compile per bucket.

Compiles dominate the run time on CPU, so the prompts are chosen to share buckets: the one- and
two-image prompts both land in (B=1, T=32, patches=64).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pgpo_jax import buckets, programs, rollout, sampler
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import loading
from tests.hf_utils import IMAGE, left_pad, make_ids, random_pixels
from tests.multidevice import run_on_8_devices

N = 10  # max_new_tokens of the HF-parity tests
EOS = (1,)  # the tiny HF model's eos id


@pytest.fixture(scope="module")
def ours(tiny_hf):
  return qwen.from_pretrained(tiny_hf[1], dtype="float32")


def hf_generate(hf, ids, am, pixels, grids, max_new_tokens, eos):
  """HF greedy generate -> (new tokens, log-probs of the raw logits at them), [B, N] each.

  Columns after HF stopped (every row done) are pad id 0 / log-prob 0.
  """
  import torch

  with torch.no_grad():
    out = hf.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(am),
      mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
      pixel_values=torch.tensor(pixels),
      image_grid_thw=torch.tensor(np.asarray(grids)),
      max_new_tokens=max_new_tokens,
      do_sample=False,
      eos_token_id=list(eos),
      pad_token_id=0,
      return_dict_in_generate=True,
      output_logits=True,
    )
  new = out.sequences[:, ids.shape[1] :].numpy()
  logp = torch.stack(out.logits, 1).float().log_softmax(-1).numpy()  # [B, n, V]
  logp = np.take_along_axis(logp, new[..., None], -1)[..., 0]
  pad = ((0, 0), (0, max_new_tokens - new.shape[1]))
  return np.pad(new, pad), np.pad(logp, pad)


def assert_matches_hf(out, hf_tokens, hf_logp):
  np.testing.assert_array_equal(out.tokens, hf_tokens)
  # Raw log-probs against HF's logits: catches position / cache errors that flip no argmax.
  np.testing.assert_allclose(out.raw_logprobs, np.where(out.mask, hf_logp, 0), atol=1e-4)


def one_image_prompt(rng):
  g = [(1, 6, 8)]
  ids, am = left_pad([make_ids(rng, g)])
  return ids, am, random_pixels(rng, g), np.asarray(g)


def two_image_prompt(rng):
  g = [(1, 4, 4), (1, 4, 6)]
  ids, am = left_pad([make_ids(rng, g)])
  return ids, am, random_pixels(rng, g), np.asarray(g)


def ragged_batch(rng):
  """Three left-padded prompts with different image sizes and lengths."""
  gs = [[(1, 6, 8)], [(1, 4, 4)], [(1, 8, 8)]]
  ids, am = left_pad(
    [make_ids(rng, gs[0]), make_ids(rng, gs[1], pre=11), make_ids(rng, gs[2], pre=1)]
  )
  flat = sum(gs, [])
  return ids, am, random_pixels(rng, flat), np.asarray(flat)


# ------------------------------------------------------------------------------------------------
# Greedy == HF generate; one compile per bucket
# ------------------------------------------------------------------------------------------------
def test_greedy_matches_hf_one_and_two_images_without_retrace(tiny_hf, ours):
  hf, _ = tiny_hf
  rng = np.random.default_rng(0)
  for prompt in (one_image_prompt(rng), two_image_prompt(rng)):
    out = sampler.generate(ours, *prompt, max_new_tokens=N, eos_token_ids=EOS)
    assert_matches_hf(out, *hf_generate(hf, *prompt, N, EOS))
    assert out.tokens.shape == (1, N) and out.tokens.dtype == np.int32
  # Both prompts share the (B=1, T=32, patches=64) buckets: one trace/compile of each program.
  graphdef, _ = nnx.split(ours)
  prog = programs.rollout_programs(
    graphdef, rollout.RolloutStatic(rollout.SamplingConfig(0.0), N, 1, 0, None, ())
  )
  assert prog.start._cache_size() == 1
  assert prog.decode._cache_size() == 1


def test_greedy_matches_hf_left_padded_ragged_batch_and_stops_at_eos(tiny_hf, ours):
  hf, _ = tiny_hf
  ids, am, pixels, grids = ragged_batch(np.random.default_rng(2))
  out = sampler.generate(ours, ids, am, pixels, grids, max_new_tokens=N, eos_token_ids=EOS)
  assert_matches_hf(out, *hf_generate(hf, ids, am, pixels, grids, N, EOS))

  # Random tiny models rarely emit EOS: declare a token that greedy decoding of some row emits for
  # the first time at step >= 2 the stop token; that row stops there, the others go on or stop.
  row, step = next(
    (r, s) for r in range(3) for s in range(2, N) if out.tokens[r, s] not in out.tokens[r, :s]
  )
  stop = int(out.tokens[row, step])
  got = sampler.generate(ours, ids, am, pixels, grids, max_new_tokens=N, eos_token_ids=(stop,))
  assert_matches_hf(got, *hf_generate(hf, ids, am, pixels, grids, N, (stop,)))
  for r in range(3):
    hits = np.nonzero(out.tokens[r] == stop)[0]
    length = int(hits[0]) + 1 if len(hits) else N
    assert got.lengths[r] == length, (r, got.lengths[r], length)
    assert got.truncated[r] == (len(hits) == 0)
    np.testing.assert_array_equal(got.mask[r], np.arange(N) < length)
    np.testing.assert_array_equal(got.tokens[r, :length], out.tokens[r, :length])  # stop token kept
    assert (got.tokens[r, length:] == 0).all()  # pad id after it
  assert got.lengths[row] == step + 1 and not got.truncated[row]
  assert got.truncated.any() or (got.lengths < N).all()
  # Greedy is a point mass under the sampling distribution; raw log-probs are the model's.
  assert (got.logprobs == 0).all()
  assert (got.raw_logprobs[got.mask] < 0).all() and (got.raw_logprobs[~got.mask] == 0).all()


# ------------------------------------------------------------------------------------------------
# Log-probs and RNG streams (temperature 1, shared buckets)
# ------------------------------------------------------------------------------------------------
SAMPLED_N = 8


def test_logprobs_equal_teacher_forced_forward(ours):
  ids, am, pixels, grids = one_image_prompt(np.random.default_rng(2))
  G = 2
  out = sampler.generate(
    ours,
    ids,
    am,
    pixels,
    grids,
    max_new_tokens=SAMPLED_N,
    temperature=1.0,
    num_samples=G,
    eos_token_ids=EOS,
    seed=5,
  )
  assert out.tokens.shape == (G, SAMPLED_N)
  assert (out.tokens[0] != out.tokens[1]).any()  # two different samples
  # Teacher forcing: the prompt + each sample through the full (uncached) forward.
  T = ids.shape[1]
  full_ids = np.concatenate([np.repeat(ids, G, 0), out.tokens], 1)
  full_am = np.concatenate([np.repeat(am, G, 0), out.mask.astype(am.dtype)], 1)
  logits = np.asarray(
    qwen.forward(ours, full_ids, full_am, np.concatenate([pixels] * G), np.repeat(grids, G, 0))
  )
  logp = jax.nn.log_softmax(logits[:, T - 1 : T - 1 + SAMPLED_N], -1)
  want = np.take_along_axis(np.asarray(logp), out.tokens[..., None], -1)[..., 0] * out.mask
  np.testing.assert_allclose(out.logprobs, want, atol=1e-4)
  np.testing.assert_allclose(out.raw_logprobs, want, atol=1e-4)  # temperature 1, no filtering


def test_samples_do_not_depend_on_batch_composition_or_padding_side(ours):
  rng = np.random.default_rng(3)
  alone = one_image_prompt(rng)
  ids, am, pixels, grids = ragged_batch(rng)
  kw = dict(max_new_tokens=SAMPLED_N, temperature=1.0, num_samples=2, eos_token_ids=EOS, seed=11)
  solo = sampler.generate(ours, *alone, prompt_ids=[7], **kw)
  # The same prompt as row 1 of a batch, RIGHT-padded this time, with stream id 7 again.
  rows = [alone[0][0], ids[0][am[0] == 1], ids[1][am[1] == 1]]
  T = max(len(r) for r in rows)
  ids_r = np.zeros((3, T), np.int64)
  am_r = np.zeros((3, T), np.int64)
  for b, r in enumerate([rows[1], rows[0], rows[2]]):
    ids_r[b, : len(r)], am_r[b, : len(r)] = r, 1
  n0 = int(grids[0].prod())
  pix = np.concatenate([pixels[:n0], alone[2], pixels[n0 : n0 + int(grids[1].prod())]])
  grd = np.concatenate([grids[:1], alone[3], grids[1:2]])
  batch = sampler.generate(ours, ids_r, am_r, pix, grd, prompt_ids=[3, 7, 9], **kw)
  np.testing.assert_array_equal(batch.tokens[2:4], solo.tokens)
  np.testing.assert_allclose(batch.logprobs[2:4], solo.logprobs, atol=1e-5)
  # Default stream ids are the positions in the call: the same prompt at position 0 of both
  # calls draws the same samples; a different stream id draws different ones.
  first = sampler.generate(ours, *alone, **kw)
  assert (first.tokens != solo.tokens).any()
  ids_b, am_b = left_pad(
    [list(alone[0][0]), list(rows[2]), list(rows[1])]
  )  # same buckets as `batch`
  batch0 = sampler.generate(
    ours,
    ids_b,
    am_b,
    np.concatenate([alone[2], pix[-16:], pix[:n0]]),
    np.concatenate([alone[3], grd[2:], grd[:1]]),
    **kw,
  )
  np.testing.assert_array_equal(batch0.tokens[:2], first.tokens)


# ------------------------------------------------------------------------------------------------
# Sampling statistics on a 16-token vocabulary
# ------------------------------------------------------------------------------------------------
def random_model(cfg: qwen.Qwen25VLConfig, seed: int, head_scale: float = 1.0) -> qwen.Qwen25VL:
  """A random model drawn on the host (`qwen.init_model` compiles one op per parameter: ~5 s)."""
  abstract = qwen.abstract_model(cfg)
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if "norm" in path[-1] or path[-1] == "ln_q":
      return 1 + 0.1 * rng.standard_normal(shape)
    return (head_scale if path[-1] == "lm_head" else 1) * 0.02 * rng.standard_normal(shape)

  params = {
    p: jnp.asarray(draw(p, v.shape), v.dtype) for p, v in qwen.flat_params(abstract).items()
  }
  return loading.model_from_flat(abstract, params)


@pytest.fixture(scope="module")
def small_vocab():
  """A text-only tiny model over 16 tokens whose next-token distribution is far from flat."""
  cfg = qwen.tiny_config(vocab_size=16, eos_token_id=1, pad_token_id=0)
  model = random_model(cfg, seed=3, head_scale=8.0)
  ids = np.array([[5, 9, 3, 12, 7, 2]])
  # Reference next-token logits from an uncached text-only forward pass (float64 on the host).
  pos = np.broadcast_to(np.arange(ids.shape[1]), (3,) + ids.shape)
  h = qwen.hidden_states(model, jnp.asarray(ids), jnp.asarray(pos), jnp.ones(ids.shape, bool))
  logits = np.asarray(qwen.logits_from_hidden(model, h)[0, -1], np.float64)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  assert 0.05 < probs.max() < 0.6 and probs.min() < 0.01, probs  # informative, not degenerate
  return model, ids, logits


def chi2(counts, probs):
  """Pearson's statistic over tokens with >= 5 expected counts; the rest pooled into one cell."""
  n = counts.sum()
  exp = n * probs
  big = exp >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(exp[big], exp[~big].sum())
  keep = exp > 0
  return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


ROWS = 4000


def first_tokens(model, ids, **kw):
  out = sampler.generate(
    model, ids, None, max_new_tokens=1, num_samples=ROWS, eos_token_ids=(), seed=1, **kw
  )
  assert out.tokens.shape == (ROWS, 1) and out.mask.all()
  return out.tokens[:, 0], out.logprobs[:, 0]


def test_sampling_frequencies_match_softmax(small_vocab):
  model, ids, logits = small_vocab
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  tok, logp = first_tokens(model, ids, temperature=1.0)
  counts = np.bincount(tok, minlength=16)
  stat, df = chi2(counts, probs)
  assert stat < 3 * df + 20, (stat, df, counts, ROWS * probs)  # p < 1e-4 for df <= 15
  # The test has power: a distribution at temperature 1.3 is rejected.
  hot = np.exp((logits - logits.max()) / 1.3)
  assert chi2(counts, hot / hot.sum())[0] > 3 * df + 20
  np.testing.assert_allclose(logp, np.log(probs[tok]), atol=1e-5)


def test_top_k_with_temperature_stays_in_top_k(small_vocab):
  model, ids, logits = small_vocab
  logits = logits / 0.7
  k = 4
  top = np.argsort(-logits)[:k]
  tok, logp = first_tokens(model, ids, temperature=0.7, top_k=k)
  assert set(np.unique(tok)) <= set(top.tolist())
  probs = np.zeros(16)
  probs[top] = np.exp(logits[top] - logits[top].max())
  probs /= probs.sum()
  stat, df = chi2(np.bincount(tok, minlength=16), probs)
  assert stat < 3 * df + 20, stat
  np.testing.assert_allclose(logp, np.log(probs[tok]), atol=1e-5)  # renormalised over the top k


def test_top_p_stays_in_nucleus(small_vocab):
  model, ids, logits = small_vocab
  p = np.exp(logits - logits.max())
  p /= p.sum()
  order = np.argsort(-p)
  before = np.cumsum(p[order]) - p[order]
  top_p = 0.6
  nucleus = order[before < top_p]
  assert np.abs(before - top_p).min() > 1e-3 and 1 < len(nucleus) < 16  # not on a boundary
  tok, logp = first_tokens(model, ids, temperature=1.0, top_p=top_p)
  assert set(np.unique(tok)) <= set(nucleus.tolist())
  assert len(np.unique(tok)) == len(nucleus)  # every nucleus token occurs (4000 draws)
  np.testing.assert_allclose(logp, np.log(p[tok] / p[nucleus].sum()), atol=1e-5)


def test_first_argmax_and_categorical_equal_jax():
  """The rollout's two-reduction argmax (ties -> first index, NaN -> first NaN, all -inf -> 0) and
  its Gumbel-max sampler draw exactly jnp.argmax's and jax.random.categorical's tokens."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 300)).astype(np.float32)
  x[1, [3, 17]] = x[1].max() + 1
  x[2, ::2] = -np.inf
  x[3, [7, 9]] = np.nan
  x[4] = -np.inf
  np.testing.assert_array_equal(rollout.first_argmax(jnp.asarray(x)), np.argmax(x, -1))
  logits = np.where(np.isnan(x), -np.inf, x)
  keys = jax.random.split(jax.random.key(1), 64)
  got = np.asarray(jax.jit(rollout.categorical)(keys, jnp.asarray(logits)))
  np.testing.assert_array_equal(got, jax.vmap(jax.random.categorical)(keys, jnp.asarray(logits)))
  assert got.dtype == np.int32 and len(set(got.tolist())) > 30  # really sampled, not all argmax


def test_filter_logits_matches_reference():
  """top-k then top-p on random logits vs a direct numpy implementation of HF's warpers."""
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((64, 50)).astype(np.float32) * 3
  for cfg in (
    rollout.SamplingConfig(0.8, 0.7, 0),
    rollout.SamplingConfig(1.0, 0.9, 10),
    rollout.SamplingConfig(1.3, 1.0, 5),
  ):
    got = np.asarray(rollout.filter_logits(jnp.asarray(logits), cfg))
    x = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k:
      kth = np.sort(x, -1)[:, -cfg.top_k][:, None]
      x = np.where(x < kth, -np.inf, x)
    if cfg.top_p < 1:  # HF TopPLogitsWarper: ascending sort, drop cumulative mass <= 1 - top_p
      asc = np.sort(x, -1)
      pr = np.exp(asc - asc.max(-1, keepdims=True))
      pr /= pr.sum(-1, keepdims=True)
      drop = np.cumsum(pr, -1) <= 1 - cfg.top_p
      drop[:, -1] = False
      thresh = np.where(drop, np.inf, asc).min(-1, keepdims=True)
      x = np.where(x < thresh, -np.inf, x)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(x))
    np.testing.assert_allclose(got[~np.isinf(got)], x[~np.isinf(x)], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Slot refill, length-aware decode attention, bfloat16 sampling, exact batch sizes
# ------------------------------------------------------------------------------------------------
def run_programs(model, ids, am, pixels, grids, static, **prep):
  """prepare_inputs + the start / decode / finish programs of `static`, as host numpy."""
  graphdef, state = nnx.split(model)
  inputs = rollout.prepare_inputs(model.cfg, ids, am, pixels, grids, **prep)
  prog = programs.rollout_programs(graphdef, static)
  ds = prog.decode(state, prog.start(state, inputs, jax.random.key(0)))
  return jax.tree.map(np.asarray, prog.finish(ds))


@pytest.mark.parametrize("tpu_layout", [False, True])
def test_one_refilled_row_with_chunked_attention_matches_hf(tiny_hf, ours, tpu_layout, monkeypatch):
  """decode_rows=1: the 3 prompts are decoded one after another in ONE row that reuses its KV
  buffers, and the decode attention reads them 4 slots at a time (chunk=4, 12 slots). Greedy tokens
  and log-probs are still HF's, with samples of different lengths (a stop token).
  tpu_layout: the program as built for TPU (weights sliced inside the loop, attention matmuls with
  (row, kv head) batch dims) instead of the CPU one."""
  hf, _ = tiny_hf
  if tpu_layout:
    monkeypatch.setattr(rollout, "_off_tpu", lambda mesh: False)
  programs.rollout_programs.cache_clear()
  ids, am, pixels, grids = ragged_batch(np.random.default_rng(2))
  free = sampler.generate(ours, ids, am, pixels, grids, max_new_tokens=N, eos_token_ids=EOS)
  stops = (
    int(free.tokens[1, 2]),
    int(free.tokens[2, 4]),
  )  # rows 1 and 2 stop early (at the latest)
  static = rollout.RolloutStatic(
    rollout.SamplingConfig(0.0), N, 1, 0, None, (), decode_rows=1, chunk=4
  )
  out = run_programs(ours, ids, am, pixels, grids, static, eos_token_ids=stops)
  hf_tokens, hf_logp = hf_generate(hf, ids, am, pixels, grids, N, stops)
  assert_matches_hf(out, hf_tokens, hf_logp)
  assert out.lengths[1] <= 3 and out.lengths[2] <= 5 and len(set(out.lengths.tolist())) == 3, (
    out.lengths
  )
  # One row: every decode step of every sample ran one after another.
  assert out.decode_steps == (out.lengths - 1).sum()
  programs.rollout_programs.cache_clear()  # no program traced with the patch outlives the test


def test_refill_keeps_every_sample_identical(ours):
  """Slot refill changes which row decodes a sample and when, never what it samples: each sample
  has its own RNG stream and positions. Skewed lengths (per-prompt limits 8, 2, 5; no stop token)."""
  ids, am, pixels, grids = ragged_batch(np.random.default_rng(4))
  kw = dict(
    max_new_tokens=SAMPLED_N,
    temperature=1.0,
    top_k=50,
    num_samples=2,
    eos_token_ids=(),
    seed=3,
    length_limits=[8, 2, 5],
  )
  full = sampler.generate(ours, ids, am, pixels, grids, **kw)
  refill = sampler.generate(ours, ids, am, pixels, grids, decode_rows=2, **kw)
  assert full.lengths.tolist() == [8, 8, 2, 2, 5, 5]
  assert full.truncated.all()
  for name in ("tokens", "mask", "lengths", "truncated"):
    np.testing.assert_array_equal(getattr(refill, name), getattr(full, name), err_msg=name)
  np.testing.assert_allclose(refill.logprobs, full.logprobs, atol=1e-5)
  np.testing.assert_allclose(refill.raw_logprobs, full.raw_logprobs, atol=1e-5)
  # Row-steps wasted = rows x steps - decode steps that produced a token (sum of lengths - 1 = 24).
  work = int((full.lengths - 1).sum())
  assert (int(full.decode_steps), 6 * int(full.decode_steps) - work) == (
    7,
    18,
  )  # all wait for the longest
  # Two rows: (s0, s1) 7 steps, then (s2, s3) 1 step, then (s4, s5) 4 steps: 12 steps, none wasted.
  assert (int(refill.decode_steps), 2 * int(refill.decode_steps) - work) == (12, 0)


@pytest.mark.parametrize("parity_model", ["tiny_hf", "tiny_hf_tied"])
def test_bf16_sampling_matches_float32_greedy_except_at_near_ties(parity_model, request):
  """A bfloat16 copy of the weights and a bf16 KV cache; logits, sampling and log-probs float32.
  On both parity models (untied GQA; tied head, no GQA).

  Greedy tokens equal the float32 path's, except where the float32 top-2 logits are within bf16's
  error (tiny random models have near-ties: top-2 margins of 0.0005..0.5 with logits ~0.16 std);
  after a first flip the two paths continue from different prefixes, so only the first flip is
  checked: it must be at a near-tie. The programs compile once (a second call does not retrace)
  and, on CPU, write the bf16 cache in place (a uint16 scatter, not a float32 round trip)."""
  ours = qwen.from_pretrained(request.getfixturevalue(parity_model)[1], dtype="float32")
  ids, am, pixels, grids = ragged_batch(np.random.default_rng(2))
  masters = {k: np.array(v) for k, v in qwen.flat_params(ours).items()}
  f32 = sampler.generate(ours, ids, am, pixels, grids, max_new_tokens=N, eos_token_ids=())
  b16 = sampler.generate(
    ours, ids, am, pixels, grids, max_new_tokens=N, eos_token_ids=(), compute_dtype="bfloat16"
  )
  after = qwen.flat_params(ours)
  assert all(
    after[k].dtype == np.float32 and np.array_equal(after[k], v) for k, v in masters.items()
  )
  assert b16.raw_logprobs.dtype == np.float32 and (b16.logprobs == 0).all()
  # The float32 model's logits along the float32 greedy path (teacher forcing, uncached forward).
  T = ids.shape[1]
  full_ids = np.concatenate([ids, f32.tokens], 1)
  logits = np.asarray(
    qwen.forward(ours, full_ids, np.concatenate([am, np.ones_like(f32.tokens)], 1), pixels, grids)
  )[:, T - 1 : T - 1 + N]
  top2 = -np.sort(-logits, -1)[..., :2]
  margin = top2[..., 0] - top2[..., 1]
  flips = 0
  for r in range(3):
    diff = np.nonzero(b16.tokens[r] != f32.tokens[r])[0]
    d = int(diff[0]) if len(diff) else N
    np.testing.assert_allclose(b16.raw_logprobs[r, :d], f32.raw_logprobs[r, :d], atol=2e-2)
    if d < N:
      flips += 1
      assert margin[r, d] < 2e-2, (r, d, margin[r, d])
  assert flips < 3
  # The programs really run in bf16: KV cache bf16, output buffers float32.
  graphdef, state = nnx.split(ours)
  static = rollout.RolloutStatic.make(
    rollout.SamplingConfig(0.0), N, 1, 0, None, {}, compute_dtype="bfloat16"
  )
  prog = programs.rollout_programs(graphdef, static)
  inputs = rollout.prepare_inputs(ours.cfg, ids, am, pixels, grids, eos_token_ids=())
  ds = jax.eval_shape(prog.start, prog.cast(state), inputs, jax.random.key(0))
  assert ds.k[0].dtype == jnp.bfloat16 and ds.prompt.v[0].dtype == jnp.bfloat16
  assert ds.logprobs.dtype == jnp.float32
  sampler.generate(
    ours, ids, am, pixels, grids, max_new_tokens=N, eos_token_ids=(), compute_dtype="bfloat16"
  )
  assert (prog.cast._cache_size(), prog.start._cache_size(), prog.decode._cache_size()) == (1, 1, 1)
  # Every write into a layer's row buffer [R, KV, S, K] is a scatter of uint16 bits: XLA:CPU's bf16
  # scatter would convert the whole buffer to float32 and back at every token.
  hlo = prog.decode.lower(prog.cast(state), ds).compile().as_text()
  buf = ",".join(map(str, ds.k[0].shape))
  kinds = re.findall(rf"= (\w+)\[{buf}\]\S* scatter\(", hlo)
  assert sorted(kinds) == ["u16"] * (2 * len(ds.k)), kinds


def test_batch_pads_only_to_a_multiple_of_the_shards(ours):
  assert [
    buckets.batch_bucket(n, m) for n, m in ((3, 1), (5, 4), (384, 32), (385, 32), (1, 8))
  ] == [3, 8, 384, 416, 8]
  rng = np.random.default_rng(5)
  ids = rng.integers(10, 400, (3, 7))
  inputs = rollout.prepare_inputs(ours.cfg, ids)
  assert inputs.batch_size == 3 and inputs.valid.all()  # was 4 (next power of two)
  assert rollout.prepare_inputs(ours.cfg, ids, batch_multiple=2).valid.tolist() == [True] * 3 + [
    False
  ]
  with pytest.raises(ValueError, match="length_limits must be one integer >= 1 per prompt"):
    rollout.prepare_inputs(ours.cfg, ids, length_limits=[3, 0, 2])


def test_trainer_rollout_uses_the_refill_switch(tmp_path, monkeypatch):
  """config.rollout.decode_rows / dtype reach the trainer's rollout calls (one training step)."""
  from pgpo_jax import rewards, trainer
  from tests.tiny_run import length_parity, tiny_config

  monkeypatch.setitem(rewards.BATCH_REWARD_FNS, "test_length_parity", length_parity)
  c = tiny_config(tmp_path / "data")
  c.rollout.decode_rows, c.rollout.dtype = 2, "bfloat16"
  c.warmup.sft_steps, c.train.num_steps, c.checkpoint.async_save = 0, 1, False
  calls = []
  real = sampler.rollout

  def spy(*args, **kw):
    out = real(*args, **kw)
    calls.append(
      (
        kw["decode_rows"],
        kw["compute_dtype"],
        int(out.decode_steps),
        int(np.asarray(out.lengths).sum()),
      )
    )
    return out

  monkeypatch.setattr(trainer.sampler, "rollout", spy)
  metrics = trainer.train(c, str(tmp_path / "run"))
  assert calls and all(rows == 2 and dtype == "bfloat16" for rows, dtype, _, _ in calls), calls
  # 2 rows for 4 prompts x 2 samples: at least (sum of lengths - 8) / 2 decode steps per round.
  assert all(steps >= (total - 8) / 2 for _, _, steps, total in calls), calls
  assert np.isfinite(metrics["train/loss"])


# ------------------------------------------------------------------------------------------------
# Sharded == unsharded
# ------------------------------------------------------------------------------------------------
def test_sharded_rollout_equals_unsharded():
  res = run_on_8_devices("""
    import json
    import numpy as np
    from pgpo_jax import sampler, sharding
    from pgpo_jax.models import qwen2_5_vl as qwen
    from tests.hf_utils import left_pad, make_ids, random_pixels
    from tests.test_rollout import random_model

    model = random_model(qwen.tiny_config(), seed=0)
    rng = np.random.default_rng(0)
    gs = [[(1, 4, 4)], [(1, 4, 6)], [(1, 6, 4)]]
    ids, am = left_pad([make_ids(rng, gs[0]), make_ids(rng, gs[1], pre=6), make_ids(rng, gs[2], pre=2)])
    flat = sum(gs, [])
    args = (ids, am, random_pixels(rng, flat), np.asarray(flat))
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=50, num_samples=2, eos_token_ids=(1,), seed=4)
    single = sampler.generate(model, *args, **kw)
    # batch over (data, fsdp) = 4 shards; heads, MLP, vocab and the cache's kv heads over tensor.
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = sampler.generate(model, *args, mesh=mesh, **kw)
    with sharding.use_rules(mesh, sharding.SAMPLE_RULES):  # the trainer's way: mesh from context
      in_context = sampler.generate(model, *args, **kw)
    # Slot refill on the mesh: 4 rows, one per batch shard, each refilled from its own shard.
    refill = sampler.generate(model, *args, mesh=mesh, decode_rows=4, **kw)
    try:
      sampler.generate(model, *args, mesh=mesh, decode_rows=6, **kw)
      bad_rows = ""
    except ValueError as e:
      bad_rows = str(e)
    print(json.dumps({"single": single.tokens.tolist(), "sharded": sharded.tokens.tolist(),
                      "in_context": in_context.tokens.tolist(), "refill": refill.tokens.tolist(),
                      "bad_rows": bad_rows,
                      "lp_single": single.logprobs.tolist(), "lp_sharded": sharded.logprobs.tolist()}))
  """)
  assert np.asarray(res["single"]).shape == (6, 6)
  np.testing.assert_array_equal(res["sharded"], res["single"])
  np.testing.assert_array_equal(res["in_context"], res["single"])
  np.testing.assert_array_equal(res["refill"], res["single"])
  assert "decode_rows=6 does not split over the 4 shards" in res["bad_rows"]
  np.testing.assert_allclose(res["lp_sharded"], res["lp_single"], atol=1e-4)
