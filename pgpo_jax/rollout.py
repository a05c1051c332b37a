"""Rollout: prefill each prompt once, then sample G completions per prompt in a jitted while loop.

This module holds the rollout's containers, sampling maths and the bodies of its device programs;
`programs.py` jits them and `sampler.py` runs them:

    from pgpo_jax import sampler
    out = sampler.generate(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                           max_new_tokens=256, temperature=1.0, num_samples=8, seed=0)
    out.tokens  # [B*G, max_new_tokens], prompt-major: prompt b's samples are rows b*G .. b*G+G-1

Programs, compiled once per (batch bucket, prompt bucket, patch bucket, max_new_tokens, G,
sampling config, mesh):
  1. `start`: vision tower + prefill of the B prompts (images encoded once per prompt), the KV
     cache repeated G times along the batch (prompt-major), the first token sampled -> `DecodeState`.
  2. `decode`: `lax.while_loop` over `DecodeState` (donated): feed the last token, sample the next,
     until every row has emitted a stop token or `max_new_tokens` tokens exist.
  3. `finish`: masks, lengths, truncation flags -> `RolloutOutput`.
Decode positions continue per row from max(prompt positions) + 1 (docs/qwen2_5_vl_port.md §2.5), so
left padding and M-RoPE image offsets need no rope-delta bookkeeping.

RNG (results independent of batch composition, padding and sharding). With `key` the call's key,
each row has its own stream
    row_key(p, g) = fold_in(fold_in(key, p), g),  token key at step s = fold_in(row_key, s)
where p is the prompt's *stream id* (default: its index in the call; pass `prompt_ids`, e.g. the
data row index, to make a prompt's samples independent of where it sits in the batch) and g the
sample index in [0, G). Padding rows and padding tokens never touch a real row's stream.

Log-prob semantics (`RolloutOutput`):
  logprobs:     log q(x_t), q = the SAMPLING distribution (logits / temperature, then top-k, then
                top-p, renormalised). This is what importance ratios against the behaviour policy
                need. Greedy decoding (temperature 0) is a point mass: 0.
  raw_logprobs: log softmax(logits)[x_t] of the unmodified model (temperature 1, no filtering), as
                a scoring pass would compute it (one extra logsumexp per step).

The host-side `prepare_inputs` turns HF-processor outputs (left or right padded) into bucketed,
left-padded `RolloutInputs`. With a mesh, rows go over the logical `batch` axis, i.e. (data, fsdp)
under SAMPLE_RULES; each program pins its inputs' and outputs' layout by logical axes
(`logical_axes`) inside, since the buckets' shapes decide where a dimension cannot be split.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pgpo_jax import sharding
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.buckets import batch_bucket, seq_bucket
from pgpo_jax.models.qwen2_5_vl.rope import valid_grids

Array = jax.Array


# ------------------------------------------------------------------------------------------------
# Typed containers
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are drawn. Static: a change compiles new programs.

  temperature: 0 = greedy argmax; otherwise logits are divided by it.
  top_k: keep the k most likely tokens (0 = off). Applied after the temperature.
  top_p: then keep the smallest set of most likely tokens whose mass reaches top_p (1 = off).
  Order and tie handling follow HF's TemperatureLogitsWarper -> TopK -> TopP.
  """
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutInputs:
  """A bucketed, LEFT-padded prompt batch (B = batch bucket, T = prompt bucket, E = stop ids).

  input_ids:      [B, T] int32, prompt tokens end at column T-1.
  attention_mask: [B, T] bool.
  position_ids:   [3, B, T] int32 M-RoPE positions (0 on padding).
  vision:         packed, padded patches of all images (`qwen.prepare_vision`), or None (text only).
  prompt_ids:     [B] uint32 RNG stream id of each prompt (see the module docstring).
  valid:          [B] bool; False rows (batch padding) emit nothing and have length 0.
  eos_ids:        [B, E] int32 stop tokens of each prompt, -1 = unused slot.
  """
  input_ids: Array
  attention_mask: Array
  position_ids: Array
  vision: qwen.VisionInputs | None
  prompt_ids: Array
  valid: Array
  eos_ids: Array

  @property
  def batch_size(self) -> int:
    return int(self.input_ids.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """The while-loop carry. R = B * G rows (prompt-major), N = max_new_tokens.

  tokens [R, N] int32 (pad after a stop token), logprobs / raw_logprobs [R, N] float32,
  last_token [R] (fed at the next step), next_pos [R] (its M-RoPE position), finished [R] bool,
  lengths [R] int32 (tokens kept, stop token included), row_keys [R] PRNG keys, eos_ids [R, E],
  cache (the KV cache, S = T + N slots), step [] int32 (index of the next token to sample).
  """
  tokens: Array
  logprobs: Array
  raw_logprobs: Array
  last_token: Array
  next_pos: Array
  finished: Array
  lengths: Array
  row_keys: Array
  eos_ids: Array
  cache: qwen.KVCache
  step: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutOutput:
  """Completions, prompt-major (prompt b's samples at rows b*G .. b*G+G-1). R rows, N = max_new_tokens.

  tokens:       [R, N] int32, the pad id after the stop token (the stop token itself is kept).
  mask:         [R, N] bool, True up to and including the stop token.
  logprobs:     [R, N] float32, log-prob under the sampling distribution (0 where masked; 0 for greedy).
  raw_logprobs: [R, N] float32, log-prob under the raw model at temperature 1 (0 where masked).
  lengths:      [R] int32, number of True entries of `mask`.
  truncated:    [R] bool, no stop token within N tokens.
  """
  tokens: Array
  mask: Array
  logprobs: Array
  raw_logprobs: Array
  lengths: Array
  truncated: Array


# ------------------------------------------------------------------------------------------------
# Sampling (pure)
# ------------------------------------------------------------------------------------------------
def filter_logits(logits_RxV: Array, sampling: SamplingConfig) -> Array:
  """logits / temperature with the tokens outside top-k / top-p set to -inf (float32 [R, V])."""
  x = logits_RxV.astype(jnp.float32) / sampling.temperature
  V = x.shape[-1]
  k = sampling.top_k if 0 < sampling.top_k < V else 0
  if k == 0 and sampling.top_p >= 1:
    return x
  if k:
    sorted_desc, _ = jax.lax.top_k(x, k)  # [R, k]
    x = jnp.where(x < sorted_desc[:, -1:], -jnp.inf, x)  # ties at the k-th value stay (as HF)
  else:
    sorted_desc = -jnp.sort(-x, axis=-1)
  if sampling.top_p < 1:
    probs = jax.nn.softmax(sorted_desc, axis=-1)  # renormalised over the top-k set
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return x


def _token_logprob(logits_RxV: Array, tokens_R: Array) -> Array:
  logp = jax.nn.log_softmax(logits_RxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens_R[:, None], axis=-1)[:, 0]


def sample_tokens(logits_RxV: Array, keys_R: Array, sampling: SamplingConfig
                  ) -> tuple[Array, Array, Array]:
  """Draws one token per row with its own key.

  Returns tokens [R] int32, log-probs [R] under the sampling distribution (0 when greedy) and
  log-probs [R] under the raw model (temperature 1, no filtering).
  """
  if sampling.greedy:
    tok = jnp.argmax(logits_RxV, axis=-1).astype(jnp.int32)
    logp = jnp.zeros(tok.shape, jnp.float32)
  else:
    filtered = filter_logits(logits_RxV, sampling)
    tok = jax.vmap(jax.random.categorical)(keys_R, filtered).astype(jnp.int32)
    logp = _token_logprob(filtered, tok)
  return tok, logp, _token_logprob(logits_RxV, tok)


def row_keys(key: Array, prompt_ids_B: Array, num_samples: int) -> Array:
  """[B*G] keys, prompt-major: fold_in(fold_in(key, prompt_ids[b]), g)."""
  p = jnp.repeat(prompt_ids_B.astype(jnp.uint32), num_samples)
  g = jnp.tile(jnp.arange(num_samples, dtype=jnp.uint32), prompt_ids_B.shape[0])
  fold = jax.random.fold_in
  return jax.vmap(lambda pi, gi: fold(fold(key, pi), gi))(p, g)


# ------------------------------------------------------------------------------------------------
# Sharding: logical axis names per leaf, mapped to the mesh by `pgpo_jax.sharding` rules
# ------------------------------------------------------------------------------------------------
def logical_axes(tree) -> object:
  """A pytree like `tree` whose leaves are tuples of logical axis names (one per dim)."""
  if isinstance(tree, RolloutInputs):
    # Per-row vision inputs ([B, N_pad, ...]): each prompt's images travel with its row.
    vis = None if tree.vision is None else jax.tree.map(lambda x: ("batch",) + (None,) * (np.ndim(x) - 1),
                                                        tree.vision)
    return RolloutInputs(input_ids=("batch", "length"), attention_mask=("batch", "length"),
                         position_ids=(None, "batch", "length"), vision=vis, prompt_ids=("batch",),
                         valid=("batch",), eos_ids=("batch", None))
  if isinstance(tree, DecodeState):
    kv = ("layers", "batch", "cache_length", "act_kv_heads", "act_head_dim")
    return DecodeState(tokens=("batch", None), logprobs=("batch", None), raw_logprobs=("batch", None),
                       last_token=("batch",), next_pos=("batch",), finished=("batch",),
                       lengths=("batch",), row_keys=("batch",), eos_ids=("batch", None),
                       cache=qwen.KVCache(k=kv, v=kv, key_mask=("batch", "cache_length"), index=()),
                       step=())
  if isinstance(tree, RolloutOutput):
    return RolloutOutput(tokens=("batch", None), mask=("batch", None), logprobs=("batch", None),
                         raw_logprobs=("batch", None), lengths=("batch",), truncated=("batch",))
  raise TypeError(type(tree))


def tree_shardings(tree, mesh: Mesh, rules: sharding.Rules):
  """NamedSharding per leaf; a dim that its mesh axes do not divide is replicated (sharding.py)."""
  def one(axes, x):
    return sharding.logical_sharding(axes, mesh, rules, np.shape(x))
  return jax.tree.map(one, logical_axes(tree), tree, is_leaf=sharding.is_logical_axes)


def _constrain(tree, mesh: Mesh | None, rules):
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh, rules))


