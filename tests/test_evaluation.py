"""Evaluation, the dependency inspector and the metric plots on tiny checkpoints (CPU, well under a minute).

Two trainer-layout checkpoints (WORKDIR/config.json + processor, WORKDIR/checkpoints/1/params) are built
by saving parameters directly:
- `bigram`: every decoder layer's output projections are zero, so the next-token distribution depends on
  the current token only, and the head is set so that from the prompt's final "\\n" the model writes
  `\\boxed{` then `1` or `2` with equal probability, `}`, `<|im_end|>`. Sampled answers are right or
  wrong at random (the demo's golds include 1 and 2), which makes avg@k non-trivial; greedy (ties go to
  the lower id) always answers 1.
- `random`: the random-init demo model, whose responses depend on the image (S > 0).
"""

import csv
import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pgpo_jax import checkpoint as ckpt_lib
from pgpo_jax import evaluation as ev
from pgpo_jax import programs, rewards, trainer
from pgpo_jax.data import hf_processor as processor_lib
from pgpo_jax.data.prompts import PromptEncoder, PromptFormat
from pgpo_jax.data.reader import DatasetReader, DatasetSpec
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.rl import advantages
from pgpo_jax.tools import inspect_dependency as idep
from pgpo_jax.tools import plotting
from tests.data import benchmark_fixtures
from tests.test_trainer import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAIN = ["\n", "\\", "boxed", "{", ("1", "2"), "}", "<|im_end|>"]


def _script(name):
  spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _make_bigram(model, tok):
  """Zero the layers' outputs; token a -> its successor in CHAIN (a tuple: equal odds)."""
  params = qwen.flat_params(model)
  lm = ("language_model",)
  params[lm + ("layers", "wo")] = np.zeros_like(params[lm + ("layers", "wo")])
  params[lm + ("layers", "w_down")] = np.zeros_like(params[lm + ("layers", "w_down")])
  emb = np.array(params[lm + ("embed_tokens",)])
  head = np.zeros_like(np.asarray(params[("lm_head",)]))  # [D, V]
  ids = [
    [
      tok.convert_tokens_to_ids(t)
      if t.startswith("<|")
      else tok(t, add_special_tokens=False)["input_ids"][0]
      for t in (x if isinstance(x, tuple) else (x,))
    ]
    for x in CHAIN
  ]
  basis = {}
  for group in ids:
    for i in group:
      basis[i] = len(basis)
      emb[i] = np.eye(emb.shape[1])[
        basis[i]
      ]  # RMSNorm(e_j) = sqrt(D) e_j: row j of the head is the logits
  for cur, nxt in zip(ids[:-1], ids[1:]):
    for i in cur:
      head[basis[i], nxt] = 5.0  # logit 5 * sqrt(64) = 40 against 0: deterministic up to e^-40
  params[lm + ("embed_tokens",)] = emb
  params[("lm_head",)] = head
  return params


def _write_workdir(path, data_dir, bigram: bool):
  c = tiny_config(data_dir)
  proc = processor_lib.load_processor(data_dir / "model")
  model = trainer.build_model(c, proc.tokenizer)
  params = _make_bigram(model, proc.tokenizer) if bigram else qwen.flat_params(model)
  os.makedirs(path / "checkpoints" / "1")
  with open(path / "config.json", "w") as f:
    json.dump(model.cfg.to_hf_dict(), f)
  proc.save_pretrained(str(path))
  ckpt_lib.save_orbax_params(
    path / "checkpoints" / "1" / "params", {k: np.asarray(v) for k, v in params.items()}
  )
  return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("eval_data")
  trainer.ensure_demo_data(tiny_config(d))
  # The same task as JSON lines with other column names and image files by relative path.
  rows = DatasetReader(DatasetSpec(str(d / "test.parquet")))
  os.makedirs(d / "jl" / "img")
  with open(d / "jl" / "bench.jsonl", "w") as f:
    for i in range(4):
      r = rows.load(i)
      r.images[0].save(d / "jl" / "img" / f"{i}.png")
      f.write(
        json.dumps({"question": r.question, "answer": r.answer, "image": f"img/{i}.png"}) + "\n"
      )
  return d


@pytest.fixture(scope="module")
def bigram_workdir(data_dir, tmp_path_factory):
  return _write_workdir(tmp_path_factory.mktemp("bigram") / "run", data_dir, bigram=True)


