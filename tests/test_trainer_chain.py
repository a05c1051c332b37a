"""The chain task through the trainer: data made on first use, warm-up on worked solutions, a shared
warm-up cache, two RL steps."""

import json
import os

import pytest

from pgpo_jax import rewards, trainer
from tests.tiny_run import every_other_group, tiny_config


@pytest.fixture(autouse=True)
def _test_reward(monkeypatch):
  monkeypatch.setitem(rewards.BATCH_REWARD_FNS, "test_every_other_group", every_other_group(2))


def _chain_config(data_dir, cache_dir):
  c = tiny_config(data_dir)
  c.data.demo_task = "chain"
  c.data.demo_image_size = 84  # room for the shapes and the digit
  c.warmup.target_key = "solution"
  c.warmup.cache_dir = str(cache_dir)
  c.reward.name = "test_every_other_group"  # RL steps with updates, whatever the policy samples
  c.train.num_steps = 2
  c.checkpoint.every = 100
  return c


def test_chain_config_trains_and_reuses_its_warmup(tmp_path):
  data, cache = tmp_path / "data", tmp_path / "warmup"
  c = _chain_config(data, cache)
  trainer.train(c, str(tmp_path / "a"))
  with open(tmp_path / "a" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
  assert os.path.isdir(cache / "params")
  # A second arm reads the cached warm-up: it never looks at the target column (a bad key would fail).
  c2 = _chain_config(data, cache)
  c2.warmup.target_key = "no_such_column"
  trainer.train(c2, str(tmp_path / "b"))
  c3 = _chain_config(data, tmp_path / "other_cache")
  c3.warmup.target_key = "no_such_column"
  with pytest.raises(ValueError, match="warmup.target_key.*no_such_column"):
    trainer.train(c3, str(tmp_path / "c"))
