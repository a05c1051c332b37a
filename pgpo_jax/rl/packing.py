"""Packed (padding-free) sequences for the scoring and update passes.

RL responses vary a lot in length (short on average, very skewed), so the padded layout of
`sequences.SequenceBatch` ([P*G, Tp+L]: every sequence padded to the longest prompt plus the
longest response) spends much of its work on padding. Here the sequences lie back to back in rows
of a fixed length T (`train.packed_row_length`), each with a segment id:

- attention never crosses a segment (`TextModel(..., segment_ids_BxT=...)`);
- every token keeps the M-RoPE ids it has in its own sequence (the prompt's ids from
  `get_rope_index`, then `next_pos + j` for response token j), so a segment computes exactly what
  its sequence computes alone in the padded layout;
- images are encoded once per prompt and each segment's `<|image_pad|>` tokens gather their own
  prompt's features (`PackedView.feature`);
- the blind view packs [prompt without its visual tokens | response] (`sequences` module
  docstring) into rows of its own.

Only the states that predict a response token reach the lm-head: both views gather them into one
response-token layout [U, M] (same order in both), so the two-view estimators and the loss see
valid tokens only; `unpack` maps [U, M] results back to the padded [P*G, L].

Units. Every device leaf has a leading unit axis U: unit u holds Pu prompts with their G
responses, packed into its own R rows, and everything those rows need (image features, response
tokens) lies in the same unit. Prompts are dealt to units longest first, each to the least loaded
unit with room (`balance`), so that the static R (the maximum over units) wastes little; losses
with the mini-batch's normalisers and `unpack` do not depend on which unit a prompt lands in. The train step splits micro-batches, and the mesh shards
rows, on this leading axis; with U a multiple of (micro-batches x batch shards) every gather stays
inside its device and micro-batch. Static shapes: (U, R, Rb, M, T) and the patch bucket; R, Rb, M
are bucketed (`size_bucket`) so that few programs compile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.rl import scoring
from pgpo_jax.rl.sequences import SequenceBatch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedView:
  """One view's decoder input: U units of R rows of T tokens.

  ids:        [U, R, T] int32 tokens (0 in empty slots).
  pos:        [U, R, 3, T] int32 M-RoPE ids of each token within its own sequence.
  segment:    [U, R, T] int32, 1, 2, ... per sequence within a row; 0 = empty slot.
  feature:    [U, R, T] int32, for `<|image_pad|>` tokens the index of their feature among the
              unit's image features [Pu * U_img] (prompt-major); -1 elsewhere.
  resp_index: [U, M] int32, slot r*T + t (within the unit) of the state that predicts each token
              of the response layout (0 in its padding).
  """

  ids: jnp.ndarray
  pos: jnp.ndarray
  segment: jnp.ndarray
  feature: jnp.ndarray
  resp_index: jnp.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBatch:
  """P prompts x G responses packed into U units (module docstring).

  image:   PackedView of [prompt | response].
  blind:   PackedView of [prompt without its visual tokens | response], or None (update passes).
  vision:  per-prompt VisionInputs with [U, Pu, N_pad, ...] leaves, or None (text only).
  target:  [U, M] int32 response tokens, sequence-major (prompt-major, then response, then token).
  mask:    [U, M] bool, valid tokens (False in the layout's padding).
  seq_len: [U, M] float32, valid length L_i of each token's response (0 in padding): the seq-*
           loss aggregations need it (`losses.aggregate(seq_length_BxT=...)`).
  """

  image: PackedView
  blind: PackedView | None
  vision: qwen.VisionInputs | None
  target: jnp.ndarray
  mask: jnp.ndarray
  seq_len: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class PackedSizes:
  """Static sizes per unit: image-view rows R, blind-view rows Rb (0 = no blind view), response
  tokens M."""

  rows: int
  blind_rows: int
  tokens: int

  def max(self, other: "PackedSizes") -> "PackedSizes":
    return PackedSizes(
      *(max(a, b) for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other)))
    )


def size_bucket(n: int) -> int:
  """n rounded up to 4 steps per octave (exact up to 8): few distinct shapes, at most 25% waste."""
  n = max(int(n), 1)
  if n <= 8:
    return n
  step = 1 << ((n - 1).bit_length() - 3)
  return -(-n // step) * step


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Sequence:
  """One prompt+response, host-side: what its segment holds in each view."""

  prompt: int  # index of its prompt in the batch
  n: int  # flat response row (prompt-major)
  resp_len: int
  ids: np.ndarray  # [t] image view
  pos: np.ndarray  # [3, t]
  feature_rank: np.ndarray  # [t] rank among its prompt's image features, -1 for other tokens
  prompt_len: int
  blind_ids: np.ndarray  # [tb]
  blind_pos: np.ndarray  # [3, tb]
  blind_prompt_len: int


def _sequences(b: SequenceBatch, image_token_id: int) -> list[_Sequence]:
  """Every response with at least one valid token, with its prompt's tokens and positions."""
  ids, pmask, ppos = (np.asarray(x) for x in (b.prompt_ids, b.prompt_mask, b.prompt_pos))
  blind_index, next_pos = np.asarray(b.blind_index), np.asarray(b.next_pos)
  response, rmask = np.asarray(b.response), np.asarray(b.response_mask).astype(bool)
  P, G, L = response.shape
  out = []
  for p in range(P):
    valid = np.nonzero(pmask[p])[0]
    is_img = ids[p] == image_token_id
    rank = np.where(is_img, np.cumsum(is_img) - 1, -1)[valid]
    kept = blind_index[p][blind_index[p] >= 0]
    for g in range(G):
      lr = int(rmask[p, g].sum())
      if not rmask[p, g, :lr].all():
        raise ValueError(
          f"response {p * G + g} (prompt {p}): response_mask must be a prefix (valid tokens "
          f"first, then padding) to be packed"
        )
      if not lr:
        continue  # filler or empty: contributes nothing anywhere
      r_pos = np.broadcast_to(next_pos[p] + np.arange(lr), (3, lr))
      tokens = response[p, g, :lr]
      out.append(
        _Sequence(
          prompt=p,
          n=p * G + g,
          resp_len=lr,
          ids=np.concatenate([ids[p, valid], tokens]),
          pos=np.concatenate([ppos[p][:, valid], r_pos], axis=1),
          feature_rank=np.concatenate([rank, np.full(lr, -1)]),
          prompt_len=len(valid),
          blind_ids=np.concatenate([ids[p, kept], tokens]),
          blind_pos=np.concatenate([ppos[p][:, kept], r_pos], 1),
          blind_prompt_len=len(kept),
        )
      )
  return out


def _first_fit(lengths: list[int], row_len: int) -> tuple[list[tuple[int, int]], int]:
  """First-fit decreasing: (row, offset) of each length and the number of rows used."""
  place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
  fill: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    n = lengths[i]
    r = next((r for r, f in enumerate(fill) if f + n <= row_len), len(fill))
    if r == len(fill):
      fill.append(0)
    place[i] = (r, fill[r])
    fill[r] += n
  return place, len(fill)


def _assign_units(load_P: np.ndarray, units: int, balance: bool) -> np.ndarray:
  """[U, Pu] prompt indices per unit: in order, or longest first to the least loaded unit with room."""
  P = len(load_P)
  Pu = P // units
  if not balance:
    return np.arange(P).reshape(units, Pu)
  members: list[list[int]] = [[] for _ in range(units)]
  total = np.zeros(units)
  for p in sorted(range(P), key=lambda p: -load_P[p]):
    u = min((u for u in range(units) if len(members[u]) < Pu), key=lambda u: total[u])
    members[u].append(p)
    total[u] += load_P[p]
  return np.array([sorted(m) for m in members], np.int64).reshape(units, Pu)


def _plan(
  b: SequenceBatch, image_token_id: int, units: int, row_len: int, blind: bool, balance: bool
):
  P = b.prompt_ids.shape[0]
  if P % units:
    raise ValueError(f"{P} prompts do not split into {units} packing units")
  seqs = _sequences(b, image_token_id)
  load = np.zeros(P)
  for s in seqs:
    longest = max(len(s.ids), len(s.blind_ids))
    if longest > row_len:
      raise ValueError(
        f"sequence {s.n} (prompt {s.prompt}) has {longest} tokens, more than the packed row "
        f"length {row_len}; raise train.packed_row_length"
      )
    load[s.prompt] += len(s.ids)
  assign = _assign_units(load, units, balance)
  unit_of = {int(p): u for u, ps in enumerate(assign) for p in ps}
  per_unit = [[s for s in seqs if unit_of[s.prompt] == u] for u in range(units)]
  plans, need = [], PackedSizes(1, 1 if blind else 0, 1)
  for ss in per_unit:
    img, rows = _first_fit([len(s.ids) for s in ss], row_len)
    bl, brows = _first_fit([len(s.blind_ids) for s in ss], row_len) if blind else ([], 0)
    plans.append((ss, img, bl))
    need = need.max(PackedSizes(rows, brows, sum(s.resp_len for s in ss)))
  return assign, plans, need


def packed_sizes(
  b: SequenceBatch,
  image_token_id: int,
  units: int,
  row_len: int,
  *,
  blind: bool = True,
  balance: bool = True,
) -> PackedSizes:
  """The bucketed sizes `pack_sequences` needs for this batch (hosts of a multi-host run take the
  maximum over hosts and pass it to `pack_sequences`)."""
  return _bucketed(
    _plan(b, image_token_id, units, row_len, blind, balance)[2], blind, _max_tokens(b, units)
  )


def _max_tokens(b: SequenceBatch, units: int) -> int:
  """Response tokens a unit can hold at most: Pu·G·L."""
  P, G, L = np.shape(b.response)
  return P // units * G * L


def _bucketed(need: PackedSizes, blind: bool, max_tokens: int) -> PackedSizes:
  """Rows in `size_bucket`s; response tokens in quarters of their bound `max_tokens` (Pu·G·L): the
  lm-head runs on them, a small share of the pass, so 4 shapes beat a tight fit that recompiles."""
  quarter = max(1, -(-max_tokens // 4))
  return PackedSizes(
    size_bucket(need.rows),
    size_bucket(need.blind_rows) if blind else 0,
    min(max(1, -(-need.tokens // quarter)) * quarter, max(max_tokens, 1)),
  )


def pack_sequences(
  b: SequenceBatch,
  image_token_id: int,
  units: int,
  row_len: int,
  *,
  sizes: PackedSizes | None = None,
  blind: bool = True,
  balance: bool = True,
) -> tuple[PackedBatch, np.ndarray]:
  """Packs a host-side (numpy) SequenceBatch into U = `units` units of rows of `row_len` tokens.

  Args:
    b: the padded batch (`sequences.make_sequence_batch`); response masks must be prefixes.
    image_token_id: `<|image_pad|>`, whose tokens take image features.
    units: U, must divide the number of prompts (module docstring).
    row_len: T, at least the longest prompt+response.
    sizes: static sizes (default: `packed_sizes` of this batch).
    blind: also pack the blind view (scoring) or not (update passes).
    balance: deal prompts to units by length (module docstring); False: prompts in order.
  Returns:
    (PackedBatch of numpy arrays, slot [P*G, L] int64): response token (n, j) lies at flat index
    slot[n, j] of the [U*M] response layout, -1 where response_mask is False (`unpack`).
  """
  assign, plans, need = _plan(b, image_token_id, units, row_len, blind, balance)
  sizes = sizes or _bucketed(need, blind, _max_tokens(b, units))
  if (
    need.rows > sizes.rows
    or need.tokens > sizes.tokens
    or (blind and need.blind_rows > sizes.blind_rows)
  ):
    raise ValueError(f"this batch needs {need} per unit, more than the given {sizes}")
  U, T, M = units, row_len, sizes.tokens
  u_img = b.vision.unit_order.shape[-1] if b.vision is not None else 0

  def empty(R):
    return dict(
      ids=np.zeros((U, R, T), np.int32),
      pos=np.zeros((U, R, 3, T), np.int32),
      segment=np.zeros((U, R, T), np.int32),
      feature=np.full((U, R, T), -1, np.int32),
      resp_index=np.zeros((U, M), np.int32),
    )

  img, bl = empty(sizes.rows), empty(sizes.blind_rows) if blind else None
  target, mask, seq_len = (
    np.zeros((U, M), np.int32),
    np.zeros((U, M), bool),
    np.zeros((U, M), np.float32),
  )
  N, L = np.prod(b.response.shape[:2]), b.response.shape[-1]
  slot = np.full((N, L), -1, np.int64)
  local = {int(p): i for ps in assign for i, p in enumerate(ps)}  # a prompt's place in its unit
  for u, (ss, img_place, bl_place) in enumerate(plans):
    m = 0
    segs_img, segs_bl = {}, {}
    for i, s in enumerate(ss):
      lr = s.resp_len
      resp = slice(m, m + lr)
      target[u, resp] = s.ids[s.prompt_len :]
      mask[u, resp] = True
      seq_len[u, resp] = lr
      slot[s.n, :lr] = u * M + np.arange(m, m + lr)
      views = [(img, img_place[i], s.ids, s.pos, s.prompt_len, segs_img)]
      if blind:
        views.append((bl, bl_place[i], s.blind_ids, s.blind_pos, s.blind_prompt_len, segs_bl))
      for v, (r, o), ids, pos, tp, segs in views:
        t = slice(o, o + len(ids))
        segs[r] = segs.get(r, 0) + 1
        v["ids"][u, r, t] = ids
        v["pos"][u, r, :, t] = pos
        v["segment"][u, r, t] = segs[r]
        # The state before response token j (the prompt's last token for j = 0) predicts it.
        v["resp_index"][u, resp] = r * T + o + tp - 1 + np.arange(lr)
      feat = s.feature_rank
      img["feature"][u, img_place[i][0], img_place[i][1] : img_place[i][1] + len(s.ids)] = np.where(
        feat >= 0, local[s.prompt] * u_img + feat, -1
      )
      m += lr
  vision = None
  if b.vision is not None:
    vision = jax.tree.map(lambda x: np.asarray(x)[assign], b.vision)  # [U, Pu, ...]
  packed = PackedBatch(
    image=PackedView(**img),
    blind=PackedView(**bl) if blind else None,
    vision=vision,
    target=target,
    mask=mask,
    seq_len=seq_len,
  )
  return packed, slot


def unpack(x_UxM, slot_NxL: np.ndarray) -> np.ndarray:
  """[U, M] per-token results -> the padded [P*G, L] layout (0 where slot is -1)."""
  flat = np.asarray(x_UxM).reshape(-1)
  return np.where(slot_NxL >= 0, flat[np.maximum(slot_NxL, 0)], 0).astype(flat.dtype)


def pack_like(x_NxL, slot_NxL: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """The inverse of `unpack`: padded [P*G, L] per-token values -> the [U, M] layout (0 in padding)."""
  x = np.asarray(x_NxL).reshape(slot_NxL.shape)
  out = np.zeros(int(np.prod(shape)), x.dtype)
  valid = slot_NxL >= 0
  out[slot_NxL[valid]] = x[valid]
  return out.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Device side (call under jit)
# ------------------------------------------------------------------------------------------------
def _unit_features(model: qwen.Qwen25VL, pb: PackedBatch) -> jnp.ndarray | None:
  """Image features [U, Pu*U_img, D], every prompt's images encoded once."""
  if pb.vision is None:
    return None
  U, Pu = pb.vision.pixel_values.shape[:2]
  flat = jax.tree.map(lambda x: x.reshape(U * Pu, *x.shape[2:]), pb.vision)
  feats = qwen.encode_images(model, flat)  # [U*Pu, U_img, D]
  return feats.reshape(U, -1, feats.shape[-1])


def _embed(model: qwen.Qwen25VL, v: PackedView, feats_UxFxD) -> jnp.ndarray:
  """[U, R, T, D] token embeddings, image features on the `<|image_pad|>` tokens."""
  x = model.language_model.embed(v.ids)
  if feats_UxFxD is None:
    return x
  U, R, T = v.ids.shape
  idx = jnp.maximum(v.feature, 0).reshape(U, R * T, 1)
  gathered = jnp.take_along_axis(feats_UxFxD, idx, axis=1).reshape(U, R, T, -1)
  return jnp.where((v.feature >= 0)[..., None], gathered.astype(x.dtype), x)


def _response_states(
  model: qwen.Qwen25VL, views: list[PackedView], xs: list[jnp.ndarray]
) -> list[jnp.ndarray]:
  """One decoder call over the rows of all `views` (embeddings `xs`); each view's states that
  predict the response layout's tokens, [U, M, D]."""
  U, T = views[0].ids.shape[0], views[0].ids.shape[2]
  rows = [v.ids.shape[1] for v in views]
  cat = lambda f: jnp.concatenate([f(v, x) for v, x in zip(views, xs)], axis=1)  # noqa: E731
  x = cat(lambda v, x: x).reshape(U * sum(rows), T, -1)
  pos = cat(lambda v, x: v.pos).reshape(U * sum(rows), 3, T).swapaxes(0, 1)
  seg = cat(lambda v, x: v.segment).reshape(U * sum(rows), T)
  h, _ = qwen.run_decoder(model, x, pos, seg > 0, segment_ids_BxT=seg)
  h = h.reshape(U, sum(rows), T, -1)
  out, r0 = [], 0
  for v, R in zip(views, rows):
    hv = h[:, r0 : r0 + R].reshape(U, R * T, -1)
    out.append(jnp.take_along_axis(hv, v.resp_index[..., None], axis=1))
    r0 += R
  return out


def response_logprobs(
  model: qwen.Qwen25VL,
  pb: PackedBatch,
  *,
  chunk_size: int = 256,
  temperature: float = 1.0,
  return_entropy: bool = False,
):
  """log π(x_t | image, prompt, x_<t) of the response layout's tokens, [U, M] float32,
  differentiable (the packed `sequences.response_logprobs`); meaningless where `mask` is False."""
  (h,) = _response_states(model, [pb.image], [_embed(model, pb.image, _unit_features(model, pb))])
  return scoring.token_logprobs_chunked(
    h,
    model.lm_head_weight(),
    pb.target,
    chunk_size,
    temperature=temperature,
    return_entropy=return_entropy,
  )


def score_rollout(
  model: qwen.Qwen25VL,
  pb: PackedBatch,
  *,
  estimator: str = "k3",
  chunk_size: int = 256,
  clamp_log_ratio: float | None = None,
  temperature: float = 1.0,
  blind: bool = True,
) -> scoring.DependencyScores:
  """PGPO's two-view scoring pass on packed rows (the packed `sequences.score_rollout`): one
  decoder call over the image view's and the blind view's rows; [U, M] arrays (`unpack` them).
  `blind=False`: the image view only (blind log-probs = old log-probs, S = 0)."""
  feats = _unit_features(model, pb)
  if not blind:
    (h_img,) = _response_states(model, [pb.image], [_embed(model, pb.image, feats)])
    return scoring.image_view_scores(
      h_img,
      model.lm_head_weight(),
      pb.target,
      pb.mask,
      chunk_size=chunk_size,
      temperature=temperature,
    )
  if pb.blind is None:
    raise ValueError(
      "score_rollout needs a PackedBatch with its blind view (pack_sequences(blind=True))"
    )
  h_img, h_blind = _response_states(
    model, [pb.image, pb.blind], [_embed(model, pb.image, feats), _embed(model, pb.blind, None)]
  )
  fn = scoring.get_dependency_estimator(estimator)
  return fn(
    h_img,
    h_blind,
    model.lm_head_weight(),
    pb.target,
    pb.mask,
    chunk_size=chunk_size,
    clamp_log_ratio=clamp_log_ratio,
    temperature=temperature,
  )


# ------------------------------------------------------------------------------------------------
# Static shapes without data (compile checks)
# ------------------------------------------------------------------------------------------------
def worst_case_sizes(
  prompts_per_unit: int,
  group: int,
  prompt_len: int,
  response_len: int,
  row_len: int,
  *,
  blind: bool = True,
) -> PackedSizes:
  """Sizes that hold any batch of these bounds: every sequence at its longest (a text-only
  prompt of `prompt_len` tokens keeps them all in the blind view too)."""
  longest = prompt_len + response_len
  if longest > row_len:
    raise ValueError(
      f"packed row length {row_len} < longest sequence {longest} (prompt + response)"
    )
  seqs = prompts_per_unit * group
  rows = size_bucket(-(-seqs // (row_len // longest)))
  return PackedSizes(rows, rows if blind else 0, seqs * response_len)


def abstract_batch(
  cfg: qwen.Qwen25VLConfig,
  units: int,
  prompts_per_unit: int,
  sizes: PackedSizes,
  row_len: int,
  patches: int | None,
  leaf,
) -> PackedBatch:
  """A PackedBatch whose leaves are `leaf(shape, dtype)` (e.g. sharded ShapeDtypeStructs)."""
  U, T, M = units, row_len, sizes.tokens

  def view(R):
    return PackedView(
      ids=leaf((U, R, T), jnp.int32),
      pos=leaf((U, R, 3, T), jnp.int32),
      segment=leaf((U, R, T), jnp.int32),
      feature=leaf((U, R, T), jnp.int32),
      resp_index=leaf((U, M), jnp.int32),
    )

  vision = None
  if patches:
    vision = qwen.VisionInputs(
      **{
        k: leaf((U, prompts_per_unit) + shape, jnp.dtype(dt))
        for k, (shape, dt) in qwen.vision.input_shapes(cfg.vision, patches).items()
      }
    )
  return PackedBatch(
    image=view(sizes.rows),
    blind=view(sizes.blind_rows) if sizes.blind_rows else None,
    vision=vision,
    target=leaf((U, M), jnp.int32),
    mask=leaf((U, M), jnp.bool_),
    seq_len=leaf((U, M), jnp.float32),
  )