@pytest.fixture(scope="module")
def random_workdir(data_dir, tmp_path_factory):
  return _write_workdir(tmp_path_factory.mktemp("random") / "run", data_dir, bigram=False)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def test_resolve_checkpoint_layouts(bigram_workdir):
  by_workdir = ev.resolve_checkpoint(bigram_workdir)
  assert (by_workdir.kind, by_workdir.step) == ("trainer", 1)
  for p in (bigram_workdir / "checkpoints" / "1", bigram_workdir / "checkpoints" / "1" / "params"):
    r = ev.resolve_checkpoint(p)
    assert (r.model_path, r.config_path, r.processor_dir, r.step) == (
      by_workdir.model_path,
      str(bigram_workdir / "config.json"),
      str(bigram_workdir),
      1,
    )
  with pytest.raises(FileNotFoundError, match="not a Qwen2.5-VL checkpoint"):
    ev.resolve_checkpoint(bigram_workdir / "checkpoints")


def test_eval_avg_at_k_equals_hand_computed_accuracy(bigram_workdir, data_dir, tmp_path):
  out = tmp_path / "out"
  rc = _script("eval").main(
    [
      "--ckpt",
      str(bigram_workdir),
      "--data",
      f"synth={data_dir / 'test.parquet'},{data_dir / 'jl' / 'bench.jsonl'}",
      "--config.k=2",
      "--config.max_new_tokens=8",
      "--config.batch_size=4",
      "--config.max_prompt_length=256",
      "--dtype",
      "float32",
      "--out",
      str(out),
      "--no_progress",
    ]
  )
  assert rc == 0
  table = {r["benchmark"]: r for r in json.load(open(out / "results.json"))["table"]}
  assert list(table) == ["synth", "bench", "average"]
  gens = ev.read_generations(out / "generations.jsonl")
  assert len(gens) == 2 * (8 + 4)
  assert {g["response"] for g in gens} <= {"\\boxed{1}", "\\boxed{2}"}  # the bigram model works
  golds = {
    "synth": [r["answer"] for r in pq.read_table(data_dir / "test.parquet").to_pylist()],
    "bench": [json.loads(l)["answer"] for l in open(data_dir / "jl" / "bench.jsonl")],
  }
  for name, n in (("synth", 8), ("bench", 4)):
    mine = [g for g in gens if g["benchmark"] == name]
    assert all(
      g["answer"] == golds[name][g["row_index"]] for g in mine
    )  # each sample scored against its row
    by_prompt = {}
    for g in mine:
      assert rewards.score(g["response"], g["answer"])["accuracy"] == g["accuracy"]
      by_prompt.setdefault(g["row_index"], []).append(
        rewards.score(g["response"], g["answer"])["accuracy"]
      )
    assert len(by_prompt) == n and all(len(v) == 2 for v in by_prompt.values())
    avg = np.mean([np.mean(v) for v in by_prompt.values()])
    np.testing.assert_allclose(table[name]["accuracy"], avg, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
      table[name]["pass_at_k"], np.mean([max(v) for v in by_prompt.values()]), atol=1e-12
    )
    assert (
      table[name]["num_prompts"] == n and table[name]["k"] == 2 and table[name]["num_skipped"] == 0
    )
  # Sampled answers are right only sometimes: the averaging is exercised, not a constant 0 or 1.
  assert 0 < table["synth"]["accuracy"] < 1
  assert (
    any(
      np.mean([g["accuracy"] for g in gens if g["row_index"] == r and g["benchmark"] == "synth"])
      == 0.5
      for r in range(8)
    )
    or table["synth"]["pass_at_k"] > table["synth"]["accuracy"]
  )
  np.testing.assert_allclose(
    table["average"]["accuracy"],
    (table["synth"]["accuracy"] + table["bench"]["accuracy"]) / 2,
    atol=1e-12,
  )
  # Sampled results depend on the prompt's benchmark and row, not on its batch or the other benchmarks.
  policy = ev.load_policy(bigram_workdir, dtype="float32")
  again = ev.evaluate(
    policy,
    ev.resolve_benchmarks([f"synth={data_dir / 'test.parquet'}"]),
    ev.EvalConfig(k=2, max_new_tokens=8, batch_size=3, max_prompt_length=256),
    progress=False,
  )
  assert [x["response"] for x in again.samples] == [
    g["response"] for g in gens if g["benchmark"] == "synth"
  ]
  with open(out / "results.csv") as f:
    csv_rows = {r["benchmark"]: r for r in csv.DictReader(f)}
  assert float(csv_rows["synth"]["accuracy"]) == pytest.approx(
    table["synth"]["accuracy"], abs=1e-12
  )


