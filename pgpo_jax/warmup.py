"""The supervised warm-up before RL (`warmup.*`, the demo's cold start).

`warmup.sft_steps` optimizer steps (their own AdamW, `warmup.learning_rate`) on the training prompts
with the response `warmup.target_template.format(answer=...)` + EOS, truncated to
`rollout.max_new_tokens`: the loss is the responses' mean NLL (`programs.sft_loss_fn`).
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from pgpo_jax import programs, train_setup
from pgpo_jax import train_step as train_step_lib
from pgpo_jax.data.pipeline import make_prompt_iterator
from pgpo_jax.data.prompts import PromptFormat
from pgpo_jax.groups import Group, split_prompt_batch
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.programs import make_optimizer, sft_loss_fn

log = logging.getLogger(__name__)


def sft_warmup(
  c: ml_collections.ConfigDict,
  graphdef,
  params,
  *,
  processor,
  cfg: qwen.Qwen25VLConfig,
  length_buckets,
  make_batch: Callable[[list[Group]], dict],
):
  """Supervised steps on `warmup.target_template` responses; returns the new params (`params` when
  `warmup.sft_steps` is 0).

  graphdef: the train state's graph (`train_step.init_train_state`); make_batch: one response per
  group → the device batch `{"seq", "token_normalizer", "seq_normalizer"}` (the trainer's collation,
  padded to the maximum over hosts).
  """
  n = c.warmup.sft_steps
  if n <= 0:
    return params
  opt = make_optimizer(c, n, learning_rate=c.warmup.learning_rate)
  graphdef, st = train_step_lib.init_train_state(nnx.merge(graphdef, params), opt)
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
  for i in range(n):
    pb = next(it)
    groups = []
    for (ids, pix, grids), ans in zip(split_prompt_batch(pb), pb.answers):
      text = c.warmup.target_template.format(answer=ans)
      toks = list(processor.tokenizer(text, add_special_tokens=False)["input_ids"])[: L - 1] + [eos]
      t = np.full((1, L), cfg.pad_token_id, np.int32)
      t[0, : len(toks)] = toks
      mk = np.zeros((1, L), bool)
      mk[0, : len(toks)] = True
      groups.append(
        Group(ids, pix, grids, ans, t, mk, np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1, bool))
      )
    st, mt = step_fn(st, make_batch(groups))
    if i % max(1, n // 5) == 0 or i == n - 1:
      log.info("warm-up %d/%d: nll %.3f", i + 1, n, float(mt["nll"]))
  return st.params
