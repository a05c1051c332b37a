"""The tiny trainer configuration and test reward shared by the trainer tests and their subprocesses."""

import importlib.util
import os
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def length_parity(responses, answers):
  """A deterministic, non-degenerate test reward (real rewards of a random model are all 0)."""
  out = []
  for r in responses:
    v = float(len(r) % 2 == 0)
    out.append({"overall": v, "accuracy": v, "format": 0.0})
  return out


def alternating(responses, answers):
  """Rewards 1, 0, 1, 0, ...: every group of an even G is non-degenerate whatever was sampled."""
  return [
    {"overall": float(i % 2 == 0), "accuracy": float(i % 2 == 0), "format": 0.0}
    for i in range(len(responses))
  ]


def fingerprint(text: str) -> float:
  """A number in [0, 1) that changes with any change of `text` (CRC-32 / 2^32)."""
  return zlib.crc32(text.encode()) / 2**32


def forced_groups(first_scores):
  """A test reward that forces the groups a test needs, whatever the policy samples.

  In a call with several responses (one rollout round, group-major), response i scores 1 when
  `first_scores(i, answer)` (true at most for the first response of a group, so a group has a reward
  spread or none) and 0 otherwise: dynamic sampling drops the groups without a spread and fillers
  replace them. A call with one response (the trainer's evaluation) is scored by `length_parity`, so
  evaluations still compare what was generated. The rewards say nothing of what was sampled, so the
  `format` field carries a fingerprint of each response (`fingerprint`): two runs whose logged
  `reward/format` agree sampled the same text.
  """

  def reward(responses, answers):
    if len(responses) == 1:
      return length_parity(responses, answers)
    out = []
    for i, (r, a) in enumerate(zip(responses, answers)):
      v = float(first_scores(i, a))
      out.append({"overall": v, "accuracy": v, "format": fingerprint(r)})
    return out

  return reward


def every_other_group(group_size: int):
  """`forced_groups`: the first response of groups 0, 2, 4, ... of each call scores 1.

  One process only: which prompt is "group 0 of this call" depends on the host split
  (`answer_selected_groups` does not).
  """
  return forced_groups(lambda i, answer: i % (2 * group_size) == 0)


def answer_selected_groups(group_size: int):
  """`forced_groups`, with the groups chosen by their prompt's answer instead of their position: the
  first response of a group scores 1 when the CRC-32 of its answer is even. Which groups have a
  reward spread depends on the data alone, not on the samples nor on how the prompts are split over
  hosts (a host reads every other row, so "group 0 of this call" is another prompt on two hosts than
  on one).
  """
  return forced_groups(
    lambda i, answer: i % group_size == 0 and zlib.crc32(str(answer).encode()) % 2 == 0
  )


def load_config(path):
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests import configs as a package (`from configs import pgpo_7b`)
  spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def tiny_config(data_dir):
  """configs/demo.py shrunk to seconds per step; `data_dir` holds (or receives) the synthetic data."""
  data_dir = str(data_dir)
  c = load_config(os.path.join(ROOT, "configs", "demo.py"))
  c.data.demo_dir = data_dir
  c.data.train_files = os.path.join(data_dir, "train.parquet")
  c.data.eval_files = os.path.join(data_dir, "test.parquet")
  c.data.processor_dir = os.path.join(data_dir, "model")
  c.data.demo_train_rows, c.data.demo_eval_rows, c.data.demo_image_size = 48, 8, 56
  c.model.tiny.update(
    dict(
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      vision_hidden_size=32,
      vision_intermediate_size=64,
    )
  )
  c.rollout.prompts_per_step, c.rollout.group_size, c.rollout.max_new_tokens = 4, 2, 8
  c.updates.prompts_per_update, c.updates.micro_batch_prompts = 2, 1
  c.warmup.sft_steps, c.warmup.prompts_per_step = 1, 4
  c.train.num_steps, c.train.eval_every, c.train.eval_prompts = 3, 0, 4
  c.checkpoint.every, c.checkpoint.async_save = 2, True
  c.reward.name = "test_length_parity"
  c.logging.tensorboard = True
  return c