def test_greedy_eval(bigram_workdir, data_dir):
  policy = ev.load_policy(bigram_workdir / "checkpoints" / "1", dtype="float32")
  bench = ev.resolve_benchmarks([str(data_dir / "test.parquet")])
  result = ev.evaluate(
    policy,
    bench,
    ev.EvalConfig.greedy(max_new_tokens=8, batch_size=4, max_prompt_length=256),
    progress=False,
  )
  golds = [r["answer"] for r in pq.read_table(data_dir / "test.parquet").to_pylist()]
  assert all(s["response"] == "\\boxed{1}" for s in result.samples)  # ties go to the lower token id
  assert result.table[0]["accuracy"] == golds.count("1") / len(golds) > 0


def test_papers_benchmarks_by_name_from_a_vppo_eval_folder(bigram_workdir, tmp_path, capsys):
  """`pgpo-eval --benchmarks=DIR` on VPPO-Eval's layout: the paper's benchmarks in its order, each row
  with its images, refused rows counted, golds scored by their conventions. The greedy bigram model
  answers `\\boxed{1}` everywhere: right for DynaMath's gold 1 and for MMMU-Pro's gold A whose option
  A is `1` (option text = letter), wrong elsewhere (the fixture's hand-checked "1" scores)."""
  data, fixtures = benchmark_fixtures.write_vppo_eval(str(tmp_path / "vppo"))
  out = tmp_path / "out"
  args = ["--ckpt", str(bigram_workdir), "--benchmarks", data, "--greedy", "--dtype", "float32"]
  args += ["--config.max_new_tokens=8", "--config.batch_size=4", "--config.max_prompt_length=512"]
  assert _script("eval").main(args + ["--out", str(out), "--no_progress"]) == 0
  table = {r["benchmark"]: r for r in json.load(open(out / "results.json"))["table"]}
  assert list(table) == [*ev.PAPER_BENCHMARKS, "average"]
  for name, fixture in fixtures.items():
    want = np.mean([row.responses["1"] for row in fixture.rows.values()])
    assert table[name]["accuracy"] == pytest.approx(want, abs=1e-12), name
    assert table[name]["num_prompts"] == len(fixture.rows), name
    assert table[name]["num_skipped"] == sum(fixture.skips.values()), name
  assert (table["DynaMath"]["accuracy"], table["MMMU-Pro"]["accuracy"]) == (0.5, 1.0)
  assert table["average"]["accuracy"] == pytest.approx(1.5 / len(ev.PAPER_BENCHMARKS))
  gens = ev.read_generations(out / "generations.jsonl")
  assert {g["response"] for g in gens} == {"\\boxed{1}"}
  lines = capsys.readouterr().out.splitlines()
  head = lines.index(next(l for l in lines if l.split() == [*ev.PAPER_BENCHMARKS, "Avg"]))
  values = dict(zip([*ev.PAPER_BENCHMARKS, "Avg"], lines[head + 1].split()))  # the paper-style row
  assert (values["DynaMath"], values["MMMU-Pro"], values["Geo3k"]) == ("50.00", "100.00", "0.00")
  assert values["Avg"] == f"{100 * 1.5 / 9:.2f}"
  # --data and --benchmarks are exclusive, one is required.
  with pytest.raises(SystemExit):
    _script("eval").main(["--ckpt", str(bigram_workdir)])


