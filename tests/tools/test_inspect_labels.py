"""The inspector on the chain task: worked solutions scored with their labels, the ground-truth report."""

import json

import numpy as np
import pytest

from pgpo_jax import evaluation as ev
from pgpo_jax import trainer
from pgpo_jax.data.reader import read_column
from pgpo_jax.demo_task import chain
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


def _overlap_labels(offsets, spans):
  """Each token's label from the character spans its [start, end) overlaps, by interval arithmetic:
  perception over format over reasoning (the rule `demo_task/labels.py` documents)."""

  def hits(a, b, kind):
    return any(a < e and s < b for s, e, label in spans if label == kind)

  P, R, F = chain.PERCEPTION, chain.REASONING, chain.FORMAT
  return [P if hits(a, b, P) else F if hits(a, b, F) else R for a, b in offsets]


def test_solution_mode_scores_the_labelled_worked_solutions(chain_setup, tmp_path):
  """Each record is the worked solution as the tokenizer splits it, then the stop token; its labels
  are those of the `labels` column's spans, worked out from the tokenizer's offsets (the stop token:
  format)."""
  d, policy = chain_setup
  spec = idep.dataset_spec(str(d / "test.parquet"))
  cfg = idep.InspectConfig(n=3, batch_size=2, responses="solution", max_prompt_length=256)
  records = idep.inspect(policy, spec, cfg, progress=False)
  sols = read_column(str(d / "test.parquet"), "solution")
  spans = read_column(str(d / "test.parquet"), "labels")
  assert len(records) == 3
  perception = 0
  for r in records:
    text = sols[r.row_index]
    enc = policy.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert r.token_ids == list(enc["input_ids"]) + [policy.cfg.eos_token_id]
    assert policy.tokenizer.decode(r.token_ids[:-1]) == text
    want = _overlap_labels(enc["offset_mapping"], json.loads(spans[r.row_index])) + [chain.FORMAT]
    assert r.labels.tolist() == want
    assert chain.PERCEPTION in want and chain.REASONING in want
    perception += want.count(chain.PERCEPTION)
    assert r.accuracy == 1.0  # the worked solution is right
    assert len(r.dependency) == len(r.labels)
  summary = idep.summarize(records, cfg)
  gt = summary["ground_truth"]
  assert gt["num_responses"] == 3 and gt["num_perception"] == perception
  assert gt["coverage"]["num_scored"] == 3
  assert gt["scorers"]["uniform"]["auc_pooled"] == 0.5
  paths = idep.write_report(records, summary, tmp_path / "rep")
  assert any(p.endswith("dependency_by_label.png") for p in paths["plots"])
  assert idep.read_tokens(paths["tokens"])[0]["labels"] == records[0].labels.tolist()


def test_sample_mode_labels_every_token(chain_setup):
  """Sampled responses: labels of `chain.label_response`'s spans on the response text (special
  tokens add no text and are format), worked out from each token's decoded piece."""
  d, policy = chain_setup
  spec = idep.dataset_spec(str(d / "test.parquet"))
  cfg = idep.InspectConfig(
    n=2, batch_size=2, temperature=0.0, max_new_tokens=6, labeler="chain", max_prompt_length=256
  )
  records = idep.inspect(policy, spec, cfg, progress=False)
  assert len(records) == 2
  specials = set(policy.tokenizer.all_special_ids)
  for r in records:
    pieces = ["" if t in specials else policy.tokenizer.decode([t]) for t in r.token_ids]
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    offsets = [(int(e) - len(p), int(e)) for p, e in zip(pieces, ends)]
    want = _overlap_labels(offsets, chain.label_response(text))
    want = [chain.FORMAT if p == "" else w for p, w in zip(pieces, want)]
    assert r.labels.tolist() == want
  with pytest.raises(ValueError, match="responses"):
    idep.InspectConfig(responses="gold")