def batch_shards(mesh: Mesh | None, rules: sharding.Rules = sharding.SAMPLE_RULES) -> int:
  """How many ways the `batch` logical axis is split on `mesh` (prompt batches pad to a multiple)."""
  if mesh is None:
    return 1
  rule = rules["batch"]
  axes = () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)
  return int(np.prod([mesh.shape[a] for a in axes]))


# ------------------------------------------------------------------------------------------------
# The programs
# ------------------------------------------------------------------------------------------------
def _start(model: qwen.Qwen25VL, inputs: RolloutInputs, key: Array, *, sampling: SamplingConfig,
           max_new_tokens: int, num_samples: int, pad_token_id: int, mesh, rules) -> DecodeState:
  """Prefill B prompts, repeat the cache G times, sample token 0 of every row."""
  inputs = _constrain(inputs, mesh, rules)
  B, T = inputs.input_ids.shape
  G, N = num_samples, max_new_tokens
  R = B * G
  cache = qwen.init_cache(model.cfg.text, B, T, model.dtype)
  logits_BxV, cache = qwen.prefill(model, inputs.input_ids, inputs.position_ids, inputs.attention_mask,
                                cache, inputs.vision)
  # Decode cache: each prompt's T slots copied to its G rows (prompt-major), plus N empty slots.
  rep = lambda x, axis: jnp.repeat(x, G, axis=axis)
  grow = lambda x: jnp.concatenate([rep(x, 1), jnp.zeros(x.shape[:1] + (R, N) + x.shape[3:], x.dtype)], 2)
  cache = qwen.KVCache(k=grow(cache.k), v=grow(cache.v),
                    key_mask=jnp.concatenate([rep(cache.key_mask, 0), jnp.zeros((R, N), bool)], 1),
                    index=cache.index)
  keys_R = row_keys(key, inputs.prompt_ids, G)
  step0 = jax.vmap(jax.random.fold_in, (0, None))(keys_R, 0)
  tok, logp, raw = sample_tokens(rep(logits_BxV, 0), step0, sampling)
  valid_R = rep(inputs.valid, 0)
  eos_RxE = rep(inputs.eos_ids, 0)
  tok = jnp.where(valid_R, tok, pad_token_id)
  col0 = lambda v, fill, dt: jnp.full((R, N), fill, dt).at[:, 0].set(jnp.where(valid_R, v, fill))
  # Decode position: max prompt position + 1 (= last + 1 for images and text; port notes §2.5).
  next_pos = rep(jnp.max(inputs.position_ids, axis=(0, 2)) + 1, 0).astype(jnp.int32)
  state = DecodeState(
      tokens=col0(tok, pad_token_id, jnp.int32), logprobs=col0(logp, 0.0, jnp.float32),
      raw_logprobs=col0(raw, 0.0, jnp.float32), last_token=tok, next_pos=next_pos,
      finished=~valid_R | _is_stop(tok, eos_RxE), lengths=valid_R.astype(jnp.int32),
      row_keys=keys_R, eos_ids=eos_RxE, cache=cache, step=jnp.ones((), jnp.int32))
  return _constrain(state, mesh, rules)


