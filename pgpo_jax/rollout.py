"""Rollout: prefill each prompt once, then sample G completions per prompt in a jitted while loop.

This module holds the rollout's containers, sampling maths and the bodies of its device programs;
`programs.py` jits them and `sampler.py` runs them:

    from pgpo_jax import sampler
    out = sampler.generate(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                           max_new_tokens=256, temperature=1.0, num_samples=8, seed=0)
    out.tokens  # [B*G, max_new_tokens], prompt-major: prompt b's samples are rows b*G .. b*G+G-1

Programs, compiled once per (batch size, prompt bucket, patch bucket, max_new_tokens, G, decode
rows, sampling config, compute dtype, mesh):
  0. `cast` (with `compute_dtype`, e.g. bf16): a copy of the parameters in that dtype, once per call.
  1. `start`: vision tower + prefill of the B prompts (images encoded once per prompt); the prompt's
     keys/values are kept ONCE per prompt (`text.PromptKV`) and read by its G samples; token 0 of
     every sample is sampled from the prefill logits; rows get their first samples -> `DecodeState`.
  2. `decode`: `lax.while_loop` over `DecodeState` (donated). A step feeds every row's last token:
     each layer writes that token's key/value into ONE slot of the row's own buffer (in place:
     no cache copy per token) and attends to the prompt plus the row's filled slots only, in
     chunks up to the longest filled row (`text.decode`: O(filled), not O(max length)). With
     fewer rows than samples (`decode_rows`), a finished row takes the next pending sample of its
     batch shard (slot refill): rows stay busy while samples are pending.
  3. `finish`: masks, lengths, truncation flags -> `RolloutOutput`.
Decode positions continue per sample from max(prompt positions) + 1 (docs/qwen2_5_vl_port.md
§2.5), so left padding and M-RoPE image offsets need no rope-delta bookkeeping. Batches are padded
only to a multiple of the batch shards (`buckets.batch_bucket`).

RNG (results independent of batch composition, padding, sharding and slot refill). With `key` the
call's key, each sample has its own stream
    row_key(p, g) = fold_in(fold_in(key, p), g),  key of token s = fold_in(row_key, s)
where p is the prompt's *stream id* (default: its index in the call; pass `prompt_ids`, e.g. the
data row index, to make a prompt's samples independent of where it sits in the batch), g the
sample index in [0, G) and s the token's index in the sample (whichever decode row runs it).
Padding rows and padding tokens never touch a real sample's stream.

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
from pgpo_jax.buckets import batch_bucket, seq_bucket
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import text as text_lib
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
  length_limit:   [B] int32 in [1, N], or None (= N): a prompt's samples are cut (truncated) after
                  this many tokens.
  """

  input_ids: Array
  attention_mask: Array
  position_ids: Array
  vision: qwen.VisionInputs | None
  prompt_ids: Array
  valid: Array
  eos_ids: Array
  length_limit: Array | None = None

  @property
  def batch_size(self) -> int:
    return int(self.input_ids.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """The decode loop's carry. W = B*G samples (prompt-major: prompt b's at b*G .. b*G+G-1), R decode
  rows (R = W, or fewer with slot refill), N = max_new_tokens, n = batch shards (W, R, B split
  into n equal blocks; a row only ever takes samples of its own block).

  Per sample:  tokens [W, N] int32 (pad after the stop token), logprobs / raw_logprobs [W, N]
               float32, lengths [W] int32 (tokens so far, stop token included), keys [W] PRNG
               keys (the sample's stream), first_token [W] (sampled from the prefill logits).
  Queue:       queue [W] int32: per block, the local indices of the samples still to decode (in
               order, then padding); queued [n] how many there are, taken [n] how many got a row.
  Per prompt:  prompt (`text.PromptKV`: the prefill's keys/values [B, KV, T, K] per layer, read by
               all of a prompt's rows), next_pos [B] (its first decode position), eos_ids [B, E],
               limit [B] (max tokens per sample).
  Per row:     row_sample [R] (global sample index; -1 = none yet), row_len [R] (its tokens so far),
               last_token [R], row_pos [R] (position of the prompt's first decode token),
               row_key [R], row_eos [R, E], row_limit [R], finished [R] (no sample in progress),
               k, v (tuples of L [R, KV, S, K]: the keys/values of the sample's own tokens; S >= N-1).
  steps [] int32: decode steps run (each computes all R rows).
  """

  tokens: Array
  logprobs: Array
  raw_logprobs: Array
  lengths: Array
  keys: Array
  first_token: Array
  queue: Array
  queued: Array
  taken: Array
  prompt: text_lib.PromptKV
  next_pos: Array
  eos_ids: Array
  limit: Array
  row_sample: Array
  row_len: Array
  last_token: Array
  row_pos: Array
  row_key: Array
  row_eos: Array
  row_limit: Array
  finished: Array
  k: tuple
  v: tuple
  steps: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutOutput:
  """Completions, prompt-major (prompt b's samples at rows b*G .. b*G+G-1). R rows, N = max_new_tokens.

  tokens:       [R, N] int32, the pad id after the stop token (the stop token itself is kept).
  mask:         [R, N] bool, True up to and including the stop token.
  logprobs:     [R, N] float32, log-prob under the sampling distribution (0 where masked; 0 for greedy).
  raw_logprobs: [R, N] float32, log-prob under the raw model at temperature 1 (0 where masked).
  lengths:      [R] int32, number of True entries of `mask`.
  truncated:    [R] bool, no stop token within N tokens (or within the prompt's length limit).
  decode_steps: [] int32, decode steps run; each computes every decode row, so
                decode rows x decode_steps - sum(max(lengths - 1, 0)) row-steps were wasted.
  """

  tokens: Array
  mask: Array
  logprobs: Array
  raw_logprobs: Array
  lengths: Array
  truncated: Array
  decode_steps: Array


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


def first_argmax(x_RxV: Array) -> Array:
  """jnp.argmax over the last axis ([R] int32: the first index of the maximum; a NaN counts as the
  maximum, as in jnp.argmax) as two plain reductions. XLA:CPU runs argmax's (value, index) reduce
  about 10x slower: ~1 ms of a ~6 ms decode step at [32, 4096]."""
  m = jnp.max(x_RxV, axis=-1, keepdims=True)
  hit = (x_RxV == m) | jnp.isnan(x_RxV)
  V = x_RxV.shape[-1]
  return jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def categorical(keys_R: Array, logits_RxV: Array) -> Array:
  """jax.random.categorical per row (row r with its own key; the same Gumbel-max draw, so the same
  tokens) with `first_argmax`. [R] int32."""
  noise = jax.vmap(lambda k, x: jax.random.gumbel(k, x.shape, x.dtype))(keys_R, logits_RxV)
  return first_argmax(noise + logits_RxV)


def sample_tokens(
  logits_RxV: Array, keys_R: Array, sampling: SamplingConfig
) -> tuple[Array, Array, Array]:
  """Draws one token per row with its own key.

  Returns tokens [R] int32, log-probs [R] under the sampling distribution (0 when greedy) and
  log-probs [R] under the raw model (temperature 1, no filtering).
  """
  if sampling.greedy:
    tok = first_argmax(logits_RxV)
    logp = jnp.zeros(tok.shape, jnp.float32)
  else:
    filtered = filter_logits(logits_RxV, sampling)
    tok = categorical(keys_R, filtered)
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
    vis = (
      None
      if tree.vision is None
      else jax.tree.map(lambda x: ("batch",) + (None,) * (np.ndim(x) - 1), tree.vision)
    )
    return RolloutInputs(
      input_ids=("batch", "length"),
      attention_mask=("batch", "length"),
      position_ids=(None, "batch", "length"),
      vision=vis,
      prompt_ids=("batch",),
      valid=("batch",),
      eos_ids=("batch", None),
      length_limit=None if tree.length_limit is None else ("batch",),
    )
  if isinstance(tree, DecodeState):
    kv = ("batch", "act_kv_heads", "cache_length", "act_head_dim")
    rows = ("batch",)
    return DecodeState(
      tokens=("batch", None),
      logprobs=("batch", None),
      raw_logprobs=("batch", None),
      lengths=rows,
      keys=rows,
      first_token=rows,
      queue=rows,
      queued=rows,
      taken=rows,
      prompt=text_lib.PromptKV(
        k=(kv,) * len(tree.k), v=(kv,) * len(tree.v), mask=("batch", "cache_length")
      ),
      next_pos=rows,
      eos_ids=("batch", None),
      limit=rows,
      row_sample=rows,
      row_len=rows,
      last_token=rows,
      row_pos=rows,
      row_key=rows,
      row_eos=("batch", None),
      row_limit=rows,
      finished=rows,
      k=(kv,) * len(tree.k),
      v=(kv,) * len(tree.v),
      steps=(),
    )
  if isinstance(tree, RolloutOutput):
    return RolloutOutput(
      tokens=("batch", None),
      mask=("batch", None),
      logprobs=("batch", None),
      raw_logprobs=("batch", None),
      lengths=("batch",),
      truncated=("batch",),
      decode_steps=(),
    )
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
def _blocks(x: Array, n: int) -> Array:
  """[X, ...] -> [n, X/n, ...]: the contiguous blocks that the n batch shards hold."""
  return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def _take_local(x: Array, local_R: Array, n: int) -> Array:
  """x[block(r) * X/n + local_R[r]] for each row r of R (rows split into the same n blocks): a
  gather within each block, so no data crosses batch shards. [X, ...] -> [R, ...]."""
  out = jax.vmap(lambda blk, i: blk[i])(_blocks(x, n), _blocks(local_R, n))
  return out.reshape(local_R.shape + x.shape[1:])


def _put_local(
  buf: Array, local_R: Array, values_R: Array, n: int, col_R: Array | None = None
) -> Array:
  """buf[block(r) * X/n + local_R[r] (, col_R[r])] = values_R[r] within each block; a local index
  of X/n (out of range) writes nothing."""
  if col_R is None:
    out = jax.vmap(lambda b, i, v: b.at[i].set(v, mode="drop"))(
      _blocks(buf, n), _blocks(local_R, n), _blocks(values_R, n)
    )
  else:
    out = jax.vmap(lambda b, i, j, v: b.at[i, j].set(v, mode="drop"))(
      _blocks(buf, n), _blocks(local_R, n), _blocks(col_R, n), _blocks(values_R, n)
    )
  return out.reshape(buf.shape)


def _local_index(global_R: Array, X: int, n: int) -> Array:
  """A row's global index into an [X] array -> its index within the row's block."""
  R = global_R.shape[0]
  return global_R - (jnp.arange(R) // (R // n)) * (X // n)


def decode_rows_for(num_samples_total: int, decode_rows: int) -> int:
  """R: all W samples at once (decode_rows 0 or >= W), else `decode_rows` slots refilled."""
  return num_samples_total if decode_rows <= 0 or decode_rows >= num_samples_total else decode_rows


def row_slots(max_new_tokens: int, chunk: int) -> int:
  """S, the slots of a row's own KV: N - 1 (the last token is never fed), rounded up to a multiple
  of the attention chunk when there is more than one chunk."""
  s = max(max_new_tokens - 1, 1)
  return -(-s // chunk) * chunk if 0 < chunk < s else s


def _is_stop(tok_R: Array, eos_RxE: Array) -> Array:
  return jnp.any(tok_R[:, None] == eos_RxE, axis=-1)


def _assign(
  s: DecodeState, take_R: Array, sample_R: Array, num_samples: int, n: int
) -> DecodeState:
  """Rows where take_R start decoding sample sample_R (global index): its first token (sampled at
  prefill) is fed next, at its prompt's first decode position, with the sample's own RNG stream."""
  W = s.tokens.shape[0]
  loc = jnp.clip(_local_index(sample_R, W, n), 0, W // n - 1)
  loc_prompt = loc // num_samples  # blocks of samples and of prompts line up (prompt-major)

  def sel(new, old):
    return jnp.where(take_R.reshape(take_R.shape + (1,) * (jnp.ndim(old) - 1)), new, old)

  pick = lambda x, i: _take_local(x, i, n)
  return dataclasses.replace(
    s,
    row_sample=sel(sample_R, s.row_sample),
    row_len=sel(1, s.row_len),
    last_token=sel(pick(s.first_token, loc), s.last_token),
    row_pos=sel(pick(s.next_pos, loc_prompt), s.row_pos),
    row_key=sel(pick(s.keys, loc), s.row_key),
    row_eos=sel(pick(s.eos_ids, loc_prompt), s.row_eos),
    row_limit=sel(pick(s.limit, loc_prompt), s.row_limit),
    finished=s.finished & ~take_R,
  )


def _refill(s: DecodeState, num_samples: int, n: int) -> DecodeState:
  """Finished rows take the next queued samples of their block, in queue order (slot refill)."""
  R, W = s.row_sample.shape[0], s.tokens.shape[0]
  Wl = W // n
  free = _blocks(s.finished, n)  # [n, R/n]
  rank = jnp.cumsum(free, axis=1) - 1
  left = s.queued - s.taken
  take = free & (rank < left[:, None])
  loc = jnp.take_along_axis(
    _blocks(s.queue, n), jnp.clip(s.taken[:, None] + rank, 0, Wl - 1), axis=1
  )
  sample = (loc + jnp.arange(n)[:, None] * Wl).reshape(R)
  s = dataclasses.replace(
    s, taken=s.taken + jnp.minimum(jnp.sum(free, axis=1), left).astype(jnp.int32)
  )
  return _assign(s, take.reshape(R), sample, num_samples, n)


def _start(
  model: qwen.Qwen25VL,
  inputs: RolloutInputs,
  key: Array,
  *,
  sampling: SamplingConfig,
  max_new_tokens: int,
  num_samples: int,
  pad_token_id: int,
  decode_rows: int,
  chunk: int,
  shards: int,
  mesh,
  rules,
) -> DecodeState:
  """Prefill the B prompts once, sample token 0 of every sample, give rows their first samples."""
  inputs = _constrain(inputs, mesh, rules)
  B, T = inputs.input_ids.shape
  G, N, n = num_samples, max_new_tokens, shards
  W = B * G
  R = decode_rows_for(W, decode_rows)
  t = model.cfg.text
  L = t.num_hidden_layers
  cache = qwen.init_cache(t, B, T, model.dtype)
  logits_BxV, cache = qwen.prefill(
    model, inputs.input_ids, inputs.position_ids, inputs.attention_mask, cache, inputs.vision
  )
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, KV, K] -> [B, KV, T, K] (`text.decode`)
  prompt = text_lib.PromptKV(
    k=tuple(heads_first(cache.k[i]) for i in range(L)),
    v=tuple(heads_first(cache.v[i]) for i in range(L)),
    mask=cache.key_mask,
  )
  rep = lambda x: jnp.repeat(x, G, axis=0)  # prompt -> its G samples (prompt-major)
  keys_W = row_keys(key, inputs.prompt_ids, G)
  tok, logp, raw = sample_tokens(
    rep(logits_BxV), jax.vmap(jax.random.fold_in, (0, None))(keys_W, 0), sampling
  )
  valid_W = rep(inputs.valid)
  tok = jnp.where(valid_W, tok, pad_token_id)
  col0 = lambda v, fill, dt: jnp.full((W, N), fill, dt).at[:, 0].set(jnp.where(valid_W, v, fill))
  limit_B = (
    jnp.full((B,), N, jnp.int32)
    if inputs.length_limit is None
    else jnp.clip(inputs.length_limit.astype(jnp.int32), 1, N)
  )
  # Samples that need decode steps: the others end at token 0 (a stop token, or limit 1).
  todo_W = valid_W & ~_is_stop(tok, rep(inputs.eos_ids)) & (rep(limit_B) > 1)
  if R == W:  # every sample has its row from the start; no queue
    queue, queued = jnp.zeros((W,), jnp.int32), jnp.zeros((n,), jnp.int32)
  else:  # per block: the samples to decode, in order, then the rest
    queue = jnp.argsort(~_blocks(todo_W, n), axis=1, stable=True).astype(jnp.int32).reshape(W)
    queued = jnp.sum(_blocks(todo_W, n), axis=1).astype(jnp.int32)
  S = row_slots(N, chunk)
  zeros = lambda: tuple(
    jnp.zeros((R, t.num_key_value_heads, S, t.head_dim), model.dtype) for _ in range(L)
  )
  state = DecodeState(
    tokens=col0(tok, pad_token_id, jnp.int32),
    logprobs=col0(logp, 0.0, jnp.float32),
    raw_logprobs=col0(raw, 0.0, jnp.float32),
    lengths=valid_W.astype(jnp.int32),
    keys=keys_W,
    first_token=tok,
    queue=queue,
    queued=queued,
    taken=jnp.zeros((n,), jnp.int32),
    prompt=prompt,
    # Decode positions continue from max(prompt positions) + 1 (docs/qwen2_5_vl_port.md §2.5).
    next_pos=(jnp.max(inputs.position_ids, axis=(0, 2)) + 1).astype(jnp.int32),
    eos_ids=inputs.eos_ids,
    limit=limit_B,
    row_sample=jnp.full((R,), -1, jnp.int32),
    row_len=jnp.zeros((R,), jnp.int32),
    last_token=jnp.full((R,), pad_token_id, jnp.int32),
    row_pos=jnp.zeros((R,), jnp.int32),
    row_key=_take_local(
      keys_W, jnp.zeros((R,), jnp.int32), n
    ),  # placeholders until a row is assigned
    row_eos=jnp.full((R, inputs.eos_ids.shape[1]), -1, jnp.int32),
    row_limit=jnp.ones((R,), jnp.int32),
    finished=jnp.ones((R,), bool),
    k=zeros(),
    v=zeros(),
    steps=jnp.zeros((), jnp.int32),
  )
  if R == W:
    state = _assign(state, todo_W, jnp.arange(W, dtype=jnp.int32), G, n)
  else:
    state = _refill(state, G, n)
  return _constrain(state, mesh, rules)


def _decode(
  model: qwen.Qwen25VL,
  state: DecodeState,
  *,
  sampling: SamplingConfig,
  num_samples: int,
  pad_token_id: int,
  chunk: int,
  shards: int,
  mesh,
  rules,
) -> DecodeState:
  """Decode steps until no row has a sample left: each step feeds every row's last token, samples
  the next one, and (with fewer rows than samples) hands finished rows the next queued samples."""
  G, n = num_samples, shards
  W, R = state.tokens.shape[0], state.row_sample.shape[0]
  refill = R < W
  # Off TPU: per-layer weights split before the loop (XLA:CPU copies a slice of a stacked weight
  # inside a loop every step; XLA:TPU reads it in the consumer's fusion), attention matmuls with
  # one batch dim (see `text._partial_attention`) and bf16 cache writes as uint16 (`text.decode`).
  off_tpu = _off_tpu(mesh)
  weights = text_lib.layer_weights(model.language_model) if off_tpu else None

  def cond(s: DecodeState):
    return jnp.any(~s.finished)  # a refilled row is live: only samples that need steps are queued

  def body(s: DecodeState) -> DecodeState:
    live = ~s.finished
    slot = jnp.maximum(s.row_len - 1, 0)  # the fed token's index = its slot in the row's KV
    x = model.language_model.embed(s.last_token)
    h, k, v = text_lib.decode(
      model.language_model,
      x,
      s.row_pos + slot,
      slot,
      s.k,
      s.v,
      heads_first=True,
      filled=jnp.max(jnp.where(live, s.row_len, 0)),
      prompt=s.prompt,
      row_prompt_R=s.row_sample // G if refill else None,
      shards=n,
      chunk=chunk,
      weights=weights,
      fold_heads=off_tpu,
      bits_scatter=off_tpu,
    )
    logits = qwen.logits_from_hidden(model, h[:, None])[:, 0]
    keys = jax.vmap(jax.random.fold_in)(s.row_key, s.row_len)  # token index = row_len
    tok, logp, raw = sample_tokens(logits, keys, sampling)
    tok = jnp.where(live, tok, pad_token_id)
    loc = jnp.where(live, _local_index(s.row_sample, W, n), W // n)  # W/n: no write
    put = lambda buf, v: _put_local(buf, loc, v.astype(buf.dtype), n, s.row_len)
    new_len = s.row_len + live.astype(jnp.int32)
    new = dataclasses.replace(
      s,
      tokens=put(s.tokens, tok),
      logprobs=put(s.logprobs, logp),
      raw_logprobs=put(s.raw_logprobs, raw),
      lengths=_put_local(s.lengths, loc, new_len, n),
      row_len=new_len,
      last_token=tok,
      finished=s.finished | _is_stop(tok, s.row_eos) | (new_len >= s.row_limit),
      k=k,
      v=v,
      steps=s.steps + 1,
    )
    if refill:
      new = _refill(new, G, n)
    return _constrain(new, mesh, rules)

  return jax.lax.while_loop(cond, body, state)


def _off_tpu(mesh: Mesh | None) -> bool:
  """Whether the programs run off TPU (the platform of the mesh's devices, else the default)."""
  devices = mesh.devices.flat if mesh is not None else jax.devices()
  return next(iter(devices)).platform != "tpu"


def _finish(s: DecodeState, *, mesh, rules) -> RolloutOutput:
  N = s.tokens.shape[1]
  # Truncated: the last kept token is not a stop token (batch-padding samples have length 0).
  last = jnp.take_along_axis(s.tokens, jnp.maximum(s.lengths - 1, 0)[:, None], axis=1)[:, 0]
  G = s.tokens.shape[0] // s.eos_ids.shape[0]
  truncated = (s.lengths > 0) & ~_is_stop(last, jnp.repeat(s.eos_ids, G, axis=0))
  out = RolloutOutput(
    tokens=s.tokens,
    mask=jnp.arange(N)[None, :] < s.lengths[:, None],
    logprobs=s.logprobs,
    raw_logprobs=s.raw_logprobs,
    lengths=s.lengths,
    truncated=truncated,
    decode_steps=s.steps,
  )
  return _constrain(out, mesh, rules)


def _merge(graphdef, state, dtype) -> qwen.Qwen25VL:
  """The model; with `dtype`, every module computes in it (activations, KV cache)."""
  model = nnx.merge(graphdef, state)
  if dtype is not None:
    for _, m in nnx.iter_modules(model):
      if hasattr(m, "dtype"):
        m.dtype = dtype
  return model


def _cast(state, dtype):
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
  )


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
  decode_rows: int = (
    0  # 0: all B*G samples at once; else that many rows, refilled (`sampler.rollout`)
  )
  compute_dtype: str | None = None  # None: the parameters' own dtype
  chunk: int = text_lib.DECODE_CHUNK  # cache slots per step of the decode attention loop

  @classmethod
  def make(
    cls,
    sampling: SamplingConfig,
    max_new_tokens: int,
    num_samples: int,
    pad_token_id: int,
    mesh: Mesh | None,
    rules: sharding.Rules,
    decode_rows: int = 0,
    compute_dtype=None,
  ) -> "RolloutStatic":
    """`compute_dtype`: None or anything `jnp.dtype` takes (stored by name: hashable)."""
    return cls(
      sampling,
      int(max_new_tokens),
      int(num_samples),
      int(pad_token_id),
      mesh,
      tuple(sorted(rules.items())) if mesh is not None else (),
      int(decode_rows),
      None if compute_dtype is None else jnp.dtype(compute_dtype).name,
    )


@dataclasses.dataclass(frozen=True)
class Programs:
  """The programs of one (model graph, static config); `programs.rollout_programs` jits them.

  cast(state) -> state                            the parameters in the compute dtype (a copy);
                                                  None without `compute_dtype`
  start(state, inputs, key) -> DecodeState        prefill + first token + first samples per row
  decode(state, decode_state) -> DecodeState      the while loop; `decode_state` is donated
  finish(decode_state) -> RolloutOutput           pack the buffers
  Each compiles once per input shapes (batch size / prompt / patch buckets).
  """

  start: object
  decode: object
  finish: object
  cast: object = None


def needs_cast(static: RolloutStatic, state) -> bool:
  """Whether `state` holds floating parameters not yet in the static's compute dtype."""
  return static.compute_dtype is not None and any(
    jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.dtype(static.compute_dtype)
    for x in jax.tree.leaves(state)
  )


def program_bodies(graphdef, static: RolloutStatic) -> Programs:
  """The programs as plain functions of (parameter state, arrays), for `programs.py` to jit."""
  rules = dict(static.rules) if static.mesh is not None else sharding.SAMPLE_RULES
  dtype = None if static.compute_dtype is None else jnp.dtype(static.compute_dtype)
  kw = dict(
    sampling=static.sampling,
    pad_token_id=static.pad_token_id,
    num_samples=static.num_samples,
    chunk=static.chunk,
    shards=batch_shards(static.mesh, rules),
    mesh=static.mesh,
    rules=rules,
  )

  def start(state, inputs, key):
    return _start(
      _merge(graphdef, state, dtype),
      inputs,
      key,
      max_new_tokens=static.max_new_tokens,
      decode_rows=static.decode_rows,
      **kw,
    )

  def decode(state, dstate):
    return _decode(_merge(graphdef, state, dtype), dstate, **kw)

  def finish(dstate):
    return _finish(dstate, mesh=static.mesh, rules=rules)

  def cast(state):
    return _cast(state, dtype)

  return Programs(start, decode, finish, cast if dtype is not None else None)


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
    raise ValueError(
      f"eos_token_ids must be a sequence of ids or a [B={B}, E] array, got shape {arr.shape}"
    )
  out = np.full((B_pad, max(arr.shape[1], 1)), -1, np.int32)
  out[:B, : arr.shape[1]] = arr
  return out


def prepare_inputs(
  cfg: qwen.Qwen25VLConfig,
  input_ids,
  attention_mask=None,
  pixel_values=None,
  image_grid_thw=None,
  *,
  position_ids=None,
  eos_token_ids=None,
  prompt_ids=None,
  batch_size: int | None = None,
  prompt_length: int | None = None,
  num_patches: int | None = None,
  batch_multiple: int = 1,
  length_limits=None,
) -> RolloutInputs:
  """HF-processor outputs -> left-padded, bucketed `RolloutInputs` (host numpy).

  Args:
    input_ids, attention_mask: [B, T], left or right padded (any padding layout: the real tokens
      of each row are moved, in order, to the right end).
    pixel_values: [N_patches, C*T*P*P] of all images in batch order, or None.
    image_grid_thw: [N_images, 3] (all-zero rows are padding), or None.
    position_ids: optional [3, B, T] aligned with `input_ids` (else `qwen.get_rope_index`).
    eos_token_ids: stop ids, shared or per prompt ([B, E]); default `default_eos_ids(cfg)`.
    prompt_ids: [B] RNG stream ids (default arange(B)).
    batch_size / prompt_length / num_patches: fixed bucket sizes (default: B rounded up to
      `batch_multiple`, a multiple of 32, `buckets.patch_bucket`).
    length_limits: [B] max new tokens per prompt (>= 1; capped at max_new_tokens), or None.
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
    raise ValueError(
      f"batch_size={B_pad} must be >= {B} prompts and a multiple of {batch_multiple}"
    )
  if T_pad < lengths.max():
    raise ValueError(
      f"prompt_length={T_pad} is shorter than the longest prompt ({lengths.max()} tokens)"
    )

  pad_id = cfg.pad_token_id
  ids_p = np.full((B_pad, T_pad), pad_id, np.int32)
  am_p = np.zeros((B_pad, T_pad), bool)
  pos_p = np.zeros((3, B_pad, T_pad), np.int32)
  src_pos = None if position_ids is None else np.asarray(position_ids).astype(np.int32)
  for b in range(B):
    keep = am[b].astype(bool)
    ids_p[b, T_pad - lengths[b] :] = ids[b, keep]
    am_p[b, T_pad - lengths[b] :] = True
    if src_pos is not None:
      pos_p[:, b, T_pad - lengths[b] :] = src_pos[:, b, keep]
  if src_pos is None:
    pos_p, _ = qwen.get_rope_index(
      ids_p,
      am_p,
      image_grid_thw,
      image_token_id=cfg.image_token_id,
      spatial_merge_size=cfg.vision.spatial_merge_size,
    )

  has_images = len(valid_grids(image_grid_thw)) > 0
  # Per-row patches: attention stays within a prompt (B·N² rather than (B·N)² scores) and the
  # vision inputs split over data shards with their rows. Batch-padding rows hold no images.
  ids_rows = np.where(am_p, ids_p, pad_id)
  # A given `num_patches` builds vision inputs even for text-only rows, so that every host of a
  # multi-host rollout passes the same structure.
  vin = (
    qwen.prepare_vision_rows(
      pixel_values, image_grid_thw, ids_rows, cfg.vision, cfg.image_token_id, num_patches
    )
    if has_images or num_patches
    else None
  )
  pid = np.arange(B_pad, dtype=np.int64)
  if prompt_ids is not None:
    given = np.asarray(prompt_ids, np.int64).reshape(-1)
    if given.shape != (B,):
      raise ValueError(f"prompt_ids must have one id per prompt ({B}), got shape {given.shape}")
    # Padding rows take ids past the largest real one, so they never share a real stream.
    pid[:B] = given
    pid[B:] = given.max() + 1 + np.arange(B_pad - B)
  limits = None
  if length_limits is not None:
    given = np.asarray(length_limits, np.int64).reshape(-1)
    if given.shape != (B,) or (given < 1).any():
      raise ValueError(
        f"length_limits must be one integer >= 1 per prompt ({B}), got {np.asarray(length_limits)!r}"
      )
    limits = np.ones(B_pad, np.int32)  # batch padding: nothing is decoded anyway
    limits[:B] = np.minimum(given, 2**31 - 1)
  return RolloutInputs(
    input_ids=ids_p,
    attention_mask=am_p,
    position_ids=pos_p.astype(np.int32),
    vision=vin,
    prompt_ids=(pid % 2**32).astype(np.uint32),
    valid=np.arange(B_pad) < B,
    eos_ids=_eos_table(default_eos_ids(cfg) if eos_token_ids is None else eos_token_ids, B, B_pad),
    length_limit=limits,
  )
