"""The attention backends against the dense-mask XLA path.

splash (TPU Pallas) runs here in Pallas interpret mode; cudnn needs an NVIDIA GPU (only its
selection is tested on CPU). The reference is `masked_softmax_attention` on a dense mask built by
hand, independent of the segment-id plumbing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import layers


def _qkv(B, T, N, G, K, seed=0):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
  return f(B, T, N, G, K), f(B, T, N, K), f(B, T, N, K)


def test_resolve_attention_impl_by_platform():
  assert layers.resolve_attention_impl("auto", "tpu") == "splash"
  assert layers.resolve_attention_impl("auto", "gpu") == "cudnn"
  assert layers.resolve_attention_impl("auto", "cpu") == "xla"
  assert layers.resolve_attention_impl("splash", "cpu") == "splash"
  with pytest.raises(ValueError, match="attention_impl"):
    layers.resolve_attention_impl("flash")


def _splash_vs_dense_causal(qa, ka, va, keep):
  """(splash in interpret mode, dense xla) causal attention under key mask `keep` [B, T]."""
  T, K = qa.shape[1], qa.shape[-1]
  dense = jnp.asarray(np.tril(np.ones((T, T), bool))[None] & keep[:, None, :])
  ref = layers.masked_softmax_attention(qa, ka, va, dense, K**-0.5)
  seg = jnp.asarray(keep.astype(np.int32))
  got = layers.chunked_attention(
    qa,
    ka,
    va,
    None,
    K**-0.5,
    0,
    impl="splash",
    causal=True,
    q_seg_BxT=seg,
    kv_seg_BxS=seg,
    interpret=True,
  )
  assert got.shape == ref.shape
  return np.asarray(got), np.asarray(ref)


def test_splash_causal_gqa_key_mask_matches_dense_xla():
  """Text decoder case: causal, GQA (G=2 query heads per KV head), keys dropped mid-sequence
  (PGPO's blind view) and left padding; compared at the kept query rows."""
  B, T, N, G, K = 2, 256, 2, 2, 16
  keep = np.ones((B, T), bool)
  keep[0, :40] = False  # left padding
  keep[1, 100:150] = False  # visual tokens of the blind view
  got, ref = _splash_vs_dense_causal(*_qkv(B, T, N, G, K), keep)
  np.testing.assert_allclose(got[keep], ref[keep], atol=2e-5, rtol=2e-5)


def test_splash_segments_and_gradients_match_dense_xla():
  """Vision case: non-causal, windows as segment ids (padding -1); values and input gradients."""
  B, T, N, G, K = 1, 128, 2, 1, 16
  qa, ka, va = _qkv(B, T, N, G, K, seed=1)
  seg_np = np.repeat(np.arange(8), 16)[None].astype(np.int32)
  seg_np[:, 120:] = -1
  seg = jnp.asarray(seg_np)
  dense = jnp.asarray(seg_np[:, :, None] == seg_np[:, None, :])
  w = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, N, G, K)), jnp.float32)

  def loss(fn, qa, ka, va):
    return jnp.sum(fn(qa, ka, va) * w)

  xla = lambda a, b, c: layers.masked_softmax_attention(a, b, c, dense, K**-0.5)
  spl = lambda a, b, c: layers.chunked_attention(
    a, b, c, None, K**-0.5, 0, impl="splash", q_seg_BxT=seg, kv_seg_BxS=seg, interpret=True
  )
  np.testing.assert_allclose(
    np.asarray(spl(qa, ka, va)), np.asarray(xla(qa, ka, va)), atol=2e-5, rtol=2e-5
  )
  g_ref = jax.grad(functools.partial(loss, xla), argnums=(0, 1, 2))(qa, ka, va)
  g_got = jax.grad(functools.partial(loss, spl), argnums=(0, 1, 2))(qa, ka, va)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5)


