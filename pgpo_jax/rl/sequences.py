"""Prompt + response sequences as the policy sees them, and the passes over them.

A `SequenceBatch` holds P prompts (left padded, with their images) and G responses per prompt
(rows prompt-major: prompt p owns response rows p*G .. p*G+G-1). The policy runs on the
concatenation [prompt | response] with the prompt's M-RoPE positions followed by
`next_pos + arange(L)` for the response (as in generation). The images are encoded once per
prompt and the prompt embeddings are repeated G times, never re-encoded per sample.

Two passes use this layout:
- `response_logprobs` (one view, differentiable): the loss's log π_θ(x_t).
- `score_rollout` (two views, no gradient): PGPO's dual-condition scoring. The image view attends
  to everything; the blind view has the visual tokens masked out of attention with the SAME token
  ids and positions (docs/method.md §2). Both views share one vision encoding and run as one batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
  next_pos:      [P] int32, position of the first response token (max prompt position + 1).
  vision:        per-row VisionInputs ([P, N_pad, ...] leaves) or None for text-only batches.
  response:      [P, G, L] int32 sampled tokens (pad after EOS).
  response_mask: [P, G, L] bool, valid response tokens (EOS included).
  """
  prompt_ids: jnp.ndarray
  prompt_mask: jnp.ndarray
  prompt_pos: jnp.ndarray
  prompt_visual: jnp.ndarray
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


def _embed_and_positions(model: qwen.Qwen25VL, b: SequenceBatch):
  """Embeddings [P*G, Tp+L, D], positions [3, P*G, Tp+L], key mask and visual mask [P*G, Tp+L]."""
  G, L = b.group_size, b.response.shape[-1]
  feats = qwen.encode_images(model, b.vision) if b.vision is not None else None  # [P, U, D]
  rep = lambda x: jnp.repeat(x, G, axis=0)
  x_prompt = rep(qwen.embed_inputs(model, b.prompt_ids, feats))
  x_resp = model.language_model.embed(b.flat_response)
  x = jnp.concatenate([x_prompt, x_resp.astype(x_prompt.dtype)], axis=1)
  resp_pos = b.next_pos[:, None] + jnp.arange(L, dtype=jnp.int32)[None]  # [P, L]
  pos = jnp.concatenate([rep(b.prompt_pos), rep(jnp.broadcast_to(resp_pos[:, None], (resp_pos.shape[0], 3, L)))],
                        axis=2)  # [P*G, 3, T]
  key_mask = jnp.concatenate([rep(b.prompt_mask), b.flat_response_mask], axis=1)
  visual = jnp.concatenate([rep(b.prompt_visual), jnp.zeros((x.shape[0], L), bool)], axis=1)
  return x, jnp.swapaxes(pos, 0, 1), key_mask, visual


def _response_hidden(h_NxTxD: jnp.ndarray, prompt_len: int) -> jnp.ndarray:
  """Hidden states that predict the response tokens: positions Tp-1 .. Tp+L-2."""
  return h_NxTxD[:, prompt_len - 1:-1]


def response_logprobs(model: qwen.Qwen25VL, b: SequenceBatch, *, chunk_size: int = 256,
                      temperature: float = 1.0, return_entropy: bool = False):
  """log π(x_t | image, prompt, x_<t) of every response token [P*G, L] (float32, differentiable).

  The lm-head and log-softmax run in sequence chunks; [N, L, V] logits are never materialised.
  Values at masked positions are meaningless; callers mask them.
  """
  x, pos, key_mask, _ = _embed_and_positions(model, b)
  h, _ = qwen.run_decoder(model, x, pos, key_mask)
  return scoring.token_logprobs_chunked(_response_hidden(h, b.prompt_ids.shape[1]), model.lm_head_weight(),
                                        b.flat_response, chunk_size, temperature=temperature,
                                        return_entropy=return_entropy)


def score_rollout(model: qwen.Qwen25VL, b: SequenceBatch, *, estimator: str = "k3", chunk_size: int = 256,
                  clamp_log_ratio: float | None = None, temperature: float = 1.0
                  ) -> scoring.DependencyScores:
  """PGPO's dual-condition scoring pass (no gradient): old log-probs, blind log-probs and S.

  One decoder call over [image view; blind view] stacked on the batch axis (2·P·G rows); the blind
  view's key mask drops `prompt_visual`. Returns [P*G, L] arrays (stop-gradient), zero where
  `response_mask` is 0.
  """
  x, pos, key_mask, visual = _embed_and_positions(model, b)
  both = lambda a, axis=0: jnp.concatenate([a, a], axis=axis)
  h, _ = qwen.run_decoder(model, both(x), both(pos, 1), jnp.concatenate([key_mask, key_mask & ~visual]))
  h = _response_hidden(h, b.prompt_ids.shape[1])
  n = h.shape[0] // 2
  fn = scoring.get_dependency_estimator(estimator)
  return fn(h[:n], h[n:], model.lm_head_weight(), b.flat_response, b.flat_response_mask, chunk_size=chunk_size,
            clamp_log_ratio=clamp_log_ratio, temperature=temperature)


# ------------------------------------------------------------------------------------------------
# Host-side construction
# ------------------------------------------------------------------------------------------------
def visual_token_mask(prompt_ids: np.ndarray, cfg: qwen.Qwen25VLConfig, mask_vision_markers: bool = False) -> np.ndarray:
  """The tokens the blind view hides: `<|image_pad|>` (+ vision start/end if asked)."""
  ids = np.asarray(prompt_ids)
  m = ids == cfg.image_token_id
  if mask_vision_markers:
    m |= (ids == cfg.vision_start_token_id) | (ids == cfg.vision_end_token_id)
  return m


def make_sequence_batch(cfg: qwen.Qwen25VLConfig, prompt_ids, prompt_mask, pixel_values, image_grid_thw,
                        response, response_mask, *, prompt_pos=None, num_patches: int | None = None,
                        mask_vision_markers: bool = False) -> SequenceBatch:
  """Builds a SequenceBatch from left-padded prompts (HF processor outputs) and sampled responses.

  `response`/`response_mask` are [P*G, L] (prompt-major) or [P, G, L]; `prompt_pos` is [3, P, Tp]
  as `get_rope_index` returns it (computed when omitted); `num_patches` is the per-row patch budget.
  """
  ids = np.asarray(prompt_ids, np.int32)
  am = np.asarray(prompt_mask).astype(np.int32)
  P = ids.shape[0]
  if prompt_pos is None:
    prompt_pos, _ = qwen.get_rope_index(ids, am, image_grid_thw, image_token_id=cfg.image_token_id,
                                     spatial_merge_size=cfg.vision.spatial_merge_size)
  prompt_pos = np.asarray(prompt_pos, np.int32)
  next_pos = (np.where(am[None] > 0, prompt_pos, -1).max(axis=(0, 2)) + 1).astype(np.int32)
  has_images = image_grid_thw is not None and len(qwen.rope.valid_grids(image_grid_thw)) > 0
  vision = (qwen.prepare_vision_rows(pixel_values, image_grid_thw, ids, cfg.vision, cfg.image_token_id, num_patches)
            if has_images or num_patches else None)
  response = np.asarray(response, np.int32)
  L = response.shape[-1]
  return SequenceBatch(prompt_ids=ids, prompt_mask=am.astype(bool), prompt_pos=prompt_pos.transpose(1, 0, 2),
                       prompt_visual=visual_token_mask(ids, cfg, mask_vision_markers), next_pos=next_pos,
                       vision=vision, response=response.reshape(P, -1, L),
                       response_mask=np.asarray(response_mask).astype(bool).reshape(P, -1, L))
