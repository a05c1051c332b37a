"""Reader and grain pipeline: encodings, bad rows, file errors, resume, sharding, epochs."""

from __future__ import annotations

import base64
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgpo_jax.data import reader as reader_lib
from pgpo_jax.data.pipeline import _EpochShardIndices, make_prompt_iterator
from pgpo_jax.data.reader import DatasetReader, DatasetSpec, RawRow
from pgpo_jax.demo_task import synthetic
from tests.data.test_data_processing import model_dir, noise_image, processor  # noqa: F401 (fixtures)

N_ROWS = 12


def png(img) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def write_table(path, columns: dict) -> str:
  pq.write_table(pa.table(columns), str(path))
  return str(path)


def write_jsonl(path, rows) -> str:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("synth") / "train.parquet"
  synthetic.write_parquet(synthetic.make_split(N_ROWS, seed=0, image_size=56), path)
  return str(path)


def collect(it, *, limit=None):
  out = []
  for b in it:
    out.append(b)
    if limit is not None and len(out) == limit:
      break
  return out


def valid_rows(batches) -> list[int]:
  return [int(r) for b in batches for r, v in zip(b.row_indices, b.prompt_valid) if v]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k, v in x.model_inputs().items():
      np.testing.assert_array_equal(v, y.model_inputs()[k], err_msg=k)
    assert (x.questions, x.answers, x.sources) == (y.questions, y.answers, y.sources)
    np.testing.assert_array_equal(x.row_indices, y.row_indices)


# ------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------
def test_image_encodings_read_identically(tmp_path):
  imgs = [noise_image(40 + 8 * i, 60, i) for i in range(3)]
  (tmp_path / "imgs").mkdir()
  for i, im in enumerate(imgs):
    im.save(tmp_path / "imgs" / f"{i}.png")
  q = [f"<image>Question {i}?" for i in range(3)]
  a = ["1", "2", "3"]
  raw = [png(im) for im in imgs]
  rel = [f"imgs/{i}.png" for i in range(3)]
  b64 = [base64.b64encode(r).decode() for r in raw]
  struct = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
  files = {
    "pq_bytes_list": write_table(
      tmp_path / "a.parquet",
      {"problem": q, "answer": a, "images": pa.array([[r] for r in raw], pa.list_(pa.binary()))},
    ),
    "pq_bytes_single": write_table(
      tmp_path / "b.parquet", {"problem": q, "answer": a, "images": pa.array(raw, pa.binary())}
    ),
    "pq_dict": write_table(
      tmp_path / "c.parquet",
      {
        "problem": q,
        "answer": a,
        "images": pa.array([[{"bytes": r, "path": None}] for r in raw], struct),
      },
    ),
    "pq_dict_path": write_table(
      tmp_path / "d.parquet",
      {
        "problem": q,
        "answer": a,
        "images": pa.array([[{"bytes": None, "path": p}] for p in rel], struct),
      },
    ),
    "pq_rel_path": write_table(
      tmp_path / "e.parquet", {"problem": q, "answer": a, "images": [[p] for p in rel]}
    ),
    "jsonl_path_single": write_jsonl(
      tmp_path / "f.jsonl",
      [{"problem": qi, "answer": ai, "images": p} for qi, ai, p in zip(q, a, rel)],
    ),
    "jsonl_dict_path": write_jsonl(
      tmp_path / "g.jsonl",
      [{"problem": qi, "answer": ai, "images": [{"path": p}]} for qi, ai, p in zip(q, a, rel)],
    ),
    "jsonl_dict_b64": write_jsonl(
      tmp_path / "h.jsonl",
      [{"problem": qi, "answer": ai, "images": [{"bytes": s}]} for qi, ai, s in zip(q, a, b64)],
    ),
    "jsonl_data_uri": write_jsonl(
      tmp_path / "i.jsonl",
      [
        {"problem": qi, "answer": ai, "images": [f"data:image/png;base64,{s}"]}
        for qi, ai, s in zip(q, a, b64)
      ],
    ),
    "jsonl_abs_path": write_jsonl(
      tmp_path / "j.jsonl",
      [
        {"problem": qi, "answer": ai, "images": [str(tmp_path / p)]} for qi, ai, p in zip(q, a, rel)
      ],
    ),
  }
  expected = [np.asarray(im) for im in imgs]
  for name, path in files.items():
    r = DatasetReader(DatasetSpec(path))
    assert len(r) == 3, name
    for i in range(3):
      row = r.load(i)
      assert isinstance(row, RawRow), (name, row)
      assert (row.question, row.answer, row.source, row.row_index) == (q[i], a[i], path, i), name
      assert len(row.images) == 1 and row.images[0].mode == "RGB", name
      np.testing.assert_array_equal(np.asarray(row.images[0]), expected[i], err_msg=name)
  # All files at once: global indices run over the files in order.
  r = DatasetReader(DatasetSpec(list(files.values())))
  assert len(r) == 3 * len(files)
  assert r.locate(3 * 4 + 1) == (files["pq_rel_path"], 1)
  # Glob patterns expand sorted.
  assert DatasetReader(DatasetSpec(str(tmp_path / "*.jsonl"))).files == sorted(
    p for p in files.values() if p.endswith(".jsonl")
  )


