"""The paper's data as users download it: ViRL39K (training), MMMU-Pro and VPPO-Eval (evaluation).

Every fixture is generated in its real layout (`tests/data/benchmark_fixtures.py`) and goes through the
reader, the prompt builder (tiny demo processor) and the reward; the questions, image counts, skip
counts and scores are the hand-checked ones of the fixture. No model runs here: the end-to-end
`pgpo-eval --benchmarks` run is in tests/test_evaluation.py.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pgpo_jax import evaluation as ev
from pgpo_jax import rewards, train_setup
from pgpo_jax.data import layouts
from pgpo_jax.data.prompts import PromptEncoder
from pgpo_jax.data.reader import DatasetReader, DatasetSpec, RawRow, SkippedRow
from tests.data import benchmark_fixtures as fx
from tests.data.test_data_processing import model_dir, processor  # noqa: F401 (fixtures)
from tests.tiny_run import ROOT, load_config


@pytest.fixture(scope="module")
def virl(tmp_path_factory):
  return fx.write_virl39k(str(tmp_path_factory.mktemp("virl39k")))


@pytest.fixture(scope="module")
def mmmu(tmp_path_factory):
  return fx.write_mmmu_pro(str(tmp_path_factory.mktemp("mmmu_pro")))


@pytest.fixture(scope="module")
def vppo_eval(tmp_path_factory):
  return fx.write_vppo_eval(str(tmp_path_factory.mktemp("vppo_eval")))


def _rows(spec: DatasetSpec) -> list[RawRow | SkippedRow]:
  reader = DatasetReader(spec)
  return [reader.load(i) for i in range(len(reader))]


def _check_rows(fixture: fx.Fixture, rows, encoder: PromptEncoder) -> None:
  """Rows that read and encode are exactly the fixture's, with its questions and image counts, and
  encode to as many `<|image_pad|>` runs; refused rows (reader or prompt builder) are counted by
  reason."""
  encoded = [encoder(r) for r in rows]
  usable = {i: r for i, (r, e) in enumerate(zip(rows, encoded)) if not isinstance(e, SkippedRow)}
  assert sorted(usable) == sorted(fixture.rows), fixture.name
  skips: dict[str, int] = {}
  for e in encoded:
    if isinstance(e, SkippedRow):
      assert e.source == fixture.path or os.path.dirname(e.source) == fixture.path
      skips[e.reason] = skips.get(e.reason, 0) + 1
  assert skips == fixture.skips, fixture.name
  for i, row in usable.items():
    want, enc = fixture.rows[i], encoded[i]
    assert (row.question, len(row.images), row.answer) == (
      want.question,
      want.num_images,
      want.answer,
    ), (fixture.name, i)
    starts = np.flatnonzero(np.diff(np.concatenate([[0], enc.is_visual.astype(int)])) == 1)
    assert len(starts) == want.num_images == enc.image_grid_thw.shape[0], (fixture.name, i)
    assert enc.pixel_values.shape[0] == int(enc.image_grid_thw.prod(axis=1).sum())


def _check_scores(fixture: fx.Fixture, rows, *, options: bool) -> None:
  """Every scripted prediction scores its hand-checked accuracy, and avg@k over them is the mean."""
  reward_fn = rewards.get_batch_reward_fn("pgpo_math")
  cfg = ev.EvalConfig(match_option_text=options)
  samples = []
  for i, want in fixture.rows.items():
    row = rows[i]
    preds = list(want.responses)
    texts = [f"<think>work</think> so \\boxed{{{p}}}" for p in preds]
    choices = [layouts.options_from_text(row.question)] if cfg.match_option_text else None
    scores = ev.score_samples(reward_fn, texts, [row.answer] * len(texts), choices, len(texts))
    got = {p: s["accuracy"] for p, s in zip(preds, scores)}
    assert got == want.responses, (fixture.name, i)
    assert all(s["format"] == 1.0 for s in scores)
    samples += [
      {"source": row.source, "row_index": i, "sample": s, "accuracy": a, "format": 1.0}
      | {"num_tokens": 1, "truncated": False}
      for s, a in enumerate(got.values())
    ]
  if samples and len({len(w.responses) for w in fixture.rows.values()}) == 1:
    k = len(next(iter(fixture.rows.values())).responses)
    mean = np.mean([np.mean(list(w.responses.values())) for w in fixture.rows.values()])
    assert ev.summarize(samples, k)["accuracy"] == pytest.approx(mean, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# MMMU-Pro: its images are read (this layout was evaluated text-only, without options, before)
# ------------------------------------------------------------------------------------------------
def test_mmmu_pro_layout_reads_numbered_images_and_options(mmmu):
  shard = os.path.join(mmmu.path, "test-00000-of-00001.parquet")
  (bench,) = ev.resolve_benchmarks([shard])
  assert bench.spec.image_key == tuple(f"image_{k}" for k in range(1, 8))
  assert (bench.spec.options_key, bench.spec.require_images) == ("options", True)
  row = DatasetReader(bench.spec).load(1)
  assert isinstance(row, RawRow) and len(row.images) == 2
  assert row.question == mmmu.rows[1].question
  # The images are placed where the text refers to them: image_1 in the question, image_2 as option J.
  table = pq.read_table(shard).to_pylist()
  for got, col in zip(row.images, ("image_1", "image_2")):
    want = Image.open(io.BytesIO(table[1][col]["bytes"])).convert("RGB")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_mmmu_pro_rows_prompts_and_scores(mmmu, processor):
  (bench,) = ev.paper_benchmarks(f"mmmu_pro={mmmu.path}")
  assert bench.name == "MMMU-Pro"
  rows = _rows(bench.spec)
  _check_rows(mmmu, rows, PromptEncoder(processor, max_prompt_length=512))
  _check_scores(mmmu, rows, options=True)


def test_a_benchmark_without_images_is_refused_not_scored_text_only(tmp_path):
  path = tmp_path / "mathverse_text.parquet"
  pq.write_table(pa.table({"question": ["What is 1+1?"], "answer": ["2"]}), path)
  with pytest.raises(ValueError, match="no image column.*--image_key=none"):
    ev.resolve_benchmarks([str(path)])
  (bench,) = ev.resolve_benchmarks([str(path)], image_key="none")  # text-only on purpose
  assert bench.spec.image_key is None and not bench.spec.require_images
  # Image columns the detected layout would not read are refused too.
  odd = tmp_path / "odd.parquet"
  pq.write_table(pa.table({"question": ["q"], "answer": ["2"], "pictures": [b"x"]}), odd)
  with pytest.raises(ValueError, match=r"\['pictures'\] look like images"):
    ev.resolve_benchmarks([str(odd)])


# ------------------------------------------------------------------------------------------------
# ViRL39K: trains with the recipe's column names, no flags
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["pgpo_7b", "pgpo_3b"])
def test_virl39k_reads_with_the_recipe_columns(virl, processor, recipe):
  c = load_config(os.path.join(ROOT, "configs", f"{recipe}.py"))
  c.data.train_files = os.path.join(os.path.dirname(virl.path), "train-*.parquet")
  spec = train_setup.dataset_spec(c, c.data.train_files)
  assert spec.require_images
  rows = _rows(spec)
  _check_rows(virl, rows, PromptEncoder(processor, max_prompt_length=512))
  _check_scores(virl, rows, options=False)  # the training reward: no option matching


# ------------------------------------------------------------------------------------------------
# VPPO-Eval: the paper's benchmarks by name
# ------------------------------------------------------------------------------------------------
def test_vppo_eval_folder_gives_the_papers_benchmarks_in_order(vppo_eval):
  data, fixtures = vppo_eval
  for source in (data, os.path.dirname(data)):  # the data folder, or the checkout around it
    benches = ev.paper_benchmarks(source)
    assert [b.name for b in benches] == list(ev.PAPER_BENCHMARKS)
    assert all(b.spec.require_images and b.spec.image_key == "images" for b in benches)
  named = ev.paper_benchmarks(
    f"mmmu-pro={fixtures['MMMU-Pro'].path},GEO3K={fixtures['Geo3k'].path}"
  )
  assert [b.name for b in named] == ["Geo3k", "MMMU-Pro"]
  with pytest.raises(ValueError, match="NAME one of"):
    ev.paper_benchmarks(f"mathvista={fixtures['Geo3k'].path}")
  with pytest.raises(ValueError, match="given twice"):
    ev.paper_benchmarks(f"geo3k={fixtures['Geo3k'].path},Geo3K={fixtures['Geo3k'].path}")
  with pytest.raises(ValueError, match="no dataset_info.json"):
    ev.paper_benchmarks(os.path.join(data, "papo"))


@pytest.mark.parametrize("name", ev.PAPER_BENCHMARKS)
def test_vppo_eval_rows_prompts_and_scores(vppo_eval, processor, name):
  data, fixtures = vppo_eval
  bench = {b.name: b for b in ev.paper_benchmarks(data)}[name]
  rows = _rows(bench.spec)
  _check_rows(fixtures[name], rows, PromptEncoder(processor, max_prompt_length=512))
  _check_scores(fixtures[name], rows, options=True)


def test_vppo_eval_skips_are_counted_by_the_pipeline(vppo_eval, processor):
  data, fixtures = vppo_eval
  cfg = ev.EvalConfig(batch_size=2, max_prompt_length=512)
  for bench in ev.paper_benchmarks(data):
    it = ev.prompt_iterator(bench.spec, processor, cfg)
    prompts = sum(b.num_valid for b in it)
    stats = it.stats.as_dict()
    assert prompts == stats["prompts"] == len(fixtures[bench.name].rows), bench.name
    assert {r: n for r, n in stats["skipped"].items() if n} == fixtures[bench.name].skips


def test_paper_names():
  for name, canon in [
    ("hiyouga_geometry3k", "Geo3k"),
    ("We-Math_We-Math", "We-Math"),
    ("We_Math", "We-Math"),
    ("PAPO_MMK12", "MMK12"),
    ("FanqingM/MMK12", "MMK12"),
    ("AI4Math_MathVerse", "MathVerse"),
    ("AI4Math_MathVerse_vision_dependent", "MathVerse-V"),
    ("mathverse_v", "MathVerse-V"),
    ("MathLLMs_MathVision", "MathVision"),
    ("DynaMath_Sample", "DynaMath"),
    ("lscpku_LogicVista", "LogicVista"),
    ("MMMU_MMMU_Pro", "MMMU-Pro"),
    ("AI4Math_MathVista", None),
    ("BUAADreamer_clevr_count_70k", None),
  ]:
    assert ev.paper_name(name) == canon, name


# ------------------------------------------------------------------------------------------------
# Layout conventions
# ------------------------------------------------------------------------------------------------
def test_parse_options():
  assert layouts.parse_options("['3', '4.5', \"a 'b'\"]") == ("3", "4.5", "a 'b'")
  assert layouts.parse_options(["x", 2]) == ("x", "2")
  assert layouts.parse_options(None) == layouts.parse_options("") == ()
  for bad, why in [
    ("A or B", "not a list literal"),
    ("{'a': 1}", "expected a list"),
    ("[['nested']]", "option 0 is a list"),
    (str([str(i) for i in range(11)]), "11 options"),
    ("__import__('os')", "not a list literal"),  # never evaluated
  ]:
    with pytest.raises(layouts.LayoutError, match=why) as e:
      layouts.parse_options(bad)
    assert e.value.reason == "malformed_row"


@given(
  st.lists(
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1).filter(
      lambda s: s.strip() == s and s
    ),
    min_size=2,
    max_size=10,
  )
)
def test_option_lines_parse_back(options):
  question = layouts.with_options("Which one?", options)
  assert layouts.options_from_text(question) == tuple(options)


def test_place_images():
  cells = ["one", None, "three"]
  names = ["image_1", "image_2", "image_3"]
  q, got = layouts.place_images("<image 3> vs <image 1>", cells, names)
  assert (q, got) == ("<image> vs <image>", ["three", "one"])
  assert layouts.place_images("no refs", cells, names) == ("no refs", ["one", "three"])
  for question, cells_, reason, what in [
    ("<image 2>", ["a", None], "missing_image", "image_2 holds no image"),
    ("<image 9>", ["a"], "missing_image", "image 9"),
    ("<image 1>", ["a", "b"], "image_placeholder_mismatch", "image_2 hold"),
    ("<image 1> and <image>", ["a"], "image_placeholder_mismatch", "mixes"),
  ]:
    with pytest.raises(layouts.LayoutError, match=what) as e:
      layouts.place_images(question, cells_, names)
    assert e.value.reason == reason


def test_format_instruction_is_removed_once():
  q = "Find x." + fx.VPPO_INSTRUCTION
  assert layouts.strip_format_instruction(q) == "Find x."
  ours = ev.PromptFormat().template.replace("{question}", "Find x.")
  assert layouts.strip_format_instruction(ours) == "Find x."
  assert layouts.strip_format_instruction("Find x. Put it in a box.") == "Find x. Put it in a box."


def test_json_array_rows_and_bad_elements(tmp_path):
  path = tmp_path / "bench.json"
  rows = [{"question": "q1", "answer": "1"}, 7, {"question": "q3", "answer": "3"}]
  path.write_text(json.dumps(rows, indent=2))
  reader = DatasetReader(DatasetSpec(str(path), image_key=None, require_images=False))
  got = [reader.load(i) for i in range(3)]
  assert [r.answer for r in (got[0], got[2])] == ["1", "3"]
  assert got[1].reason == "malformed_row" and "element 1 is a JSON int" in got[1].detail
  (tmp_path / "all_bad.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="no element of its array is a JSON object"):
    DatasetReader(DatasetSpec(str(tmp_path / "all_bad.json"), image_key=None))


def test_option_text_and_letters_score_alike():
  resp = lambda p: f"<think>w</think> \\boxed{{{p}}}"
  opts = ("12", "\\frac{1}{2}", "blue")
  cases = [  # (prediction, gold, choices, accuracy)
    ("B", "B", opts, 1.0),
    ("0.5", "B", opts, 1.0),  # the option's text, as math
    ("12", "B", opts, 0.0),
    ("B", "\\frac{1}{2}", opts, 1.0),  # a letter against a text gold
    ("C", "\\frac{1}{2}", opts, 0.0),
    ("0.5", "B", None, 0.0),  # no options known: the training reward's strict letters
    ("D", "0.5", opts, 0.0),  # a letter beyond the options stays a letter
    ("J", "J", (), 1.0),  # ten-option letters
  ]
  scores = rewards.score_batch(
    [resp(p) for p, *_ in cases], [g for _, g, *_ in cases], choices=[c for _, _, c, _ in cases]
  )
  assert [s["accuracy"] for s in scores] == [a for *_, a in cases]