def _is_stop(tok_R: Array, eos_RxE: Array) -> Array:
  return jnp.any(tok_R[:, None] == eos_RxE, axis=-1)


def _decode(model: qwen.Qwen25VL, state: DecodeState, *, sampling: SamplingConfig, max_new_tokens: int,
            pad_token_id: int, mesh, rules) -> DecodeState:
  """Runs the while loop until every row stopped or N tokens exist; returns the final state."""
  N = max_new_tokens

  def cond(s: DecodeState):
    return (s.step < N) & ~jnp.all(s.finished)

  def body(s: DecodeState) -> DecodeState:
    logits, cache = qwen.decode_step(model, s.last_token, s.next_pos, s.cache)
    keys = jax.vmap(jax.random.fold_in, (0, None))(s.row_keys, s.step)
    tok, logp, raw = sample_tokens(logits, keys, sampling)
    live = ~s.finished  # rows that stopped earlier write pad / 0 and keep their length
    tok = jnp.where(live, tok, pad_token_id)
    put = lambda buf, v: jax.lax.dynamic_update_slice(
        buf, jnp.where(live, v, 0).astype(buf.dtype)[:, None], (0, s.step))
    new = dataclasses.replace(
        s, tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step)),
        logprobs=put(s.logprobs, logp), raw_logprobs=put(s.raw_logprobs, raw),
        last_token=tok, next_pos=s.next_pos + 1, finished=s.finished | _is_stop(tok, s.eos_ids),
        lengths=s.lengths + live.astype(jnp.int32), cache=cache, step=s.step + 1)
    return _constrain(new, mesh, rules)

  return jax.lax.while_loop(cond, body, state)