def _bf16_qkv(B, T, N, G, K, sd, seed):
  r = np.random.default_rng(seed)
  f = lambda sd, *s: jnp.asarray(sd * r.standard_normal(s), jnp.bfloat16)
  return f(sd, B, T, N, G, K), f(sd, B, T, N, K), f(1.0, B, T, N, K)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_splash_operands_give_the_xla_paths_float32_scores(dtype):
  """The kernel takes no scale; its logits are q'·k' accumulated in float32. They equal the xla
  path's (q·k)·scale to float32 rounding, at K = 128 (scale 128^-0.5 is not a power of two). The
  old operands, q·scale rounded to bfloat16, were off by ~1e-3 of the largest score."""
  B, T, N, G, K = 1, 32, 2, 2, 128
  q, k, _ = _bf16_qkv(B, T, N, G, K, 3.0, seed=6)
  q, k = q.astype(dtype), k.astype(dtype)
  scale = K**-0.5
  q_op, k_op = layers.splash_operands(q, k, scale)
  assert q_op.dtype == dtype and k_op.dtype == dtype
  assert q_op.shape[-1] == k_op.shape[-1] == (K if dtype == jnp.float32 else 2 * K)
  scores = lambda a, b: jnp.einsum("btngq,bsnq->bngts", a, b, preferred_element_type=jnp.float32)
  ref = np.asarray(scores(q, k)) * scale
  got = np.asarray(scores(q_op, k_op))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_splash_in_bfloat16_has_no_rounding_the_xla_path_lacks():
  """bfloat16 q/k/v, K = 128, scores of standard deviation ~9 (peaked rows). Splash rounded
  q·scale to bfloat16 before its kernel, a rounding the xla path (float32 scores times the scale)
  does not have: mean |splash - xla| was 2.0e-3, and splash twice as far as xla from the exact
  attention of the same inputs. Now it is 7e-4 (what is left: xla rounds the probabilities to
  bfloat16 before P·V, splash does not; both round the output) and splash is no further from
  exact than xla. Gradients: the kernel's backward pass rounds dS to bfloat16 (the xla path's stays float32),
  so they are compared loosely, enough to catch a misplaced scale or a doubled term."""
  B, T, N, G, K = 1, 128, 1, 2, 128
  q, k, v = _bf16_qkv(B, T, N, G, K, 3.0, seed=0)
  seg = jnp.ones((B, T), jnp.int32)
  mask = jnp.tril(jnp.ones((T, T), bool))[None]
  kw = dict(mask_BxTxS=mask, scale=K**-0.5, chunk=0, causal=True, q_seg_BxT=seg, kv_seg_BxS=seg)
  attend = lambda impl: functools.partial(layers.chunked_attention, impl=impl, interpret=True, **kw)
  w = jnp.asarray(np.random.default_rng(7).standard_normal((B, T, N, G, K)), jnp.bfloat16)
  (xla, g_xla), (spl, g_spl), (exact, g_exact) = [
    (lambda o, vjp: (o, vjp(w.astype(o.dtype))))(*jax.vjp(attend(impl), *args))
    for impl, args in (
      ("xla", (q, k, v)),
      ("splash", (q, k, v)),
      ("xla", tuple(a.astype(jnp.float32) for a in (q, k, v))),
    )
  ]
  f32 = lambda a: np.asarray(a.astype(jnp.float32))
  err = lambda a, b: float(np.abs(f32(a) - f32(b)).mean())
  assert spl.dtype == jnp.bfloat16
  assert err(spl, xla) < 1e-3, err(spl, xla)
  assert err(spl, exact) <= err(xla, exact), (err(spl, exact), err(xla, exact))
  for name, a, b, ref in zip("qkv", g_spl, g_xla, g_exact):
    assert err(a, b) < 2e-2 * np.abs(f32(ref)).mean(), name


