"""The host loop: the only place that orchestrates, logs and checkpoints.

One training step (= one rollout batch):

    prompts ─► rollout (G samples, current weights, no host copy of params) ─► rewards (host)
      ─► dynamic sampling (drop all-correct / all-wrong groups, sample more rounds, capped)
      ─► scoring pass (old log-probs + blind log-probs + dependency S, one jitted no-grad call)
      ─► token advantages (`pgpo` or `grpo`) ─► update_batches × passes optimizer updates
      ─► metrics (jsonl, TensorBoard, progress bar) ─► async checkpoint

Resuming from WORKDIR restores params, optimizer state, RNG, the data iterator and counters, so the
next batch is the one after the last saved step. SIGTERM or SIGINT (preemption, Ctrl-C) triggers a
checkpoint after the current step (during the warm-up: a stop before the next warm-up step, nothing
saved; `Trainer.run`), then `train` raises `Preempted` (`scripts/train.py` exits with
`EXIT_PREEMPTED` = 75: not finished, rerun the same command to resume).

What the loop calls lives beside it: `train_setup` (demo data, model, WORKDIR model folder),
`warmup` (the SFT warm-up), `train_eval` (the in-loop greedy eval), `train_metrics` (metrics.jsonl,
TensorBoard, W&B, MFU), `groups` (`Group`), `programs` (every device program), `checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from pgpo_jax import checkpoint as ckpt_lib
from pgpo_jax import config as config_lib
from pgpo_jax import (
  multihost,
  programs,
  sampler,
  sharding,
  train_eval,
  train_metrics,
  train_setup,
  warmup,
)
from pgpo_jax import reference as reference_lib
from pgpo_jax import rewards as rewards_lib
from pgpo_jax import rollout as rollout_lib
from pgpo_jax import train_step as train_step_lib
from pgpo_jax.buckets import (
  batch_bucket,
  bucket_size,
  default_length_buckets,
  patch_bucket,
  seq_bucket,
)
from pgpo_jax.data import hf_processor as processor_lib
from pgpo_jax.data import reader
from pgpo_jax.data.pipeline import make_prompt_iterator
from pgpo_jax.data.prompts import PromptBatch, PromptFormat
from pgpo_jax.groups import Group, split_prompt_batch  # noqa: F401  (re-exported: the tests build groups)
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.programs import make_optimizer
from pgpo_jax.rl import packed_passes, sequences
from pgpo_jax.train_setup import build_model, ensure_demo_data  # noqa: F401  (re-exported)
from pgpo_jax.workdir_lock import WorkdirBusy, WorkdirLock

log = logging.getLogger("pgpo_jax.trainer")


# ------------------------------------------------------------------------------------------------
# Groups: one prompt with its G responses, collected across rollout rounds
# ------------------------------------------------------------------------------------------------
def group_extent(groups: list[Group], image_token_id: int = -1) -> tuple[int, ...]:
  """(longest prompt in tokens, most patches in one prompt, longest prompt without its
  `image_token_id` tokens: the blind view's) of some groups."""
  return (
    max((len(g.prompt_ids) for g in groups), default=1),
    max((int(g.grids.prod(axis=1).sum()) for g in groups), default=0),
    max((int((g.prompt_ids != image_token_id).sum()) for g in groups), default=1),
  )


def row_patches(pb: PromptBatch) -> np.ndarray:
  """[B] number of patches of each prompt's images (0 for text-only prompts)."""
  sizes = qwen.rope.valid_grids(pb.image_grid_thw).prod(axis=1)
  csum = np.concatenate([[0], np.cumsum(sizes)])
  ends = np.cumsum(pb.num_images)
  return (csum[ends] - csum[ends - pb.num_images]).astype(np.int64)


def collate_groups(
  groups: list[Group],
  cfg: qwen.Qwen25VLConfig,
  length_buckets,
  pad_id: int,
  filler: int = 0,
  *,
  filler_group: Group | None = None,
  extent: tuple[int, ...] | None = None,
  mask_vision_markers: bool = False,
) -> tuple[sequences.SequenceBatch, np.ndarray]:
  """Left-pads the groups' prompts into one SequenceBatch (+ `filler` masked groups).

  Returns the batch and the flat rewards [P*G]. Filler groups (copies of `filler_group`, default
  group 0) have an all-False response mask, so they add nothing to losses, normalisers or
  statistics; they keep the update batch shape static. `extent` = (prompt tokens, patches per
  prompt, blind prompt tokens) to pad to (default: `group_extent(groups)`; hosts of a multi-host run
  pass the maximum over hosts so that their batches have one shape). `mask_vision_markers`: the blind
  view also hides `<|vision_start|>`/`<|vision_end|>` (`pgpo.mask_vision_markers`).
  """
  base = groups[0] if filler_group is None else filler_group
  groups = list(groups) + [dataclasses.replace(base, mask=np.zeros_like(base.mask))] * filler
  longest, patches, blind = group_extent(groups, cfg.image_token_id) if extent is None else extent
  T = bucket_size(longest, length_buckets)
  P = len(groups)
  ids = np.full((P, T), pad_id, np.int32)
  am = np.zeros((P, T), np.int32)
  for p, g in enumerate(groups):
    ids[p, T - len(g.prompt_ids) :] = g.prompt_ids
    am[p, T - len(g.prompt_ids) :] = 1
  pix = np.concatenate([g.pixel_values for g in groups]) if groups else None
  grids = np.concatenate([g.grids for g in groups])
  seq = sequences.make_sequence_batch(
    cfg,
    ids,
    am,
    pix,
    grids,
    np.stack([g.tokens for g in groups]),
    np.stack([g.mask for g in groups]),
    num_patches=patch_bucket(patches),
    mask_vision_markers=mask_vision_markers,
    blind_prompt_len=min(bucket_size(blind, length_buckets), T),
  )
  return seq, np.concatenate([g.rewards for g in groups]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Update batches
# ------------------------------------------------------------------------------------------------
def _normalizers(mask: np.ndarray) -> dict[str, np.ndarray]:
  """Token and sequence counts of a (host-local) update batch, summed over hosts: the loss of the
  global batch is normalised by the global counts."""
  m = np.asarray(mask).reshape(-1, mask.shape[-1]).astype(bool)
  tokens, seqs = multihost.sum_over_hosts(np.array([m.sum(), m.any(-1).sum()], np.int64))
  return {"token_normalizer": np.float32(tokens), "seq_normalizer": np.float32(seqs)}


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """x [n, ...] -> [rows, ...], zeros after row n."""
  return (
    np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])
    if rows > x.shape[0]
    else x
  )


