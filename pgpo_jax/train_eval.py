"""The in-loop evaluation: greedy accuracy on held-out prompts (`train.eval_every`, `train.eval_prompts`).

A quick signal logged with the training metrics (`eval/accuracy`, `eval/format`, `eval/num_prompts`);
the full benchmark protocols live in `evaluation.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import ml_collections
import numpy as np

from pgpo_jax import multihost, train_setup
from pgpo_jax import rollout as rollout_lib
from pgpo_jax.data.pipeline import make_prompt_iterator
from pgpo_jax.data.prompts import PromptFormat


def evaluate(
  c: ml_collections.ConfigDict,
  *,
  sample: Callable[..., rollout_lib.RolloutOutput],
  sample_params: Callable[[], object],
  processor,
  reward_fn,
  max_batch_size: int,
  length_buckets,
) -> dict[str, float]:
  """Greedy accuracy on the first `train.eval_prompts` held-out prompts (each host takes its
  share of them from its own shard of the eval files).

  sample: the trainer's rollout of one host's PromptBatch (`Trainer._sample`'s signature), run with
  the params `sample_params()` returns (called once, when there is something to evaluate);
  max_batch_size: prompts per host per rollout (the training rollout's).
  """
  if not c.data.eval_files or c.train.eval_prompts <= 0:
    return {}
  want = -(-c.train.eval_prompts // jax.process_count())
  bs = min(want, max_batch_size)
  it = make_prompt_iterator(
    train_setup.dataset_spec(c, c.data.eval_files),
    processor,
    batch_size=bs,
    seed=0,
    num_epochs=1,
    max_prompt_length=c.data.max_prompt_length,
    length_buckets=length_buckets,
    prompt_format=PromptFormat(min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels),
  )
  params = sample_params()
  acc, fmt, n = 0.0, 0.0, 0
  max_new = c.train.eval_max_new_tokens or c.rollout.max_new_tokens
  last = None
  while True:
    pb = next(it, None) if n < want else None
    # Every host samples while any host still has prompts (sampling is a collective); a host that
    # is done feeds its last batch again with every prompt marked invalid.
    if not int(multihost.max_over_hosts(np.int64(pb is not None))):
      break
    if pb is None:
      if last is None:
        raise RuntimeError(
          f"host {jax.process_index()} has no prompt of {c.data.eval_files} (after skips) while "
          "other hosts do; use more evaluation rows than hosts"
        )
      pb = dataclasses.replace(last, prompt_valid=np.zeros_like(last.prompt_valid))
    last = pb
    out = sample(
      pb, params, 0, max_new_tokens=max_new, num_samples=1, sampling=rollout_lib.SamplingConfig(0.0)
    )
    for b in range(pb.batch_size):
      if not pb.prompt_valid[b] or n >= want:
        continue
      text = processor.tokenizer.decode(out.tokens[b][out.mask[b]], skip_special_tokens=True)
      s = reward_fn([text], [pb.answers[b]])[0]
      acc += s["accuracy"]
      fmt += s["format"]
      n += 1
  acc, fmt, n = (float(x) for x in multihost.sum_over_hosts(np.array([acc, fmt, n], np.float64)))
  return {
    "eval/accuracy": acc / max(n, 1),
    "eval/format": fmt / max(n, 1),
    "eval/num_prompts": int(n),
  }
