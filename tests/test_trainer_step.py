"""One RL step of the trainer, opened up: what reaches the optimizer, checked against independent code.

- `kl_step`: a real step (rollout, rewards, scoring, PGPO advantages, 2 update mini-batches of 2
  micro-batches) at rollout temperature 0.7 with a k3 KL term. Its scoring, its update batches and its
  logged losses are recomputed from the kept groups with `qwen2_5_vl.forward` (the HF-parity-tested
  full forward on [prompt | response]), NumPy softmax at temperature T, and the NumPy GRPO / PGPO
  weight references of `test_advantages.py`.
- `collect` and the update loop on scripted rollouts (accuracies chosen per prompt, no sampling):
  dynamic-sampling bounds, the round cap, truncation to the batch, padding, short batches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pgpo_jax import rewards, trainer
from pgpo_jax.models import qwen2_5_vl as qwen
from tests.rl.test_advantages import np_grpo, np_weights
from tests.tiny_run import alternating, length_parity, tiny_config

T_ROLLOUT = 0.7
KL_COEF = 0.05


rewards.BATCH_REWARD_FNS.setdefault("test_length_parity", length_parity)


rewards.BATCH_REWARD_FNS.setdefault("test_alternating", alternating)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("step_data")
  trainer.ensure_demo_data(tiny_config(d))
  return d


def _host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _record(t: trainer.Trainer):
  """Wraps the trainer's train step, scoring and collect; returns the lists they append to."""
  calls, kept, scores = [], [], []
  step_fn, collect, score_fn = t.train_step, t.collect, t.score_fn

  def score(params, seq, **kw):
    out = score_fn(params, seq, **kw)
    scores.append(_host(out))
    return out

  def train_step(state, batch):
    before = _host(state.params)  # the state is donated: copy first
    state, metrics = step_fn(state, batch)
    calls.append({"params": before, "batch": _host(batch), "metrics": _host(metrics)})
    return state, metrics

  def recording_collect():
    out = collect()
    kept.extend(out[0])
    return out

  t.train_step, t.collect, t.score_fn = train_step, recording_collect, score
  return calls, kept, scores


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------
def _forward_logp(
  model, g: trainer.Group, temperature: float, *, blind: bool = False
) -> np.ndarray:
  """[G, L] log softmax(logits / T) of each sampled token, from qwen.forward on [prompt | response]
  (the blind view: visual tokens dropped from attention, positions unchanged)."""
  Tp = len(g.prompt_ids)
  out = np.zeros(g.tokens.shape, np.float64)
  for s in range(g.tokens.shape[0]):
    full = np.concatenate([g.prompt_ids, g.tokens[s]])[None]
    am = np.concatenate([np.ones(Tp, np.int32), g.mask[s].astype(np.int32)])[None]
    km = am * (full != model.cfg.image_token_id) if blind else None
    logits = np.asarray(
      qwen.forward(model, full, am, g.pixel_values, g.grids, key_mask=km), np.float64
    )[0]
    z = logits[Tp - 1 : -1] / temperature
    logp = (
      z
      - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - z.max(-1, keepdims=True)
    )
    out[s] = np.take_along_axis(logp, g.tokens[s][:, None].astype(np.int64), -1)[:, 0]
  return out


def _model(t: trainer.Trainer, params) -> qwen.Qwen25VL:
  return nnx.merge(t.model_graphdef, jax.tree.map(jnp.asarray, params))


def _np_k3(logp, ref):
  log_r = np.clip(ref - logp, -20, 20)
  return np.clip(np.exp(log_r) - log_r - 1, -10, 10)


