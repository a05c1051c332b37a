"""The Qwen2 decoder of Qwen2.5-VL: GQA with qkv bias, M-RoPE, SwiGLU, scanned layers, KV cache.

Attention is masked by data: a key mask [B, S] that can drop any token set (padding, or the
visual tokens for PGPO's blind view) while the position ids stay those of the full sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pgpo_jax.logical_axes import constrain  # the identity unless a caller set `use_rules`
from pgpo_jax.models.qwen2_5_vl import layers, rope
from pgpo_jax.models.qwen2_5_vl.config import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Post-RoPE keys/values of every layer, preallocated to `max_len` (S).

  k, v:     [L, B, S, KV, K]
  key_mask: [B, S] bool, which cache slots may be attended to (written and not masked out).
  index:    [] int32, number of slots written so far (all rows advance together).
  """

  k: jnp.ndarray
  v: jnp.ndarray
  key_mask: jnp.ndarray
  index: jnp.ndarray

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype) -> KVCache:
  shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  return KVCache(
    k=jnp.zeros(shape, dtype),
    v=jnp.zeros(shape, dtype),
    key_mask=jnp.zeros((batch, max_len), bool),
    index=jnp.zeros((), jnp.int32),
  )


class DecoderLayers(nnx.Module):
  """L decoder layers, parameters stacked on a leading `layers` axis."""

  NAMES = (
    "input_norm",
    "wq",
    "bq",
    "wk",
    "bk",
    "wv",
    "bv",
    "wo",
    "post_norm",
    "w_gate",
    "w_up",
    "w_down",
  )

  def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
    L, D, H, N, K, I = (
      cfg.num_hidden_layers,
      cfg.hidden_size,
      cfg.num_attention_heads,
      cfg.num_key_value_heads,
      cfg.head_dim,
      cfg.intermediate_size,
    )
    p = lambda shape, axes, init="normal": layers.param(rngs, shape, axes, dtype, init)
    self.input_norm = p((L, D), ("layers", "embed"), "ones")
    self.wq = p((L, D, H, K), ("layers", "embed", "heads", "head_dim"))
    self.bq = p((L, H, K), ("layers", "heads", "head_dim"), "zeros")
    self.wk = p((L, D, N, K), ("layers", "embed", "kv_heads", "head_dim"))
    self.bk = p((L, N, K), ("layers", "kv_heads", "head_dim"), "zeros")
    self.wv = p((L, D, N, K), ("layers", "embed", "kv_heads", "head_dim"))
    self.bv = p((L, N, K), ("layers", "kv_heads", "head_dim"), "zeros")
    self.wo = p((L, H, K, D), ("layers", "heads", "head_dim", "embed"))
    self.post_norm = p((L, D), ("layers", "embed"), "ones")
    self.w_gate = p((L, D, I), ("layers", "embed", "mlp"))
    self.w_up = p((L, D, I), ("layers", "embed", "mlp"))
    self.w_down = p((L, I, D), ("layers", "mlp", "embed"))