def test_verl_layout_and_explicit_keys(tmp_path):
  img = png(noise_image(56, 56, 0))
  path = write_table(
    tmp_path / "verl.parquet",
    {
      "prompt": [
        [{"role": "system", "content": "ignored"}, {"role": "user", "content": "<image>Find x."}]
      ],
      "reward_model": [{"ground_truth": "7", "style": "rule"}],
      "images": pa.array([[{"bytes": img, "path": None}]]),
    },
  )
  row = DatasetReader(DatasetSpec(path, answer_key="reward_model.ground_truth")).load(0)
  assert (row.question, row.answer) == ("<image>Find x.", "7")
  path2 = write_jsonl(tmp_path / "custom.jsonl", [{"q": "Why?", "gt": 3, "pics": None}])
  row = DatasetReader(
    DatasetSpec(path2, question_key="q", answer_key="gt", image_key="pics", require_images=False)
  ).load(0)
  assert (row.question, row.answer, row.images) == ("Why?", "3", ())


@pytest.fixture(scope="module")
def bad_rows_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  good = [png(noise_image(56, 56, i)) for i in range(3)]
  truncated = png(noise_image(56, 56, 9))[:200]
  struct = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
  img = lambda b: [{"bytes": b, "path": None}]
  pq_path = write_table(
    d / "mixed.parquet",
    {
      "problem": [
        "good 0",
        "corrupt",
        "missing file",
        "",
        "null answer",
        "good 1",
        "truncated",
        "no image",
      ],
      "answer": ["a", "b", "c", "d", None, "e", "f", "g"],
      "images": pa.array(
        [
          img(good[0]),
          img(b"not an image"),
          [{"bytes": None, "path": "nope.png"}],
          img(good[1]),
          img(good[1]),
          img(good[2]),
          img(truncated),
          [],
        ],
        struct,
      ),
    },
  )
  jl_path = write_jsonl(
    d / "more.jsonl",
    [
      {"problem": "no answer key", "images": [{"bytes": base64.b64encode(good[0]).decode()}]},
      {
        "problem": "good 2",
        "answer": "h",
        "images": [{"bytes": base64.b64encode(good[2]).decode()}],
      },
    ],
  )
  return pq_path, jl_path


def test_bad_rows_are_skipped_counted_and_logged(processor, bad_rows_files, caplog):
  pq_path, jl_path = bad_rows_files
  with caplog.at_level(logging.WARNING, logger=reader_lib.__name__):
    it = make_prompt_iterator(
      DatasetSpec([pq_path, jl_path]),
      processor,
      batch_size=4,
      seed=0,
      num_epochs=1,
      max_prompt_length=512,
      shard_index=0,
      shard_count=1,
    )
    batches = collect(it)
  questions = [q for b in batches for q, v in zip(b.questions, b.prompt_valid) if v]
  assert sorted(questions) == ["good 0", "good 1", "good 2"]
  assert it.stats.counts == {
    reader_lib.EMPTY_QUESTION: 1,
    reader_lib.MISSING_ANSWER: 2,
    reader_lib.MISSING_IMAGE: 1,
    reader_lib.MISSING_IMAGE_FILE: 1,
    reader_lib.CORRUPT_IMAGE: 2,
    reader_lib.IMAGE_PLACEHOLDER_MISMATCH: 0,
    reader_lib.PROMPT_TOO_LONG: 0,
    reader_lib.PROCESSOR_ERROR: 0,
    reader_lib.MALFORMED_ROW: 0,
    reader_lib.NONFINITE_ANSWER: 0,
  }
  assert (it.stats.rows_read, it.stats.prompts, it.stats.skipped) == (10, 3, 7)
  # One log line per skip, naming file, row and reason.
  msgs = [r.getMessage() for r in caplog.records]
  assert f"skipping row 1 of {pq_path}: corrupt_image" in "\n".join(msgs)
  assert any(
    m.startswith(f"skipping row 2 of {pq_path}: missing_image_file") and "nope.png" in m
    for m in msgs
  )
  assert f"skipping row 0 of {jl_path}: missing_answer" in "\n".join(msgs)
  assert len([m for m in msgs if m.startswith("skipping row")]) == 7


