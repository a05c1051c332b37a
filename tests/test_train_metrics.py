"""The trainer's metric sinks (`train_metrics.py`): rows, non-finite values, truncation on resume, peak FLOP/s."""

import json
import types

import ml_collections
import numpy as np

from pgpo_jax import train_metrics
from pgpo_jax.data import reader


def _config(tensorboard=False):
  return ml_collections.ConfigDict(
    {"logging": {"tensorboard": tensorboard, "wandb": False, "wandb_project": "x"}}
  )


def _rows(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_rows_are_floats_with_null_for_non_finite_and_truncate_drops_later_steps(tmp_path):
  m = train_metrics.MetricsLog(_config(), str(tmp_path), is_host0=True)
  for step in range(4):
    m.log(step, {"a": np.float32(step) / 2, "b": np.int64(step), "nan": float("nan"), "s": "text"})
  m.close()
  rows = _rows(tmp_path / "metrics.jsonl")
  assert rows[3] == {"step": 3, "a": 1.5, "b": 3.0, "nan": None, "s": "text"}
  m.truncate(1)
  assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1]


def test_other_hosts_write_nothing(tmp_path):
  m = train_metrics.MetricsLog(_config(tensorboard=True), str(tmp_path), is_host0=False)
  m.log(0, {"a": 1.0})
  m.truncate(0)
  m.close()
  assert not list(tmp_path.iterdir())


def test_peak_flops_by_device_kind():
  assert train_metrics.peak_flops(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
  assert (
    train_metrics.peak_flops(types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")) == 989e12
  )
  assert train_metrics.peak_flops(types.SimpleNamespace(device_kind="cpu")) is None


def test_data_counts_split_skips_by_reason():
  stats = types.SimpleNamespace(rows_read=10, skipped=3, counts={reader.CORRUPT_IMAGE: 2})
  out = train_metrics.data_counts(stats)
  assert out["count/data_rows_read"] == 10 and out["count/data_skipped_rows"] == 3
  assert out[f"count/data_skipped_rows/{reader.CORRUPT_IMAGE}"] == 2
  assert out["count/data_skipped_rows/other"] == 1  # skipped rows with no known reason
