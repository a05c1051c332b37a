"""The trainer's scoring and update passes on packed rows (`train.packing=True`, `rl.packing`).

The trainer builds its padded `SequenceBatch` as always; these functions turn its slices into
`PackedBatch`es (sizes agreed over hosts), run the device programs, and hand back per-sequence
results in the padded [P*G, L] layout, so advantages, metrics and checkpoints do not change.

    scores, ref_logp = score(score_fn, params, seq, ..., reference=...)  # [P*G, L] numpy
    batch = update_batch(padded_batch, ...)                          # the train step's packed batch
    loss, metrics = policy_loss(model, batch, loss_cfg)              # inside the train step
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pgpo_jax.rl import losses, packing, scoring
from pgpo_jax.rl.sequences import SequenceBatch
from pgpo_jax.train_step import METRIC_WEIGHT


def _units(prompts: int, units: int, what: str) -> int:
  if units < 1 or prompts % units:
    raise ValueError(
      f"{what}: {prompts} prompts per host do not split into {units} packing units "
      f"(one per micro-batch and batch shard); change the batch sizes or set train.packing=False"
    )
  return units


def _sizes(
  seq: SequenceBatch,
  image_token_id: int,
  units: int,
  row_len: int,
  blind: bool,
  agree: Callable[..., tuple[int, ...]],
) -> packing.PackedSizes:
  """This host's packed sizes, then the maximum over hosts (every host compiles the same shapes)."""
  own = packing.packed_sizes(seq, image_token_id, units, row_len, blind=blind)
  return packing.PackedSizes(*agree(own.rows, own.blind_rows, own.tokens))


def score(
  score_fn: Callable[..., scoring.DependencyScores],
  params: Any,
  seq: SequenceBatch,
  *,
  slice_prompts: int,
  units: int,
  row_len: int,
  image_token_id: int,
  put: Callable[[Any], Any],
  get: Callable[[Any], Any],
  agree: Callable[..., tuple[int, ...]],
  blind: bool = True,
  reference: Callable[[Any], Any] | None = None,
) -> tuple[scoring.DependencyScores, np.ndarray | None]:
  """Two-view scores of a host-local padded batch, computed on packed rows in slices of
  `slice_prompts` prompts; returns them as [P*G, L] numpy arrays (zero where `response_mask` is
  False), with log π_ref [P*G, L] in the same layout when `reference` is given (else None).

  `score_fn(params, packed_batch)` is the jitted scoring program (`programs.make_score_program`,
  built with the same `blind`); `reference(packed_batch) -> [U, M]` runs π_ref's program
  (`reference.ReferencePolicy.logprobs`) on the same placed slice, so π_ref sees exactly the packing
  the scores do. `put`/`get` move row-aligned trees to global arrays and back; `agree` takes the
  maximum of some ints over hosts. `blind=False` packs and scores the image view only (GRPO/DAPO).
  """
  P = seq.prompt_ids.shape[0]
  units = _units(slice_prompts, units, "pgpo.scoring_prompts")
  parts, ref_parts = [], []
  for s0 in range(0, P, slice_prompts):
    sub = jax.tree.map(lambda x: np.asarray(x)[s0 : s0 + slice_prompts], seq)
    sizes = _sizes(sub, image_token_id, units, row_len, blind, agree)
    pb, slot = packing.pack_sequences(sub, image_token_id, units, row_len, sizes=sizes, blind=blind)
    pb = put(pb)
    out = score_fn(params, pb)
    ref = reference(pb) if reference is not None else None  # dispatched before the first read
    out = get(out)
    parts.append(type(out)(*[packing.unpack(x, slot) for x in out]))
    if ref is not None:
      ref_parts.append(packing.unpack(get(ref), slot))
  scores = type(parts[0])(*[np.concatenate(x) for x in zip(*parts)])
  return scores, (np.concatenate(ref_parts) if reference is not None else None)


def update_batch(
  batch: dict[str, Any],
  *,
  units: int,
  row_len: int,
  image_token_id: int,
  agree: Callable[..., tuple[int, ...]],
) -> dict[str, Any]:
  """The trainer's padded update batch {"seq", "adv", "old_logp", ["ref_logp"], normalisers} → the
  packed one {"packed", "adv" [U, M], "old_logp" [U, M], ["ref_logp" [U, M]], normalisers,
  "loss_horizon"} (host-local numpy)."""
  seq: SequenceBatch = batch["seq"]
  units = _units(seq.prompt_ids.shape[0], units, "updates.prompts_per_update")
  sizes = _sizes(seq, image_token_id, units, row_len, False, agree)
  pb, slot = packing.pack_sequences(seq, image_token_id, units, row_len, sizes=sizes, blind=False)
  shape = pb.target.shape
  per_token = ("adv", "old_logp", "ref_logp")  # [P, G, L] rows → the response-token layout
  rest = {k: v for k, v in batch.items() if k != "seq" and k not in per_token}
  packed = {k: packing.pack_like(batch[k], slot, shape) for k in per_token if k in batch}
  return {"packed": pb, **packed, "loss_horizon": np.float32(seq.response.shape[-1]), **rest}


def policy_loss(
  model, b: dict[str, Any], l, *, temperature: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The trainer's RL loss (`programs.rl_loss_fn`) on a packed update batch; `l` is `config.loss`,
  π_θ's log-probs at `temperature` (`programs.logprob_temperature`). With `l.kl_coef > 0` the batch
  carries "ref_logp" [U, M] (log π_ref in the same layout) and the KL term's value is `kl_loss`.
  Every aggregation mode gives the padded batch's value (tests/rl/test_packing.py)."""
  pb: packing.PackedBatch = b["packed"]
  logp, entropy = packing.response_logprobs(
    model, pb, chunk_size=l.logprob_chunk, temperature=temperature, return_entropy=True
  )
  kl = (
    dict(ref_logp_BxT=b["ref_logp"], kl_coef=l.kl_coef, kl_estimator=l.kl_estimator)
    if l.kl_coef
    else {}
  )
  loss, metrics = losses.policy_loss(
    logp,
    b["old_logp"],
    b["adv"],
    pb.mask,
    l.clip_low,
    l.clip_high,
    l.agg,
    dual_clip=l.dual_clip or None,
    entropy_BxT=entropy if l.entropy_coef else None,
    entropy_coef=l.entropy_coef,
    loss_horizon=b["loss_horizon"],
    token_normalizer=b["token_normalizer"],
    seq_normalizer=b["seq_normalizer"],
    seq_length_BxT=pb.seq_len,
    **kl,
  )
  m = pb.mask
  metrics["entropy"] = jnp.sum(jnp.where(m, entropy, 0.0)) / jnp.maximum(m.sum(), 1)
  metrics[METRIC_WEIGHT] = m.sum()  # token-weighted means over micro-batches
  return loss, metrics
