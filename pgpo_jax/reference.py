"""The frozen reference policy π_ref of the KL loss term (`loss.kl_coef > 0`, verl's "ref" worker).

π_ref is a copy of the policy's weights at the start of RL, on the policy's own parameter shardings
and in its dtype, never updated. `logprobs(seq)` runs the trainer's π_ref program
(`programs.make_reference_program`, built by `programs.trainer_programs` with the score program's
shardings and rows, and compiled by `compile_check` as its "reference" step) on one scoring slice:
log π_ref(x_t) of the sampled tokens at the rollout temperature (the same tempered log-softmax as the
old log-probs and the loss). The trainer hands it the very slice the score program gets: the padded
SequenceBatch, or with `train.packing` the packed one (`packed_passes.score(reference=...)`); the
result goes to `losses.policy_loss(ref_logp_BxT=..., kl_coef=..., kl_estimator=...)`.

Which weights: the initial ones (`model.init_from`, or the seeded random init), which every start of
the trainer rebuilds. A supervised warm-up (`warmup.sft_steps > 0`, the demo) moves the weights before
RL starts, so then π_ref is reset to the warmed-up weights and written once to WORKDIR/reference; a
resumed run reads it back. With `loss.kl_coef == 0`, `build` returns None: no copy, no memory.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from pgpo_jax import checkpoint as ckpt_lib

log = logging.getLogger("pgpo_jax.reference")

DIRNAME = "reference"  # WORKDIR/reference: π_ref after a warm-up


class ReferencePolicy:
  """A frozen copy of some parameters and the jitted π_ref program that runs on them."""

  def __init__(self, params: nnx.State, shardings: Any, program: Callable):
    self._shardings = shardings
    self.params = self._copy(params)
    self.program = program  # (params, slice) -> log π_ref: `programs.make_reference_program`

  def _copy(self, params: nnx.State) -> nnx.State:
    # A real copy: the policy's buffers are donated to (and freed by) every optimizer step.
    return jax.device_put(params, self._shardings, may_alias=False)

  def reset(self, params: nnx.State) -> None:
    """π_ref := a copy of `params` (e.g. the weights after the warm-up)."""
    self.params = self._copy(params)

  def logprobs(self, seq: Any) -> jax.Array:
    """log π_ref(x_t) of a scoring slice already placed on the devices: [P*G, L] of a SequenceBatch,
    [U, M] of a PackedBatch."""
    return self.program(self.params, seq)

  def save(self, path: str) -> None:
    ckpt_lib.save_params(path, self.params)

  def restore(self, path: str) -> None:
    self.params = ckpt_lib.restore_params(path, self.params)


def build(
  c: ml_collections.ConfigDict, program: Callable | None, params: nnx.State, shardings: Any
) -> ReferencePolicy | None:
  """π_ref as a copy of `params` (the initial weights) on `shardings`, run by `program` (the
  trainer's `programs.trainer_programs(c).reference`), when `loss.kl_coef > 0`; else None."""
  if not c.loss.kl_coef:
    return None
  if program is None:
    raise ValueError(
      "loss.kl_coef > 0 needs the π_ref program (programs.trainer_programs(c).reference)"
    )
  log.info(
    "KL to a frozen reference policy: kl_coef %g, estimator %s", c.loss.kl_coef, c.loss.kl_estimator
  )
  return ReferencePolicy(params, shardings, program)


def start_rl(
  ref: ReferencePolicy | None, params: nnx.State, workdir: str, *, resumed: bool, warmed_up: bool
) -> None:
  """Makes π_ref the weights RL starts from (see the module docstring). Call on every host.

  Without a warm-up the copy `build` made of the initial weights already is. After a warm-up, a fresh
  run resets π_ref to `params` and saves it to WORKDIR/reference; a resumed run restores it.
  """
  if ref is None or not warmed_up:
    return
  path = os.path.join(workdir, DIRNAME)
  if not resumed:
    ref.reset(params)
    ref.save(path)
    return
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"{path}: the reference weights of this run are missing. With loss.kl_coef > 0 and "
      "warmup.sft_steps > 0, π_ref is the weights after the warm-up, saved there when the run starts; a "
      "run started with loss.kl_coef=0 has none. Start a new workdir, or set warmup.sft_steps=0 to use "
      "the initial weights as π_ref."
    )
  ref.restore(path)