def test_malformed_jsonl_lines_are_skipped_and_counted_like_bad_parquet_rows(
  processor, tmp_path, caplog
):
  """One bad line no longer rejects a JSON-lines file: it is a skipped row, numbered from 0 like parquet's."""
  b64 = lambda i: base64.b64encode(png(noise_image(56, 56, i))).decode()  # noqa: E731
  good = lambda q, i: json.dumps({"problem": q, "answer": "1", "images": [{"bytes": b64(i)}]})  # noqa: E731
  jl = tmp_path / "some_bad.jsonl"
  jl.write_text(
    "\n".join(
      [
        good("jl 0", 0),  # row 0, line 1
        '{"problem": "cut short", "answer": ',  # row 1, line 2: truncated
        "",  # line 3: blank, not a row
        '["a", "list"]',  # row 2, line 4: JSON, not an object
        good("jl 3", 1),  # row 3, line 5
        '{"problem": "nan", "answer": NaN}',  # row 4, line 6: not JSON
      ]
    )
    + "\n"
  )
  pq_path = write_table(
    tmp_path / "one_bad.parquet",
    {
      "problem": ["pq 0", "pq 1"],
      "answer": ["1", "2"],
      "images": pa.array([[png(noise_image(56, 56, 2))], [b"not an image"]], pa.list_(pa.binary())),
    },
  )
  with caplog.at_level(logging.WARNING, logger=reader_lib.__name__):
    it = make_prompt_iterator(
      DatasetSpec([pq_path, str(jl)]),
      processor,
      batch_size=2,
      seed=0,
      num_epochs=1,
      max_prompt_length=512,
      shard_index=0,
      shard_count=1,
    )
    batches = collect(it)
  assert sorted(q for b in batches for q, v in zip(b.questions, b.prompt_valid) if v) == [
    "jl 0",
    "jl 3",
    "pq 0",
  ]
  assert (
    it.stats.counts[reader_lib.MALFORMED_ROW] == 3
    and it.stats.counts[reader_lib.CORRUPT_IMAGE] == 1
  )
  assert (it.stats.rows_read, it.stats.prompts, it.stats.skipped) == (7, 3, 4)
  msgs = "\n".join(r.getMessage() for r in caplog.records)
  assert f"skipping row 1 of {pq_path}: corrupt_image" in msgs
  assert f"skipping row 1 of {jl}: malformed_row (line 2: " in msgs
  assert f"skipping row 2 of {jl}: malformed_row (line 4: a JSON list, not an object)" in msgs
  assert f"skipping row 4 of {jl}: malformed_row (line 6: NaN is not valid JSON)" in msgs
  assert (
    DatasetReader(DatasetSpec(str(jl))).load(3).question == "jl 3"
  )  # rows keep the file's numbering


