"""`layers.dot`: float32 accumulation rounded once to the compute dtype, in value and gradient."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpo_jax.models.qwen2_5_vl import layers

SPECS = [
  ("btd,dhk->bthk", (2, 5, 8), (8, 3, 4)),
  ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 8)),
  ("btd,di->bti", (2, 5, 8), (8, 16)),
  ("bnts,bnsk->bntk", (2, 3, 5, 7), (2, 3, 7, 4)),
]


def _loss(spec, g):
  return lambda a, w: jnp.sum(layers.dot(spec, a, w).astype(jnp.float32) * g)


@pytest.mark.parametrize("spec,sa,sw", SPECS)
def test_float32_is_the_plain_einsum(spec, sa, sw):
  ka, kw = jax.random.split(jax.random.key(0))
  a, w = jax.random.normal(ka, sa), jax.random.normal(kw, sw)
  chex.assert_trees_all_close(layers.dot(spec, a, w), jnp.einsum(spec, a, w), rtol=1e-6)


@pytest.mark.parametrize("spec,sa,sw", SPECS)
def test_bfloat16_value_and_gradient_match_float32(spec, sa, sw):
  ka, kw, kg = jax.random.split(jax.random.key(1), 3)
  a, w = jax.random.normal(ka, sa), jax.random.normal(kw, sw)
  g = jax.random.normal(kg, jnp.einsum(spec, a, w).shape)
  ref_val = jnp.einsum(spec, a, w)
  ref = jax.grad(lambda a, w: jnp.sum(jnp.einsum(spec, a, w) * g), (0, 1))(a, w)
  a16, w16 = a.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  val = layers.dot(spec, a16, w16)
  assert val.dtype == jnp.bfloat16
  # Close to the float32 result in value and gradient (at this short contraction any bf16 dot is;
  # float32 accumulation and a single rounding: `test_bfloat16_accumulates_in_float32_rounds_once`).
  scale = float(jnp.max(jnp.abs(ref_val)))
  np.testing.assert_allclose(np.asarray(val, np.float32), ref_val, atol=2e-2 * scale)
  got = jax.grad(_loss(spec, g), (0, 1))(a16, w16)
  for r, x in zip(ref, got):
    assert x.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(x, np.float32), r, atol=2e-2 * float(jnp.max(jnp.abs(r))))


def _ulps(x, exact):
  """|x - exact| in bf16 ulps of `exact` (spacing 2^(e-7) for |exact| in [2^e, 2^(e+1)))."""
  exact = np.asarray(exact, np.float64)
  return np.abs(np.asarray(x, np.float64) - exact) / 2.0 ** (np.floor(np.log2(np.abs(exact))) - 7)


def _bf16_sums(products_TxKxI):
  """Sums over K accumulated in bfloat16, in sequence and pairwise: what a dot that accumulates in
  its bf16 output type computes."""
  step = lambda c, x: ((c + x).astype(jnp.bfloat16), None)  # noqa: E731
  zero = jnp.zeros(products_TxKxI.shape[2:], jnp.bfloat16)
  sequential = jax.vmap(lambda p: jax.lax.scan(step, zero, p)[0])(products_TxKxI)
  p = products_TxKxI
  while p.shape[1] > 1:
    p = (p[:, 0::2] + p[:, 1::2]).astype(jnp.bfloat16)
  return sequential, p[:, 0]


def test_bfloat16_accumulates_in_float32_rounds_once():
  """Over a 4,096-long contraction (value: the shared index; gradient: the rows, for ∂w) each bf16
  result is the exact product of the bf16 inputs rounded once (≤ 0.5 ulp, + float32 noise), and the
  dot is float32-typed in the program. A bf16-accumulating dot misses the bound by 1-200 ulps (checked
  here on the same inputs), and a plain bf16 einsum has a bf16 dot (bf16 on CPU is upcast, so its
  values alone cannot tell)."""
  rng = np.random.default_rng(0)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
  a, w = bf(rng.uniform(0.5, 1.5, (4, 4096))), bf(rng.uniform(0.5, 1.5, (4096, 8)))
  exact = f64(a) @ f64(w)
  assert _ulps(layers.dot("td,di->ti", a, w), exact).max() <= 0.55
  for bf16_sum in _bf16_sums(a[:, :, None] * w[None]):
    assert _ulps(bf16_sum, exact).max() > 1.0  # the bound does catch bf16 accumulation
  hlo = jax.jit(lambda a, w: layers.dot("td,di->ti", a, w)).lower(a, w).as_text()
  dots = re.findall(r"dot_general[^\n]*-> tensor<([^>]*)>", hlo)
  assert dots == ["4x8xf32"], dots

  # ∂w = aᵀ g over 4,096 rows, with the cotangent g rounded to bf16 first; ∂a = g wᵀ.
  a, w = bf(rng.uniform(0.5, 1.5, (4096, 4))), bf(rng.uniform(0.5, 1.5, (4, 8)))
  g = jnp.asarray(rng.uniform(0.5, 1.5, (4096, 8)), jnp.float32)
  da, dw = jax.grad(_loss("td,di->ti", g), (0, 1))(a, w)
  assert da.dtype == dw.dtype == jnp.bfloat16
  g16 = f64(bf(g))
  assert _ulps(dw, f64(a).T @ g16).max() <= 0.55
  assert _ulps(da, g16 @ f64(w).T).max() <= 0.55
  for bf16_sum in _bf16_sums(jnp.swapaxes(a, 0, 1)[:, :, None] * bf(g)[None]):
    assert _ulps(bf16_sum, f64(a).T @ g16).max() > 1.0


@pytest.mark.parametrize("spec,sa,sw", SPECS)
def test_bfloat16_backward_matmuls_stay_bfloat16(spec, sa, sw):
  """The gradient's dots take bf16 operands (float32 result): differentiating a float32 result
  would make them float32 x float32, several times slower on TPU."""
  a, w = jnp.ones(sa, jnp.bfloat16), jnp.ones(sw, jnp.bfloat16)
  g = jnp.ones(jnp.einsum(spec, a, w).shape, jnp.float32)
  hlo = jax.jit(jax.grad(_loss(spec, g), (0, 1))).lower(a, w).as_text()
  dots = re.findall(r"dot_general[^\n]*?: \(([^)]*)\)", hlo)
  assert len(dots) == 2, dots  # the two transposes (the forward value is dead under grad)
  for operands in dots:
    assert "f32" not in operands, operands


def test_an_index_in_one_term_only_is_an_error():
  a = jnp.ones((2, 3), jnp.bfloat16)
  with pytest.raises(ValueError, match="only one term"):
    layers.dot("ab,bc->a", a, jnp.ones((3, 4), jnp.bfloat16))
