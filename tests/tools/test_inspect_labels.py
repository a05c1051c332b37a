"""The inspector on the chain task: worked solutions scored with their labels, the ground-truth report."""

import json

import numpy as np
import pytest

from pgpo_jax import evaluation as ev
from pgpo_jax import trainer
from pgpo_jax.data.reader import read_column
from pgpo_jax.demo_task import chain, labels
from pgpo_jax.tools import inspect_dependency as idep
from tests.test_evaluation import _write_workdir
from tests.tiny_run import tiny_config


@pytest.fixture(scope="module")
def chain_setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("chain_data")
  c = tiny_config(d)
  c.data.demo_task, c.data.demo_image_size = "chain", 84
  trainer.ensure_demo_data(c)
  work = _write_workdir(tmp_path_factory.mktemp("chain_ckpt"), d, bigram=False)
  return d, ev.load_policy(work, dtype="float32")


def test_solution_mode_scores_the_labelled_worked_solutions(chain_setup, tmp_path):
  d, policy = chain_setup
  spec = idep.dataset_spec(str(d / "test.parquet"))
  cfg = idep.InspectConfig(n=3, batch_size=2, responses="solution", max_prompt_length=256)
  records = idep.inspect(policy, spec, cfg, progress=False)
  sols = read_column(str(d / "test.parquet"), "solution")
  spans = read_column(str(d / "test.parquet"), "labels")
  assert len(records) == 3
  for r in records:
    want_ids, want_labels = labels.tokenize_with_labels(
      policy.tokenizer, sols[r.row_index], [tuple(s) for s in json.loads(spans[r.row_index])]
    )
    assert r.token_ids == want_ids + [policy.cfg.eos_token_id]
    assert r.labels.tolist() == want_labels.tolist() + [chain.FORMAT]
    assert r.accuracy == 1.0  # the worked solution is right
    assert len(r.dependency) == len(r.labels)
  summary = idep.summarize(records, cfg)
  gt = summary["ground_truth"]
  assert gt["num_responses"] == 3 and gt["num_perception"] == sum(
    int((r.labels == chain.PERCEPTION).sum()) for r in records
  )
  assert gt["scorers"]["uniform"]["auc_pooled"] == 0.5
  paths = idep.write_report(records, summary, tmp_path / "rep")
  assert any(p.endswith("dependency_by_label.png") for p in paths["plots"])
  assert idep.read_tokens(paths["tokens"])[0]["labels"] == records[0].labels.tolist()


def test_sample_mode_labels_every_token(chain_setup):
  d, policy = chain_setup
  spec = idep.dataset_spec(str(d / "test.parquet"))
  cfg = idep.InspectConfig(
    n=2, batch_size=2, temperature=0.0, max_new_tokens=6, labeler="chain", max_prompt_length=256
  )
  records = idep.inspect(policy, spec, cfg, progress=False)
  for r in records:
    assert r.labels is not None and len(r.labels) == len(r.token_ids)
    assert set(np.unique(r.labels).tolist()) <= {0, 1, 2}
  with pytest.raises(ValueError, match="responses"):
    idep.InspectConfig(responses="gold")
