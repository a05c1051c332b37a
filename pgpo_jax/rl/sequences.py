"""Prompt + response sequences as the policy sees them, and the passes over them.

A `SequenceBatch` holds P prompts (left padded, with their images) and G responses per prompt
(rows prompt-major: prompt p owns response rows p*G .. p*G+G-1). The policy runs on the
concatenation [prompt | response] with the prompt's M-RoPE positions followed by
`next_pos + arange(L)` for the response (as in generation). The images are encoded once per
prompt and the prompt embeddings are repeated G times, never re-encoded per sample.

Two passes use this layout:
- `response_logprobs` (one view, differentiable): the loss's log π_θ(x_t).
- `score_rollout` (two views, no gradient): PGPO's dual-condition scoring. The image view attends
  to everything; in the blind view no token attends to a visual token, with the SAME token ids and
  positions (docs/method.md §2). Since nothing attends to them, the visual tokens cannot change any text
  token's output, so the blind view runs on the sequence WITHOUT them (`blind_index`), every kept
  token with its M-RoPE ids from the full sequence: same numbers as masking, a fraction of the work
  (a 1,024-token image in a ~100-token prompt). The image view encodes the images once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pgpo_jax.buckets import seq_bucket
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.rl import scoring


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SequenceBatch:
  """P prompts × G responses, every leaf row-aligned on a leading prompt axis P, so a batch splits
  into micro-batches or data shards by rows. Shapes: Tp prompt bucket, L max response length.

  prompt_ids:    [P, Tp] int32, left padded.
  prompt_mask:   [P, Tp] bool.
  prompt_pos:    [P, 3, Tp] int32 M-RoPE positions (0 at padding).
  prompt_visual: [P, Tp] bool, tokens hidden from the blind view (the `<|image_pad|>` payload).
  blind_index:   [P, Tb] int32, prompt slots of the tokens the blind view keeps (the valid, non-visual
                 ones) in order, left padded with -1; Tb ≤ Tp is the blind prompt bucket.
  next_pos:      [P] int32, position of the first response token (max prompt position + 1).
  vision:        per-row VisionInputs ([P, N_pad, ...] leaves) or None for text-only batches.
  response:      [P, G, L] int32 sampled tokens (pad after EOS).
  response_mask: [P, G, L] bool, valid response tokens (EOS included).
  """

  prompt_ids: jnp.ndarray
  prompt_mask: jnp.ndarray
  prompt_pos: jnp.ndarray
  prompt_visual: jnp.ndarray
  blind_index: jnp.ndarray
  next_pos: jnp.ndarray
  vision: qwen.VisionInputs | None
  response: jnp.ndarray
  response_mask: jnp.ndarray

  @property
  def group_size(self) -> int:
    return self.response.shape[1]

  @property
  def flat_response(self) -> jnp.ndarray:
    """[P*G, L], prompt-major."""
    return self.response.reshape(-1, self.response.shape[-1])

  @property
  def flat_response_mask(self) -> jnp.ndarray:
    return self.response_mask.reshape(-1, self.response_mask.shape[-1]).astype(bool)


def _response_positions(b: SequenceBatch) -> jnp.ndarray:
  """[P, 3, L] M-RoPE ids of the response tokens: `next_pos + arange(L)` on all three axes."""
  L = b.response.shape[-1]
  resp_pos = b.next_pos[:, None] + jnp.arange(L, dtype=jnp.int32)[None]  # [P, L]
  return jnp.broadcast_to(resp_pos[:, None], (resp_pos.shape[0], 3, L))


def _embed_and_positions(model: qwen.Qwen25VL, b: SequenceBatch):
  """Embeddings [P*G, Tp+L, D], positions [3, P*G, Tp+L], key mask and visual mask [P*G, Tp+L]."""
  G, L = b.group_size, b.response.shape[-1]
  feats = qwen.encode_images(model, b.vision) if b.vision is not None else None  # [P, U, D]
  rep = lambda x: jnp.repeat(x, G, axis=0)
  x_prompt = rep(qwen.embed_inputs(model, b.prompt_ids, feats))
  x_resp = model.language_model.embed(b.flat_response)
  x = jnp.concatenate([x_prompt, x_resp.astype(x_prompt.dtype)], axis=1)
  pos = jnp.concatenate([rep(b.prompt_pos), rep(_response_positions(b))], axis=2)  # [P*G, 3, T]
  key_mask = jnp.concatenate([rep(b.prompt_mask), b.flat_response_mask], axis=1)
  visual = jnp.concatenate([rep(b.prompt_visual), jnp.zeros((x.shape[0], L), bool)], axis=1)
  return x, jnp.swapaxes(pos, 0, 1), key_mask, visual


def _blind_embed_and_positions(model: qwen.Qwen25VL, b: SequenceBatch):
  """The blind view's inputs, [prompt without visual tokens | response]: embeddings
  [P*G, Tb+L, D], positions [3, P*G, Tb+L] (each token's ids from the full sequence), key mask."""
  G = b.group_size
  rep = lambda x: jnp.repeat(x, G, axis=0)
  kept = b.blind_index >= 0
  idx = jnp.maximum(b.blind_index, 0)
  ids = jnp.where(kept, jnp.take_along_axis(b.prompt_ids, idx, axis=1), 0)
  pos = jnp.where(
    kept[:, None], jnp.take_along_axis(b.prompt_pos, idx[:, None, :], axis=2), 0
  )  # [P, 3, Tb]
  x_prompt = rep(model.language_model.embed(ids))
  x = jnp.concatenate(
    [x_prompt, model.language_model.embed(b.flat_response).astype(x_prompt.dtype)], axis=1
  )
  pos = jnp.concatenate([rep(pos), rep(_response_positions(b))], axis=2)
  key_mask = jnp.concatenate([rep(kept), b.flat_response_mask], axis=1)
  return x, jnp.swapaxes(pos, 0, 1), key_mask


def _response_hidden(h_NxTxD: jnp.ndarray, prompt_len: int) -> jnp.ndarray:
  """Hidden states that predict the response tokens: positions Tp-1 .. Tp+L-2."""
  return h_NxTxD[:, prompt_len - 1 : -1]


def response_logprobs(
  model: qwen.Qwen25VL,
  b: SequenceBatch,
  *,
  chunk_size: int = 256,
  temperature: float = 1.0,
  return_entropy: bool = False,
):
  """log π(x_t | image, prompt, x_<t) of every response token [P*G, L] (float32, differentiable).

  The lm-head and log-softmax run in sequence chunks; [N, L, V] logits are never materialised.
  Values at masked positions are meaningless; callers mask them.
  """
  x, pos, key_mask, _ = _embed_and_positions(model, b)
  h, _ = qwen.run_decoder(model, x, pos, key_mask)
  return scoring.token_logprobs_chunked(
    _response_hidden(h, b.prompt_ids.shape[1]),
    model.lm_head_weight(),
    b.flat_response,
    chunk_size,
    temperature=temperature,
    return_entropy=return_entropy,
  )


def blind_response_logprobs(
  model: qwen.Qwen25VL,
  b: SequenceBatch,
  *,
  chunk_size: int = 256,
  temperature: float = 1.0,
) -> jnp.ndarray:
  """log π_∅(x_t | prompt without its visual tokens, x_<t) of every response token [P*G, L]
  (float32, differentiable): the blind view exactly as `score_rollout` builds it (same inputs, same
  M-RoPE ids), for training on it (`warmup.blind_fraction`). Masked positions are meaningless."""
  x, pos, key_mask = _blind_embed_and_positions(model, b)
  h, _ = qwen.run_decoder(model, x, pos, key_mask)
  return scoring.token_logprobs_chunked(
    _response_hidden(h, b.blind_index.shape[1]),
    model.lm_head_weight(),
    b.flat_response,
    chunk_size,
    temperature=temperature,
  )


def partial_view_logprobs(
  model: qwen.Qwen25VL,
  b: SequenceBatch,
  hidden_PxTp: jnp.ndarray,
  *,
  chunk_size: int = 256,
  temperature: float = 1.0,
) -> jnp.ndarray:
  """log π(x_t) [P*G, L] when no token may attend to the prompt tokens in `hidden_PxTp` (bool [P, Tp],
  e.g. a random half of the visual tokens: a partial blind view, as VPPO masks image patches). The
  full sequence with a key mask, so any subset can be hidden; hiding every visual token gives the
  blind view's numbers (`score_rollout`), hiding none the image view's."""
  x, pos, key_mask, _ = _embed_and_positions(model, b)
  hidden = jnp.repeat(jnp.asarray(hidden_PxTp, bool), b.group_size, axis=0)
  hidden = jnp.concatenate([hidden, jnp.zeros((hidden.shape[0], b.response.shape[-1]), bool)], 1)
  h, _ = qwen.run_decoder(model, x, pos, key_mask & ~hidden)
  return scoring.token_logprobs_chunked(
    _response_hidden(h, b.prompt_ids.shape[1]),
    model.lm_head_weight(),
    b.flat_response,
    chunk_size,
    temperature=temperature,
  )


def score_rollout(
  model: qwen.Qwen25VL,
  b: SequenceBatch,
  *,
  estimator: str = "k3",
  chunk_size: int = 256,
  clamp_log_ratio: float | None = None,
  temperature: float = 1.0,
  blind: bool = True,
) -> scoring.DependencyScores:
  """PGPO's dual-condition scoring pass (no gradient): old log-probs, blind log-probs and S.

  The image view runs on [prompt | response] (P*G rows of Tp+L); the blind view on [prompt without
  its visual tokens | response] (P*G rows of Tb+L, `blind_index`), with the full sequence's
  positions: what the image view gives when no token may attend to a visual token. Returns
  [P*G, L] arrays (stop-gradient), zero where `response_mask` is 0. `blind=False` (GRPO/DAPO,
  `pgpo.enabled=False`) runs the image view only: blind log-probs = old log-probs, S = 0.
  """
  x, pos, key_mask, _ = _embed_and_positions(model, b)
  h_image, _ = qwen.run_decoder(model, x, pos, key_mask)
  h_image = _response_hidden(h_image, b.prompt_ids.shape[1])
  if not blind:
    return scoring.image_view_scores(
      h_image,
      model.lm_head_weight(),
      b.flat_response,
      b.flat_response_mask,
      chunk_size=chunk_size,
      temperature=temperature,
    )
  x, pos, key_mask = _blind_embed_and_positions(model, b)
  h_blind, _ = qwen.run_decoder(model, x, pos, key_mask)
  fn = scoring.get_dependency_estimator(estimator)
  return fn(
    h_image,
    _response_hidden(h_blind, b.blind_index.shape[1]),
    model.lm_head_weight(),
    b.flat_response,
    b.flat_response_mask,
    chunk_size=chunk_size,
    clamp_log_ratio=clamp_log_ratio,
    temperature=temperature,
  )


# ------------------------------------------------------------------------------------------------
# Host-side construction
# ------------------------------------------------------------------------------------------------
def visual_token_mask(
  prompt_ids: np.ndarray, cfg: qwen.Qwen25VLConfig, mask_vision_markers: bool = False
) -> np.ndarray:
  """The tokens the blind view hides: `<|image_pad|>` (+ vision start/end if asked)."""
  ids = np.asarray(prompt_ids)
  m = ids == cfg.image_token_id
  if mask_vision_markers:
    m |= (ids == cfg.vision_start_token_id) | (ids == cfg.vision_end_token_id)
  return m


def blind_prompt_index(
  prompt_mask: np.ndarray, prompt_visual: np.ndarray, length: int | None = None
) -> np.ndarray:
  """[P, Tb] prompt slots of the valid non-visual tokens, left padded with -1 (`SequenceBatch.blind_index`).

  `length` is Tb (default: the 32-multiple bucket of the longest, at most Tp). The blind view predicts the first
  response token from the last prompt token, so that token must be kept (it is text in every chat
  template: the assistant header).
  """
  keep = np.asarray(prompt_mask).astype(bool) & ~np.asarray(prompt_visual).astype(bool)
  counts = keep.sum(axis=1)
  Tb = min(seq_bucket(int(counts.max(initial=1))), keep.shape[1]) if length is None else int(length)
  if counts.max(initial=0) > Tb:
    raise ValueError(f"blind prompt length {Tb} < {int(counts.max())} non-visual prompt tokens")
  out = np.full((keep.shape[0], Tb), -1, np.int32)
  for p in range(keep.shape[0]):
    slots = np.nonzero(keep[p])[0]
    valid = np.nonzero(np.asarray(prompt_mask)[p])[0]
    if len(valid) and not keep[p, valid[-1]]:
      raise ValueError(
        f"prompt row {p} ends with a visual token; the blind view needs a text token last"
      )
    out[p, Tb - len(slots) :] = slots
  return out


def make_sequence_batch(
  cfg: qwen.Qwen25VLConfig,
  prompt_ids,
  prompt_mask,
  pixel_values,
  image_grid_thw,
  response,
  response_mask,
  *,
  prompt_pos=None,
  num_patches: int | None = None,
  mask_vision_markers: bool = False,
  blind_prompt_len: int | None = None,
) -> SequenceBatch:
  """Builds a SequenceBatch from left-padded prompts (HF processor outputs) and sampled responses.

  `response`/`response_mask` are [P*G, L] (prompt-major) or [P, G, L]; `prompt_pos` is [3, P, Tp]
  as `get_rope_index` returns it (computed when omitted); `num_patches` is the per-row patch budget;
  `blind_prompt_len` the blind view's prompt bucket Tb (default: from this batch, `blind_prompt_index`).
  """
  ids = np.asarray(prompt_ids, np.int32)
  am = np.asarray(prompt_mask).astype(np.int32)
  P = ids.shape[0]
  if prompt_pos is None:
    prompt_pos, _ = qwen.get_rope_index(
      ids,
      am,
      image_grid_thw,
      image_token_id=cfg.image_token_id,
      spatial_merge_size=cfg.vision.spatial_merge_size,
    )
  prompt_pos = np.asarray(prompt_pos, np.int32)
  next_pos = (np.where(am[None] > 0, prompt_pos, -1).max(axis=(0, 2)) + 1).astype(np.int32)
  has_images = image_grid_thw is not None and len(qwen.rope.valid_grids(image_grid_thw)) > 0
  vision = (
    qwen.prepare_vision_rows(
      pixel_values, image_grid_thw, ids, cfg.vision, cfg.image_token_id, num_patches
    )
    if has_images or num_patches
    else None
  )
  response = np.asarray(response, np.int32)
  L = response.shape[-1]
  visual = visual_token_mask(ids, cfg, mask_vision_markers)
  return SequenceBatch(
    prompt_ids=ids,
    prompt_mask=am.astype(bool),
    prompt_pos=prompt_pos.transpose(1, 0, 2),
    prompt_visual=visual,
    blind_index=blind_prompt_index(am, visual, blind_prompt_len),
    next_pos=next_pos,
    vision=vision,
    response=response.reshape(P, -1, L),
    response_mask=np.asarray(response_mask).astype(bool).reshape(P, -1, L),
  )
