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
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 key_mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


class DecoderLayers(nnx.Module):
  """L decoder layers, parameters stacked on a leading `layers` axis."""

  NAMES = ("input_norm", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "post_norm",
           "w_gate", "w_up", "w_down")

  def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
    L, D, H, N, K, I = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size)
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

  def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.embed_tokens = layers.param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
    self.layers = DecoderLayers(cfg, dtype, rngs)
    self.norm = layers.param(rngs, (cfg.hidden_size,), ("embed",), dtype, "ones")

  def embed(self, input_ids_BxT: jnp.ndarray) -> jnp.ndarray:
    return jnp.take(self.embed_tokens[...], input_ids_BxT, axis=0)

  def __call__(self, x_BxTxD: jnp.ndarray, position_ids_3xBxT: jnp.ndarray, key_mask_BxT: jnp.ndarray,
               cache: KVCache | None = None, *, segment_ids_BxT: jnp.ndarray | None = None,
               remat_policy: str = "none", use_scan: bool = True,
               attention_chunk_size: int = 0) -> tuple[jnp.ndarray, KVCache | None]:
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
      start = None
      kv_mask = None
    else:
      start = cache.index
      S = cache.max_len
      kv_mask = jax.lax.dynamic_update_slice(cache.key_mask, key_mask_BxT, (0, start))
      q_slot = start + jnp.arange(T)
      causal = jnp.arange(S)[None, :] <= q_slot[:, None]  # [T, S]
      mask = causal[None] & kv_mask[:, None, :]
    scale = K ** -0.5

    resid = lambda x: constrain(x, ("batch", "length", "act_embed"))

    def layer(x, xs):
      p, ck, cv = xs
      x = resid(x)
      h = layers.rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
      q = jnp.einsum("btd,dhk->bthk", h, p["wq"]) + p["bq"]
      k = jnp.einsum("btd,dnk->btnk", h, p["wk"]) + p["bk"]
      v = jnp.einsum("btd,dnk->btnk", h, p["wv"]) + p["bv"]
      q = rope.apply_rotary(q, cos, sin)
      k = rope.apply_rotary(k, cos, sin)
      if ck is not None:
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, start, 0, 0))
        k_all, v_all = ck.astype(dt), cv.astype(dt)
      else:
        k_all, v_all = k, v
      att = layers.chunked_attention(q.reshape(B, T, N, G, K), k_all, v_all, mask, scale,
                                     attention_chunk_size).reshape(B, T, H, K)
      x = x + jnp.einsum("bthk,hkd->btd", att, p["wo"])
      h = layers.rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
      x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
      return resid(x), (ck, cv)

    body = layers.maybe_remat(layer, remat_policy)
    params = layers.values(self.layers, DecoderLayers.NAMES)
    ks = None if cache is None else cache.k
    vs = None if cache is None else cache.v
    x, (new_k, new_v) = layers.scan_layers(body, resid(x_BxTxD.astype(dt)), (params, ks, vs),
                                           cfg.num_hidden_layers, use_scan)
    x = layers.rms_norm(x, self.norm[...], cfg.rms_norm_eps)
    if cache is None:
      return x, None
    return x, KVCache(k=new_k, v=new_v, key_mask=kv_mask, index=start + T)
