"""The supervised warm-up's blind-view rows (`warmup.blind_fraction`): which rows, and what they train."""

import logging

import jax
import ml_collections
import numpy as np
import pytest

from pgpo_jax import programs, rewards, trainer, warmup
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.rl import sequences
from tests.hf_utils import left_pad, make_ids, random_pixels
from tests.tiny_run import length_parity, tiny_config


def test_blind_rows_pick_exactly_the_fraction_per_step():
  for n, f in [(16, 0.25), (16, 0.5), (5, 0.5), (8, 0.0), (8, 1.0), (3, 0.1)]:
    rows = warmup.blind_rows(n, f, seed=0, step=3)
    assert rows.dtype == bool and rows.shape == (n,) and rows.sum() == round(f * n)
  a = warmup.blind_rows(16, 0.5, seed=0, step=1)
  np.testing.assert_array_equal(a, warmup.blind_rows(16, 0.5, seed=0, step=1))  # reproducible
  picks = {tuple(warmup.blind_rows(16, 0.5, seed=0, step=s)) for s in range(8)}
  assert len(picks) > 1  # a fresh choice each step, not the same rows every time


@pytest.fixture(scope="module")
def batches(tiny_hf):
  model = qwen.from_pretrained(tiny_hf[1])
  rng = np.random.default_rng(1)
  grids = [[(1, 4, 8)], [(1, 2, 4)]]
  ids, am = left_pad([make_ids(rng, g, pre=3) for g in grids])
  flat = [g for gs in grids for g in gs]
  pixels = random_pixels(rng, flat)
  resp = rng.integers(10, 400, (2, 5)).astype(np.int32)
  rmask = np.ones((2, 5), bool)
  rmask[1, 3:] = False

  def seq(rows):
    sizes = [int(np.prod(g)) for g in flat]
    starts = np.cumsum([0] + sizes)
    pix = np.concatenate([pixels[starts[r] : starts[r + 1]] for r in rows])
    return sequences.make_sequence_batch(
      model.cfg,
      ids[rows],
      am[rows],
      pix,
      np.asarray([flat[r] for r in rows]),
      resp[rows],
      rmask[rows],
    )

  return model, seq


def test_sft_loss_trains_blind_rows_on_the_scoring_pass_blind_view(batches):
  model, seq = batches
  c = ml_collections.ConfigDict({"loss": {"logprob_chunk": 4}})
  loss_fn = programs.sft_loss_fn(c)
  both, first, second = seq([0, 1]), seq([0]), seq([1])
  s = sequences.score_rollout(model, both, chunk_size=4)
  m = np.asarray(both.flat_response_mask)
  img, bl = np.asarray(s.logp_image_BxT), np.asarray(s.logp_blind_BxT)
  n = float(m.sum())
  # Row 0 with its image, row 1 blind: the blind row's NLL is the scoring pass's blind log-probs.
  loss, aux = loss_fn(model, {"seq": first, "seq_blind": second, "token_normalizer": n})
  want = -(img[0][m[0]].sum() + bl[1][m[1]].sum()) / n
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux["nll_blind"]), -bl[1][m[1]].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(aux["nll_image"]), -img[0][m[0]].mean(), rtol=1e-5)
  # All blind, and all with images (the warm-up without blind rows): each view's own numbers.
  loss_b, _ = loss_fn(model, {"seq_blind": both, "token_normalizer": n})
  np.testing.assert_allclose(float(loss_b), -bl[m].sum() / n, rtol=1e-5)
  loss_i, aux_i = loss_fn(model, {"seq": both, "token_normalizer": n})
  np.testing.assert_allclose(float(loss_i), -img[m].sum() / n, rtol=1e-5)
  assert float(aux_i["nll_blind"]) == 0.0
  assert abs(float(loss_b) - float(loss_i)) > 1e-4


def test_sft_loss_with_token_weights_is_the_weighted_mean_nll(batches):
  model, seq = batches
  c = ml_collections.ConfigDict({"loss": {"logprob_chunk": 4}})
  loss_fn = programs.sft_loss_fn(c)
  both, first, second = seq([0, 1]), seq([0]), seq([1])
  s = sequences.score_rollout(model, both, chunk_size=4)
  m = np.asarray(both.flat_response_mask)
  nll_img, nll_bl = -np.asarray(s.logp_image_BxT), -np.asarray(s.logp_blind_BxT)
  w = np.where(m, 1.0, 0.0).astype(np.float32)
  w[0, 1], w[1, 2] = 7.0, 0.5  # one up-weighted token in each row
  z = float(w.sum())
  b = {
    "seq": first,
    "seq_weight": w[0].reshape(1, 1, -1),
    "seq_blind": second,
    "seq_blind_weight": w[1].reshape(1, 1, -1),
    "token_normalizer": z,
  }
  loss, aux = loss_fn(model, b)
  want = ((w[0] * nll_img[0])[m[0]].sum() + (w[1] * nll_bl[1])[m[1]].sum()) / z
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(
    float(aux["nll_upweighted"]), (nll_img[0, 1] + nll_bl[1, 2]) / 2, rtol=1e-5
  )
  # The reported NLL stays the unweighted token mean; all-ones weights give the unweighted loss.
  np.testing.assert_allclose(
    float(aux["nll"]), (nll_img[0][m[0]].sum() + nll_bl[1][m[1]].sum()) / m.sum(), rtol=1e-5
  )
  ones = dict(
    b,
    seq_weight=np.where(m[:1], 1.0, 0.0).reshape(1, 1, -1),
    seq_blind_weight=np.where(m[1:], 1.0, 0.0).reshape(1, 1, -1),
    token_normalizer=float(m.sum()),
  )
  plain, aux1 = loss_fn(
    model, {"seq": first, "seq_blind": second, "token_normalizer": float(m.sum())}
  )
  np.testing.assert_allclose(float(loss_fn(model, ones)[0]), float(plain), rtol=1e-6)
  assert float(aux1["nll_upweighted"]) == 0.0
  assert abs(float(loss) - float(plain)) > 1e-4


