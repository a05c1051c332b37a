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


def _no_nan(x):
  """True when no float in the nested dict / list `x` is NaN."""
  if isinstance(x, dict):
    return all(_no_nan(v) for v in x.values())
  if isinstance(x, (list, tuple)):
    return all(_no_nan(v) for v in x)
  return not (isinstance(x, float) and np.isnan(x))


def test_coverage_counts_every_reason_a_response_is_not_scored():
  recs = [
    _record([0.1, 0.9, 0.0], [1, 0, 2]),  # perception and other tokens: scored
    _record([0.1, 0.2], [1, 2]),  # the labeler found no fact statement
    _record([0.5, 0.5], [0, 0]),  # nothing to rank the perception tokens against
    _record([], []),
    types.SimpleNamespace(labels=None),
  ]
  cov = lm.label_coverage(recs)
  assert cov == {
    "num_records": 5,
    "num_scored": 1,
    "unscored": {
      "unlabelled": 1,
      "empty": 1,
      "no_perception_token": 1,
      "only_perception_tokens": 1,
    },
  }
  text = lm.coverage_text(cov)
  assert text.startswith("1 of 5 responses scored; not scored: 1 with no labels (no labeler), ")
  assert "1 with no perception token (the labeler recognised no image-fact statement)" in text
  assert lm.coverage_text(lm.label_coverage(recs[:1])) == "1 of 1 responses scored"
  r = lm.ground_truth_report(recs)
  assert r["coverage"] == cov and "scorers" in r and _no_nan(r)


def test_no_perception_token_gives_a_reason_not_a_table_of_nan():
  """Sampled responses of an untrained model rarely state an image fact: the report says how many
  responses were labelled and why none could be scored, and holds no NaN."""
  recs = [_record([0.1, 0.2], [1, 2]), _record([0.3], [2]), types.SimpleNamespace(labels=None)]
  r = lm.ground_truth_report(recs)
  assert "scorers" not in r and _no_nan(r)
  assert r["num_responses"] == 2 and r["num_unlabelled"] == 1 and r["num_perception"] == 0
  assert r["coverage"]["unscored"]["no_perception_token"] == 2
  assert r["unscored_reason"].startswith("no labelled token is a perception token")
  assert "0 of 3 responses scored" in r["unscored_reason"]
  assert r["by_label"]["reasoning"]["count"] == 1 and r["by_label"]["perception"]["count"] == 0
  none = lm.ground_truth_report([types.SimpleNamespace(labels=None)])
  assert "scorers" not in none and none["unscored_reason"].startswith("no response is labelled")


def _inspect_record(index, labels, dep):
  from pgpo_jax.tools import inspect_dependency as idep

  n = len(labels)
  return idep.ResponseRecord(
    index=index,
    source="data/test.parquet",
    row_index=index,
    question="q",
    answer="1",
    response="x" * n,
    accuracy=0.0,
    format=0.0,
    truncated=False,
    token_ids=list(range(n)),
    tokens=["x"] * n,
    categories=["word"] * n,
    dependency=np.asarray(dep, np.float64),
    logp_image=np.zeros(n),
    logp_blind=-np.asarray(dep, np.float64),
    entropy=np.zeros(n),
    weights=np.ones(n),
    labels=np.asarray(labels, np.int8),
  )


def test_index_page_explains_missing_ground_truth_scores(tmp_path):
  from pgpo_jax.tools import inspect_dependency as idep

  cfg = idep.InspectConfig(n=2, labeler="chain")
  recs = [_inspect_record(0, [1, 1, 2], [0.1, 0.2, 0.0]), _inspect_record(1, [2, 1], [0.0, 0.3])]
  paths = idep.write_report(recs, idep.summarize(recs, cfg), tmp_path / "none")
  page = open(paths["index"], encoding="utf-8").read()
  section = page[page.index("Finding perception tokens") :].split("<h3>", 1)[0]  # to the next
  assert "No scores: no labelled token is a perception token" in section
  assert "0 of 2 responses scored; not scored: 2 with no perception token" in section
  assert "<table>" not in section and "nan" not in section.lower()
  # With a perception token: the coverage line above the table.
  recs[0] = _inspect_record(0, [0, 1, 2], [0.9, 0.2, 0.0])
  paths = idep.write_report(recs, idep.summarize(recs, cfg), tmp_path / "some")
  page = open(paths["index"], encoding="utf-8").read()
  assert "1 of 2 responses scored; not scored: 1 with no perception token" in page
  assert "pooled over 5 tokens of 2 labelled responses, 1 of them perception" in page
  assert "nan" not in page[page.index("Finding perception tokens") :].split("</table>")[0].lower()