# ------------------------------------------------------------------------------------------------
# A real step with KL and T != 1
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kl_step(data_dir, tmp_path_factory):
  c = tiny_config(data_dir)
  c.rollout.temperature = T_ROLLOUT
  c.reward.name = "test_alternating"
  c.loss.kl_coef, c.loss.kl_estimator = KL_COEF, "k3"
  c.dynamic_sampling.enabled = False  # all 4 groups kept: 2 update mini-batches of 2 micro-batches
  c.pgpo.max_weight = None  # docs/method.md §3 as written (the NumPy reference has no cap)
  c.warmup.sft_steps = 0
  c.train.num_steps = 1
  t = trainer.Trainer(c, str(tmp_path_factory.mktemp("kl_step")))
  init = _host(t.state.params)
  calls, kept, scores = _record(t)
  m = t.train_one_step()
  t.checkpointer.close()
  # The kept groups' rows of the scoring outputs (they come first; filler rows follow).
  dep = np.concatenate([s.dependency_BxT for s in scores])[: len(kept) * t.G]
  model = _model(t, init)
  img = [_forward_logp(model, g, T_ROLLOUT) for g in kept]
  blind = [_forward_logp(model, g, T_ROLLOUT, blind=True) for g in kept]
  return t, m, calls, kept, init, dep, img, blind


def test_reference_is_a_frozen_copy_of_the_initial_weights(kl_step):
  t, m, calls, _, init, *_ = kl_step
  assert t.reference is not None
  ref = _host(t.reference.params)
  jax.tree.map(np.testing.assert_array_equal, ref, init)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), _host(t.state.params), init)
  assert max(jax.tree.leaves(moved)) > 0  # the policy moved, π_ref did not
  assert "train/kl" in m and m["train/num_updates"] == 2 and len(calls) == 2


def test_scoring_and_loss_log_probs_use_the_rollout_temperature(kl_step):
  """Old log-probs, blind log-probs, S and log π_ref all equal log softmax(logits / T) of the full
  forward; the loss's log π_θ does too (ratio 1 on the first mini-batch)."""
  t, _, calls, kept, init, dep, img, blind = kl_step
  model = _model(t, init)
  G = t.G
  for p, g in enumerate(kept):
    mb, row = divmod(p, t.update_local)
    b = calls[mb]["batch"]
    old, ref_logp, mask = b["old_logp"][row], b["ref_logp"][row], g.mask
    np.testing.assert_allclose(old[mask], img[p][mask], atol=2e-4)
    np.testing.assert_allclose(
      ref_logp[mask], img[p][mask], atol=2e-4
    )  # π_ref = the initial weights
    d = img[p] - blind[p]
    s_ref = np.expm1(-d) + d  # k3 of the two views at T
    np.testing.assert_allclose(dep[p * G : (p + 1) * G][mask], s_ref[mask], rtol=2e-2, atol=2e-6)
    if p == 0:  # T matters: a T = 1 pass would fail the lines above
      assert np.abs(_forward_logp(model, g, 1.0) - img[p])[mask].max() > 1e-2
  assert float(dep.max()) > 1e-5, float(dep.max())  # the views differ: S is not trivially 0
  first = calls[0]["metrics"]
  for k in ("ratio_mean", "ratio_max", "ratio_min"):
    assert first[k] == pytest.approx(1.0, abs=2e-5), (k, first[k])
  assert first["clip_frac"] == 0.0 and abs(first["kl"]) < 1e-6


def test_advantages_are_grpo_times_pgpo_weights(kl_step):
  """A·ω̃ (NumPy GRPO × docs/method.md §3 weights of the scoring's S; S itself is checked above) is the
  advantage of every update batch, and reaches the loss."""
  t, _, calls, kept, _, dep, _, _ = kl_step
  c = t.c
  rewards_ = np.concatenate([g.rewards for g in kept])
  mask = np.concatenate([g.mask for g in kept])
  A = np_grpo(rewards_, t.G)
  assert np.abs(A).max() > 0  # not a degenerate batch
  w = np_weights(dep, mask, c.pgpo.tau, c.pgpo.beta)
  want = (A[:, None] * w).reshape(len(kept), t.G, -1)
  got = np.concatenate([cl["batch"]["adv"] for cl in calls])
  m = mask.reshape(got.shape)
  np.testing.assert_allclose(got[m], want[m], rtol=1e-3, atol=1e-4)
  # At ratio 1 (first mini-batch) the clipped surrogate is -Σ Ã / N_tok: the weighted advantages
  # are what the loss sees.
  b = calls[0]["batch"]
  bm = b["seq"].response_mask
  np.testing.assert_allclose(
    calls[0]["metrics"]["pg_loss"], -b["adv"][bm].sum() / bm.sum(), rtol=1e-4, atol=1e-6
  )