def test_packed_rows_through_splash_match_xla_and_each_sequence_alone(monkeypatch):
  """train.packing + splash: three sequences packed back to back into one row (segment ids 1, 2, 3,
  empty slots 0 at the end, each sequence's positions from 0), through the decoder. The splash
  path (interpret mode) gives the xla path's hidden states, and each sequence's equal those of the
  sequence run alone (unpacked, xla). The row without segment ids differs: the check can fail."""
  kernel, calls = layers.splash_attention, []

  def interpreted(*a, **kw):
    calls.append(kw["causal"])
    return kernel(*a, **{**kw, "interpret": True})

  monkeypatch.setattr(layers, "splash_attention", interpreted)
  cfg = qwen.tiny_config()
  model = qwen.init_model(cfg, "float32", seed=0)
  lengths, T = (37, 50, 29), 128
  seg_np = np.zeros((1, T), np.int32)
  pos_np = np.zeros((1, T), np.int32)
  starts = np.cumsum((0,) + lengths)
  spans = list(zip(starts[:-1], starts[1:]))
  for i, (a, b) in enumerate(spans):
    seg_np[0, a:b] = i + 1
    pos_np[0, a:b] = np.arange(b - a)
  ids = np.random.default_rng(8).integers(10, 400, (1, T)).astype(np.int32)
  x = model.language_model.embed(jnp.asarray(ids))
  pos = jnp.asarray(np.broadcast_to(pos_np[None], (3, 1, T)))
  keep = jnp.asarray(seg_np > 0)

  def decode(impl, x, pos, keep, seg):
    model.cfg = cfg.replace(attention_impl=impl)
    return np.asarray(qwen.run_decoder(model, x, pos, keep, segment_ids_BxT=seg)[0])

  xla = decode("xla", x, pos, keep, jnp.asarray(seg_np))
  spl = decode("splash", x, pos, keep, jnp.asarray(seg_np))
  assert calls == [True]
  real = seg_np[0] > 0
  np.testing.assert_allclose(spl[0, real], xla[0, real], atol=2e-5, rtol=2e-5)
  # The sequences alone: one batch, right-padded (a causal token never sees the keys after it).
  L = max(lengths)
  x_alone = jnp.stack([jnp.pad(x[0, a:b], ((0, L - (b - a)), (0, 0))) for a, b in spans])
  pos_alone = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (3, len(lengths), L))
  keep_alone = jnp.asarray(np.arange(L)[None] < np.asarray(lengths)[:, None])
  alone = decode("xla", x_alone, pos_alone, keep_alone, None)
  leaky = decode("xla", x, pos, keep, None)
  for i, (a, b) in enumerate(spans):
    np.testing.assert_allclose(spl[0, a:b], alone[i, : b - a], atol=2e-5, rtol=2e-5)
    if a > 0:  # a later sequence would see the earlier ones without its segment id
      assert np.abs(leaky[0, a:b] - alone[i, : b - a]).max() > 1e-3


def test_model_with_splash_attention_matches_xla(monkeypatch):
  """The whole decoder (text + a key mask) with attention_impl='splash' equals the xla model."""
  kernel, calls = layers.splash_attention, []

  def interpreted(*a, **kw):
    calls.append(kw["causal"])
    return kernel(*a, **{**kw, "interpret": True})

  monkeypatch.setattr(layers, "splash_attention", interpreted)
  cfg = qwen.tiny_config()
  model = qwen.init_model(cfg, "float32", seed=0)
  B, T = 2, 128
  ids = np.random.default_rng(3).integers(10, 400, (B, T)).astype(np.int32)
  pos = np.broadcast_to(np.arange(T, dtype=np.int32)[None, None], (3, B, T))
  keep = np.ones((B, T), bool)
  keep[0, :17] = False
  keep[1, 30:60] = False
  ref = qwen.logits_from_hidden(model, qwen.hidden_states(model, ids, pos, keep))
  model.cfg = cfg.replace(attention_impl="splash")
  got = qwen.logits_from_hidden(model, qwen.hidden_states(model, ids, pos, keep))
  assert calls == [True]  # the scanned decoder layer traced once, through the kernel
  np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(ref)[keep], atol=1e-4, rtol=1e-4)


def test_cudnn_path_plumbing_matches_dense_xla(monkeypatch):
  """cuDNN needs a GPU; here `jax.nn.dot_product_attention` runs its xla implementation on exactly the
  arguments the cudnn path builds (GQA heads, scale, the [B, 1, T, S] segment mask)."""
  real = jax.nn.dot_product_attention
  seen = []

  def as_xla(*a, implementation=None, **kw):
    seen.append(implementation)
    return real(*a, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  B, T, N, G, K = 2, 64, 2, 2, 16
  qa, ka, va = _qkv(B, T, N, G, K, seed=4)
  keep = np.ones((B, T), bool)
  keep[0, :9] = False
  keep[1, 20:33] = False
  dense = jnp.asarray(np.tril(np.ones((T, T), bool))[None] & keep[:, None, :])
  ref = layers.masked_softmax_attention(qa, ka, va, dense, K**-0.5)
  seg = jnp.asarray(keep.astype(np.int32))
  got = layers.chunked_attention(
    qa, ka, va, dense, K**-0.5, 0, impl="cudnn", causal=True, q_seg_BxT=seg, kv_seg_BxS=seg
  )
  assert seen == ["cudnn"]
  np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(ref)[keep], atol=2e-5, rtol=2e-5)
  assert np.isfinite(np.asarray(got)).all()  # no empty rows, even under left padding