def test_nonfinite_numeric_answers_are_skipped_and_counted(processor, tmp_path, caplog):
  """A float answer column holding NaN / ±inf was read as the text 'nan' / 'inf' (which `\\boxed{nan}`
  then matched), with no row skipped. Large finite numbers stay answers (`1e+300`)."""
  answers = [1.5, float("nan"), float("inf"), -float("inf"), 1e300, 3.0]
  pq_path = write_table(
    tmp_path / "floats.parquet",
    {
      "problem": [f"q {i}" for i in range(len(answers))],
      "answer": pa.array(answers, pa.float64()),
      "images": pa.array([[png(noise_image(56, 56, i))] for i in range(len(answers))]),
    },
  )
  jl_path = (
    tmp_path / "overflow.jsonl"
  )  # JSON has no inf, but a number too large for a float is one
  image = {"bytes": base64.b64encode(png(noise_image(56, 56, 9))).decode()}
  jl_path.write_text(
    "\n".join(
      json.dumps({"problem": f"j {i}", "answer": a, "images": [image]}).replace('"@"', "1e999")
      for i, a in enumerate([2.0, "@"])
    )
  )
  reader = DatasetReader(DatasetSpec([pq_path, str(jl_path)]))
  loaded = [reader.load(i) for i in range(len(reader))]
  assert [getattr(r, "answer", None) for r in loaded] == [
    "1.5",
    None,
    None,
    None,
    "1e+300",
    "3.0",
    "2.0",
    None,
  ]
  skipped = [r for r in loaded if isinstance(r, reader_lib.SkippedRow)]
  assert [(r.reason, r.row_index) for r in skipped] == [
    (reader_lib.NONFINITE_ANSWER, 1),
    (reader_lib.NONFINITE_ANSWER, 2),
    (reader_lib.NONFINITE_ANSWER, 3),
    (reader_lib.MALFORMED_ROW, 1),  # pyarrow cannot store the line; it no longer fails the file
  ]
  assert "line 2: the number 1e999 does not fit a 64-bit float" in skipped[-1].detail
  assert "'answer' holds nan, not a finite number" in skipped[0].detail
  with caplog.at_level(logging.WARNING, logger=reader_lib.__name__):
    it = make_prompt_iterator(
      DatasetSpec([pq_path, str(jl_path)]),
      processor,
      batch_size=2,
      seed=0,
      num_epochs=1,
      max_prompt_length=512,
      shard_index=0,
      shard_count=1,
    )
    batches = collect(it)
  assert sorted(a for b in batches for a, v in zip(b.answers, b.prompt_valid) if v) == [
    "1.5",
    "1e+300",
    "2.0",
    "3.0",
  ]
  assert it.stats.counts[reader_lib.NONFINITE_ANSWER] == 3
  assert it.stats.counts[reader_lib.MALFORMED_ROW] == 1 and it.stats.skipped == 4
  assert f"skipping row 2 of {pq_path}: nonfinite_answer (column 'answer' holds inf" in caplog.text


def test_jsonl_file_level_errors_give_the_line(tmp_path):
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": {"x": 1}}\n')
  with pytest.raises(ValueError, match=r"mixed.jsonl.*answer.*\(row 1 is line 3\)"):
    DatasetReader(DatasetSpec(str(mixed), image_key=None))
  junk = tmp_path / "junk.jsonl"
  junk.write_text("not json\n[1]\n")
  with pytest.raises(
    ValueError, match=r"junk.jsonl.*none of its 2 lines is a JSON object \(first: line 1: "
  ):
    DatasetReader(DatasetSpec(str(junk), image_key=None))