class TextModel(nnx.Module):
  """Embedding table, decoder layers and final norm (the LM head lives on the outer model)."""

  def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs, param_dtype=None):
    """`dtype`: compute dtype (activations, KV cache); `param_dtype`: parameters (default `dtype`)."""
    self.cfg = cfg
    self.dtype = dtype
    pdt = dtype if param_dtype is None else param_dtype
    self.embed_tokens = layers.param(
      rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt
    )
    self.layers = DecoderLayers(cfg, pdt, rngs)
    self.norm = layers.param(rngs, (cfg.hidden_size,), ("embed",), pdt, "ones")

  def embed(self, input_ids_BxT: jnp.ndarray) -> jnp.ndarray:
    """[B, T, D] (any leading dims) embeddings in the compute dtype.

    The table is cast, then gathered whole along D before the lookup. TRAIN layouts split the
    table's D over `fsdp`: a lookup in it returns rows split over D, which the batch-split layers
    then re-lay with an all-to-all over the fsdp devices (on v5e-256, 64 of them, that all-to-all
    aborts the TPU compiler). One all-gather of the [vocab/tensor, D] table (272 MiB in bfloat16 at
    7B) costs less and leaves the rows split like the ids. Cast-then-gather = gather-then-cast.
    """
    table_VxD = constrain(self.embed_tokens[...].astype(self.dtype), ("vocab", None))
    return jnp.take(table_VxD, input_ids_BxT, axis=0)

  def __call__(
    self,
    x_BxTxD: jnp.ndarray,
    position_ids_3xBxT: jnp.ndarray,
    key_mask_BxT: jnp.ndarray,
    cache: KVCache | None = None,
    *,
    segment_ids_BxT: jnp.ndarray | None = None,
    remat_policy: str = "none",
    use_scan: bool = True,
    attention_chunk_size: int = 0,
    attention_impl: str = "xla",
  ) -> tuple[jnp.ndarray, KVCache | None]:
    """Runs the decoder on T new tokens. Returns final-normed hidden states [B, T, D] and the cache.

    Without a cache, attention is causal over the T tokens and `key_mask_BxT` drops keys. With a
    cache, the T tokens are written at slots [index, index+T) and attend to every earlier slot
    whose cache key mask is set plus themselves causally (`key_mask_BxT` marks which new ones count).
    `segment_ids_BxT` (no cache only): packed rows, several sequences back to back; a token attends
    only to earlier tokens of its own segment.
    """
    cfg, dt = self.cfg, self.dtype
    B, T, _ = x_BxTxD.shape
    H, N, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G = H // N
    cos, sin = rope.mrope_cos_sin(position_ids_3xBxT, K, cfg.rope_theta, cfg.mrope_section)
    cos, sin = cos.astype(dt), sin.astype(dt)  # HF casts text cos/sin to the activation dtype
    key_mask_BxT = key_mask_BxT.astype(bool)
    if cache is not None and segment_ids_BxT is not None:
      raise ValueError("segment_ids_BxT (packed rows) is for uncached passes only")
    if cache is None:
      causal = jnp.tril(jnp.ones((T, T), bool))
      mask = causal[None] & key_mask_BxT[:, None, :]  # [B, T, S=T]
      if segment_ids_BxT is not None:
        mask &= segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
      # The same mask as segment ids for the fused kernels: kept tokens see kept keys of their own
      # (packed) segment causally; a dropped token (0) sees only dropped ones, itself included, so
      # no row is empty (its output is never used, as with the dense mask).
      seg = key_mask_BxT.astype(jnp.int32)
      if segment_ids_BxT is not None:
        seg = jnp.where(key_mask_BxT, segment_ids_BxT.astype(jnp.int32) + 1, 0)
      start = None
      kv_mask = None
    else:
      start = cache.index
      S = cache.max_len
      kv_mask = jax.lax.dynamic_update_slice(cache.key_mask, key_mask_BxT, (0, start))
      q_slot = start + jnp.arange(T)
      causal = jnp.arange(S)[None, :] <= q_slot[:, None]  # [T, S]
      mask = causal[None] & kv_mask[:, None, :]
      seg = None  # cached steps: the dense-mask path
    scale = K**-0.5

    resid = lambda x: constrain(x, ("batch", "length", "act_embed"))

    def layer(x, xs):
      p, ck, cv = xs
      p = layers.cast(p, dt)  # this layer's weights in the compute dtype (float32 masters stay put)
      x = resid(x)
      h = layers.rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
      # Matmul outputs carry the names the remat policies save by (`layers.REMAT_SAVED`).
      q = layers.dot("btd,dhk->bthk", h, p["wq"], "q_proj") + p["bq"]
      k = layers.dot("btd,dnk->btnk", h, p["wk"], "k_proj") + p["bk"]
      v = layers.dot("btd,dnk->btnk", h, p["wv"], "v_proj") + p["bv"]
      q = rope.apply_rotary(q, cos, sin)
      k = rope.apply_rotary(k, cos, sin)
      if ck is not None:
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, start, 0, 0))
        k_all, v_all = ck.astype(dt), cv.astype(dt)
      else:
        k_all, v_all = k, v
      att = layers.chunked_attention(
        q.reshape(B, T, N, G, K),
        k_all,
        v_all,
        mask,
        scale,
        attention_chunk_size,
        impl=attention_impl,
        causal=cache is None,  # with a cache, queries sit at slots [index, index+T) of S
        q_seg_BxT=seg,
        kv_seg_BxS=seg,
      ).reshape(B, T, H, K)
      x = x + layers.dot("bthk,hkd->btd", att, p["wo"], "o_proj")
      h = layers.rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
      gate = jax.nn.silu(layers.dot("btd,di->bti", h, p["w_gate"], "mlp_gate"))
      up = layers.dot("btd,di->bti", h, p["w_up"], "mlp_up")
      x = x + layers.dot("bti,id->btd", gate * up, p["w_down"], "mlp_down")
      return resid(x), (ck, cv)

    body = layers.maybe_remat(layer, remat_policy)
    params = layers.values(self.layers, DecoderLayers.NAMES)
    ks = None if cache is None else cache.k
    vs = None if cache is None else cache.v
    x, (new_k, new_v) = layers.scan_layers(
      body, resid(x_BxTxD.astype(dt)), (params, ks, vs), cfg.num_hidden_layers, use_scan
    )
    x = layers.rms_norm(x, self.norm[...], cfg.rms_norm_eps)
    if cache is None:
      return x, None
    return x, KVCache(k=new_k, v=new_v, key_mask=kv_mask, index=start + T)