@pytest.mark.parametrize("causal", [False, True])
def test_query_chunks_are_rematerialised_and_keep_the_gradients(causal):
  """xla attention over query chunks: each chunk is a `jax.checkpoint` (its [chunk, S] scores are
  recomputed in the backward pass rather than kept for every chunk at once); values and input
  gradients equal the unchunked dense path. `causal`: with a chunk size, causal self-attention
  takes the same rematerialised map (not the Python loop of causal blocks)."""
  B, T, N, G, K, chunk = 2, 64, 2, 2, 16, 16
  qa, ka, va = _qkv(B, T, N, G, K, seed=3)
  q = jnp.asarray(np.random.default_rng(4).standard_normal((B, T, N, G, K)), jnp.float32)
  mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
  w = jnp.asarray(np.random.default_rng(5).standard_normal((B, T, N, G, K)), jnp.float32)
  del qa

  def loss(c, q, k, v):
    return jnp.sum(layers.chunked_attention(q, k, v, mask, K**-0.5, c, causal=causal) * w)

  jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, chunk)))(q, ka, va))
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert "checkpoint" not in str(jax.make_jaxpr(jax.grad(functools.partial(loss, 0)))(q, ka, va))
  g_ref = jax.grad(functools.partial(loss, 0), argnums=(0, 1, 2))(q, ka, va)
  g_got = jax.grad(functools.partial(loss, chunk), argnums=(0, 1, 2))(q, ka, va)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_splash_pads_lengths_that_are_not_lane_multiples():
  """Sequences of 200 and 40 tokens (not multiples of 128) against the dense reference."""
  for T in (200, 40):
    keep = np.ones((2, T), bool)
    keep[0, : T // 5] = False
    got, ref = _splash_vs_dense_causal(*_qkv(2, T, 2, 2, 16, seed=T), keep)
    np.testing.assert_allclose(got[keep], ref[keep], atol=2e-5, rtol=2e-5)


def test_fused_attention_runs_per_device_under_shard_map():
  """On an 8-device mesh (fsdp 4 x tensor 2) the fused kernel runs under shard_map: rows split over
  the batch axes, heads over `tensor` (KV heads when it divides them, else the query groups);
  values and gradients equal the dense xla path, and `auto` picks by the mesh's platform."""
  from tests.multidevice import run_on_8_devices

  out = run_on_8_devices(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from pgpo_jax import sharding
    from pgpo_jax.models.qwen2_5_vl import layers

    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    rules = sharding.TRAIN_RULES
    res = {}
    res["specs_heads"] = [str(s) for s in layers.fused_specs(mesh, rules, 4, 2, 2)]
    res["specs_groups"] = [str(s) for s in layers.fused_specs(mesh, rules, 4, 1, 4)]
    res["specs_none"] = [str(s) for s in layers.fused_specs(mesh, rules, 2, 1, 3)]
    mesh3 = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    res["specs_data_fsdp"] = [str(s) for s in layers.fused_specs(mesh3, rules, 4, 2, 2)]
    errs = []
    for N, G in ((2, 2), (1, 4)):
      B, T, K = 4, 200, 16
      r = np.random.default_rng(N)
      q = jnp.asarray(r.standard_normal((B, T, N, G, K)), jnp.float32)
      k = jnp.asarray(r.standard_normal((B, T, N, K)), jnp.float32)
      v = jnp.asarray(r.standard_normal((B, T, N, K)), jnp.float32)
      keep = np.ones((B, T), bool); keep[1, :30] = False; keep[2, 50:90] = False
      seg = jnp.asarray(keep.astype(np.int32))
      dense = jnp.asarray(np.tril(np.ones((T, T), bool))[None] & keep[:, None, :])
      w = jnp.asarray(keep[:, :, None, None, None] * r.standard_normal((B, T, N, G, K)), jnp.float32)

      def loss(impl, q, k, v):
        o = layers.chunked_attention(q, k, v, dense, K**-0.5, 0, impl=impl, causal=True,
                                     q_seg_BxT=seg, kv_seg_BxS=seg, interpret=True)
        return jnp.sum(o * w), o

      with sharding.use_rules(mesh, rules):
        f = jax.jit(jax.value_and_grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2), has_aux=True))
        g = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True))
        (_, o1), g1 = f(q, k, v)
        (_, o2), g2 = g(q, k, v)
        jaxpr = str(jax.make_jaxpr(lambda *a: loss("splash", *a))(q, k, v))
        res["auto_on_cpu_mesh"] = layers.resolve_attention_impl("auto")
      errs.append(float(np.abs(np.asarray(o1)[keep] - np.asarray(o2)[keep]).max()))
      errs.append(max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(g1, g2)))
      res.setdefault("shard_map", []).append("shard_map" in jaxpr)
    res["errs"] = errs
    print(json.dumps(res))
    """
  )
  assert out["specs_heads"] == [
    str(P("fsdp", None, "tensor", None, None)),
    str(P("fsdp", None, "tensor", None)),
    str(P("fsdp", None)),
  ]
  assert out["specs_groups"][0] == str(P("fsdp", None, None, "tensor", None))
  assert out["specs_groups"][1] == str(P("fsdp", None, None, None))
  # 2 rows do not split over 4 shards, nor 1 KV head x 3 groups over 2: the kernel sees all of it.
  assert out["specs_none"][0] == str(P(None, None, None, None, None))
  # data x fsdp both > 1: rows split over the two together.
  assert out["specs_data_fsdp"][0] == str(P(("data", "fsdp"), None, "tensor", None, None))
  assert out["shard_map"] == [True, True]
  assert out["auto_on_cpu_mesh"] == "xla"
  assert max(out["errs"]) < 1e-4, out["errs"]


def test_model_with_splash_on_a_mesh_matches_xla():
  """The whole model (vision tower with a full-attention layer, decoder, left padding, the blind
  view's key mask) traced under an 8-device mesh's rules: splash (interpret mode) per device under
  shard_map gives the xla model's logits."""
  from tests.multidevice import run_on_8_devices

  out = run_on_8_devices(
    """
    import json
    import numpy as np
    from pgpo_jax import sharding
    from pgpo_jax.models import qwen2_5_vl as qwen
    from pgpo_jax.models.qwen2_5_vl import layers
    from tests.hf_utils import IMAGE, left_pad, make_ids, random_pixels

    kernel, calls = layers.splash_attention, []

    def interpreted(*a, **kw):
      calls.append(bool(kw["causal"]))
      return kernel(*a, **{**kw, "interpret": True})

    layers.splash_attention = interpreted
    cfg = qwen.tiny_config()
    model = qwen.init_model(cfg, "float32", seed=0)
    rng = np.random.default_rng(0)
    grids = [[(1, 4, 8)], [(1, 8, 8)], [(1, 4, 4)], [(1, 6, 4)]]
    ids, am = left_pad([make_ids(rng, g, pre=3 + 5 * i) for i, g in enumerate(grids)])
    flat = np.asarray([g for row in grids for g in row])
    pixels = random_pixels(rng, flat)
    blind = am * (ids != IMAGE)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    res = {}
    with sharding.use_rules(mesh, sharding.TRAIN_RULES):
      for impl in ("xla", "splash"):
        model.cfg = cfg.replace(attention_impl=impl)
        res[impl] = [
          np.asarray(qwen.forward(model, ids, am, pixels, flat)),
          np.asarray(qwen.forward(model, ids, am, pixels, flat, key_mask=blind)),
        ]
    # Compared where a view's outputs are used: kept tokens (in the blind view, the text tokens;
    # a dropped token's own row is never read, and the two backends fill it differently).
    keeps = (am.astype(bool), blind.astype(bool))
    errs = [
      float(np.abs(a[k] - b[k]).max()) for a, b, k in zip(res["xla"], res["splash"], keeps)
    ]
    scale = float(np.abs(res["xla"][0][keeps[0]]).max())
    print(json.dumps(dict(errs=errs, scale=scale, calls=sorted(set(calls)))))
    """
  )
  assert out["calls"] == [False, True]  # the vision tower's full layer and the decoder
  assert max(out["errs"]) < 1e-4 * max(1.0, out["scale"]), out
