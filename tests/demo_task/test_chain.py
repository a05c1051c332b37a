"""The reasoning-chain task: worked solutions score 1, facts match the scene, labels survive tokenisation."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgpo_jax import rewards
from pgpo_jax.demo_task import chain, labels, synthetic, tiny_tokenizer

SETTINGS = settings(
  max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer.build_tokenizer(task="chain")


def _example(seed: int, qtype=None, describe=False) -> chain.ChainExample:
  rng = synthetic.split_rng(seed, 7)
  return chain.sample_chain_example(rng, image_size=84, qtype=qtype, describe=describe)


@given(st.integers(0, 10**6), st.sampled_from(chain.QTYPES), st.booleans())
@settings(max_examples=60, deadline=None)
def test_worked_solutions_verify_and_wrong_answers_do_not(seed, qtype, describe):
  ex = _example(seed, qtype, describe)
  assert int(ex.answer) >= 0
  assert rewards.score(ex.solution, ex.answer) == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}
  wrong = ex.solution.replace(f"\\boxed{{{ex.answer}}}", f"\\boxed{{{int(ex.answer) + 1}}}")
  assert rewards.score(wrong, ex.answer)["accuracy"] == 0.0


@given(st.integers(0, 10**6), st.sampled_from(chain.QTYPES), st.booleans())
@settings(max_examples=60, deadline=None)
def test_stated_facts_match_the_scene_and_the_answer_follows(seed, qtype, describe):
  ex = _example(seed, qtype, describe)
  scene = json.loads(ex.scene.to_json())
  shapes = scene["shapes"]
  for m in re.finditer(r"The number drawn is (\d+)\.", ex.solution):
    assert int(m.group(1)) == scene["digit"]["value"]
  for m in re.finditer(r"I count (\d+) (\w+) shapes\.", ex.solution):
    assert int(m.group(1)) == sum(s["color"] == m.group(2) for s in shapes)
  for m in re.finditer(r"I count (\d+) (circle|square|triangle)s\.", ex.solution):
    assert int(m.group(1)) == sum(s["kind"] == m.group(2) for s in shapes)
  for m in re.finditer(r"I count (\d+) shapes in all\.", ex.solution):
    assert int(m.group(1)) == len(shapes)
  if qtype.startswith("arith"):  # the question's formula with the stated values gives the answer
    binds = dict(re.findall(r"(\b[abc]) = (\d+)", ex.solution.split("Now I compute")[0]))
    formula = re.search(r"Compute (.*)\.$", ex.question).group(1)
    assert eval(re.sub(r"\b[abc]\b", lambda m: binds[m.group(0)], formula)) == int(ex.answer)


@given(st.integers(0, 10**6), st.sampled_from(chain.QTYPES))
@settings(max_examples=40, deadline=None)
def test_a_described_example_states_every_fact_of_the_same_question(seed, qtype):
  plain, dense = _example(seed, qtype), _example(seed, qtype, describe=True)
  assert (dense.scene, dense.answer, dense.qtype) == (plain.scene, plain.answer, plain.qtype)
  assert dense.question == chain.DESCRIBE_PREFIX + plain.question and dense.describe
  assert not plain.describe and not plain.question.startswith(chain.DESCRIBE_PREFIX)
  # The tail after the reading (binding, computing, answer) is the plain solution's.
  assert (
    dense.solution[dense.solution.index(" So a = ") :]
    == (plain.solution[plain.solution.index(" So a = ") :])
  )
  # Every fact, in statements the perception parser reads, labelled where first stated.
  shapes = dense.scene.scene.shapes
  facts = chain.perception_facts(dense.solution)
  want = {
    "The number drawn is _.": str(dense.scene.digit),
    "I count _ shapes in all.": str(len(shapes)),
    **{f"I count _ {c} shapes.": str(sum(s.color == c for s in shapes)) for c in synthetic.COLORS},
    **{f"I count _ {k}s.": str(sum(s.kind == k for s in shapes)) for k in synthetic.KINDS},
  }
  areas = sorted((s.area for s in shapes), reverse=True)
  if areas[0] >= synthetic.LARGEST_MARGIN * areas[1]:
    want["The largest shape is _."] = max(shapes, key=lambda s: s.area).color
  relation = {k: v for k, v in facts.items() if k.startswith("Is ")}
  assert len(relation) == (qtype == "cond_relation")
  assert facts == {**want, **relation}
  # The plain solution's facts are a subset, with the same values.
  assert chain.perception_facts(plain.solution).items() <= facts.items()
  assert chain.label_response(dense.solution) == dense.spans
  n = sum(lab == chain.PERCEPTION for _, _, lab in dense.spans)
  assert n == len(facts) and chain.perception_accuracy(dense.solution, dense.solution) == (n, n)


def test_describe_fraction_changes_only_the_solutions_of_its_share_of_rows():
  plain = chain.make_split(40, seed=3)
  half = chain.make_split(40, seed=3, describe_fraction=0.5)
  every = chain.make_split(40, seed=3, describe_fraction=1.0)
  assert chain.make_split(40, seed=3, describe_fraction=0.0) == plain
  dense = [r["problem"].count(chain.DESCRIBE_PREFIX) == 1 for r in half]
  assert 10 <= sum(dense) <= 30 and all(r["problem"].count(chain.DESCRIBE_PREFIX) for r in every)
  for p, h, e, d in zip(plain, half, every, dense):
    assert (p["images"], p["answer"], p["scene"], p["qtype"]) == (
      h["images"],
      h["answer"],
      h["scene"],
      h["qtype"],
    )
    assert h == (e if d else p)
  assert half[:20] == chain.make_split(
    20, seed=3, describe_fraction=0.5
  )  # row i does not depend on n
  with pytest.raises(ValueError, match="describe_fraction"):
    chain.make_split(2, seed=3, describe_fraction=1.5)


def test_write_splits_describes_training_rows_only(tmp_path):
  from pgpo_jax.demo_task import tasks

  tasks.write_splits(
    str(tmp_path), "chain", n_train=6, n_test=6, seed=0, image_size=84, describe_fraction=1.0
  )
  train = pq.read_table(tmp_path / "train.parquet").to_pylist()
  test = pq.read_table(tmp_path / "test.parquet").to_pylist()
  assert all(r["problem"].count(chain.DESCRIBE_PREFIX) for r in train)
  assert not any(chain.DESCRIBE_PREFIX in r["problem"] for r in test)
  with pytest.raises(ValueError, match="chain-task option"):
    tasks.write_splits(
      str(tmp_path), "answer", n_train=2, n_test=2, seed=0, image_size=84, describe_fraction=0.5
    )


def test_the_digit_is_drawn_where_the_scene_says():
  ex = _example(3)
  img = np.asarray(chain.draw_chain_scene(ex.scene))
  cs = ex.scene
  ink = (img == chain.DIGIT_COLOR).all(-1)
  ys, xs = np.nonzero(ink)
  assert ink.any()
  assert cs.dx0 <= xs.min() and xs.max() < cs.dx0 + cs.dw
  assert cs.dy0 <= ys.min() and ys.max() < cs.dy0 + cs.dh


@given(st.integers(0, 10**6))
@SETTINGS
def test_labels_survive_tokenisation(tok, seed):
  ex = _example(seed)
  assert chain.label_response(ex.solution) == ex.spans  # the text labeller agrees with the builder
  ids, lab = labels.tokenize_with_labels(tok, ex.solution, ex.spans)
  assert 40 <= len(ids) + 1 <= 150  # + the stop token
  enc = tok(ex.solution, add_special_tokens=False, return_offsets_mapping=True)
  offsets = enc["offset_mapping"]
  P, R, F = chain.PERCEPTION, chain.REASONING, chain.FORMAT

  def overlaps(t, kind):
    a, b = offsets[t]
    return any(a < e and s < b for s, e, label in ex.spans if label == kind)

  # Each token's label from the spans its characters overlap (interval arithmetic on the tokenizer's
  # offsets, not `char_labels`): perception over format over reasoning; every span is covered.
  want = [P if overlaps(t, P) else F if overlaps(t, F) else R for t in range(len(ids))]
  assert lab.tolist() == want
  assert {P, R, F} <= set(want)
  for s, e, _ in ex.spans:
    assert any(a < e and s < b for a, b in offsets)
  # Perception tokens hold nothing but the stated values (and the spaces BPE joins to them), in order.
  values = [ex.solution[s:e] for s, e, label in ex.spans if label == chain.PERCEPTION]
  got = [tok.decode([i]).strip() for i, la in zip(ids, lab) if la == chain.PERCEPTION]
  assert got == values
  assert 1 <= len(values) <= 3
  fmt = "".join(tok.decode([i]) for i, la in zip(ids, lab) if la == chain.FORMAT)
  for piece in ("<think>", "</think>", "\\boxed{", "}"):
    assert piece in fmt


def test_char_and_token_labels_by_hand():
  P, R, F = chain.PERCEPTION, chain.REASONING, chain.FORMAT
  # text: "<t>ab 7." ; format [0,3), perception [6,7)
  chars = labels.char_labels(8, [(0, 3, F), (6, 7, P)])
  assert chars.tolist() == [F, F, F, R, R, R, P, R]
  # tokens "<t" "> a" "b" " 7" "." and a stop token with no characters
  offsets = np.array([[0, 2], [2, 5], [5, 5], [5, 7], [7, 8], [8, 8]])
  assert labels.token_labels(offsets, chars).tolist() == [F, F, F, P, R, F]
  assert labels.char_labels(3, [(0, 3, F), (1, 2, P)]).tolist() == [F, P, F]  # priority
  with pytest.raises(ValueError, match="outside the text"):
    labels.char_labels(3, [(2, 5, P)])


def test_offsets_from_pieces():
  assert labels.offsets_from_pieces(["ab", "", "c"]).tolist() == [[0, 2], [2, 2], [2, 3]]


def test_label_response_on_sampled_text_labels_what_it_recognises():
  text = "<think>The number drawn is 4. So a = 4. Now I compute. The number drawn is 5.</think> x"
  spans = chain.label_response(text)
  assert [text[s:e] for s, e, _ in spans] == ["<think>", "4", "</think>"]
  assert chain.label_response("no format at all") == ()


def test_perception_accuracy_on_hand_made_responses():
  sol = (
    "<think>First I read the image. The number drawn is 7. I count 2 red shapes. "
    "Is the red circle left of the blue square? yes. So a = 7 and b = 2. Now I compute. "
    "7 + 2 = 9. So the answer is 9.</think> \\boxed{9}"
  )
  assert chain.perception_facts(sol) == {
    "The number drawn is _.": "7",
    "I count _ red shapes.": "2",
    "Is the red circle left of the blue square? _.": "yes",
  }
  assert chain.perception_accuracy(sol, sol) == (3, 3)
  # One misread value, one fact about another colour (the question asked red), one right.
  wrong = sol.replace("drawn is 7", "drawn is 1").replace("2 red", "2 blue")
  assert chain.perception_accuracy(wrong, sol) == (1, 3)
  # A restatement after `Now I compute` does not count; nothing read at all is 0 of 3.
  late = "<think>So a = 7. Now I compute. The number drawn is 7.</think> \\boxed{9}"
  assert chain.perception_accuracy(late, sol) == (0, 3)
  assert chain.perception_accuracy("", sol) == (0, 3)
  # The first statement of a fact counts, not a later correction.
  twice = sol.replace("drawn is 7.", "drawn is 3. The number drawn is 7.")
  assert chain.perception_accuracy(twice, sol) == (2, 3)


def test_perception_accuracy_of_every_worked_solution_is_complete():
  rng = np.random.default_rng(3)
  for qtype in chain.QTYPES:
    ex = chain.sample_chain_example(rng, qtype=qtype)
    n_perception = sum(label == chain.PERCEPTION for _, _, label in ex.spans)
    assert chain.perception_accuracy(ex.solution, ex.solution) == (n_perception, n_perception)
