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


# ----------------------------------------------------------------------------- model FLOPs and MFU

# Image token 9, vision start / end 7 / 8. Group A: 10 prompt tokens (3 image pads, 5 with the
# markers), responses of 4 and 5 tokens; B: 7 text tokens, responses of 1 and 0; C (sampled, not
# kept): 6 prompt tokens, responses of 2 and 3. Masks are padded to L = 8 with False.
_CFG = types.SimpleNamespace(image_token_id=9, vision_start_token_id=7, vision_end_token_id=8)


def _group(prompt, lengths, width=8):
  mask = np.arange(width)[None] < np.asarray(lengths)[:, None]
  return types.SimpleNamespace(prompt_ids=np.asarray(prompt, np.int32), mask=mask)


def _groups(width=8):
  a = _group([1, 7, 9, 9, 9, 8, 2, 3, 4, 5], [4, 5], width)
  b = _group([1, 2, 3, 4, 5, 6, 1], [1, 0], width)
  c = _group([1, 2, 3, 4, 5, 6], [2, 3], width)
  return [a, b, c], [a, b]


def _image_pads(ids):
  return ids == 9


def test_step_tokens_count_real_tokens_by_hand_whatever_the_padding():
  sampled, kept = _groups()
  # prefill 10 + 7 + 6; generated 4+5 + 1+0 + 2+3; sequences (2·10 + 9) + (2·7 + 1); blind: - 2·3
  want = train_metrics.StepTokens(prefill=23, generated=15, sequences=44, blind=38)
  assert train_metrics.step_tokens(sampled, kept, _image_pads) == want
  assert train_metrics.step_tokens(*_groups(width=64), _image_pads) == want
  markers = lambda ids: (ids == 9) | (ids == 7) | (ids == 8)  # noqa: E731
  assert train_metrics.step_tokens(sampled, kept, markers).blind == 44 - 2 * 5


def test_step_model_flops_by_hand():
  t = train_metrics.StepTokens(prefill=23, generated=15, sequences=44, blind=38)
  f = lambda **kw: train_metrics.step_model_flops(100, t, **kw)  # noqa: E731
  # rollout 2·100·38 = 7,600; image view 2·100·44 = 8,800; blind view 2·100·38 = 7,600;
  # π_ref 8,800; one update pass 6·100·44 = 26,400.
  assert f(passes=2, blind_view=True, reference=False) == 7600 + 8800 + 7600 + 2 * 26400
  assert f(passes=1, blind_view=False, reference=True) == 7600 + 8800 + 8800 + 26400
  assert f(passes=2, blind_view=True, reference=True) == 85600


def test_mfu_over_the_chips_peak():
  assert train_metrics.mfu(85600.0, 2.0, peak=1e4, chips=2) == 85600 / (2.0 * 1e4 * 2)
  assert np.isnan(train_metrics.mfu(85600.0, 2.0))  # CPU: no known peak


def test_trainer_step_flops_counts_the_passes_a_run_has():
  """The trainer's wiring: GRPO/DAPO (pgpo.enabled=False) scores one view, π_ref only with a KL
  term, the blind view drops the markers with pgpo.mask_vision_markers, updates.passes passes."""
  from pgpo_jax.trainer import Trainer

  sampled, kept = _groups()

  def flops(enabled, markers, reference, passes):
    c = ml_collections.ConfigDict(
      {"pgpo": {"enabled": enabled, "mask_vision_markers": markers}, "updates": {"passes": passes}}
    )
    fake = types.SimpleNamespace(
      c=c, cfg=_CFG, num_params=100, reference=object() if reference else None
    )
    return Trainer._step_flops(fake, sampled, kept)

  assert flops(True, False, False, 2) == 76800  # 7,600 + 8,800 + 7,600 + 2·26,400
  assert flops(True, True, False, 2) == 76800 - 2 * 100 * 2 * 2  # blind view 34 tokens, not 38
  assert flops(False, False, True, 1) == 51600  # 7,600 + 8,800 + π_ref 8,800 + 26,400