def test_file_level_errors_raise_before_iteration(processor, synth_path, tmp_path):
  kw = dict(batch_size=2, seed=0, num_epochs=1, max_prompt_length=512, shard_index=0, shard_count=1)
  missing = str(tmp_path / "nope.parquet")
  with pytest.raises(FileNotFoundError, match="nope.parquet"):
    make_prompt_iterator(DatasetSpec([synth_path, missing]), processor, **kw)
  with pytest.raises(FileNotFoundError, match="matches no file"):
    make_prompt_iterator(DatasetSpec(str(tmp_path / "*.parquet")), processor, **kw)
  with pytest.raises(ValueError, match=rf"{synth_path}.*no column 'solution_text'"):
    make_prompt_iterator(DatasetSpec(synth_path, answer_key="solution_text"), processor, **kw)
  with pytest.raises(ValueError, match=r"no column 'pictures'.*image_key"):
    make_prompt_iterator(DatasetSpec(synth_path, image_key="pictures"), processor, **kw)
  noq = write_jsonl(tmp_path / "noq.jsonl", [{"text": "hi", "answer": "1", "images": []}])
  with pytest.raises(ValueError, match=r"noq.jsonl.*none of the question columns"):
    make_prompt_iterator(DatasetSpec(noq), processor, **kw)
  csv = tmp_path / "data.csv"
  csv.write_text("problem,answer\n")
  with pytest.raises(ValueError, match="unknown format"):
    make_prompt_iterator(DatasetSpec(str(csv)), processor, **kw)
  broken = tmp_path / "broken.parquet"
  broken.write_bytes(b"PAR1 garbage")
  with pytest.raises(ValueError, match="cannot read dataset file .*broken.parquet"):
    make_prompt_iterator(DatasetSpec(str(broken)), processor, **kw)

  # Empty files hold no rows: fine next to other files, an error when they are all there is.
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  empty_pq = write_table(
    tmp_path / "empty.parquet",
    {
      "problem": pa.array([], pa.string()),
      "answer": pa.array([], pa.string()),
      "images": pa.array([], pa.list_(pa.binary())),
    },
  )
  it = make_prompt_iterator(DatasetSpec([str(empty), synth_path, empty_pq]), processor, **kw)
  assert sum(b.num_valid for b in it) == N_ROWS
  with pytest.raises(ValueError, match="has no rows"):
    make_prompt_iterator(DatasetSpec([str(empty), empty_pq]), processor, **kw)


# ------------------------------------------------------------------------------------------------
# Pipeline
# ------------------------------------------------------------------------------------------------
def test_resume_continues_with_the_next_unseen_batch(processor, synth_path, bad_rows_files):
  spec = DatasetSpec([synth_path, *bad_rows_files])  # 22 rows, 7 of them skipped.
  kw = dict(
    batch_size=4,
    seed=3,
    num_epochs=2,
    max_prompt_length=512,
    shard_index=0,
    shard_count=1,
    num_threads=2,
  )
  full_it = make_prompt_iterator(spec, processor, **kw)
  full = collect(full_it)
  assert [b.num_valid for b in full] == [4] * 7 + [2]  # 2 epochs x 15 good rows
  assert full_it.stats.skipped == 14
  for k in (0, 4, len(full) - 1):
    it = make_prompt_iterator(spec, processor, **kw)
    head = collect(it, limit=k) if k else []
    state = json.loads(json.dumps(it.get_state()))  # Checkpoints are JSON.
    resumed = make_prompt_iterator(spec, processor, **kw)
    resumed.set_state(state)
    assert resumed.stats.as_dict() == it.stats.as_dict()
    assert_same_batches(head + collect(resumed), full)
    assert resumed.stats.as_dict() == full_it.stats.as_dict()
    if k == 4:  # A run may be extended: same order, then a third epoch.
      longer = make_prompt_iterator(spec, processor, **{**kw, "num_epochs": 3})
      longer.set_state(state)
      rest = valid_rows(full[k:])
      more = valid_rows(collect(longer))
      assert more[: len(rest)] == rest and len(more) == len(rest) + N_ROWS + 3
  other = make_prompt_iterator(spec, processor, **{**kw, "seed": 4})
  with pytest.raises(ValueError, match="different pipeline"):
    other.set_state(state)