def _finish(s: DecodeState, *, mesh, rules) -> RolloutOutput:
  N = s.tokens.shape[1]
  # Truncated: the last kept token is not a stop token (batch-padding rows have length 0).
  last = jnp.take_along_axis(s.tokens, jnp.maximum(s.lengths - 1, 0)[:, None], axis=1)[:, 0]
  truncated = (s.lengths > 0) & ~_is_stop(last, s.eos_ids)
  out = RolloutOutput(tokens=s.tokens, mask=jnp.arange(N)[None, :] < s.lengths[:, None],
                      logprobs=s.logprobs, raw_logprobs=s.raw_logprobs, lengths=s.lengths,
                      truncated=truncated)
  return _constrain(out, mesh, rules)


@dataclasses.dataclass(frozen=True)
class RolloutStatic:
  """Everything the programs specialise on besides array shapes (hashable: the jit cache key).

  `rules` is the sorted items of the rules table (a hashable form), empty without a mesh.
  """
  sampling: SamplingConfig
  max_new_tokens: int
  num_samples: int
  pad_token_id: int
  mesh: Mesh | None
  rules: tuple[tuple[str, sharding.AxisRule], ...]

  @classmethod
  def make(cls, sampling: SamplingConfig, max_new_tokens: int, num_samples: int, pad_token_id: int,
           mesh: Mesh | None, rules: sharding.Rules) -> "RolloutStatic":
    return cls(sampling, int(max_new_tokens), int(num_samples), int(pad_token_id), mesh,
               tuple(sorted(rules.items())) if mesh is not None else ())


