"""The supervised warm-up before RL (`warmup.*`, the demo's cold start).

`warmup.sft_steps` optimizer steps (their own AdamW, `warmup.learning_rate`) on the training prompts
with the response `warmup.target_template.format(answer=...)` + EOS (or, with `warmup.target_key`,
the row's own target column, e.g. the chain task's worked solution), truncated to
`rollout.max_new_tokens`: the loss is the responses' mean NLL (`programs.sft_loss_fn`). With
`warmup.labels_key` and `warmup.perception_weight` ≠ 1 it is a weighted mean: each target token
weighs `perception_weight` where the row's character-span labels (`demo_task.labels`) call it
perception, 1 elsewhere.

With `warmup.cache_dir`, the warmed-up params are saved there and a later run given the same folder
reads them back instead of warming up again: the arms of an experiment start from one warm-up per
seed. The folder must only be shared by runs with the same model, data, seed and warm-up settings
(the experiment scripts name it after the seed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from pgpo_jax import checkpoint, multihost, programs, train_setup
from pgpo_jax import train_step as train_step_lib
from pgpo_jax.data.pipeline import make_prompt_iterator
from pgpo_jax.data.prompts import PromptFormat
from pgpo_jax.data.reader import DatasetReader, read_column
from pgpo_jax.demo_task import labels as labels_lib
from pgpo_jax.demo_task.chain import PERCEPTION
from pgpo_jax.groups import Group, split_prompt_batch
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.programs import make_optimizer, sft_loss_fn

log = logging.getLogger(__name__)


class Interrupted(Exception):
  """`sft_warmup`'s `should_stop` said stop (a signal): raised before warm-up step `step` + 1."""

  def __init__(self, step: int, total: int):
    super().__init__(f"before warm-up step {step + 1} of {total}")
    self.step, self.total = step, total