def test_epochs_reshuffle_and_seeds_are_reproducible(processor, synth_path):
  kw = dict(batch_size=4, num_epochs=2, max_prompt_length=512, shard_index=0, shard_count=1)
  rows = valid_rows(collect(make_prompt_iterator(DatasetSpec(synth_path), processor, seed=0, **kw)))
  e0, e1 = rows[:N_ROWS], rows[N_ROWS:]
  assert sorted(e0) == sorted(e1) == list(range(N_ROWS))
  assert e0 != e1 and e0 != sorted(e0)
  again = valid_rows(
    collect(make_prompt_iterator(DatasetSpec(synth_path), processor, seed=0, **kw))
  )
  assert again == rows
  other = valid_rows(
    collect(make_prompt_iterator(DatasetSpec(synth_path), processor, seed=1, **kw))
  )
  assert other[:N_ROWS] != e0
  # num_epochs=None repeats forever with the same per-epoch permutations.
  forever = make_prompt_iterator(
    DatasetSpec(synth_path), processor, seed=0, **{**kw, "num_epochs": None}
  )
  assert valid_rows(collect(forever, limit=3 * N_ROWS // 4))[: 2 * N_ROWS] == rows


@pytest.mark.parametrize("shard_count", [2, 3, 4])
def test_host_shards_are_disjoint_and_cover_each_epoch(processor, synth_path, shard_count):
  per_epoch = N_ROWS // shard_count
  epochs = [[] for _ in range(2)]
  for shard in range(shard_count):
    it = make_prompt_iterator(
      DatasetSpec(synth_path),
      processor,
      batch_size=2,
      seed=5,
      num_epochs=2,
      max_prompt_length=512,
      shard_index=shard,
      shard_count=shard_count,
    )
    rows = valid_rows(collect(it))
    assert len(rows) == 2 * per_epoch
    for e in range(2):
      epochs[e].extend(rows[e * per_epoch : (e + 1) * per_epoch])
  for e in range(2):
    assert sorted(epochs[e]) == list(range(N_ROWS)), e  # Disjoint (no repeats) and covering.


def test_default_shard_is_this_jax_process(processor, synth_path):
  it = make_prompt_iterator(
    DatasetSpec(synth_path), processor, batch_size=5, seed=0, num_epochs=1, max_prompt_length=512
  )
  batches = collect(it)
  assert sorted(valid_rows(batches)) == list(range(N_ROWS))
  assert [b.num_valid for b in batches] == [5, 5, 2]
  assert batches[-1].prompt_valid.tolist() == [True, True, False, False, False]
  dropped = make_prompt_iterator(
    DatasetSpec(synth_path),
    processor,
    batch_size=5,
    seed=0,
    num_epochs=1,
    max_prompt_length=512,
    drop_remainder=True,
  )
  assert [b.num_valid for b in dropped] == [5, 5]


@settings(max_examples=60, deadline=None)
@given(
  num_rows=st.integers(1, 40),
  shard_count=st.integers(1, 6),
  num_epochs=st.integers(1, 3),
  even=st.booleans(),
  seed=st.integers(0, 2**32 - 1),
)
def test_epoch_shard_indices_partition_every_epoch(num_rows, shard_count, num_epochs, even, seed):
  if num_rows < shard_count:  # Some host would get nothing: a configuration error.
    with pytest.raises(ValueError, match="cannot feed"):
      _EpochShardIndices(
        num_rows,
        seed=seed,
        num_epochs=1,
        shard_index=shard_count - 1,
        shard_count=shard_count,
        even_shards=even,
      )
    return
  shards = [
    _EpochShardIndices(
      num_rows,
      seed=seed,
      num_epochs=num_epochs,
      shard_index=i,
      shard_count=shard_count,
      even_shards=even,
    )
    for i in range(shard_count)
  ]
  lengths = [len(s) // num_epochs for s in shards]
  if even:
    assert set(lengths) == {num_rows // shard_count}
  for e in range(num_epochs):
    seen = [int(s[e * n + j]) for s, n in zip(shards, lengths) for j in range(n)]
    assert len(set(seen)) == len(seen)  # Disjoint.
    assert len(seen) == (num_rows - num_rows % shard_count if even else num_rows)
    assert set(seen) <= set(range(num_rows))


def test_over_long_prompts_are_dropped_and_counted(processor, tmp_path):
  img = [{"bytes": png(noise_image(56, 56, 0)), "path": None}]
  questions = ["Short?", "Long " * 300 + "?", "Also short?", "Longer still " * 200 + "?"]
  path = write_table(
    tmp_path / "long.parquet",
    {
      "problem": questions,
      "answer": ["1"] * 4,
      "images": pa.array(
        [img] * 4, pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
      ),
    },
  )
  it = make_prompt_iterator(
    DatasetSpec(path),
    processor,
    batch_size=4,
    seed=0,
    num_epochs=1,
    max_prompt_length=256,
    shard_index=0,
    shard_count=1,
  )
  (batch,) = collect(it)
  assert sorted(q for q, v in zip(batch.questions, batch.prompt_valid) if v) == [
    "Also short?",
    "Short?",
  ]
  assert it.stats.counts[reader_lib.PROMPT_TOO_LONG] == 2
  assert batch.input_ids.shape[1] <= 256 and batch.attention_mask.sum(1).max() <= 256
