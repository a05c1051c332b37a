"""The trainer's metric sinks and estimates: WORKDIR/metrics.jsonl, TensorBoard, W&B, MFU.

`MetricsLog` writes one row per step on host 0 (the other hosts hold a no-op log): metrics.jsonl
(one JSON object per step, non-finite values as null), TensorBoard scalars under WORKDIR/tb
(`logging.tensorboard`) and W&B (`logging.wandb`, when installed). After a resume, `truncate`
drops the rows of steps that were logged but not checkpointed (they run again).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np

from pgpo_jax.data.reader import SKIP_REASONS

log = logging.getLogger(__name__)


class MetricsLog:
  """Host 0's metric sinks under `workdir`; every method is a no-op on the other hosts."""

  def __init__(self, c: ml_collections.ConfigDict, workdir: str, is_host0: bool):
    self.is_host0 = is_host0
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    if self.is_host0 and c.logging.tensorboard:
      from tensorboardX import SummaryWriter

      self.writer = SummaryWriter(os.path.join(workdir, "tb"))
    self.wandb = None
    if self.is_host0 and c.logging.wandb:
      try:
        import wandb

        self.wandb = wandb.init(project=c.logging.wandb_project, config=c.to_dict(), dir=workdir)
      except ImportError:
        log.warning("logging.wandb=True but wandb is not installed; skipping W&B")

  def truncate(self, step: int) -> None:
    """After a resume, drop metrics of steps that were logged but not checkpointed (they rerun)."""
    if not self.is_host0 or not os.path.exists(self.metrics_path):
      return
    with open(self.metrics_path) as f:
      rows = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
    with open(self.metrics_path, "w") as f:
      f.writelines(rows)

  def log(self, step: int, m: dict[str, float]) -> None:
    """One row of metrics `m` for `step`."""
    if not self.is_host0:
      return
    m = {
      "step": step,
      **{
        k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
        for k, v in m.items()
      },
    }
    with open(self.metrics_path, "a") as f:
      f.write(
        json.dumps(
          {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
        )
        + "\n"
      )
    if self.writer is not None:
      for k, v in m.items():
        if k != "step" and isinstance(v, float) and math.isfinite(v):
          self.writer.add_scalar(k, v, step)
      self.writer.flush()
    if self.wandb is not None:
      self.wandb.log(m, step=step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def data_counts(stats) -> dict[str, float]:
  """Training rows read and skipped so far (cumulative over resumes), by reason, from an iterator's
  `stats`: this host's counts, summed over hosts by `reduce_metrics` (the `count/` prefix)."""
  by_reason = {r: int(stats.counts.get(r, 0)) for r in SKIP_REASONS}
  out = {"count/data_rows_read": stats.rows_read, "count/data_skipped_rows": stats.skipped}
  out.update({f"count/data_skipped_rows/{r}": n for r, n in by_reason.items()})
  out["count/data_skipped_rows/other"] = stats.skipped - sum(by_reason.values())
  return out


class StepTokens(NamedTuple):
  """The real (non-padding) tokens one RL step's passes compute, host-local; the same whether the
  passes run on padded or packed rows (padding is cost, not model FLOPs).

  prefill:   prompt tokens of every sampled prompt, every round (the rollout prefills each prompt once
             for its G samples).
  generated: sampled response tokens, every round.
  sequences: Σ over the trained responses (kept groups) of prompt + response tokens: the tokens of
             one view of the scoring pass, of π_ref's pass and of one update pass (each response is
             its own sequence, its prompt repeated).
  blind:     the same without the visual tokens the blind view drops (PGPO's second view).
  """

  prefill: int
  generated: int
  sequences: int
  blind: int


def step_tokens(
  sampled: Sequence, trained: Sequence, visual_mask: Callable[[np.ndarray], np.ndarray]
) -> StepTokens:
  """`StepTokens` from host-side groups (`groups.Group`: `prompt_ids` [t], `mask` [G, L]).

  Args:
    sampled: every group the rollout rounds sampled (kept or not).
    trained: the groups the update trains on.
    visual_mask: prompt ids [t] -> [t] bool, the tokens the blind view drops
      (`sequences.visual_token_mask`).
  """
  prefill = sum(len(g.prompt_ids) for g in sampled)
  generated = sum(int(np.asarray(g.mask).sum()) for g in sampled)
  seqs = blind = 0
  for g in trained:
    n_samples, response = len(g.mask), int(np.asarray(g.mask).sum())
    visual = int(np.asarray(visual_mask(np.asarray(g.prompt_ids))).sum())
    seqs += n_samples * len(g.prompt_ids) + response
    blind += n_samples * (len(g.prompt_ids) - visual) + response
  return StepTokens(prefill, generated, seqs, blind)


def step_model_flops(
  num_params: int, tokens: StepTokens, *, passes: int, blind_view: bool, reference: bool
) -> float:
  """Model FLOPs of one RL step (2N per token of a forward pass, 6N of a forward + backward):

  rollout  2N · (prefill + generated)
  scoring  2N · sequences (image view) + 2N · blind (blind view, when `blind_view`: pgpo.enabled)
  π_ref    2N · sequences (when `reference`: the KL term is on)
  updates  6N · sequences · passes (updates.passes)
  """
  n = float(num_params)
  flops = 2 * n * (tokens.prefill + tokens.generated) + 2 * n * tokens.sequences
  if blind_view:
    flops += 2 * n * tokens.blind
  if reference:
    flops += 2 * n * tokens.sequences
  return flops + 6 * n * tokens.sequences * passes


def mfu(flops: float, seconds: float, peak: float | None = None, chips: int | None = None) -> float:
  """Model FLOPs utilisation: `flops` (`step_model_flops`) over `seconds` at `chips` chips' peak
  bf16 FLOP/s `peak` (defaults: this host's chips, `peak_flops` of their kind); NaN where the peak
  is unknown, e.g. CPU. Host-local FLOPs over this host's chips (the mean over hosts is the run's
  MFU)."""
  peak = peak_flops(jax.devices()[0]) if peak is None else peak
  if not peak:
    return float("nan")
  chips = jax.local_device_count() if chips is None else chips
  return flops / (seconds * peak * chips)


_PEAK_BF16 = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
}


def peak_flops(device) -> float | None:
  """Peak dense bf16 FLOP/s of one chip of `device`'s kind; None when unknown."""
  kind = getattr(device, "device_kind", "")
  for name, v in _PEAK_BF16.items():
    if kind.startswith(name):
      return v
  return None