def test_logged_losses_equal_single_batch_computations(kl_step):
  """train/pg_loss, train/kl and train/loss: the mean over mini-batches of each mini-batch's loss,
  computed here in one piece (NumPy, from the full forward at the pre-update weights)."""
  t, m, calls, kept, *_ = kl_step
  c = t.c
  pg, kl = [], []
  for mb, cl in enumerate(calls):
    model = _model(t, cl["params"])
    b = cl["batch"]
    rows = kept[mb * t.update_local : (mb + 1) * t.update_local]
    logp = np.stack([_forward_logp(model, g, T_ROLLOUT) for g in rows])
    mask = b["seq"].response_mask
    ratio = np.exp(logp - b["old_logp"])
    adv = b["adv"]
    tok = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - c.loss.clip_low, 1 + c.loss.clip_high))
    pg.append(tok[mask].sum() / mask.sum())
    kl.append(_np_k3(logp, b["ref_logp"])[mask].sum() / mask.sum())
    np.testing.assert_allclose(cl["metrics"]["pg_loss"], pg[-1], rtol=1e-3, atol=1e-6)
  assert kl[1] > 0  # after one update the policy left π_ref
  np.testing.assert_allclose(m["train/pg_loss"], np.mean(pg), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(m["train/kl"], np.mean(kl), rtol=1e-3, atol=1e-9)
  np.testing.assert_allclose(
    m["train/loss"], np.mean(pg) + KL_COEF * np.mean(kl), rtol=1e-3, atol=1e-6
  )


def test_no_reference_model_without_kl(data_dir, tmp_path):
  c = tiny_config(data_dir)
  assert c.loss.kl_coef == 0
  t = trainer.Trainer(c, str(tmp_path))
  assert t.reference is None
  t.checkpointer.close()


# ------------------------------------------------------------------------------------------------
# collect and the update loop on scripted rollouts
# ------------------------------------------------------------------------------------------------
class Script:
  """Replaces `Trainer.rollout_round`: real prompts, fixed responses, accuracy chosen per group."""

  def __init__(self, t: trainer.Trainer, accuracies):
    self.t, self.accuracies, self.rounds = t, list(accuracies), 0
    t.rollout_round = self

  def __call__(self, pb, params):
    t = self.t
    self.rounds += 1
    groups = []
    for b, (ids, pix, grids) in enumerate(trainer.split_prompt_batch(pb)):
      acc = self.accuracies.pop(0)
      L = t.c.rollout.max_new_tokens
      tokens = np.full((t.G, L), 7 + b, np.int32)
      mask = np.zeros((t.G, L), bool)
      mask[:, : 3 + b % 3] = True
      correct = np.arange(t.G) < round(acc * t.G)
      groups.append(
        trainer.Group(
          ids,
          pix,
          grids,
          pb.answers[b],
          tokens,
          mask,
          correct.astype(np.float32),
          correct.astype(np.float32),
          np.zeros(t.G, np.float32),
          np.zeros(t.G, bool),
        )
      )
    return groups


@pytest.fixture(scope="module")
def scripted(data_dir, tmp_path_factory):
  """A trainer with G = 4 (accuracies 0, .25, .5, .75, 1), bounds (0.25, 0.75), 4 prompts per step,
  update mini-batches of 2 prompts, `mask_vision_markers` on."""
  c = tiny_config(data_dir)
  c.rollout.group_size = 4
  c.dynamic_sampling.min_accuracy, c.dynamic_sampling.max_accuracy = 0.25, 0.75
  c.pgpo.mask_vision_markers = True
  c.warmup.sft_steps = 0
  t = trainer.Trainer(c, str(tmp_path_factory.mktemp("scripted")))
  yield t
  t.checkpointer.close()


def _set(t, **kw):
  for k, v in kw.items():
    t.c.dynamic_sampling[k] = v


def test_collect_bounds_are_strict_and_order_is_kept(scripted):
  t = scripted
  _set(t, max_rounds=1, on_short="train")
  s = Script(t, [0.0, 0.25, 0.5, 0.75])
  kept, stats, seen = t.collect()
  assert s.rounds == 1 and len(seen) == 4
  assert [float(g.accuracy.mean()) for g in kept] == [
    0.5
  ]  # 0.25 and 0.75 are on the bounds: dropped
  assert stats["dynamic_sampling/kept_share"] == 0.25 and stats["dynamic_sampling/filled"] == 0.25
  assert stats["dynamic_sampling/rounds"] == 1


def test_collect_round_cap_and_unlimited_rounds(scripted):
  t = scripted
  _set(t, max_rounds=2, on_short="train")
  s = Script(t, [0.0] * 8)
  kept, stats, _ = t.collect()
  assert s.rounds == 2 and kept == [] and stats["dynamic_sampling/rounds"] == 2
  _set(t, max_rounds=0)  # no cap: until the batch is full
  s = Script(t, [0.0] * 8 + [0.5] * 4)
  kept, stats, _ = t.collect()
  assert s.rounds == 3 and len(kept) == 4 and stats["dynamic_sampling/rounds"] == 3


def test_collect_truncates_to_the_batch_in_order(scripted):
  t = scripted
  _set(t, max_rounds=3, on_short="train")
  s = Script(t, [0.5, 0.0, 0.5, 0.0] + [0.5, 0.5, 0.5, 0.0])  # 2 kept, then 3 more: 5 > 4 wanted
  kept, stats, seen = t.collect()
  assert s.rounds == 2 and len(seen) == 8 and len(kept) == 4
  assert [g.tokens[0, 0] for g in kept] == [
    7,
    9,
    7,
    8,
  ]  # rows 0, 2 of round 1, rows 0, 1 of round 2
  assert stats["dynamic_sampling/filled"] == 1.0


def test_short_batch_error_names_the_key(scripted):
  t = scripted
  _set(t, max_rounds=2, on_short="error")
  Script(t, [0.5, 0.0, 0.0, 0.0] * 2)
  with pytest.raises(RuntimeError, match=r"kept 2 of .*dynamic_sampling.max_rounds=2"):
    t.collect()


def test_short_batch_trains_without_all_padding_updates(scripted):
  """One kept group of 4: one update mini-batch (its other row is a masked filler), not two; the
  second, all padding, would move every weight through AdamW's momentum and weight decay."""
  t = scripted
  _set(t, max_rounds=1, on_short="train")
  Script(t, [0.0, 0.5, 1.0, 1.0])
  calls, kept, _ = _record(t)
  steps_before = int(t.state.step)
  m = t.train_one_step()
  assert len(kept) == 1 and len(calls) == 1 and m["train/num_updates"] == 1
  assert int(t.state.step) == steps_before + 1  # the optimizer ran once
  b = calls[0]["batch"]
  rm = b["seq"].response_mask
  assert rm[0].any() and not rm[1].any()  # the kept group, then a masked filler copy
  np.testing.assert_array_equal(rm[0], kept[0].mask)
  # The blind view hides the vision markers too (pgpo.mask_vision_markers).
  ids = b["seq"].prompt_ids
  cfg = t.cfg
  want = (
    (ids == cfg.image_token_id)
    | (ids == cfg.vision_start_token_id)
    | (ids == cfg.vision_end_token_id)
  )
  assert (ids == cfg.vision_start_token_id).any()
  np.testing.assert_array_equal(b["seq"].prompt_visual, want)
  assert m["train/grad_norm"] == pytest.approx(
    calls[0]["metrics"]["grad_norm"]
  )  # no zero averaged in
  for k in ("count/data_rows_read", "count/data_skipped_rows"):
    assert k in m


def test_mini_batches_follow_the_host_with_most_groups():
  assert [trainer.num_update_batches(k, 2) for k in (0, 1, 2, 3, 4)] == [0, 1, 1, 2, 2]