@dataclasses.dataclass(frozen=True)
class Programs:
  """The programs of one (model graph, static config); `programs.rollout_programs` jits them.

  start(state, inputs, key) -> DecodeState        prefill + first token
  decode(state, decode_state) -> DecodeState      the while loop; `decode_state` is donated
  finish(decode_state) -> RolloutOutput           pack the buffers
  Each compiles once per input shapes (batch / prompt / patch buckets).
  """
  start: object
  decode: object
  finish: object


def program_bodies(graphdef, static: RolloutStatic) -> Programs:
  """The three programs as plain functions of (parameter state, arrays), for `programs.py` to jit."""
  rules = dict(static.rules)
  kw = dict(sampling=static.sampling, max_new_tokens=static.max_new_tokens,
            pad_token_id=static.pad_token_id, mesh=static.mesh, rules=rules)

  def start(state, inputs, key):
    return _start(nnx.merge(graphdef, state), inputs, key, num_samples=static.num_samples, **kw)

  def decode(state, dstate):
    return _decode(nnx.merge(graphdef, state), dstate, **kw)

  def finish(dstate):
    return _finish(dstate, mesh=static.mesh, rules=rules)

  return Programs(start, decode, finish)


# ------------------------------------------------------------------------------------------------
# Host-side preparation
# ------------------------------------------------------------------------------------------------
def default_eos_ids(cfg: qwen.Qwen25VLConfig) -> tuple[int, ...]:
  """`<|im_end|>` (eos) and `<|endoftext|>` (Qwen's pad / bos): both stop generation (§3)."""
  return tuple(dict.fromkeys((cfg.eos_token_id, cfg.pad_token_id)))


def _eos_table(eos_token_ids, B: int, B_pad: int) -> np.ndarray:
  """[B_pad, E] stop ids from a flat sequence (shared) or a per-prompt [B, E] array (-1 = none)."""
  arr = np.asarray(eos_token_ids if eos_token_ids is not None else (), np.int64)
  if arr.ndim <= 1:
    arr = np.broadcast_to(arr.reshape(1, -1), (B, arr.size))
  if arr.ndim != 2 or arr.shape[0] != B:
    raise ValueError(f"eos_token_ids must be a sequence of ids or a [B={B}, E] array, got shape {arr.shape}")
  out = np.full((B_pad, max(arr.shape[1], 1)), -1, np.int32)
  out[:B, :arr.shape[1]] = arr
  return out