def test_an_empty_benchmark_file_is_skipped_and_the_others_run(bigram_workdir, data_dir, tmp_path):
  """One empty file (JSON lines with no line, or a parquet of 0 rows) aborted every benchmark of the
  call; now it is skipped, with a warning and a note in its table row, and left out of the average."""
  (tmp_path / "empty.jsonl").write_text("\n")
  table = pq.read_table(data_dir / "test.parquet")
  pq.write_table(table.slice(0, 0), tmp_path / "none.parquet")
  benches = ev.resolve_benchmarks(
    [str(tmp_path / "empty.jsonl"), str(data_dir / "test.parquet"), str(tmp_path / "none.parquet")]
  )
  policy = ev.load_policy(bigram_workdir / "checkpoints" / "1", dtype="float32")
  cfg = ev.EvalConfig.greedy(max_new_tokens=8, batch_size=4, max_prompt_length=256)
  result = ev.evaluate(policy, benches, cfg, progress=False)
  rows = {r["benchmark"]: r for r in result.table}
  assert list(rows) == ["empty", "test", "none", "average"]
  golds = table.column("answer").to_pylist()
  assert rows["test"]["accuracy"] == golds.count("1") / len(golds) > 0
  assert rows["test"]["num_prompts"] == len(golds) and not rows["test"].get("note")
  for name in ("empty", "none"):
    assert rows[name]["note"] == ev.EMPTY_NOTE and rows[name]["num_prompts"] == 0
    assert np.isnan(rows[name]["accuracy"])
  assert rows["average"]["accuracy"] == rows["test"]["accuracy"]  # over the benchmarks that ran
  text = ev.format_table(result.table)
  assert [line.split()[0] for line in text.splitlines() if "skipped: no rows" in line] == [
    "empty",
    "none",
  ]
  paths = ev.write_results(result, tmp_path / "out")
  assert json.load(open(paths["json"]))["table"][0]["note"] == ev.EMPTY_NOTE


def test_benchmark_columns_and_names(data_dir, tmp_path):
  b = ev.resolve_benchmarks(f"{data_dir / 'test.parquet'},named={data_dir / 'jl' / 'bench.jsonl'}")
  assert [x.name for x in b] == ["test", "named"]
  assert (b[0].spec.question_key, b[0].spec.answer_key, b[0].spec.image_key) == (
    "problem",
    "answer",
    "images",
  )
  assert (b[1].spec.question_key, b[1].spec.answer_key, b[1].spec.image_key) == (
    "question",
    "answer",
    "image",
  )
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "q", "target": "1"}) + "\n")
  with pytest.raises(ValueError, match="no answer column.*target"):
    ev.resolve_benchmarks([str(bad)])
  assert ev.parse_mesh("data=2, tensor=4") == {"data": 2, "tensor": 4}
  with pytest.raises(ValueError, match="NAME=SIZE"):
    ev.parse_mesh("model=2")


# ------------------------------------------------------------------------------------------------
# Inspector
# ------------------------------------------------------------------------------------------------
def _check_png(path, size):
  assert os.path.getsize(path) > 5000, path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == size, (path, im.size)
    assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas


def _direct_logprobs(policy, prompt, response, temperature):
  """log π_I and log π_∅ of `response` after `prompt` (an encoded prompt) at `temperature`, straight
  from the model's logits over the whole sequence (`qwen.forward`, positions from `get_rope_index`):
  the blind view masks the `<|image_pad|>` keys. [L] float64 each."""
  from flax import nnx

  model = nnx.merge(policy.graphdef, policy.state)
  ids = np.concatenate([prompt.input_ids, response]).astype(np.int32)[None]
  out = []
  for key_mask in (None, ids != policy.cfg.image_token_id):
    logits = (
      np.asarray(
        qwen.forward(
          model, ids, None, prompt.pixel_values, prompt.image_grid_thw, key_mask=key_mask
        ),
        np.float64,
      )[0]
      / temperature
    )
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    t = len(prompt.input_ids) - 1 + np.arange(len(response))
    out.append(logp[t, np.asarray(response)])
  return out


@pytest.mark.parametrize("temperature, scored_at, other", [(0.5, 0.5, 1.0), (0.0, 1.0, 0.5)])
def test_inspector_scores_at_the_sampling_temperature(
  random_workdir, data_dir, temperature, scored_at, other
):
  """Sampled at T, scored at T (greedy, T = 0: at 1), as the trainer scores at the rollout
  temperature; the values equal the model's logits / T and differ from those at another T."""
  policy = ev.load_policy(random_workdir, dtype="float32")
  spec = idep.dataset_spec(str(data_dir / "test.parquet"))
  cfg = idep.InspectConfig(
    n=2, batch_size=2, temperature=temperature, max_new_tokens=6, max_prompt_length=256
  )
  records = idep.inspect(policy, spec, cfg, progress=False)
  enc = PromptEncoder(policy.processor, PromptFormat(), max_prompt_length=256)
  reader = DatasetReader(spec)
  for r in records:
    prompt = enc.encode(reader.load(r.row_index))
    lp_i, lp_b = _direct_logprobs(policy, prompt, r.token_ids, scored_at)
    np.testing.assert_allclose(r.logp_image, lp_i, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.logp_blind, lp_b, rtol=1e-4, atol=1e-5)
    d = lp_i - lp_b
    np.testing.assert_allclose(r.dependency, np.expm1(-d) + d, rtol=1e-3, atol=1e-6)
    lp_other, _ = _direct_logprobs(policy, prompt, r.token_ids, other)
    assert np.abs(r.logp_image - lp_other).max() > 1e-2


