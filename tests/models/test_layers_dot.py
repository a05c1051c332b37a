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
  # One rounding of a float32-accumulated product: within a few bf16 ulps of the float32 result
  # (inputs rounded to bf16 too), far tighter than a bf16-accumulated sum would be.
  scale = float(jnp.max(jnp.abs(ref_val)))
  np.testing.assert_allclose(np.asarray(val, np.float32), ref_val, atol=2e-2 * scale)
  got = jax.grad(_loss(spec, g), (0, 1))(a16, w16)
  for r, x in zip(ref, got):
    assert x.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(x, np.float32), r, atol=2e-2 * float(jnp.max(jnp.abs(r))))


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