def num_update_batches(kept_local: int, per_update_local: int) -> int:
  """Update mini-batches of a step whose hosts kept `kept_local` groups each (a collective).

  Enough for the host with the most groups: every mini-batch then holds a real group on that host,
  so none is all padding, and every host runs the same number of optimizer steps.
  """
  most = int(multihost.max_over_hosts(np.int64(kept_local)))
  return -(-most // per_update_local)


class EndOfData(Exception):
  """The training data ran out (after `data.num_epochs` passes) while a step collected prompts."""


EXIT_PREEMPTED = (
  75  # sysexits.h EX_TEMPFAIL: stopped early by a signal, checkpoint saved; rerun to resume
)


class Preempted(Exception):
  """Raised by `train` when SIGTERM or SIGINT stopped the run; `str()` says what was saved (a
  checkpoint of `step`, or, during the warm-up, nothing: `Trainer.run`) and what a rerun does."""

  def __init__(self, step: int, metrics: dict[str, float], message: str = ""):
    super().__init__(
      message
      or f"stopped by a signal after step {step}, which is checkpointed; rerun the same command "
      "to resume"
    )
    self.step = step
    self.metrics = metrics


def lock_workdir(workdir: str) -> WorkdirLock:
  """This process's `WorkdirLock` of `workdir`, agreed over hosts (a collective): when any host finds
  its lock held, every host releases its own and raises `WorkdirBusy`, so that a second run refuses
  on every process instead of leaving some of them waiting in a collective."""
  try:
    lock, busy = WorkdirLock(workdir, jax.process_index()), ""
  except WorkdirBusy as e:
    lock, busy = None, str(e)
  if int(multihost.max_over_hosts(np.int64(bool(busy)))):
    if lock is not None:
      lock.release()
    raise WorkdirBusy(
      busy
      or f"workdir {os.path.abspath(workdir)} is in use by another training run (the lock "
      "of another host's process is held)"
    )
  return lock


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
  """Holds the run's state; `run()` executes the loop. Built from a validated config.

  Multi-host: every process runs this same loop over its own shard of the prompts. Batch sizes in
  the config are global; each host holds `1 / process_count` of every batch as host-local numpy
  rows (groups, rewards, advantages) and device programs see global arrays (`multihost.py`).
  Decisions that change what runs on the devices (dynamic-sampling rounds, padded shapes, the
  evaluation loop) are agreed across hosts; metrics are reduced over hosts; host 0 logs.
  """

  def __init__(self, c: ml_collections.ConfigDict, workdir: str):
    config_lib.validate(c, jax.device_count(), jax.process_count(), platform=jax.default_backend())
    self.c = c
    self.workdir = os.path.abspath(workdir)
    # One run per workdir (`workdir_lock`): held until `run()` ends or `close()`.
    self._lock = lock_workdir(self.workdir)
    try:
      self._build()
    except BaseException:
      self._lock.release()
      raise

  def _build(self) -> None:
    c = self.c
    ensure_demo_data(c)
    self.is_host0 = jax.process_index() == 0

    proc_dir = c.data.processor_dir or c.model.init_from
    self.processor = processor_lib.load_processor(
      proc_dir, min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels
    )
    self.tokenizer = self.processor.tokenizer
    self.model = build_model(c, self.tokenizer)
    self.cfg = self.model.cfg
    self.G = c.rollout.group_size
    self.reward_fn = rewards_lib.get_batch_reward_fn(c.reward.name)
    self.length_buckets = default_length_buckets(c.data.max_prompt_length)

    if self.is_host0:
      train_setup.write_model_folder(self.workdir, self.cfg, self.processor)
    self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    self.train_shardings = sharding.param_shardings(self.model, self.mesh, sharding.TRAIN_RULES)
    self.sample_shardings = sharding.param_shardings(self.model, self.mesh, sharding.SAMPLE_RULES)
    self.batch_shards = rollout_lib.batch_shards(self.mesh, sharding.SAMPLE_RULES)
    if c.rollout.decode_rows % self.batch_shards:  # a row only takes samples of its own batch shard
      raise ValueError(
        f"rollout.decode_rows ({c.rollout.decode_rows}) must be a multiple of the "
        f"{self.batch_shards} batch shards of the mesh (SAMPLE_RULES' 'batch' axes)"
      )
    # This host's share of every global batch (validate() checked that they split evenly).
    n = jax.process_count()
    self.prompts_local = c.rollout.prompts_per_step // n
    self.update_local = c.updates.prompts_per_update // n
    self.scoring_local = config_lib.scoring_prompts_per_host(c, n)
    self.rollout_multiple = max(self.batch_shards // n, 1)
    for rules, rows, what in (
      (sharding.TRAIN_RULES, c.updates.prompts_per_update, "updates.prompts_per_update"),
      (sharding.TRAIN_RULES, self.scoring_local * n, "pgpo.scoring_prompts"),
      (sharding.SAMPLE_RULES, max(self.batch_shards, n), "mesh"),
    ):
      multihost.check_host_split(self.mesh, rules, rows, what)

    self.updates_per_step = (
      c.rollout.prompts_per_step // c.updates.prompts_per_update * c.updates.passes
    )
    total_updates = c.train.num_steps * self.updates_per_step
    self.optimizer = make_optimizer(c, total_updates)
    self.graphdef, state = train_step_lib.init_train_state(self.model, self.optimizer)
    self.state = jax.device_put(state, self._state_shardings(state))
    self.model_graphdef, _ = nnx.split(self.model)
    del self.model  # the parameters live in self.state from here on
    # The device programs, with their shardings (`compile_check` compiles these same programs).
    self.programs = programs.trainer_programs(
      c,
      model_graphdef=self.model_graphdef,
      train_graphdef=self.graphdef,
      optimizer=self.optimizer,
      mesh=self.mesh,
      state_sharding=self._state_shardings(state),
      num_processes=n,
    )
    self.train_step = self.programs.train_step
    self.score_fn = self.programs.score
    self.advantage_fn = self.programs.advantages
    # train.packing: this host's packing units per scoring slice and per update batch.
    self.packing_units = programs.packing_units(c, self.mesh, n)
    # π_ref for the KL term: a copy of the initial weights run by the π_ref program, or None (and no
    # memory) when kl_coef == 0.
    self.reference = reference_lib.build(
      c, self.programs.reference, self.state.params, self.train_shardings
    )
    self.key = jax.random.key(c.seed)
    self.step = 0
    self.stop_reason = ""  # set by run(): "finished" | "preempted" | "end of data"
    self.stop_message = ""  # with "preempted": what was saved and what a rerun does
    self.data_iter = self._train_iterator()
    self.checkpointer = ckpt_lib.Checkpointer(
      os.path.join(self.workdir, "checkpoints"),
      save_every=c.checkpoint.every,
      keep=c.checkpoint.keep,
      async_save=c.checkpoint.async_save,
    )
    self.metrics = train_metrics.MetricsLog(c, self.workdir, self.is_host0)

  # -- data ----------------------------------------------------------------------------------------
  def _train_iterator(self):
    c = self.c
    return make_prompt_iterator(
      train_setup.dataset_spec(c, c.data.train_files),
      self.processor,
      batch_size=self.prompts_local,
      seed=c.seed,
      num_epochs=c.data.num_epochs or None,
      max_prompt_length=c.data.max_prompt_length,
      drop_remainder=True,
      length_buckets=self.length_buckets,
      prompt_format=PromptFormat(min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels),
    )

  def _state_shardings(self, state):
    return programs.train_state_shardings(state, self.train_shardings, self.mesh)

  # -- device programs ----------------------------------------------------------------------------
  def _sample_params(self):
    if self.mesh.size == 1:
      return self.state.params
    return jax.device_put(self.state.params, self.sample_shardings)

  def _put_batch(self, tree):
    """Row-aligned host arrays (this host's rows) → global arrays, rows split over the batch axes."""
    return multihost.to_global(tree, None, self.mesh, sharding.TRAIN_RULES)

  def _get_rows(self, tree):
    """The inverse of `_put_batch`: this host's rows of row-aligned device outputs, as numpy."""
    return multihost.to_local(tree, None, self.mesh, sharding.TRAIN_RULES)

  def _extent(self, *sizes: int) -> tuple[int, ...]:
    """Sizes to pad to, e.g. (prompt tokens, patches per prompt): the maximum over hosts."""
    return tuple(int(x) for x in multihost.max_over_hosts(np.array(sizes, np.int64)))

  # -- one step -----------------------------------------------------------------------------------
  def _sample(
    self,
    pb: PromptBatch,
    params,
    key,
    *,
    max_new_tokens: int,
    num_samples: int,
    sampling: rollout_lib.SamplingConfig,
  ) -> rollout_lib.RolloutOutput:
    """Rollout of this host's PromptBatch with the current params (training rounds and evaluation
    alike); returns this host's rows (numpy). Each prompt's RNG stream is keyed by its data row, so
    samples do not depend on the batch or host a prompt lands in."""
    longest = int(pb.attention_mask.sum(1).max())
    longest, patches = self._extent(longest, int(row_patches(pb).max()))
    inputs = rollout_lib.prepare_inputs(
      self.cfg,
      pb.input_ids,
      pb.attention_mask,
      pb.pixel_values,
      pb.image_grid_thw,
      position_ids=pb.position_ids,
      batch_multiple=self.rollout_multiple,
      batch_size=batch_bucket(pb.batch_size, self.rollout_multiple),
      prompt_length=seq_bucket(longest),
      num_patches=patch_bucket(patches) if patches else None,
      prompt_ids=reader.row_stream_ids(pb.sources, pb.row_indices),
    )
    mesh = self.mesh if self.mesh.size > 1 else None
    out = sampler.rollout(
      self.model_graphdef,
      params,
      inputs,
      key,
      max_new_tokens=max_new_tokens,
      sampling=sampling,
      num_samples=num_samples,
      pad_token_id=self.cfg.pad_token_id,
      mesh=mesh,
      decode_rows=self.c.rollout.decode_rows,
      compute_dtype=self.c.rollout.dtype,
    )
    return multihost.to_local(out, rollout_lib.logical_axes(out), self.mesh, sharding.SAMPLE_RULES)

  def rollout_round(self, pb: PromptBatch, params) -> list[Group]:
    c = self.c
    self.key, k = jax.random.split(self.key)
    out = self._sample(
      pb,
      params,
      k,
      max_new_tokens=c.rollout.max_new_tokens,
      num_samples=self.G,
      sampling=rollout_lib.SamplingConfig(c.rollout.temperature, c.rollout.top_p, c.rollout.top_k),
    )
    tokens, mask, trunc = (np.asarray(x) for x in (out.tokens, out.mask, out.truncated))
    prompts = split_prompt_batch(pb)
    valid_rows = [b for b in range(pb.batch_size) if pb.prompt_valid[b]]
    texts, answers = [], []
    for b in valid_rows:
      for s in range(self.G):
        r = b * self.G + s
        texts.append(self.tokenizer.decode(tokens[r][mask[r]], skip_special_tokens=True))
        answers.append(pb.answers[b])
    scores = self.reward_fn(texts, answers)
    groups = []
    for i, (b, (ids, pix, grids)) in enumerate(zip(valid_rows, prompts)):
      sl = slice(i * self.G, (i + 1) * self.G)
      rows = slice(b * self.G, (b + 1) * self.G)
      sc = scores[sl]
      groups.append(
        Group(
          ids,
          pix,
          grids,
          pb.answers[b],
          tokens[rows],
          mask[rows],
          np.array([s["overall"] for s in sc], np.float32),
          np.array([s["accuracy"] for s in sc], np.float32),
          np.array([s["format"] for s in sc], np.float32),
          trunc[rows],
        )
      )
    return groups

  def _next_prompts(self) -> PromptBatch:
    """This host's next batch of prompts. Raises EndOfData on every host as soon as any host's data
    ran out (`data.num_epochs`): hosts skip different rows, so their shards end at different batches."""
    pb = next(self.data_iter, None)
    if not int(multihost.min_over_hosts(np.int64(pb is not None))):
      raise EndOfData(
        f"the training data ran out after data.num_epochs={self.c.data.num_epochs} passes"
      )
    return pb

  def collect(self) -> tuple[list[Group], dict[str, float], list[Group]]:
    """Rollout rounds until `prompts_per_step` groups pass dynamic sampling, at most
    `dynamic_sampling.max_rounds` rounds (0: no cap), as verl's DAPO does.

    Returns this host's kept groups (at most its share; later ones are dropped), metrics, and every
    group sampled (reward statistics). When the rounds run out with fewer groups, `on_short="error"`
    raises naming the key and "train" leaves the step to train on the groups kept.
    Multi-host: each host keeps its own groups; rounds go on until every host has its share (a
    rollout is a collective, so all hosts run the same number of rounds)."""
    ds = self.c.dynamic_sampling
    want = self.prompts_local
    params = self._sample_params()
    kept, seen, rounds, all_groups = [], 0, 0, []
    while (not ds.max_rounds or rounds < ds.max_rounds) and int(
      multihost.min_over_hosts(np.int64(len(kept)))
    ) < want:
      groups = self.rollout_round(self._next_prompts(), params)
      rounds += 1
      seen += len(groups)
      all_groups.extend(groups)
      for g in groups:
        acc = float(g.accuracy.mean())
        if not ds.enabled or ds.min_accuracy < acc < ds.max_accuracy:
          kept.append(g)
    kept = kept[:want]
    total = int(multihost.sum_over_hosts(np.int64(len(kept))))
    if total < self.c.rollout.prompts_per_step and ds.on_short == "error":
      raise RuntimeError(
        f"step {self.step + 1}: dynamic sampling kept {total} of the rollout.prompts_per_step="
        f"{self.c.rollout.prompts_per_step} groups in dynamic_sampling.max_rounds={ds.max_rounds} rounds "
        f"(accuracy bounds ({ds.min_accuracy}, {ds.max_accuracy})). Raise dynamic_sampling.max_rounds "
        "(0: no cap), or set dynamic_sampling.on_short='train' to train on the groups kept."
      )
    stats = {
      "dynamic_sampling/kept_share": len(kept) / max(seen, 1),
      "dynamic_sampling/rounds": rounds,
      "dynamic_sampling/filled": len(kept) / want,
    }
    return kept, stats, all_groups

  def _data_counts(self) -> dict[str, float]:
    return train_metrics.data_counts(self.data_iter.stats)

  def train_one_step(self) -> dict[str, float]:
    c = self.c
    times = {}
    t0 = time.perf_counter()
    kept, ds_stats, all_groups = self.collect()
    times["rollout"] = time.perf_counter() - t0  # rewards are timed inside; see below
    m: dict[str, float] = dict(ds_stats)
    all_rewards = np.concatenate([g.rewards for g in all_groups])
    m["reward/overall"] = float(all_rewards.mean())
    m["reward/accuracy"] = float(np.concatenate([g.accuracy for g in all_groups]).mean())
    m["reward/format"] = float(np.concatenate([g.format for g in all_groups]).mean())
    lengths = np.concatenate([g.mask.sum(-1) for g in all_groups])
    m["response/length_mean"] = float(lengths.mean())
    m["response/truncated_share"] = float(np.concatenate([g.truncated for g in all_groups]).mean())
    gen_tokens = int(lengths.sum())
    m.update(self._data_counts())
    # Update mini-batches: as many as the host with the most kept groups fills, so that none is all
    # padding (AdamW would still move every weight by momentum and weight decay).
    upd = self.update_local
    n_updates = num_update_batches(len(kept), upd)
    m["train/num_updates"] = float(n_updates * c.updates.passes)
    if not n_updates:
      log.warning("step %d: no group passed dynamic sampling; skipping the update", self.step)
      m.update({"skipped_no_groups": 1.0, **{f"time/{k}": v for k, v in times.items()}})
      return multihost.reduce_metrics(m)
    # Pad to this host's share with masked copies of a kept group (a host that kept none: of one it
    # sampled); shapes are the maximum over hosts.
    filler = self.prompts_local - len(kept)
    base = kept or all_groups[:1]
    seq, rewards = collate_groups(
      kept,
      self.cfg,
      self.length_buckets,
      self.cfg.pad_token_id,
      filler,
      filler_group=base[0],
      extent=self._extent(*group_extent(base, self.cfg.image_token_id)),
      mask_vision_markers=c.pgpo.mask_vision_markers,
    )
    t1 = time.perf_counter()
    P, L = seq.response.shape[0], seq.response.shape[-1]
    used = n_updates * upd  # rows the updates read; filler rows after them are not scored
    # Scoring runs in slices of `scoring_prompts` prompts: one call over a whole 384-prompt rollout
    # batch needs hundreds of GiB of activations per device at 7B (compile_check).
    sp = self.scoring_local
    scored = min(P, -(-used // sp) * sp)  # whole scoring slices up to the last used row
    # π_ref (KL term) scores every scoring slice as the score program gets it, padded or packed.
    ref = self.reference
    if c.train.packing:  # padding-free rows, one packing unit per batch shard (rl/packed_passes.py)
      scores, ref_logp = packed_passes.score(
        self.score_fn,
        self.state.params,
        jax.tree.map(lambda x: x[:scored], seq),
        slice_prompts=sp,
        units=self.packing_units[0],
        row_len=c.train.packed_row_length,
        image_token_id=self.cfg.image_token_id,
        put=self._put_batch,
        get=self._get_rows,
        agree=self._extent,
        blind=c.pgpo.enabled,
        reference=None if ref is None else ref.logprobs,
      )
      scores = type(scores)(*[_pad_rows(x, P * self.G) for x in scores])
    else:
      parts, ref_parts = [], []
      for s0 in range(0, used, sp):
        sub = self._put_batch(jax.tree.map(lambda x: x[s0 : s0 + sp], seq))
        parts.append(self.score_fn(self.state.params, sub))
        if ref is not None:
          ref_parts.append(ref.logprobs(sub))
      parts = [self._get_rows(x) for x in parts]
      scores = type(parts[0])(*[_pad_rows(np.concatenate(x), P * self.G) for x in zip(*parts)])
      ref_logp = np.concatenate([self._get_rows(x) for x in ref_parts]) if ref_parts else None
    if ref is not None:
      ref_logp = _pad_rows(ref_logp, P * self.G).reshape(P, self.G, L)
    times["scoring"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    mask = seq.flat_response_mask
    adv, diag = self.advantage_fn(rewards, scores.dependency_BxT, mask)
    adv = np.asarray(adv).reshape(P, self.G, L)
    old_logp = np.asarray(scores.logp_image_BxT).reshape(P, self.G, L)
    dep = np.asarray(scores.dependency_BxT)
    times["advantages"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    update_metrics = []
    for _ in range(c.updates.passes):
      for s in range(0, used, upd):
        sl = slice(s, s + upd)
        sub = jax.tree.map(lambda x: x[sl], seq)
        batch = {
          "seq": sub,
          "adv": adv[sl],
          "old_logp": old_logp[sl],
          **_normalizers(sub.response_mask),
        }
        if self.reference is not None:
          batch["ref_logp"] = ref_logp[sl]
        if c.train.packing:  # one packing unit per micro-batch and batch shard
          batch = packed_passes.update_batch(
            batch,
            units=self.packing_units[1],
            row_len=c.train.packed_row_length,
            image_token_id=self.cfg.image_token_id,
            agree=self._extent,
          )
        self.state, um = self.train_step(self.state, self._put_batch(batch))
        update_metrics.append(um)
    update_metrics = jax.device_get(update_metrics)
    times["update"] = time.perf_counter() - t3
    # Per mini-batch values (losses: the mini-batch's own loss, micro-batch partial sums added up),
    # averaged over the step's mini-batches.
    for k in update_metrics[0]:
      vals = np.array([u[k] for u in update_metrics], np.float64)
      m[f"train/{k}"] = float(vals.mean())
    m["train/grad_norm_max"] = float(max(u["grad_norm"] for u in update_metrics))
    m["train/skipped_updates"] = float(sum(u["skipped"] for u in update_metrics))
    valid = mask.astype(bool)
    m["dependency/mean"] = float(dep[valid].mean()) if valid.any() else 0.0
    m["dependency/max"] = float(dep[valid].max()) if valid.any() else 0.0
    for k, v in diag.items():
      m[f"pgpo/{k}"] = float(v)
    m["entropy/scoring"] = (
      float(np.asarray(scores.entropy_BxT)[valid].mean()) if valid.any() else 0.0
    )
    for k, v in times.items():
      m[f"time/{k}"] = v
    m["time/step"] = time.perf_counter() - t0
    m["throughput/generated_tokens_per_s"] = gen_tokens / max(times["rollout"], 1e-9)
    m["throughput/mfu"] = train_metrics.mfu(self._step_flops(all_groups, kept), m["time/step"])
    return multihost.reduce_metrics(m)

  def _step_flops(self, sampled: list[Group], trained: list[Group]) -> float:
    """This host's model FLOPs of a step that sampled `sampled` and trained on `trained`
    (`train_metrics.step_model_flops`: real tokens, the blind view with PGPO, π_ref with a KL term)."""
    c = self.c
    tokens = train_metrics.step_tokens(
      sampled,
      trained,
      lambda ids: sequences.visual_token_mask(ids, self.cfg, c.pgpo.mask_vision_markers),
    )
    return train_metrics.step_model_flops(
      self.num_params,
      tokens,
      passes=c.updates.passes,
      blind_view=c.pgpo.enabled,
      reference=self.reference is not None,
    )

  @functools.cached_property
  def num_params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.state.params)))

  # -- warm-up and evaluation (warmup.py, train_eval.py) --------------------------------------------
  def sft_warmup(self, should_stop=lambda: False) -> None:
    """`warmup.sft_warmup` of the current params; `should_stop` (checked before each warm-up step)
    True raises `warmup.Interrupted`."""
    params = warmup.sft_warmup(
      self.c,
      self.graphdef,
      self.state.params,
      processor=self.processor,
      cfg=self.cfg,
      length_buckets=self.length_buckets,
      make_batch=self._sft_batch,
      should_stop=should_stop,
    )
    self.state = dataclasses.replace(self.state, params=params)

  def _sft_batch(self, groups: list[Group], weight: np.ndarray | None = None):
    """The warm-up's device batch; `weight` [n, 1, L] token weights make the token normaliser their
    sum over hosts (a weighted mean NLL)."""
    seq, _ = collate_groups(
      groups,
      self.cfg,
      self.length_buckets,
      self.cfg.pad_token_id,
      extent=self._extent(*group_extent(groups)),
    )
    batch = {"seq": seq, **_normalizers(seq.response_mask)}
    if weight is not None:
      weight = np.where(np.asarray(seq.response_mask), weight, np.float32(0.0)).astype(np.float32)
      batch["weight"] = weight
      batch["token_normalizer"] = np.float32(multihost.sum_over_hosts(weight.sum(dtype=np.float64)))
    return self._put_batch(batch)

  def evaluate(self) -> dict[str, float]:
    return train_eval.evaluate(
      self.c,
      sample=self._sample,
      sample_params=self._sample_params,
      processor=self.processor,
      reward_fn=self.reward_fn,
      max_batch_size=self.prompts_local,
      length_buckets=self.length_buckets,
    )

  # -- checkpointing ------------------------------------------------------------------------------
  def _ckpt_state(self):
    # The key is the same on every host: saved as numpy (written once), not as a per-host array.
    return {"train": self.state, "rng": np.asarray(jax.random.key_data(self.key))}

  def save(self, force: bool = False) -> None:
    if not force and not self.checkpointer.should_save(self.step):
      return
    # Every host's iterator state (each reads its own shard); Orbax writes JSON from host 0 only.
    data = {
      "iterators": multihost.allgather_json(ckpt_lib.to_jsonable(self.data_iter.get_state())),
      "step": self.step,
    }
    self.checkpointer.save(
      self.step,
      self._ckpt_state(),
      self.state.params,
      data,
      ckpt_lib.to_jsonable(self.c.to_dict()),
      force=force,
    )

  def maybe_restore(self) -> bool:
    found = self.checkpointer.restore_latest(self._ckpt_state(), self.state.params)
    if found is None:
      return False
    step, restored, data = found
    self.state = restored["train"]
    self.key = jax.random.wrap_key_data(np.asarray(restored["rng"]))
    states = data["iterators"] if "iterators" in data else [data["iterator"]]
    if len(states) != jax.process_count():
      raise ValueError(
        f"{self.checkpointer.directory}/{step} was saved by {len(states)} host(s); resuming with "
        f"{jax.process_count()} would change every host's data shard (data.seed fixes the order)"
      )
    self.data_iter.set_state(states[jax.process_index()])
    self.step = int(data["step"])
    self.metrics.truncate(self.step)
    log.info("resumed from %s at step %d", self.checkpointer.directory, self.step)
    return True

  def log_metrics(self, m: dict[str, float]) -> None:
    self.metrics.log(self.step, m)

  def close(self) -> None:
    """Waits for the pending checkpoint, closes the metric sinks and frees the workdir (`run()` calls
    it at its end); idempotent."""
    self.checkpointer.close()
    self.metrics.close()
    self._lock.release()

  # -- main loop ----------------------------------------------------------------------------------
  def _profile(self, first_step: int):
    """A jax.profiler trace of one step into WORKDIR/profile when `train.profile`: the second step
    this process runs (the first compiles), or its only one."""
    c = self.c
    if not c.train.profile or self.step != min(first_step + 1, c.train.num_steps - 1):
      return contextlib.nullcontext()
    log.info(
      "train.profile: tracing step %d into %s", self.step + 1, os.path.join(self.workdir, "profile")
    )
    return jax.profiler.trace(os.path.join(self.workdir, "profile"))

  def run(self) -> dict[str, float]:
    """Trains to `train.num_steps` (or the end of the data); returns the last step's metrics plus the
    run's data counts. `stop_reason` says why it stopped.

    SIGTERM / SIGINT (`PreemptionGuard`, from the start of the run) stop it with `stop_reason`
    "preempted", at the first of these points that follows the signal: before a warm-up step (the
    warm-up so far is dropped and the rerun starts it again, unless `warmup.cache_dir` and
    `warmup.save_every` keep its progress, from which the rerun resumes), after the warm-up
    and the eval before RL (the weights RL starts from are saved as checkpoint 0, from which the
    rerun resumes), after an RL step (that step is saved).
    """
    with ckpt_lib.PreemptionGuard() as guard:
      last = self._run(guard)
    self.close()
    counts = multihost.reduce_metrics(self._data_counts())
    log.info(
      "training data: %d rows read, %d skipped %s",
      counts["count/data_rows_read"],
      counts["count/data_skipped_rows"],
      {
        k.rsplit("/", 1)[1]: int(v)
        for k, v in counts.items()
        if k.startswith("count/data_skipped_rows/") and v
      },
    )
    return {**last, **counts}

  @staticmethod
  def _signalled(guard: ckpt_lib.PreemptionGuard) -> bool:
    """Whether any host got SIGTERM/SIGINT (a collective: a signal may reach the hosts at different
    steps; they stop together)."""
    return bool(int(multihost.max_over_hosts(np.int64(guard.triggered))))

  def _preempted(self, message: str) -> dict[str, float]:
    self.stop_reason, self.stop_message = "preempted", message
    log.warning("%s; exiting with status %d", message, EXIT_PREEMPTED)
    return {}

  def _run(self, guard: ckpt_lib.PreemptionGuard) -> dict[str, float]:
    c = self.c
    resumed = self.maybe_restore()
    if not resumed:
      try:
        self.sft_warmup(should_stop=lambda: self._signalled(guard))
      except warmup.Interrupted as e:
        kept = bool(c.warmup.cache_dir and c.warmup.save_every)
        return self._preempted(
          f"stopped by {guard.received or 'a signal'} during the warm-up, {e}: no RL step had run; "
          + (
            f"the warm-up's progress is in {c.warmup.cache_dir}, and rerunning the same command "
            "resumes it"
            if kept
            else "nothing is saved; rerun the same command to start again (the warm-up restarts; "
            "warmup.cache_dir with warmup.save_every keeps its progress)"
          )
        )
      if c.train.eval_every:
        ev = self.evaluate()
        self.log_metrics(ev)
        log.info("eval before RL: %s", ev)
    reference_lib.start_rl(
      self.reference,
      self.state.params,
      self.workdir,
      resumed=resumed,
      warmed_up=c.warmup.sft_steps > 0,
    )
    if self._signalled(guard):  # during the warm-up's last step, the eval before RL or the restore
      self.save(force=True)  # a fresh run: the weights RL starts from, as step 0
      return self._preempted(
        f"stopped by {guard.received or 'a signal'} before the first RL step of this run: step "
        f"{self.step} is checkpointed; rerun the same command to resume from it"
      )
    from tqdm import tqdm

    last: dict[str, float] = {}
    bar = tqdm(
      total=c.train.num_steps,
      initial=self.step,
      disable=not self.is_host0,
      desc="pgpo",
      dynamic_ncols=True,
    )
    rules = (
      sharding.use_rules(self.mesh, sharding.TRAIN_RULES)
      if self.mesh.size > 1
      else contextlib.nullcontext()
    )
    first_step = self.step
    self.stop_reason = "finished"
    with rules:
      while self.step < c.train.num_steps:
        try:
          with self._profile(first_step):
            m = self.train_one_step()
        except EndOfData as e:
          log.warning(
            "%s: stopping at step %d (train.num_steps=%d)", e, self.step, c.train.num_steps
          )
          self.stop_reason = "end of data"
          self.save(force=True)
          break
        self.step += 1
        if c.train.eval_every and (
          self.step % c.train.eval_every == 0 or self.step == c.train.num_steps
        ):
          m.update(self.evaluate())
        if m.get("train/skipped_updates"):
          log.warning(
            "step %d: %d update(s) skipped for non-finite loss/gradients",
            self.step,
            int(m["train/skipped_updates"]),
          )
        self.log_metrics(m)
        last = m
        bar.update(1)
        bar.set_postfix(
          reward=f"{m.get('reward/overall', float('nan')):.3f}",
          acc=f"{m.get('reward/accuracy', float('nan')):.2f}",
          s_per_step=f"{m.get('time/step', 0):.1f}",
        )
        if self._signalled(guard):
          self.save(force=True)
          self._preempted(
            f"stopped by {guard.received or 'a signal'} after step {self.step}, which is "
            "checkpointed; rerun the same command to resume"
          )
          break
        self.save(force=self.step == c.train.num_steps)
    bar.close()
    return last


def train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Entry point used by `scripts/train.py` and the tests: the last step's metrics (+ data counts).

  Raises `Preempted` (after the checkpoint is saved) when SIGTERM/SIGINT stopped the run, and
  `WorkdirBusy` (before anything is read or written) when another run holds `workdir`.
  """
  t = Trainer(c, workdir)
  try:
    last = t.run()
  finally:
    t._lock.release()  # also when the run failed: the workdir is free for a rerun in this process
  if t.stop_reason == "preempted":
    raise Preempted(t.step, last, t.stop_message)
  return last