def test_inspector_values_equal_score_rollout(random_workdir, data_dir, tmp_path):
  out = tmp_path / "insp"
  rc = _script("inspect_dependency").main(
    [
      "--ckpt",
      str(random_workdir),
      "--data",
      str(data_dir / "test.parquet"),
      "--config.n=5",
      "--config.batch_size=4",
      "--greedy",
      "--config.max_new_tokens=8",
      "--config.max_prompt_length=256",
      "--config.chunk_size=4",
      "--out",
      str(out),
      "--no_progress",
    ]
  )
  assert rc == 0
  recs = idep.read_tokens(out / "tokens.jsonl")
  assert len(recs) == 5
  # Recompute every value the trainer's way: prompts encoded afresh, collated as the trainer collates its
  # groups (another padding and batch than the inspector's), scored by the trainer's scoring program.
  policy = ev.load_policy(random_workdir, dtype="float32")
  spec = DatasetSpec(str(data_dir / "test.parquet"))
  reader, enc = (
    DatasetReader(spec),
    PromptEncoder(policy.processor, PromptFormat(), max_prompt_length=256),
  )
  L = 8
  groups = []
  for r in recs:
    e = enc.encode(reader.load(r["row_index"]))
    n = len(r["token_ids"])
    tokens, mask = np.zeros((1, L), np.int32), np.zeros((1, L), bool)
    tokens[0, :n], mask[0, :n] = r["token_ids"], True
    groups.append(
      trainer.Group(
        e.input_ids,
        e.pixel_values,
        e.image_grid_thw,
        r["answer"],
        tokens,
        mask,
        np.zeros(1),
        np.zeros(1),
        np.zeros(1),
        np.zeros(1, bool),
      )
    )
  seq, _ = trainer.collate_groups(groups, policy.cfg, (64, 128, 256), policy.cfg.pad_token_id)
  s = jax.device_get(programs.make_score_program(policy.graphdef)(policy.state, seq))
  any_positive = False
  for i, r in enumerate(recs):
    n = len(r["token_ids"])
    for field, ours in (
      ("dependency", s.dependency_BxT),
      ("logp_image", s.logp_image_BxT),
      ("logp_blind", s.logp_blind_BxT),
      ("entropy", s.entropy_BxT),
    ):
      np.testing.assert_allclose(r[field], ours[i, :n], rtol=1e-4, atol=1e-6, err_msg=field)
    assert np.isclose(np.sum(r["weights"]), n, rtol=1e-5)  # mass conservation
    assert len(r["tokens"]) == len(r["categories"]) == n
    any_positive |= max(r["dependency"]) > 0
    page = (out / f"response_{r['index']:03d}.html").read_text()
    assert page.count('class="tok"') == n
  assert any_positive  # the random model does look at the image
  # The weights are the trainer's function of the inspector's S (min-max normalisation amplifies the float
  # noise between two paddings, so they are compared on the same S).
  dep, mask = np.zeros((5, L), np.float32), np.zeros((5, L), bool)
  for i, r in enumerate(recs):
    dep[i, : len(r["dependency"])], mask[i, : len(r["dependency"])] = r["dependency"], True
  w = np.asarray(advantages.pgpo_token_weights(dep, mask, 0.4, 2.0))
  for i, r in enumerate(recs):
    np.testing.assert_allclose(r["weights"], w[i, : len(r["weights"])], rtol=1e-5, atol=1e-6)

  summary = json.load(open(out / "summary.json"))
  dep = np.concatenate([r["dependency"] for r in recs])
  assert summary["num_tokens"] == dep.size
  for t, share in summary["sparsity"]["share_above"].items():
    assert share == pytest.approx(float((dep > float(t)).mean()))
  assert sum(v["count"] for v in summary["by_category"].values()) == dep.size
  assert len(summary["top_tokens"]) == min(25, dep.size)
  assert summary["top_tokens"][0]["S"] == pytest.approx(dep.max())
  assert "response_004.html" in (out / "index.html").read_text()
  for name, size in (
    ("dependency_hist.png", (770, 462)),
    ("weights_hist.png", (770, 462)),
    ("dependency_by_category.png", (1210, 462)),
    ("sparsity.png", (1210, 462)),
  ):
    _check_png(out / name, size)


