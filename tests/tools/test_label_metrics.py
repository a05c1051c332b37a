"""ROC-AUC and precision@k against hand-computed cases and brute force; the ground-truth report."""

import itertools
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgpo_jax.tools import label_metrics as lm


def test_auc_by_hand():
  # positives 0.35 and 0.8 against negatives 0.1 and 0.4: wins (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3/4
  assert lm.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
  # ties count one half: the positive 1 vs negatives 1 (1/2), 2 (0), 0 (1) -> 1.5 / 3
  assert lm.roc_auc(np.array([1.0, 1.0, 2.0, 0.0]), np.array([1, 0, 0, 0], bool)) == 0.5
  assert np.isnan(lm.roc_auc(np.ones(3), np.zeros(3, bool)))
  assert lm.roc_auc(np.ones(4), np.array([1, 0, 1, 0], bool)) == 0.5


@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=40))
@settings(max_examples=200, deadline=None)
def test_auc_equals_the_pairwise_count(pairs):
  score = np.array([s for s, _ in pairs], np.float64)
  pos = np.array([p for _, p in pairs], bool)
  if pos.all() or not pos.any():
    assert np.isnan(lm.roc_auc(score, pos))
    return
  wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in score[pos] for b in score[~pos])
  assert lm.roc_auc(score, pos) == pytest.approx(wins / (pos.sum() * (~pos).sum()), abs=1e-12)


def test_precision_at_k_by_hand():
  score, pos = np.array([3.0, 2.0, 2.0, 1.0]), np.array([0, 1, 0, 1], bool)
  assert lm.precision_at_k(score, pos, 1) == 0.0
  assert lm.precision_at_k(score, pos, 2) == 0.25  # 3 (no), then half a chance of the positive 2
  assert lm.precision_at_k(score, pos, 3) == pytest.approx(1 / 3)
  assert lm.precision_at_k(score, pos, 4) == 0.5
  with pytest.raises(ValueError, match="k must be"):
    lm.precision_at_k(score, pos, 0)


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=7), st.data())
@settings(max_examples=100, deadline=None)
def test_precision_at_k_is_the_mean_over_tie_breaks(pairs, data):
  score = np.array([s for s, _ in pairs], np.float64)
  pos = np.array([p for _, p in pairs], bool)
  k = data.draw(st.integers(1, len(pairs)))
  # every ordering consistent with the scores (stable sort of each permutation) is equally likely
  tops = []
  for perm in itertools.permutations(range(len(pairs))):
    order = sorted(perm, key=lambda i: -score[i])
    tops.append(pos[order[:k]].mean())
  assert lm.precision_at_k(score, pos, k) == pytest.approx(np.mean(tops), abs=1e-12)


def _record(dep, labels, weights=None):
  dep = np.asarray(dep, np.float64)
  return types.SimpleNamespace(
    dependency=dep,
    weights=np.ones_like(dep) if weights is None else np.asarray(weights, np.float64),
    entropy=np.zeros_like(dep),
    logp_image=np.zeros_like(dep),
    logp_blind=-dep,
    labels=np.asarray(labels, np.int8),
  )


def test_ground_truth_report():
  recs = [
    _record([0.0, 5.0, 0.1, 0.0], [2, 0, 1, 2], weights=[0.0, 3.0, 1.0, 0.0]),
    _record([0.2, 0.0, 4.0], [1, 1, 0], weights=[1.0, 0.0, 2.0]),
    types.SimpleNamespace(labels=None),
  ]
  r = lm.ground_truth_report(recs)
  assert r["num_responses"] == 2 and r["num_unlabelled"] == 1
  assert r["num_tokens"] == 7 and r["num_perception"] == 2
  assert r["scorers"]["S"]["auc_pooled"] == 1.0
  assert r["scorers"]["S"]["precision_at_r"] == 1.0
  assert r["scorers"]["uniform"]["auc_pooled"] == 0.5
  assert r["scorers"]["uniform"]["precision_at_r_pooled"] == pytest.approx(2 / 7)
  assert r["by_label"]["perception"]["share_of_omega"] == pytest.approx(5 / 7)
  assert r["by_label"]["format"]["mean_omega"] == 0.0
  assert sum(v["count"] for v in r["by_label"].values()) == 7