def sft_warmup(
  c: ml_collections.ConfigDict,
  graphdef,
  params,
  *,
  processor,
  cfg: qwen.Qwen25VLConfig,
  length_buckets,
  make_batch: Callable[[list[Group], np.ndarray | None], dict],
  should_stop: Callable[[], bool] = lambda: False,
):
  """Supervised steps on `warmup.target_template` responses; returns the new params (`params` when
  `warmup.sft_steps` is 0).

  graphdef: the train state's graph (`train_step.init_train_state`); make_batch: (one response per
  group, their [n, 1, L] token weights or None) → the device batch `{"seq", "token_normalizer",
  "seq_normalizer"}` (+ `"weight"` when given; the normaliser is then the weights' sum), the trainer's
  collation padded to the maximum over hosts. should_stop: called before each step (on every host: the
  trainer's is a collective); True raises `Interrupted`. With `warmup.cache_dir` and
  `warmup.save_every` > 0 the warm-up's progress (train state and data position) is saved there every
  `save_every` steps and when stopped, and a rerun resumes from it; otherwise a stop drops it.
  """
  n = c.warmup.sft_steps
  if n <= 0:
    return params
  cache = os.path.join(c.warmup.cache_dir, "params") if c.warmup.cache_dir else ""
  if cache and os.path.isdir(cache):
    log.info("warm-up: reading the cached warm-up params from %s", cache)
    return checkpoint.restore_params(cache, params)
  targets = _target_columns(c, c.warmup.target_key, "config.warmup.target_key")
  weighted = c.warmup.perception_weight != 1.0
  spans = _target_columns(c, c.warmup.labels_key, "config.warmup.labels_key") if weighted else None
  opt = make_optimizer(c, n, learning_rate=c.warmup.learning_rate)
  graphdef, st = train_step_lib.init_train_state(nnx.merge(graphdef, params), opt)
  progress = os.path.join(c.warmup.cache_dir, "progress") if c.warmup.cache_dir else ""
  save_every = c.warmup.save_every if progress else 0
  step_fn = programs.make_train_step(graphdef, sft_loss_fn(c), opt, 1)
  it = make_prompt_iterator(
    train_setup.dataset_spec(c, c.data.train_files),
    processor,
    batch_size=c.warmup.prompts_per_step // jax.process_count(),
    seed=c.seed + 1,
    num_epochs=None,
    max_prompt_length=c.data.max_prompt_length,
    drop_remainder=True,
    length_buckets=length_buckets,
    prompt_format=PromptFormat(min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels),
  )
  L = c.rollout.max_new_tokens
  eos = cfg.eos_token_id
  start = 0
  if save_every and os.path.isdir(progress):
    start, st = _restore_progress(progress, st, it)
    log.info("warm-up: resuming at step %d of %d from %s", start + 1, n, progress)
  for i in range(start, n):
    if should_stop():
      if save_every and i > start:
        _save_progress(progress, i, st, it)
      raise Interrupted(i, n)
    if save_every and i > start and i % save_every == 0:
      _save_progress(progress, i, st, it)
    pb = next(it)
    groups, weights = [], []
    for b, ((ids, pix, grids), ans) in enumerate(zip(split_prompt_batch(pb), pb.answers)):
      if targets is None:
        text = c.warmup.target_template.format(answer=ans)
      else:
        where = (os.path.abspath(pb.sources[b]), int(pb.row_indices[b]))
        text = targets[where[0]][where[1]]
      if spans is None:
        toks = list(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        w = np.ones(len(toks), np.float32)
      else:
        toks, w = target_weights(
          processor.tokenizer, text, spans[where[0]][where[1]], c.warmup.perception_weight, where
        )
      toks, w = list(toks)[: L - 1] + [eos], np.append(w[: L - 1], np.float32(1.0))
      t = np.full((1, L), cfg.pad_token_id, np.int32)
      t[0, : len(toks)] = toks
      mk = np.zeros((1, L), bool)
      mk[0, : len(toks)] = True
      wt = np.zeros((1, L), np.float32)
      wt[0, : len(toks)] = w
      groups.append(
        Group(ids, pix, grids, ans, t, mk, np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1, bool))
      )
      weights.append(wt)
    blind = blind_rows(len(groups), c.warmup.blind_fraction, c.seed, i)
    st, mt = step_fn(st, _batch(groups, blind, make_batch, weights if weighted else None))
    if i % max(1, n // 5) == 0 or i == n - 1:
      log.info(
        "warm-up %d/%d: nll %.3f (image rows %.3f, blind rows %.3f; up-weighted tokens %.3f)",
        i + 1,
        n,
        float(mt["nll"]),
        float(mt["nll_image"]),
        float(mt["nll_blind"]),
        float(mt["nll_upweighted"]),
      )
  if cache and jax.process_index() == 0:
    checkpoint.save_params(cache, st.params)
    log.info("warm-up: saved the warm-up params to %s", cache)
    if save_every and os.path.isdir(progress):
      shutil.rmtree(progress)  # the finished params supersede it
  return st.params


def _save_progress(path: str, step: int, st, it) -> None:
  """The warm-up after `step` steps: train state (params + AdamW moments) and each host's data
  position, written beside the old progress and swapped in, so an interrupted save keeps the old."""
  states = multihost.allgather_json(checkpoint.to_jsonable(it.get_state()))
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  checkpoint.save_params(os.path.join(tmp, "state"), st)
  with open(os.path.join(tmp, "data.json"), "w") as f:
    json.dump({"step": step, "iterators": states}, f)
  if os.path.isdir(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  log.info("warm-up: saved the progress after step %d to %s", step, path)


def _restore_progress(path: str, st, it) -> tuple[int, object]:
  """(steps done, train state) of `_save_progress`'s folder; sets this host's data position."""
  with open(os.path.join(path, "data.json")) as f:
    data = json.load(f)
  states = data["iterators"]
  if len(states) != jax.process_count():
    raise ValueError(
      f"{path}: warm-up progress saved by {len(states)} host(s); resuming with "
      f"{jax.process_count()} would change every host's data shard"
    )
  it.set_state(states[jax.process_index()])
  return int(data["step"]), checkpoint.restore_params(os.path.join(path, "state"), st)


def blind_rows(n: int, fraction: float, seed: int, step: int) -> np.ndarray:
  """[n] bool: which of a warm-up step's `n` examples train under the blind view — exactly
  round(fraction * n) of them, a pure function of (seed, step) so every host and a rerun pick alike."""
  k = int(round(fraction * n))
  out = np.zeros(n, bool)
  out[np.random.default_rng([seed, step, 0x5EED]).permutation(n)[:k]] = True
  return out


def target_weights(
  tokenizer, text: str, spans_json: str, perception_weight: float, where: tuple[str, int]
) -> tuple[list[int], np.ndarray]:
  """(token ids of `text`, [L] float32 weights): `perception_weight` on the tokens its character
  spans (`spans_json`, JSON [[start, end, label], ...]) label perception, 1 on the others. A
  malformed label column is an error naming the file and row (`where`)."""
  try:
    spans = [tuple(int(x) for x in s) for s in json.loads(spans_json)]
    if any(len(s) != 3 for s in spans):
      raise ValueError("each span must be [start, end, label]")
    ids, lab = labels_lib.tokenize_with_labels(tokenizer, text, spans)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"config.warmup.labels_key: row {where[1]} of {where[0]!r} has bad span labels: {e}"
    ) from e
  return ids, np.where(lab == PERCEPTION, np.float32(perception_weight), np.float32(1.0))


def _batch(
  groups: list[Group],
  blind_N: np.ndarray,
  make_batch: Callable[[list[Group], np.ndarray | None], dict],
  weights: list[np.ndarray] | None = None,
):
  """The SFT batch: `seq` for the image-view rows, `seq_blind` for the blind rows (a part with no row
  is left out; `seq_weight` / `seq_blind_weight` their [n, 1, L] token weights when given),
  `token_normalizer` the target tokens (or their weights) of both (`programs.sft_loss_fn`)."""
  out, tokens = {}, 0.0
  for key, blind in (("seq", False), ("seq_blind", True)):
    rows = [r for r, b in enumerate(blind_N) if bool(b) == blind]
    if rows:
      w = None if weights is None else np.stack([weights[r] for r in rows])
      b = make_batch([groups[r] for r in rows], w)
      out[key] = b["seq"]
      if w is not None:
        out[key + "_weight"] = b["weight"]
      tokens = tokens + b["token_normalizer"]
  out["token_normalizer"] = tokens
  return out


def _target_columns(c: ml_collections.ConfigDict, key: str, what: str) -> dict[str, list] | None:
  """{training file: its column `key`} (None without a key); every row must hold non-empty text."""
  if not key:
    return None
  out = {}
  for path in DatasetReader(train_setup.dataset_spec(c, c.data.train_files)).files:
    values = read_column(path, key, what=what)
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str) or not v), None)
    if bad is not None:
      raise ValueError(f"{what}: row {bad} of {path!r} has no text in column {key!r}")
    out[os.path.abspath(path)] = values
  return out