# ------------------------------------------------------------------------------------------------
# Decode: one new token per row; its keys/values written in place; attention over filled slots
# ------------------------------------------------------------------------------------------------
DECODE_CHUNK = 512  # cache slots per step of the length-aware attention loop


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptKV:
  """Post-RoPE keys/values of P prompts that decode rows read but never write.

  k, v: one [P, KV, T, K] array per layer (tuples of length L), kv-heads-major.
  mask: [P, T] bool, the prompt's real tokens (False on padding).
  A prompt's G samples all read this one copy (`decode` with `row_prompt_R=None`).
  """

  k: tuple
  v: tuple
  mask: jnp.ndarray


def layer_weights(model: TextModel) -> tuple[dict[str, jnp.ndarray], ...]:
  """The decoder's weights as one dict per layer (a copy). Inside a decode loop, slices of the
  stacked arrays are copied every step on CPU; split once before the loop instead."""
  params = layers.values(model.layers, DecoderLayers.NAMES)
  return tuple({k: w[i] for k, w in params.items()} for i in range(model.cfg.num_hidden_layers))


def _partial_attention(q_BxQxNxGxK, k, v, valid_BxQxS, heads_first: bool, fold_heads: bool = False):
  """Softmax attention over S keys, not yet normalised, in float32: (max, sum, weighted values).

  k, v: [B, N, S, K] (heads_first) or [B, S, N, K]. Returns m [B, Q, N, G], l [B, Q, N, G] (sum
  of exp(score - m) over valid keys) and acc [B, Q, N, G, K]. A query without any valid key gives
  m = finfo.min, l = 0, acc = 0. `fold_heads` (heads_first only): merge (batch, kv head) into one
  batch dim, one batched matmul (4x faster on XLA:CPU than two batch dims; but on a mesh that
  splits both dims the merge would reshard k and v every step).
  """
  B, Q, N, G, K = q_BxQxNxGxK.shape
  S = k.shape[2] if heads_first else k.shape[1]
  fold = heads_first and fold_heads
  if fold:
    q = jnp.swapaxes(q_BxQxNxGxK, 1, 2).reshape(B * N, Q * G, K)
    s = jnp.einsum("xqk,xsk->xqs", q, k.reshape(B * N, S, K), preferred_element_type=jnp.float32)
    s = jnp.swapaxes(s.reshape(B, N, Q, G, S), 1, 2)
  else:
    kv = "bnsk" if heads_first else "bsnk"
    s = jnp.einsum(f"bqngk,{kv}->bqngs", q_BxQxNxGxK, k, preferred_element_type=jnp.float32)
  valid = valid_BxQxS[:, :, None, None, :]
  s = jnp.where(valid, s, jnp.finfo(jnp.float32).min)
  m = jnp.max(s, axis=-1)
  p = jnp.where(valid, jnp.exp(s - m[..., None]), 0.0)
  # Weights in the values' dtype, as `layers.masked_softmax_attention` does (XLA:CPU has no
  # bf16 x bf16 -> f32 dot); the chunks' sums are then accumulated in float32.
  pv = p.astype(v.dtype)
  if fold:
    acc = jnp.einsum(
      "xqs,xsk->xqk", jnp.swapaxes(pv, 1, 2).reshape(B * N, Q * G, S), v.reshape(B * N, S, K)
    )
    acc = jnp.swapaxes(acc.reshape(B, N, Q, G, K), 1, 2)
  else:
    acc = jnp.einsum(f"bqngs,{kv}->bqngk", pv, v)
  return m, jnp.sum(p, axis=-1), acc.astype(jnp.float32)