def prepare_inputs(cfg: qwen.Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None, *, position_ids=None, eos_token_ids=None, prompt_ids=None,
                   batch_size: int | None = None, prompt_length: int | None = None,
                   num_patches: int | None = None, batch_multiple: int = 1) -> RolloutInputs:
  """HF-processor outputs -> left-padded, bucketed `RolloutInputs` (host numpy).

  Args:
    input_ids, attention_mask: [B, T], left or right padded (any padding layout: the real tokens
      of each row are moved, in order, to the right end).
    pixel_values: [N_patches, C*T*P*P] of all images in batch order, or None.
    image_grid_thw: [N_images, 3] (all-zero rows are padding), or None.
    position_ids: optional [3, B, T] aligned with `input_ids` (else `qwen.get_rope_index`).
    eos_token_ids: stop ids, shared or per prompt ([B, E]); default `default_eos_ids(cfg)`.
    prompt_ids: [B] RNG stream ids (default arange(B)).
    batch_size / prompt_length / num_patches: fixed bucket sizes (default: power of two rounded
      to `batch_multiple`, a multiple of 32, `buckets.patch_bucket`).
  """
  ids = np.asarray(input_ids).astype(np.int32)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
  B, T = ids.shape
  am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
  if am.shape != ids.shape:
    raise ValueError(f"attention_mask shape {am.shape} != input_ids shape {ids.shape}")
  lengths = am.astype(bool).sum(1)
  if (lengths == 0).any():
    raise ValueError(f"prompt rows {np.nonzero(lengths == 0)[0].tolist()} have no tokens")
  qwen.check_image_tokens(np.where(am.astype(bool), ids, -1), image_grid_thw, cfg)

  B_pad = batch_bucket(B, batch_multiple) if batch_size is None else int(batch_size)
  T_pad = seq_bucket(int(lengths.max())) if prompt_length is None else int(prompt_length)
  if B_pad < B or B_pad % batch_multiple:
    raise ValueError(f"batch_size={B_pad} must be >= {B} prompts and a multiple of {batch_multiple}")
  if T_pad < lengths.max():
    raise ValueError(f"prompt_length={T_pad} is shorter than the longest prompt ({lengths.max()} tokens)")

  pad_id = cfg.pad_token_id
  ids_p = np.full((B_pad, T_pad), pad_id, np.int32)
  am_p = np.zeros((B_pad, T_pad), bool)
  pos_p = np.zeros((3, B_pad, T_pad), np.int32)
  src_pos = None if position_ids is None else np.asarray(position_ids).astype(np.int32)
  for b in range(B):
    keep = am[b].astype(bool)
    ids_p[b, T_pad - lengths[b]:] = ids[b, keep]
    am_p[b, T_pad - lengths[b]:] = True
    if src_pos is not None:
      pos_p[:, b, T_pad - lengths[b]:] = src_pos[:, b, keep]
  if src_pos is None:
    pos_p, _ = qwen.get_rope_index(ids_p, am_p, image_grid_thw, image_token_id=cfg.image_token_id,
                                spatial_merge_size=cfg.vision.spatial_merge_size)

  has_images = len(valid_grids(image_grid_thw)) > 0
  # Per-row patches: attention stays within a prompt (B·N² rather than (B·N)² scores) and the
  # vision inputs split over data shards with their rows. Batch-padding rows hold no images.
  ids_rows = np.where(am_p, ids_p, pad_id)
  # A given `num_patches` builds vision inputs even for text-only rows, so that every host of a
  # multi-host rollout passes the same structure.
  vin = (qwen.prepare_vision_rows(pixel_values, image_grid_thw, ids_rows, cfg.vision, cfg.image_token_id, num_patches)
         if has_images or num_patches else None)
  pid = np.arange(B_pad, dtype=np.int64)
  if prompt_ids is not None:
    given = np.asarray(prompt_ids, np.int64).reshape(-1)
    if given.shape != (B,):
      raise ValueError(f"prompt_ids must have one id per prompt ({B}), got shape {given.shape}")
    # Padding rows take ids past the largest real one, so they never share a real stream.
    pid[:B] = given
    pid[B:] = given.max() + 1 + np.arange(B_pad - B)
  return RolloutInputs(input_ids=ids_p, attention_mask=am_p, position_ids=pos_p.astype(np.int32),
                       vision=vin, prompt_ids=(pid % 2**32).astype(np.uint32),
                       valid=np.arange(B_pad) < B,
                       eos_ids=_eos_table(default_eos_ids(cfg) if eos_token_ids is None else eos_token_ids,
                                          B, B_pad))
