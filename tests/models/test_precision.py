"""Mixed precision: float32 master weights, bfloat16 compute.

- An AdamW step at lr 1e-6 moves float32 masters, and would leave bfloat16 parameters unchanged.
- bfloat16-compute logits stay within a stated tolerance of the HF PyTorch float32 reference.
- Computing in bfloat16 from float32 masters is exactly a bfloat16 model of the rounded weights (the
  weights are cast where they are used, nothing else changes), and the parameters, gradients and
  AdamW moments stay float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpo_jax import programs
from pgpo_jax import train_step as ts
from pgpo_jax.models import qwen2_5_vl as qwen
from tests.hf_utils import hf_logits, make_ids, random_pixels

# Measured on the tiny HF model below (one image, 2 ViT + 2 decoder layers): max |logits − HF float32|
# / std(HF logits) = 0.024 computing in bfloat16 (8-bit mantissa: ~4e-3 relative per rounding) and
# 1.7e-6 in float32. The bound leaves 2x headroom over the bf16 value.
BF16_REL_TOL = 0.05


def _text_batch(cfg, B=2, T=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, cfg.text.vocab_size - 20, (B, T)).astype(np.int32)
  pos = np.broadcast_to(np.arange(T, dtype=np.int32)[None, None], (3, B, T))
  return {"ids": ids, "pos": pos, "mask": np.ones((B, T), bool)}


def _nll(model, batch):
  h = qwen.hidden_states(
    model, batch["ids"][:, :-1], batch["pos"][:, :, :-1], batch["mask"][:, :-1]
  )
  logp = jax.nn.log_softmax(qwen.logits_from_hidden(model, h), axis=-1)
  tgt = jnp.take_along_axis(logp, batch["ids"][:, 1:, None], axis=-1)[..., 0]
  return -jnp.mean(tgt), {}


def _one_step(model):
  opt = ts.make_optimizer(1e-6, weight_decay=1e-2, grad_clip_norm=1.0)
  graphdef, state = ts.init_train_state(model, opt)
  before = np.asarray(state.params["language_model"]["layers"]["wq"][...], np.float32)
  step = programs.make_train_step(graphdef, _nll, opt, donate=False)
  new, metrics = step(state, _text_batch(model.cfg))
  after = np.asarray(new.params["language_model"]["layers"]["wq"][...], np.float32)
  return state, new, before, after, metrics


def test_adamw_at_lr_1e6_moves_float32_masters_but_not_bfloat16_weights():
  cfg = qwen.tiny_config()
  # Masters: float32 parameters, bfloat16 compute.
  model = qwen.init_model(cfg, "bfloat16", seed=0, param_dtype="float32")
  assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
  state, new, before, after, metrics = _one_step(model)
  assert float(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
  moved = np.mean(after != before)
  assert moved > 0.95, f"only {moved:.1%} of the float32 wq entries moved"
  # An AdamW first step moves each weight by ~lr (|m̂/√v̂| ≈ 1), plus lr·wd·w.
  assert np.abs(after - before).max() <= 1.1e-6
  for leaf in jax.tree.leaves(new.params) + jax.tree.leaves(new.opt_state):
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim > 0:
      assert leaf.dtype == jnp.float32, leaf.dtype  # parameters and AdamW moments (mu, nu)

  # The same step on bfloat16 parameters: a change of ~1e-6 is below half a bf16 ulp for every
  # |w| >= 2^-9 (ulp 2^-16 there), so those weights (97% of a normal(0.02) init) never move.
  model16 = qwen.init_model(cfg, "bfloat16", seed=0)
  assert model16.param_dtype == jnp.bfloat16
  _, _, before16, after16, metrics16 = _one_step(model16)
  assert float(metrics16["skipped"]) == 0 and np.isfinite(float(metrics16["param_norm"]))
  np.testing.assert_array_equal(before16, before.astype(jnp.bfloat16).astype(np.float32))
  big = np.abs(before16) >= 2.0**-9
  assert big.mean() > 0.9
  assert not np.any((after16 != before16) & big), "a bf16 weight of |w| >= 2^-9 moved by ~1e-6"
  assert np.mean(after16 != before16) < 0.05


@pytest.fixture(scope="module")
def image_inputs():
  rng = np.random.default_rng(11)
  grids = [(1, 8, 12)]
  return (
    np.array([make_ids(rng, grids, pre=12, post=12)]),
    random_pixels(rng, grids),
    np.asarray(grids),
  )


def test_bfloat16_compute_logits_close_to_hf_float32(tiny_hf, image_inputs):
  hf, path = tiny_hf
  ids, pixels, grids = image_inputs
  ref = hf_logits(hf, ids, None, pixels, grids)
  mixed = qwen.from_pretrained(path, dtype="bfloat16", param_dtype="float32")
  assert {v.dtype for v in qwen.flat_params(mixed).values()} == {jnp.dtype(jnp.float32)}
  got = np.asarray(qwen.forward(mixed, ids, None, pixels, grids))
  assert got.dtype == np.float32
  err = np.abs(got - ref).max() / ref.std()
  assert err <= BF16_REL_TOL, f"bf16-compute logits: max |err| / std = {err:.4f}"
  # The comparison can fail: the float32 port is 100x closer, so the bf16 path really computes in bf16.
  f32 = np.asarray(
    qwen.forward(qwen.from_pretrained(path, dtype="float32"), ids, None, pixels, grids)
  )
  err32 = np.abs(f32 - ref).max() / ref.std()
  assert err32 < err / 100, (err32, err)


def test_float32_masters_compute_exactly_as_a_bfloat16_model(tiny_hf, image_inputs):
  """Casting at use is the only difference: masters + bf16 compute == bf16 weights + bf16 compute."""
  _, path = tiny_hf
  ids, pixels, grids = image_inputs
  mixed = qwen.from_pretrained(path, dtype="bfloat16", param_dtype="float32")
  pure16 = qwen.from_pretrained(path, dtype="bfloat16")
  assert {v.dtype for v in qwen.flat_params(pure16).values()} == {jnp.dtype(jnp.bfloat16)}
  a = np.asarray(qwen.forward(mixed, ids, None, pixels, grids))
  b = np.asarray(qwen.forward(pure16, ids, None, pixels, grids))
  np.testing.assert_array_equal(a, b)


def test_compile_check_peak_follows_the_compute_dtype_and_precision():
  """t@peak's FLOP rate: bf16 matmuls at the MXU peak; float32 ones at 1/1/3/6 bf16 passes
  (JAX's TPU precisions default / bfloat16 / high = bf16_3x / highest = bf16_6x)."""
  from pgpo_jax.tools import compile_check as cc

  chip = cc.CHIPS["v5p"]
  assert cc.matmul_peak(chip, jnp.bfloat16, "highest") == chip.peak_flops
  assert cc.matmul_peak(chip, jnp.float32, "default") == chip.peak_flops
  assert cc.matmul_peak(chip, jnp.float32, "high") == chip.peak_flops / 3
  assert cc.matmul_peak(chip, jnp.float32, "highest") == chip.peak_flops / 6
  assert cc.MATMUL_PRECISION == "default"  # what the trainer runs at (it sets no precision)