def _merge_partials(a, b):
  """Combines two partial softmaxes over disjoint key sets (exact when one of them is empty:
  its weight is exp(finfo.min - m) = 0 and the other's is exp(0) = 1)."""
  m = jnp.maximum(a[0], b[0])
  wa, wb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
  return m, a[1] * wa + b[1] * wb, a[2] * wa[..., None] + b[2] * wb[..., None]


def decode(
  model: TextModel,
  x_RxD,
  position_R,
  slot_R,
  k_rows,
  v_rows,
  *,
  heads_first: bool = False,
  row_mask_RxS=None,
  filled=None,
  prompt: PromptKV | None = None,
  row_prompt_R=None,
  shards: int = 1,
  chunk: int = DECODE_CHUNK,
  weights=None,
  fold_heads: bool = False,
  bits_scatter: bool = False,
):
  """Runs the decoder on ONE new token per row. Returns final-normed hidden states [R, D] and the
  updated row buffers (k_rows, v_rows).

  Row r's token sits at text position position_R[r] (the same on the 3 M-RoPE axes). Its key and
  value are written at slot slot_R[r] of the row buffers `k_rows` / `v_rows` — per layer
  [R, S, KV, K], or [R, KV, S, K] with `heads_first`; a stacked [L, ...] array or a tuple of L
  arrays — and nothing else is written, so a decode loop that carries (and donates) the buffers
  updates them in place. The token attends to
    - its prompt's keys, if `prompt` is given: row r continues prompt row_prompt_R[r], or, with
      `row_prompt_R=None`, rows are prompt-major groups (R = P * G, rows p*G .. p*G+G-1 read prompt
      p: one read of the prompt per group). With `shards` > 1 the rows and prompts are split into
      that many equal contiguous blocks and a row's prompt must lie in its own block (a
      shard-local gather under a batch-sharded mesh);
    - its row-buffer slots j <= slot_R[r] (and, if given, with row_mask_RxS[r, j] set).
  Length-aware: only slots below `filled` (a traced scalar; default all S) are read, in chunks of
  `chunk` slots in a loop, so a step costs O(filled), not O(S). Chunks need S % chunk == 0;
  otherwise, or when S <= chunk, all S slots are read at once.
  `weights`: `layer_weights(model)` computed outside the caller's loop (default: sliced here).
  `fold_heads`: attention matmuls with (row, kv head) as one batch dim (`_partial_attention`).
  `bits_scatter`: write bf16 buffers as uint16 bits. XLA:CPU has no bf16 scatter: it converts the
  whole buffer to float32 and back around every write (3x the cache's bytes per layer per token,
  ~40% of a bf16 decode step at 32 rows x 64 slots); the uint16 scatter writes one slot in place.
  """
  cfg, dt = model.cfg, model.dtype
  R = x_RxD.shape[0]
  H, N, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  G = H // N
  ax = 2 if heads_first else 1  # the slot axis of a layer's buffer
  S = k_rows[0].shape[ax]
  pos = jnp.broadcast_to(position_R[None, :, None], (3, R, 1))
  cos, sin = rope.mrope_cos_sin(pos, K, cfg.rope_theta, cfg.mrope_section)
  cos, sin = cos.astype(dt), sin.astype(dt)
  scale = K**-0.5
  slot_R = slot_R.astype(jnp.int32)
  rows = jnp.arange(R)
  resid = lambda x: constrain(x, ("batch", "act_embed"))
  weights = layer_weights(model) if weights is None else weights

  def scatter(b, idx, new):  # b[idx] = new, in place
    if not (bits_scatter and b.dtype == jnp.bfloat16):
      return b.at[idx].set(new.astype(b.dtype))
    # The same bits as uint16, scattered in place (see `bits_scatter`).
    u16 = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
    out = u16(b).at[idx].set(u16(new.astype(b.dtype)))
    return jax.lax.bitcast_convert_type(out, jnp.bfloat16)

  def write(buf, i, new_RxNxK):  # only row r's slot slot_R[r] of layer i changes
    idx = (rows, slice(None), slot_R) if heads_first else (rows, slot_R)
    if isinstance(buf, (tuple, list)):
      return buf[:i] + (scatter(buf[i], idx, new_RxNxK),) + buf[i + 1 :]
    return scatter(buf, (i,) + idx, new_RxNxK)

  def read(buf, i, start, size):  # slots [start, start + size) of layer i
    b = buf[i]  # a tuple element, or a static slice of the stacked array
    return b if size == S else jax.lax.dynamic_slice_in_dim(b, start, size, axis=ax)

  def row_valid(start, size):  # [R, size]
    j = start + jnp.arange(size)
    ok = j[None, :] <= slot_R[:, None]
    if row_mask_RxS is not None:
      ok &= jax.lax.dynamic_slice_in_dim(row_mask_RxS, start, size, axis=1)
    return ok

  chunked = 0 < chunk < S and S % chunk == 0
  if chunked:
    filled = S if filled is None else filled
    n_chunks = (jnp.minimum(filled, S) + chunk - 1) // chunk

  def prompt_partial(i, q_RxNxGxK):
    pk, pv = prompt.k[i], prompt.v[i]
    P = pk.shape[0]
    if row_prompt_R is None:  # prompt-major groups: q [P, G_samples, ...] against one prompt copy
      m, l, acc = _partial_attention(
        q_RxNxGxK.reshape(P, R // P, N, G, K), pk, pv, prompt.mask[:, None, :], True, fold_heads
      )
      return m.reshape(R, 1, N, G), l.reshape(R, 1, N, G), acc.reshape(R, 1, N, G, K)
    # Each row reads its own prompt: a gather within each of the `shards` blocks.
    n = shards
    local = (row_prompt_R - (rows // (R // n)) * (P // n)).reshape(n, R // n)
    take = lambda a: jax.vmap(lambda blk, idx: blk[idx])(
      a.reshape((n, P // n) + a.shape[1:]), local
    ).reshape((R,) + a.shape[1:])
    return _partial_attention(
      q_RxNxGxK[:, None], take(pk), take(pv), take(prompt.mask)[:, None, :], True, fold_heads
    )

  mm = layers.dot  # the weight matmuls of the uncached pass, so decode rounds where it does

  def layer(i, x, k_rows, v_rows):
    p = layers.cast(weights[i], dt)  # a no-op for the rollout's cast copy
    x = resid(x)
    h = layers.rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
    q = mm("rd,dhk->rhk", h, p["wq"]) + p["bq"]
    k = mm("rd,dnk->rnk", h, p["wk"]) + p["bk"]
    v = mm("rd,dnk->rnk", h, p["wv"]) + p["bv"]
    q = rope.apply_rotary(q[:, None], cos, sin)[:, 0]
    k = rope.apply_rotary(k[:, None], cos, sin)[:, 0]
    k_rows, v_rows = write(k_rows, i, k), write(v_rows, i, v)
    q = (q * scale).reshape(R, 1, N, G, K)  # one query per row, scaled once here
    if prompt is not None:
      acc = prompt_partial(i, q[:, 0])
    else:
      big = jnp.finfo(jnp.float32).min
      acc = (jnp.full((R, 1, N, G), big), jnp.zeros((R, 1, N, G)), jnp.zeros((R, 1, N, G, K)))
    attend = lambda start, size: _partial_attention(
      q,
      read(k_rows, i, start, size),
      read(v_rows, i, start, size),
      row_valid(start, size)[:, None],
      heads_first,
      fold_heads,
    )
    if chunked:
      acc = jax.lax.fori_loop(
        0, n_chunks, lambda c, acc: _merge_partials(acc, attend(c * chunk, chunk)), acc
      )
    else:
      acc = _merge_partials(acc, attend(0, S))
    _, l, out = acc
    att = (out / jnp.where(l == 0, 1.0, l)[..., None]).astype(dt).reshape(R, H, K)
    x = x + mm("rhk,hkd->rd", att, p["wo"])
    h = layers.rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
    gate = jax.nn.silu(mm("rd,di->ri", h, p["w_gate"])) * mm("rd,di->ri", h, p["w_up"])
    x = x + mm("ri,id->rd", gate, p["w_down"])
    return resid(x), k_rows, v_rows

  x = x_RxD.astype(dt)
  for i in range(cfg.num_hidden_layers):  # unrolled: each layer's buffer is written where it lies
    x, k_rows, v_rows = layer(i, x, k_rows, v_rows)
  return layers.rms_norm(x, model.norm[...], cfg.rms_norm_eps), k_rows, v_rows
