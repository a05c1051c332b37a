"""Remat policies (`layers.maybe_remat`): what each saves for the backward pass, in either dtype.

The residuals are read with `jax.ad_checkpoint.print_saved_residuals` (a saved value tagged by
`checkpoint_name` prints as "named 'q_proj'"). Under bfloat16 compute every matmul runs inside
`layers.dot`'s custom VJP, which the primitive-based `checkpoint_dots*` policies cannot see into:
there `dots_no_batch` used to save exactly what `full` saves.
"""

import collections
import contextlib
import io
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import layers, text, vision
from tests.hf_utils import random_pixels

POLICIES = ("full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")
B, T = 2, 16


def _residuals(fn, *args) -> list[str]:
  """One line per value the backward pass of `fn` keeps: "<aval> <where it comes from>"."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(fn, *args)
  return out.getvalue().splitlines()


def _names(lines: list[str]) -> collections.Counter:
  return collections.Counter(
    m.group(1) for m in map(re.compile(r"named '(\w+)'").search, lines) if m
  )


def _decoder_loss(dtype, policy, *, use_scan=False, chunk=0):
  """(loss(state, x), state, x): the tiny decoder's L=2 layers, float32 masters, `dtype` compute."""
  cfg = qwen.tiny_config().text
  model = text.TextModel(cfg, jnp.dtype(dtype), nnx.Rngs(0), param_dtype=jnp.float32)
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(T), (3, B, T))
  keep = jnp.ones((B, T), bool).at[0, :3].set(False)  # some left padding

  def loss(state, x):
    h, _ = nnx.merge(graphdef, state)(
      x, pos, keep, None, remat_policy=policy, use_scan=use_scan, attention_chunk_size=chunk
    )
    return jnp.sum(h.astype(jnp.float32) ** 2)

  return loss, state, x


def _vision_loss(dtype, policy, *, use_scan=False):
  """(loss(state), state): the tiny vision tower (2 blocks: one windowed, one full-attention)."""
  cfg = qwen.tiny_config().vision
  tower = vision.VisionTower(cfg, jnp.dtype(dtype), nnx.Rngs(0), param_dtype=jnp.float32)
  graphdef, state = nnx.split(tower)
  grids = np.asarray([(1, 8, 8)])
  vin = qwen.prepare_vision(random_pixels(np.random.default_rng(0), grids), grids, cfg)

  def loss(state):
    out = nnx.merge(graphdef, state)(vin, remat_policy=policy, use_scan=use_scan)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return loss, state


def _expected(policy: str, layers_: int) -> collections.Counter:
  """Each name the policy saves, once per layer; never mlp_down (its output, added to the
  residual stream, is not read by the backward pass)."""
  saved = set(layers.REMAT_SAVED[policy]) - {"mlp_down"}
  return collections.Counter({n: layers_ for n in saved})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_decoder_layers_save_the_named_matmul_outputs_of_their_policy(dtype, policy):
  loss, state, x = _decoder_loss(dtype, policy)
  assert _names(_residuals(loss, state, x)) == _expected(policy, layers_=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_vision_blocks_save_the_named_matmul_outputs_of_their_policy(dtype, policy):
  """The weight matmuls by name. Attention runs in a `lax.cond` (windowed or full layer, a traced
  flag under remat), whose residuals come out unnamed, one per branch: under `dots` the scores and
  context of both branches (4 per block), under the others none."""
  loss, state = _vision_loss(dtype, policy)
  lines = _residuals(loss, state)
  weights = "full" if policy == "full" else "dots_no_batch"
  assert _names(lines) == _expected(weights, layers_=2)
  from_cond = [line for line in lines if "output of cond" in line]
  assert len(from_cond) == (8 if policy == "dots" else 0)


@pytest.mark.parametrize("use_scan", [True, False])
def test_scanned_layers_keep_as_much_in_bfloat16_as_in_float32(use_scan):
  """Counts of saved values (scanned layers stack their residuals under the scan's name): each
  policy keeps the same number in both dtypes, and dots_no_batch (6 per layer: q/k/v/o, gate, up)
  and dots (+ scores, context) keep more than full. Before the names, bfloat16 dots_no_batch kept
  exactly what full keeps (22 values on the scanned tiny decoder)."""
  counts = {
    (d, p): len(_residuals(*_decoder_loss(d, p, use_scan=use_scan)))
    for d in DTYPES
    for p in POLICIES
  }
  per_layer = 1 if use_scan else 2  # a scan stacks each per-layer residual into one value
  for d in DTYPES:
    assert counts[d, "dots_no_batch"] - counts[d, "full"] == 6 * per_layer
    assert counts[d, "dots"] - counts[d, "dots_no_batch"] == 2 * per_layer
  assert all(counts["float32", p] == counts["bfloat16", p] for p in POLICIES)


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_chunked_attention_keeps_no_scores_under_dots(dtype):
  """Chunks of 4 query rows: `dots` keeps the context but no chunk's float32 scores (an enclosing
  policy sees into each chunk's checkpoint; keeping them all is the [T, S] the chunks avoid)."""
  loss, state, x = _decoder_loss(dtype, "dots", chunk=4)
  names = _names(_residuals(loss, state, x))
  assert names["attn_scores"] == 0 and names["attn_context"] == 2
  assert names == _expected("dots_no_batch", layers_=2) + collections.Counter(attn_context=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_are_the_same_under_every_policy(dtype):
  """Remat changes what is kept, not what is computed: the parameter and input gradients of the
  tiny decoder (scanned layers, as the recipes run) and the vision tower's parameter gradients equal
  those without remat, up to float32 rounding of the largest gradient (XLA fuses the recomputed
  program differently: ~0.5 ulp of it in float32 here; bfloat16 gave identical bits)."""
  grad = lambda loss, *a: jax.jit(jax.grad(loss, argnums=tuple(range(len(a)))))(*a)  # noqa: E731
  for make in (_decoder_loss, _vision_loss):
    ref = grad(*make(dtype, "none", use_scan=True))
    atol = 1e-6 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref))
    for policy in POLICIES:
      got = grad(*make(dtype, policy, use_scan=True))
      chex.assert_trees_all_close(got, ref, atol=atol, rtol=0)