def test_target_weights_up_weight_exactly_the_perception_tokens():
  from pgpo_jax.demo_task import chain, labels, tiny_tokenizer

  tok = tiny_tokenizer.build_tokenizer(task="chain")
  ex = chain.sample_chain_example(np.random.default_rng(3))
  row = chain.example_to_row(ex)
  ids, w = warmup.target_weights(tok, row["solution"], row["labels"], 4.0, ("f.parquet", 5))
  want_ids, lab = labels.tokenize_with_labels(tok, ex.solution, ex.spans)
  assert ids == want_ids and w.dtype == np.float32 and w.shape == (len(ids),)
  np.testing.assert_array_equal(w == 4.0, lab == chain.PERCEPTION)
  assert (w == 4.0).sum() >= 1 and set(np.unique(w)) == {1.0, 4.0}
  text = "".join(tok.decode([i]) for i, x in zip(ids, w) if x == 4.0)
  facts = "".join(ex.solution[a:b] for a, b, lab_ in ex.spans if lab_ == chain.PERCEPTION)
  assert text.replace(" ", "") == facts.replace(" ", "")
  for bad in ("not json", "[[0, 3]]", "[[0, 9999, 0]]", "[[0, 2, 7]]"):
    with pytest.raises(ValueError, match="labels_key: row 5 of 'f.parquet'"):
      warmup.target_weights(tok, row["solution"], bad, 4.0, ("f.parquet", 5))


def test_warmup_with_perception_weight_feeds_the_weights(tmp_path, monkeypatch):
  from pgpo_jax import config as config_lib

  monkeypatch.setitem(rewards.BATCH_REWARD_FNS, "test_length_parity", length_parity)
  c = tiny_config(tmp_path / "data")
  c.data.demo_task, c.data.demo_image_size = "chain", 84
  c.rollout.max_new_tokens = 96
  c.warmup.sft_steps, c.warmup.prompts_per_step, c.warmup.blind_fraction = 1, 4, 0.5
  c.warmup.target_key, c.warmup.perception_weight = "solution", 6.0
  with pytest.raises(config_lib.ConfigError, match="warmup.perception_weight: needs"):
    config_lib.validate(c)
  c.warmup.labels_key = "labels"
  c.warmup.target_key = ""
  with pytest.raises(config_lib.ConfigError, match="warmup.labels_key: labels a target column"):
    config_lib.validate(c)
  c.warmup.target_key = "solution"
  seen = []
  real = warmup._batch

  def spy(groups, blind_N, make_batch, weights=None):
    out = real(groups, blind_N, make_batch, weights)
    seen.append((groups, weights, out))
    return out

  monkeypatch.setattr(warmup, "_batch", spy)
  t = trainer.Trainer(c, str(tmp_path / "run"))
  t.sft_warmup()
  ((groups, weights, out),) = seen
  assert len(weights) == 4
  total = 0.0
  for g, w in zip(groups, weights):
    assert w.shape == g.mask.shape and (w[~g.mask] == 0).all()
    assert (w[g.mask] == 6.0).sum() >= 1 and set(np.unique(w[g.mask])) == {1.0, 6.0}
    total += float(w.sum())
  np.testing.assert_allclose(float(out["token_normalizer"]), total, rtol=1e-6)
  got = np.concatenate([np.asarray(out[k]).reshape(-1) for k in ("seq_weight", "seq_blind_weight")])
  np.testing.assert_allclose(got.sum(), total, rtol=1e-6)
  jax.clear_caches()


def test_warmup_with_blind_fraction_trains_both_views(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(rewards.BATCH_REWARD_FNS, "test_length_parity", length_parity)
  c = tiny_config(tmp_path / "data")
  c.warmup.sft_steps, c.warmup.prompts_per_step, c.warmup.blind_fraction = 2, 4, 0.5
  c.train.num_steps = 1
  seen = []
  real = warmup._batch

  def spy(groups, blind_N, make_batch, weights=None):
    out = real(groups, blind_N, make_batch, weights)
    seen.append({k: v.response.shape[0] for k, v in out.items() if k != "token_normalizer"})
    return out

  monkeypatch.setattr(warmup, "_batch", spy)
  with caplog.at_level(logging.INFO, logger="pgpo_jax"):
    trainer.train(c, str(tmp_path / "run"))
  assert seen == [{"seq": 2, "seq_blind": 2}] * 2
  lines = [r.getMessage() for r in caplog.records if "warm-up 2/2" in r.getMessage()]
  assert lines and "blind rows 0.000" not in lines[0]
  jax.clear_caches()