def test_token_categories_and_colors():
  cat = idep.token_category
  assert [
    cat("3"),
    cat(" 12"),
    cat("0.5"),
    cat("boxed"),
    cat(" the"),
    cat("{"),
    cat(" \\"),
    cat("\n"),
    cat("<|im_end|>", special=True),
    cat("{yes"),
  ] == [
    "digit",
    "digit",
    "digit",
    "word",
    "word",
    "punctuation",
    "punctuation",
    "whitespace",
    "special",
    "word",
  ]
  assert idep.s_color(0.0, 2.0) == "rgb(255,255,255)" and idep.s_color(2.0, 2.0) == "rgb(255,80,30)"
  assert idep.w_color(1.0, 5.0) == "rgb(255,255,255)"
  assert idep.w_color(0.0, 5.0).endswith(",255)") and idep.w_color(5.0, 5.0) == "rgb(255,45,45)"


# ------------------------------------------------------------------------------------------------
# Metric plots
# ------------------------------------------------------------------------------------------------
def _write_metrics(path, rows):
  os.makedirs(path, exist_ok=True)
  with open(path / "metrics.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def test_plot_metrics_two_runs(tmp_path):
  rng = np.random.default_rng(0)
  a_rows = [{"step": 0, "eval/accuracy": 0.2}]
  for s in range(1, 21):
    a_rows.append(
      {
        "step": s,
        "reward/overall": 0.1 + 0.02 * s,
        "reward/accuracy": 0.01 * s,
        "reward/format": 0.9,
        "train/grad_norm": float(rng.uniform(0.5, 2)),
        "entropy/scoring": 1.0 - 0.02 * s,
        "dependency/mean": 0.01,
        "dependency/max": None if s == 3 else 2.5,  # null = non-finite
        "pgpo/max_weight": 4.0,
        "response/length_mean": 100 + s,
        "throughput/mfu": None,
      }
    )
    if s % 10 == 0:
      a_rows[-1]["eval/accuracy"] = 0.2 + 0.01 * s
  b_rows = [
    {"step": s, "reward/overall": 0.05 * s, "train/grad_norm": 1.0, "response/length_mean": 80.0}
    for s in range(1, 11)
  ]
  b_rows.append({"step": 5, "reward/overall": 0.9})  # logged again after a resume: replaces step 5
  _write_metrics(tmp_path / "pgpo_run", a_rows)
  _write_metrics(tmp_path / "dapo_run", b_rows)

  runs = plotting.parse_runs(
    [str(tmp_path / "pgpo_run"), f"dapo={tmp_path / 'dapo_run' / 'metrics.jsonl'}"]
  )
  assert [label for label, _ in runs] == ["pgpo_run", "dapo"]
  b = plotting.read_metrics(tmp_path / "dapo_run")
  assert [r["step"] for r in b] == list(range(1, 11)) and b[4]["reward/overall"] == 0.9
  steps, vals = plotting.series(plotting.read_metrics(tmp_path / "pgpo_run"), "dependency/max")
  assert 3 not in steps and len(vals) == 19

  out = tmp_path / "plots"
  rc = _script("plot_metrics").main(
    [str(tmp_path / "pgpo_run"), f"dapo={tmp_path / 'dapo_run'}", "--out", str(out)]
  )
  assert rc == 0
  names = sorted(os.listdir(out))
  for must in (
    "overview.png",
    "reward.png",
    "eval_accuracy.png",
    "entropy.png",
    "grad_norm.png",
    "dependency.png",
    "pgpo_weights.png",
    "response_length.png",
  ):
    assert must in names, names
  assert "time.png" not in names and "loss.png" not in names  # no run has those keys
  for name in names:
    with Image.open(out / name) as im:
      w, h = im.size
    assert os.path.getsize(out / name) > 5000 and w >= 500 and h >= 300, (name, w, h)
  _check_png(out / "reward.png", (int(5.2 * 110 * 3), int(3.4 * 110)))  # 3 keys side by side
