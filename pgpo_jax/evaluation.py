"""Benchmark evaluation: avg@k accuracy of a policy on local benchmark files (docs/method.md §5).

    from pgpo_jax import evaluation as ev
    policy = ev.load_policy("runs/pgpo_7b")                     # WORKDIR -> its latest checkpoint
    benches = ev.paper_benchmarks("data/VPPO-Eval")            # the paper's benchmarks by name
    # or any files: ev.resolve_benchmarks(["mathverse=data/mathverse.parquet", "data/wemath.jsonl"])
    result = ev.evaluate(policy, benches, ev.EvalConfig())      # paper: k=8, T=1.0, top-p 1.0, 2048
    ev.write_results(result, "eval_out")                       # results.json / .csv / generations.jsonl
    print(ev.format_table(result.table)); print(ev.format_paper_row(result.table))

Protocol. Every prompt is rendered exactly as in training (system prompt, `<think>`/`\\boxed{}` format
instruction, images first or at `<image>` placeholders; `data/prompts.py`) and sampled k times; each
response is scored by the training reward (`rewards.score_batch`: the last `\\boxed{}` against the gold,
multiple-choice letters, numbers and math_verify), plus one evaluation convention: when the prompt lists
options (`A. ...` lines, from an options column or in the question), an option's letter and its text are
the same answer (`EvalConfig.match_option_text`; docs/method.md §5). avg@k = mean over prompts of the mean accuracy of
its k samples (every prompt has exactly k samples, so it is also the mean over all samples); pass@k =
share of prompts with at least one correct sample. `--greedy` is avg@1 at temperature 0. The table's
`average` row is the unweighted mean over benchmarks, as in the paper's tables.

Reproducibility. Sample s of the prompt in row r of the benchmark's file f uses the stream
fold_in(fold_in(key_b, id(f, r)), s), key_b = fold_in(key(seed), crc32(benchmark name)) (`rollout.py`),
id(f, r) = `reader.row_stream_ids`, the training run's scheme (a hash of f's content fingerprint and r):
results do not depend on the batch size, the order rows are read in, the device count, the other
benchmarks of the call, or the file's name or folder.

Multi-host. Run the same command on every host (`scripts/eval.py --coordinator_address ...`, or a TPU
pod's workers): the mesh spans every host's devices, each host reads every `process_count`-th row of each
benchmark and samples its share (a generation call is a collective: a host out of rows takes part with
an all-invalid batch), and the per-sample records are gathered, so every host returns the whole result
(host 0 writes it). The streams above make it the result of one host. `batch_size` is the prompts of
one generation call over all hosts.

Layouts. A checkpoint is a trainer WORKDIR (latest finished step), `WORKDIR/checkpoints/<step>`, its
`params` item, an HF folder or a converted folder (`scripts/convert_hf.py`); the processor comes from
the folder holding the config. A benchmark is a parquet, JSON-lines or JSON-array file read by
`data/reader.py`; when a column name is not given, the layout is detected from the columns
(`data/layouts.py`: EasyR1, MMMU-Pro's numbered image columns, sharegpt `messages`, or the first present
of `QUESTION_KEYS`, `ANSWER_KEYS` and `IMAGE_KEYS`). A file with no image column is refused unless the
image column is given as `none` (text-only on purpose), and so is a file whose image-like columns the
layout would not read: a benchmark is never scored without its images. The paper's benchmarks by name:
`paper_benchmarks(DIR)` reads a VPPO-Eval / PAPO-Eval folder (`dataset_info.json`) or `NAME=PATH`
items, and orders them as the paper's table (`PAPER_BENCHMARKS`). Rows the pipeline cannot use (empty
question, missing answer, a missing or undecodable image, an image placeholder without its image,
prompt over `max_prompt_length`) are counted per reason, reported as `num_skipped`, and are not part of
the accuracy. A benchmark whose files hold no row at
all is skipped with a warning (its row of the table says so in `note`; the other benchmarks of the
call run as usual), and left out of the `average` row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import time
import zlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from pgpo_jax import checkpoint as ckpt_lib
from pgpo_jax import multihost, sampler, sharding
from pgpo_jax import rewards as rewards_lib
from pgpo_jax import rollout as rollout_lib
from pgpo_jax.buckets import batch_bucket, default_length_buckets, patch_bucket, seq_bucket
from pgpo_jax.data import hf_processor as processor_lib
from pgpo_jax.data import layouts
from pgpo_jax.data import reader as reader_lib
from pgpo_jax.data.pipeline import make_prompt_iterator
from pgpo_jax.data.prompts import PromptBatch, PromptFormat
from pgpo_jax.data.reader import (
  DatasetReader,
  DatasetSpec,
  EmptyDatasetError,
  expand_paths,
  row_stream_ids,
)
from pgpo_jax.models import qwen2_5_vl as qwen

log = logging.getLogger("pgpo_jax.evaluation")

# Column names tried, in order, when a key is not given (common local benchmark layouts: EasyR1/verl
# parquet, MathVista's `query` (question + choices), HF `datasets.Image` columns, path columns).
QUESTION_KEYS = layouts.QUESTION_KEYS
ANSWER_KEYS = layouts.ANSWER_KEYS
IMAGE_KEYS = layouts.IMAGE_KEYS

# The paper's benchmarks, in its table's order (VPPO's README order, which PGPO follows; MathVerse-V,
# the vision-dependent subset, after MathVerse). Which MathVerse variant the paper's 8-column average
# holds is not stated in a form we could check: both are evaluated when given (docs/method.md §6).
PAPER_BENCHMARKS = (
  "Geo3k",
  "We-Math",
  "MMK12",
  "MathVerse",
  "MathVerse-V",
  "MathVision",
  "DynaMath",
  "LogicVista",
  "MMMU-Pro",
)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How to sample and score. Defaults are the paper's protocol (avg@8, T=1, top-p 1, 2048 tokens).

  k: samples per prompt (1 for greedy). temperature 0 = greedy. batch_size: prompts per generation
  call (rows = batch_size * k; the KV cache holds rows x (prompt + max_new_tokens) tokens).
  max_prompt_length: longer prompts (after image-token expansion) are skipped and counted.
  min_pixels / max_pixels: override the processor's image resize bounds (None: the checkpoint's).
  reward: a name registered in `rewards.BATCH_REWARD_FNS`.
  """

  k: int = 8
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 2048
  batch_size: int = 16
  max_prompt_length: int = 4096
  min_pixels: int | None = None
  max_pixels: int | None = None
  seed: int = 0
  reward: str = "pgpo_math"
  # An option's letter and its text are the same answer when the prompt lists options (`A. 12`):
  # `\boxed{12}` is right for gold `A`, `\boxed{A}` for gold `12`. False: VPPO's strict grading.
  match_option_text: bool = True

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"k must be >= 1, got {self.k}")
    if self.temperature == 0 and self.k != 1:
      raise ValueError(
        f"greedy decoding (temperature 0) gives k identical samples; use k=1, got k={self.k}"
      )
    if self.batch_size < 1 or self.max_new_tokens < 1:
      raise ValueError(
        f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}"
      )
    rollout_lib.SamplingConfig(
      self.temperature, self.top_p, self.top_k
    )  # validates the sampling values
    rewards_lib.get_batch_reward_fn(self.reward)

  @classmethod
  def greedy(cls, **kw) -> "EvalConfig":
    return cls(**{**kw, "k": 1, "temperature": 0.0})

  @property
  def sampling(self) -> rollout_lib.SamplingConfig:
    return rollout_lib.SamplingConfig(self.temperature, self.top_p, self.top_k)

  @property
  def tag(self) -> str:
    """A short name of the protocol: `greedy` or `avg8_t1.0_p1.0_n2048`."""
    if self.temperature == 0:
      return f"greedy_n{self.max_new_tokens}"
    return f"avg{self.k}_t{self.temperature:g}_p{self.top_p:g}_n{self.max_new_tokens}"


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark: a display name and the file(s) with its columns."""

  name: str
  spec: DatasetSpec


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """Where a checkpoint's pieces are. kind: "trainer" | "hf" | "orbax"; step: trainer step or None."""

  path: str  # what the user gave
  kind: str
  model_path: str  # what `qwen.from_pretrained` loads (HF folder or Orbax params item)
  config_path: str
  processor_dir: str
  step: int | None = None
  workdir: str | None = None


def _finished_steps(checkpoints_dir: str) -> list[int]:
  out = []
  for name in os.listdir(checkpoints_dir):
    if name.isdigit() and ckpt_lib.is_orbax_params_dir(
      os.path.join(checkpoints_dir, name, ckpt_lib.PARAMS_ITEM)
    ):
      out.append(int(name))
  return sorted(out)


def resolve_checkpoint(path: str | os.PathLike, processor_dir: str | None = None) -> CheckpointRef:
  """Finds the params, config and processor of a checkpoint path (see the module docstring).

  Raises FileNotFoundError naming what was looked for.
  """
  given = os.fspath(path)
  path = os.path.abspath(given)
  step, workdir = None, None
  parent = os.path.dirname(path)
  if os.path.isdir(os.path.join(path, "checkpoints")) and not os.path.exists(
    os.path.join(path, "model.safetensors")
  ):
    steps = _finished_steps(os.path.join(path, "checkpoints"))
    if not steps:
      raise FileNotFoundError(
        f"{given}: a trainer WORKDIR without a finished checkpoint in {path}/checkpoints"
      )
    step, workdir = steps[-1], path
    model_path = os.path.join(path, "checkpoints", str(step), ckpt_lib.PARAMS_ITEM)
  elif os.path.basename(path).isdigit() and os.path.basename(parent) == "checkpoints":
    step, workdir = int(os.path.basename(path)), os.path.dirname(parent)
    model_path = os.path.join(path, ckpt_lib.PARAMS_ITEM)
    if not ckpt_lib.is_orbax_params_dir(model_path):
      raise FileNotFoundError(
        f"{given}: no finished Orbax params item at {model_path} (save still running?)"
      )
  elif (
    os.path.basename(path) == ckpt_lib.PARAMS_ITEM
    and os.path.basename(parent).isdigit()
    and os.path.basename(os.path.dirname(parent)) == "checkpoints"
  ):
    step, workdir = int(os.path.basename(parent)), os.path.dirname(os.path.dirname(parent))
    model_path = path
  else:
    kind, model_path = ckpt_lib.checkpoint_layout(path)
    config_path = ckpt_lib.find_config(model_path)
    return CheckpointRef(
      given, kind, model_path, config_path, processor_dir or os.path.dirname(config_path)
    )
  config_path = ckpt_lib.find_config(model_path)
  return CheckpointRef(
    given,
    "trainer",
    model_path,
    config_path,
    processor_dir or os.path.dirname(config_path),
    step=step,
    workdir=workdir,
  )


@dataclasses.dataclass
class Policy:
  """A loaded model, split for the jitted programs, with its processor and (optional) mesh."""

  graphdef: Any
  state: Any  # nnx.State of the parameters; on `mesh` (SAMPLE_RULES) when a mesh is given
  cfg: qwen.Qwen25VLConfig
  processor: Any
  ref: CheckpointRef
  mesh: jax.sharding.Mesh | None = None

  @property
  def tokenizer(self):
    return self.processor.tokenizer

  @property
  def batch_shards(self) -> int:
    return rollout_lib.batch_shards(self.mesh, sharding.SAMPLE_RULES)

  def model(self) -> qwen.Qwen25VL:
    return nnx.merge(self.graphdef, self.state)


def parse_mesh(text: str | None) -> dict[str, int]:
  """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}; empty or None -> {} (all devices on `data`)."""
  out: dict[str, int] = {}
  for part in (text or "").split(","):
    if not part.strip():
      continue
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in sharding.MESH_AXES:
      raise ValueError(
        f"bad mesh entry {part!r}: expected NAME=SIZE with NAME in {sharding.MESH_AXES}"
      )
    try:
      out[name] = int(value)
    except ValueError:
      raise ValueError(
        f"bad mesh entry {part!r}: SIZE must be an integer (or -1 to fill)"
      ) from None
  return out


def make_eval_mesh(spec: str | Mapping[str, int] | None = None) -> jax.sharding.Mesh | None:
  """A sampling mesh: by default every device on `data` (the batch); None when it has one device."""
  axes = parse_mesh(spec) if spec is None or isinstance(spec, str) else dict(spec)
  if not axes:
    axes = {"data": -1}
  if -1 not in axes.values() and math.prod(axes.values()) != jax.device_count():
    for name in sharding.MESH_AXES:  # fill the first unnamed axis with the remaining devices
      if name not in axes:
        axes[name] = -1
        break
  mesh = sharding.make_mesh(axes.get("data", 1), axes.get("fsdp", 1), axes.get("tensor", 1))
  return mesh if mesh.size > 1 else None


def load_policy(
  ckpt: str | os.PathLike,
  *,
  dtype: str = "bfloat16",
  mesh: jax.sharding.Mesh | None = None,
  processor_dir: str | None = None,
  min_pixels: int | None = None,
  max_pixels: int | None = None,
) -> Policy:
  """Loads a checkpoint (any layout of `resolve_checkpoint`) and its processor.

  With a mesh, every parameter is written straight into its SAMPLE_RULES sharding (weights split over
  `tensor`, replicated over `data`/`fsdp`, which carry the batch). Multi-host runs need the mesh (over
  every host's devices, `make_eval_mesh`).
  """
  if jax.process_count() > 1 and mesh is None:
    raise ValueError(
      f"evaluation on {jax.process_count()} processes needs a mesh over all their devices "
      "(make_eval_mesh)"
    )
  ref = resolve_checkpoint(ckpt, processor_dir)
  cfg = qwen.Qwen25VLConfig.from_json(ref.config_path)
  shardings = None
  if (
    mesh is not None
  ):  # every parameter read straight into its sharding (never whole on one device)
    shardings = sharding.flat_shardings(
      sharding.param_shardings(qwen.abstract_model(cfg, dtype), mesh, sharding.SAMPLE_RULES)
    )
  model = qwen.from_pretrained(ref.model_path, dtype, config=cfg, shardings=shardings)
  try:
    proc = processor_lib.load_processor(
      ref.processor_dir, min_pixels=min_pixels, max_pixels=max_pixels
    )
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"{e}. The processor of {ckpt!r} was looked for in {ref.processor_dir}; pass "
      "processor_dir (--processor) to take it from another folder"
    ) from None
  graphdef, state = nnx.split(model)
  log.info(
    "loaded %s checkpoint %s (step %s) from %s", ref.kind, ref.path, ref.step, ref.model_path
  )
  return Policy(graphdef, state, cfg, proc, ref, mesh)


# ------------------------------------------------------------------------------------------------
# Benchmarks
# ------------------------------------------------------------------------------------------------
def file_columns(path: str) -> list[str]:
  """Top-level column names of a parquet, JSON-lines or JSON-array file (`reader.column_names`)."""
  return reader_lib.column_names(path)


def _split_named(item: str) -> tuple[str | None, str]:
  """'name=path' -> (name, path); a plain path -> (None, path). A '=' inside the path is kept."""
  name, sep, rest = item.partition("=")
  if sep and name and os.sep not in name and not os.path.exists(item):
    return name, rest
  return None, item


def _default_names(paths: Sequence[str]) -> list[str]:
  """File stems; where stems collide (`a/test.parquet`, `b/test.parquet`), parent folder + stem."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  out = []
  for p, s in zip(paths, stems):
    if stems.count(s) > 1:
      s = f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{s}"
    out.append(s)
  return out


_DATA_SUFFIXES = (".parquet", ".pq", ".jsonl", ".json", ".ndjson")


def _data_files(pattern: str) -> list[str]:
  """The files of a benchmark item: a file, a glob, or a folder (its data files, recursively: an HF
  download such as `MMMU_Pro/standard (10 options)/test-*.parquet`)."""
  if os.path.isdir(pattern):
    files = sorted(
      os.path.join(d, f)
      for d, _, names in os.walk(pattern)
      for f in names
      if f.lower().endswith(_DATA_SUFFIXES) and not f.startswith(".")
    )
    if not files:
      raise FileNotFoundError(f"benchmark folder {pattern!r} holds no {_DATA_SUFFIXES} file")
    return files
  return expand_paths([pattern])


def benchmark_spec(
  files: Sequence[str],
  *,
  question_key: str | None = None,
  answer_key: str | None = None,
  image_key: str | Sequence[str] | None = None,
  image_dir: str | Sequence[str] | None = None,
  options_key: str | None = None,
  name: str = "benchmark",
) -> DatasetSpec:
  """The `DatasetSpec` of a benchmark's files: given columns, the rest detected from the first file
  with rows (`layouts.detect_columns`). `image_key="none"` evaluates text-only on purpose; otherwise
  a file without images is refused, and every row must have its image(s) (else `missing_image`)."""
  cols = next((c for c in map(file_columns, files) if c), [])  # empty JSON lines have none
  if not cols:  # no rows to detect columns from: `evaluate` reports the benchmark as empty
    return DatasetSpec(tuple(files), question_key, answer_key or "answer")
  text_only = isinstance(image_key, str) and image_key.lower() in ("", "none")
  if isinstance(image_key, str) and "," in image_key:
    image_key = tuple(k.strip() for k in image_key.split(","))
  found = layouts.detect_columns(
    cols,
    where=f"benchmark {name} ({files[0]})",
    question_key=question_key,
    answer_key=answer_key,
    image_key=None if text_only else image_key,
  )
  if found.image_key is None and not text_only:
    raise ValueError(
      f"benchmark {name} ({files[0]}): no image column among {list(IMAGE_KEYS)} or image_1 ...; "
      f"columns are {sorted(cols)}. Pass --image_key=COLUMN, or --image_key=none to evaluate it "
      "text-only on purpose."
    )
  return DatasetSpec(
    tuple(files),
    question_key=found.question_key,
    answer_key=found.answer_key,
    image_key=None if text_only else found.image_key,
    image_dir=image_dir,
    require_images=not text_only,
    options_key=options_key or found.options_key,
  )


def resolve_benchmarks(
  data: str | Sequence[str],
  *,
  question_key: str | None = None,
  answer_key: str | None = None,
  image_key: str | None = None,
  image_dir: str | None = None,
) -> list[Benchmark]:
  """Benchmarks from 'FILE[,FILE...]' or a list; entries may be 'name=FILE' (globs allowed: one
  benchmark per pattern; a folder: its data files). Columns are detected per benchmark unless given
  (`benchmark_spec`); errors name the file."""
  items = [s.strip() for s in data.split(",")] if isinstance(data, str) else [str(s) for s in data]
  items = [s for s in items if s]
  if not items:
    raise ValueError("no benchmark files given")
  named = [_split_named(s) for s in items]
  names = _default_names([p for _, p in named])
  out, seen = [], set()
  for (name, pattern), default in zip(named, names):
    name = name or default
    if name in seen:
      raise ValueError(f"two benchmarks are named {name!r}; name them explicitly as NAME=FILE")
    seen.add(name)
    spec = benchmark_spec(
      _data_files(pattern),
      question_key=question_key,
      answer_key=answer_key,
      image_key=image_key,
      image_dir=image_dir,
      name=name,
    )
    out.append(Benchmark(name, spec))
  return out


# ------------------------------------------------------------------------------------------------
# The paper's benchmarks by name
# ------------------------------------------------------------------------------------------------
def paper_name(name: str) -> str | None:
  """The `PAPER_BENCHMARKS` entry a benchmark or file name stands for (`hiyouga_geometry3k` ->
  Geo3k, `AI4Math_MathVerse_vision_dependent` -> MathVerse-V, `MMMU_MMMU_Pro` -> MMMU-Pro, ...), or
  None for another benchmark (MathVista, CLEVR counting, ...)."""
  n = re.sub(r"[^a-z0-9]", "", name.lower())
  if "geometry3k" in n or "geo3k" in n:
    return "Geo3k"
  if "wemath" in n:
    return "We-Math"
  if "mmk12" in n:
    return "MMK12"
  if "mathverse" in n:
    vision = "visiondependent" in n or "mathversevision" in n or n.endswith("mathversev")
    return "MathVerse-V" if vision else "MathVerse"
  for key, canon in (
    ("mathvision", "MathVision"),
    ("dynamath", "DynaMath"),
    ("logicvista", "LogicVista"),
    ("mmmupro", "MMMU-Pro"),
  ):
    if key in n:
      return canon
  return None


def find_dataset_info(root: str) -> str | None:
  """`root/dataset_info.json` or `root/data/dataset_info.json` (VPPO-Eval's `data` folder, or the
  PAPO-Eval checkout it goes into); None when neither exists."""
  for path in (
    os.path.join(root, "dataset_info.json"),
    os.path.join(root, "data", "dataset_info.json"),
  ):
    if os.path.isfile(path):
      return path
  return None


def sharegpt_benchmarks(info_path: str) -> list[Benchmark]:
  """The paper's benchmarks listed in a LLaMA-Factory `dataset_info.json` (VPPO-Eval, PAPO-Eval).

  Each entry `{"file_name": ..., "formatting": "sharegpt", "columns": {"messages": ..., "images":
  ...}}` is a JSON file of chat rows (user turn: question with `<image>` placeholders; assistant turn:
  the answer) whose relative image paths are resolved against the file's folder, the
  `dataset_info.json` folder and its parent, in that order (LLaMA-Factory's `data/` folder and the
  checkout around it). Entries that are not among `PAPER_BENCHMARKS` are skipped (logged), as are
  entries without a local `file_name`. Two entries for one paper benchmark raise ValueError.
  """
  with open(info_path, encoding="utf-8") as f:
    try:
      info = json.load(f)
    except ValueError as e:
      raise ValueError(f"{info_path}: not valid JSON ({e})") from None
  if not isinstance(info, dict):
    raise ValueError(f"{info_path}: expected a JSON object of datasets, got {type(info).__name__}")
  base = os.path.dirname(os.path.abspath(info_path))
  found: dict[str, tuple[str, Benchmark]] = {}
  others = []
  for entry, desc in info.items():
    canon = paper_name(entry)
    if canon is None or not isinstance(desc, dict) or "file_name" not in desc:
      others.append(entry)
      continue
    if desc.get("formatting", "alpaca") != "sharegpt":
      raise ValueError(
        f"{info_path}: entry {entry!r} has formatting {desc.get('formatting', 'alpaca')!r}; the "
        "benchmarks are read in the sharegpt format"
      )
    if canon in found:
      raise ValueError(
        f"{info_path}: entries {found[canon][0]!r} and {entry!r} are both {canon}; evaluate them "
        "with --benchmarks=NAME=FILE,..."
      )
    path = os.path.join(base, desc["file_name"])
    columns = desc.get("columns") or {}
    spec = benchmark_spec(
      _data_files(path),
      question_key=columns.get("messages"),
      answer_key=columns.get("messages"),
      image_key=columns.get("images"),
      image_dir=(os.path.dirname(os.path.abspath(path)), base, os.path.dirname(base)),
      name=canon,
    )
    found[canon] = (entry, Benchmark(canon, spec))
  if others:
    log.info("%s: not among the paper's benchmarks, not evaluated: %s", info_path, others)
  return [b for _, b in found.values()]


def paper_benchmarks(
  source: str | Sequence[str], *, image_dir: str | None = None
) -> list[Benchmark]:
  """The paper's benchmarks (`PAPER_BENCHMARKS`) named by the paper, in its table's order.

  source: a folder holding `dataset_info.json` (VPPO-Eval's `data` folder, or the folder above it),
  or `NAME=PATH` items (comma-separated, or a list) whose NAME stands for a paper benchmark
  (`paper_name`: `mmmu_pro=MMMU_Pro/standard (10 options)` is MMMU-Pro) and PATH is a file, glob or
  folder of any layout `layouts.detect_columns` knows. Raises ValueError for an unknown NAME, a
  benchmark named twice, or a folder without `dataset_info.json`.
  """
  if isinstance(source, str) and os.path.isdir(source):
    info = find_dataset_info(source)
    if info is None:
      raise ValueError(
        f"{source}: no dataset_info.json in it or in {os.path.join(source, 'data')}; pass a "
        "VPPO-Eval data folder or NAME=PATH items"
      )
    benches = sharegpt_benchmarks(info)
  else:
    items = [s.strip() for s in source.split(",")] if isinstance(source, str) else list(source)
    benches, seen = [], {}
    for item in (s for s in items if s):
      name, sep, path = item.partition("=")
      canon = paper_name(name) if sep else None
      if canon is None:
        raise ValueError(
          f"--benchmarks item {item!r}: expected NAME=PATH with NAME one of {list(PAPER_BENCHMARKS)}"
        )
      if canon in seen:
        raise ValueError(f"--benchmarks: {canon} is given twice ({seen[canon]!r} and {item!r})")
      seen[canon] = item
      spec = benchmark_spec(_data_files(path), image_dir=image_dir, name=canon)
      benches.append(Benchmark(canon, spec))
  if not benches:
    raise ValueError(f"{source}: none of the paper's benchmarks {list(PAPER_BENCHMARKS)} found")
  return sorted(benches, key=lambda b: PAPER_BENCHMARKS.index(b.name))


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Generations:
  """Samples of one PromptBatch's valid prompts. R = valid prompts * num_samples, prompt-major.

  tokens [R, N] int32 and mask [R, N] bool (stop token included), truncated [R] bool; `prompts` are the
  indices into the batch of the valid prompts, in row order.
  """

  tokens: np.ndarray
  mask: np.ndarray
  truncated: np.ndarray
  prompts: list[int]
  num_samples: int


def generate_batch(
  policy: Policy,
  pb: PromptBatch,
  key: jax.Array,
  *,
  num_samples: int,
  max_new_tokens: int,
  sampling: rollout_lib.SamplingConfig,
  stream_ids: Sequence[int] | None = None,
) -> Generations:
  """Samples `num_samples` responses for every valid prompt of `pb`; rows of filler prompts are dropped.

  stream_ids [B]: RNG stream of each prompt (default: `reader.row_stream_ids` of its data file and
  row, as in training), so a prompt's samples do not depend on its batch. The batch is padded to a
  multiple of the mesh's batch shards. Multi-host: every host calls this with its own batch of
  equally many prompts (a collective) and gets its own rows.
  """
  n = jax.process_count()
  shards = max(policy.batch_shards // n, 1)  # this host's share of the batch shards
  ids = np.asarray(
    row_stream_ids(pb.sources, pb.row_indices) if stream_ids is None else stream_ids, np.int64
  )
  extent = {}
  if (
    n > 1
  ):  # the hosts' inputs must have one shape: pad to the longest prompt / most patches of any host
    longest, patches = (
      int(x)
      for x in multihost.max_over_hosts(
        np.array([pb.attention_mask.sum(1).max(), _max_row_patches(pb)], np.int64)
      )
    )
    extent = dict(
      prompt_length=seq_bucket(longest), num_patches=patch_bucket(patches) if patches else None
    )
  inputs = rollout_lib.prepare_inputs(
    policy.cfg,
    pb.input_ids,
    pb.attention_mask,
    pb.pixel_values,
    pb.image_grid_thw,
    position_ids=pb.position_ids,
    prompt_ids=ids,
    batch_multiple=shards,
    batch_size=batch_bucket(pb.batch_size, shards),
    **extent,
  )
  out = sampler.rollout(
    policy.graphdef,
    policy.state,
    inputs,
    key,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    num_samples=num_samples,
    pad_token_id=policy.cfg.pad_token_id,
    mesh=policy.mesh,
  )
  if n > 1:
    out = multihost.to_local(out, rollout_lib.logical_axes(out), policy.mesh, sharding.SAMPLE_RULES)
  tokens, mask, trunc = (np.asarray(x) for x in (out.tokens, out.mask, out.truncated))
  prompts = [b for b in range(pb.batch_size) if pb.prompt_valid[b]]
  rows = np.array([b * num_samples + s for b in prompts for s in range(num_samples)], np.int64)
  return Generations(tokens[rows], mask[rows], trunc[rows], prompts, num_samples)


def _max_row_patches(pb: PromptBatch) -> int:
  """The most image patches of one prompt of the batch (0 without images)."""
  sizes = (
    qwen.rope.valid_grids(pb.image_grid_thw).prod(axis=1)
    if pb.image_grid_thw is not None
    else np.zeros(0)
  )
  csum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  ends = np.cumsum(pb.num_images)
  return int((csum[ends] - csum[ends - pb.num_images]).max(initial=0))


def host_batches(it) -> Iterable[PromptBatch]:
  """This host's batches of `it`, then copies of its last one with every prompt invalid until every
  host is done: generation is a collective, so all hosts call it equally often."""
  last = None
  while True:
    pb = next(it, None)
    if not int(multihost.max_over_hosts(np.int64(pb is not None))):
      return
    if pb is None:
      if last is None:
        raise ValueError(
          f"host {jax.process_index()} has no usable row of this benchmark while other hosts do; "
          f"evaluate it with fewer processes than its {jax.process_count()}"
        )
      pb = dataclasses.replace(last, prompt_valid=np.zeros_like(last.prompt_valid))
    last = pb
    yield pb


def benchmark_key(seed: int, name: str) -> jax.Array:
  """The RNG key of a benchmark: independent of the other benchmarks evaluated with it."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def prompt_iterator(
  spec: DatasetSpec,
  processor,
  cfg: EvalConfig | Any,
  *,
  seed: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
  batch_size: int | None = None,
):
  """One pass over the rows of `spec` as `PromptBatch`es of `batch_size` (default `cfg.batch_size`):
  all of them, or every `shard_count`-th from `shard_index` (a host's share)."""
  return make_prompt_iterator(
    spec,
    processor,
    batch_size=batch_size or cfg.batch_size,
    seed=seed,
    num_epochs=1,
    max_prompt_length=cfg.max_prompt_length,
    shard_index=shard_index,
    shard_count=shard_count,
    even_shards=False,
    length_buckets=default_length_buckets(cfg.max_prompt_length),
    prompt_format=PromptFormat(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels),
  )


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalResult:
  """table: one row per benchmark plus `average`; samples: one dict per (prompt, sample), sorted by
  benchmark, file, row, sample; info: checkpoint, protocol, skips, timings."""

  table: list[dict[str, Any]]
  samples: list[dict[str, Any]]
  info: dict[str, Any]


EMPTY_NOTE = "skipped: no rows"  # the `note` of a benchmark whose files hold no row

TABLE_COLUMNS = (
  "benchmark",
  "accuracy",
  "pass_at_k",
  "format",
  "num_prompts",
  "k",
  "num_skipped",
  "mean_response_tokens",
  "truncated",
  "accuracy_std_over_k",
  "seconds",
  "note",  # why a benchmark has no accuracy (`EMPTY_NOTE`); empty otherwise
)


def summarize(samples: Sequence[Mapping[str, Any]], k: int) -> dict[str, Any]:
  """Per-benchmark metrics from its per-sample records (each prompt has exactly k samples).

  accuracy = avg@k (mean over prompts of the per-prompt mean), pass_at_k = share of prompts with a
  correct sample, accuracy_std_over_k = std over the k sample slots of the slot accuracy (how much a
  single-sample evaluation would move), format / truncated = sample shares.
  """
  by_prompt: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
  for s in samples:
    by_prompt.setdefault((s["source"], s["row_index"]), []).append(s)
  n = len(by_prompt)
  if n == 0:
    return {
      "accuracy": float("nan"),
      "pass_at_k": float("nan"),
      "format": float("nan"),
      "num_prompts": 0,
      "k": k,
      "mean_response_tokens": float("nan"),
      "truncated": float("nan"),
      "accuracy_std_over_k": float("nan"),
    }
  acc_PxK = np.array(
    [[x["accuracy"] for x in sorted(v, key=lambda x: x["sample"])] for v in by_prompt.values()],
    np.float64,
  )
  if acc_PxK.shape != (n, k):
    raise ValueError(f"expected {k} samples per prompt, got an array of shape {acc_PxK.shape}")
  return {
    "accuracy": float(acc_PxK.mean(axis=1).mean()),
    "pass_at_k": float((acc_PxK > 0).any(axis=1).mean()),
    "format": float(np.mean([s["format"] for s in samples])),
    "num_prompts": n,
    "k": k,
    "mean_response_tokens": float(np.mean([s["num_tokens"] for s in samples])),
    "truncated": float(np.mean([s["truncated"] for s in samples])),
    "accuracy_std_over_k": float(acc_PxK.mean(axis=0).std()) if k > 1 else 0.0,
  }


def evaluate(
  policy: Policy,
  benchmarks: Sequence[Benchmark],
  cfg: EvalConfig = EvalConfig(),
  *,
  progress: bool = True,
) -> EvalResult:
  """Samples, scores and summarises every benchmark (see the module docstring for the protocol).
  Multi-host: call on every host; each gets the whole result."""
  from tqdm import tqdm

  reward_fn = rewards_lib.get_batch_reward_fn(cfg.reward)
  tok = policy.tokenizer
  table, all_samples, skips = [], [], {}
  t_all = time.perf_counter()
  host, hosts = jax.process_index(), jax.process_count()
  for bench in benchmarks:
    t0 = time.perf_counter()
    try:
      reader = DatasetReader(bench.spec)
    except EmptyDatasetError as e:  # the same on every host: they all skip it
      log.warning("benchmark %s: skipped: %s", bench.name, e)
      skips[bench.name] = {"rows_read": 0, "prompts": 0, "skipped": {}}
      table.append(
        {
          "benchmark": bench.name,
          **summarize([], cfg.k),
          "num_skipped": 0,
          "seconds": time.perf_counter() - t0,
          "note": EMPTY_NOTE,
        }
      )
      continue
    total = len(range(host, len(reader), hosts))  # this host's rows
    del reader  # the iterator reads the files again; do not hold two copies of the image column
    it = prompt_iterator(
      bench.spec,
      policy.processor,
      cfg,
      seed=cfg.seed,
      shard_index=host,
      shard_count=hosts,
      batch_size=-(-cfg.batch_size // hosts),
    )
    key = benchmark_key(cfg.seed, bench.name)
    samples: list[dict[str, Any]] = []
    gen_tokens, correct = 0, 0.0
    progress_here = progress and host == 0
    with tqdm(
      total=total, desc=bench.name, unit="prompt", disable=not progress_here, dynamic_ncols=True
    ) as bar:
      read = 0
      for pb in host_batches(it):
        gen = generate_batch(
          policy,
          pb,
          key,
          num_samples=cfg.k,
          max_new_tokens=cfg.max_new_tokens,
          sampling=cfg.sampling,
        )
        texts = [tok.decode(t[m], skip_special_tokens=True) for t, m in zip(gen.tokens, gen.mask)]
        answers = [pb.answers[b] for b in gen.prompts for _ in range(cfg.k)]
        scores = score_samples(
          reward_fn, texts, answers, prompt_choices(pb, gen.prompts, cfg), cfg.k
        )
        for r, (text, sc) in enumerate(zip(texts, scores)):
          b, s = gen.prompts[r // cfg.k], r % cfg.k
          n_tok = int(gen.mask[r].sum())
          gen_tokens += n_tok
          correct += float(sc["accuracy"])
          samples.append(
            {
              "benchmark": bench.name,
              "source": pb.sources[b],
              "row_index": int(pb.row_indices[b]),
              "sample": s,
              "question": pb.questions[b],
              "answer": pb.answers[b],
              "response": text,
              "prediction": rewards_lib.extract_boxed(rewards_lib.strip_stop_tokens(text)),
              "accuracy": float(sc["accuracy"]),
              "format": float(sc["format"]),
              "overall": float(sc["overall"]),
              "num_tokens": n_tok,
              "truncated": bool(gen.truncated[r]),
            }
          )
        bar.update(it.stats.rows_read - read)
        read = it.stats.rows_read
        bar.set_postfix(acc=f"{correct / len(samples):.3f}" if samples else "-")
      bar.update(total - read)
    stats = _sum_stats(multihost.allgather_json(it.stats.as_dict()))
    skips[bench.name] = stats
    if stats["skipped_total"]:
      log.warning(
        "benchmark %s: %d of %d rows skipped (%s); they are not part of the accuracy",
        bench.name,
        stats["skipped_total"],
        stats["rows_read"],
        {r: n for r, n in stats["skipped"].items() if n},
      )
    del stats["skipped_total"]
    if hosts > 1:  # every host's records (JSON-safe values), and the token count over hosts
      samples = [x for part in multihost.allgather_json(samples) for x in part]
      gen_tokens = int(multihost.sum_over_hosts(np.int64(gen_tokens)))
    samples.sort(key=lambda x: (x["source"], x["row_index"], x["sample"]))
    seconds = time.perf_counter() - t0
    table.append(
      {
        "benchmark": bench.name,
        **summarize(samples, cfg.k),
        "num_skipped": sum(stats["skipped"].values()),
        "seconds": seconds,
        "generated_tokens_per_s": gen_tokens / max(seconds, 1e-9),
      }
    )
    all_samples.extend(samples)
  table.append(average_row(table))
  info = {
    "checkpoint": dataclasses.asdict(policy.ref),
    "config": dataclasses.asdict(cfg),
    "protocol": cfg.tag,
    "benchmarks": {
      b.name: {
        "files": list(b.spec.paths),
        "question_key": b.spec.question_key,
        "answer_key": b.spec.answer_key,
        "image_key": b.spec.image_key,
        "options_key": b.spec.options_key,
      }
      for b in benchmarks
    },
    "rows": skips,
    "devices": [str(d) for d in jax.devices()],
    "mesh": None if policy.mesh is None else dict(policy.mesh.shape),
    "seconds": time.perf_counter() - t_all,
  }
  return EvalResult(table, all_samples, info)


def prompt_choices(
  pb: PromptBatch, prompts: Sequence[int], cfg: EvalConfig
) -> list[tuple[str, ...]] | None:
  """The option texts each of `prompts` lists (`layouts.options_from_text` of the question the model
  saw); None when `cfg.match_option_text` is off."""
  if not cfg.match_option_text:
    return None
  return [layouts.options_from_text(pb.questions[b]) for b in prompts]


def score_samples(
  reward_fn,
  texts: Sequence[str],
  answers: Sequence[str],
  choices: Sequence[tuple[str, ...]] | None,
  k: int,
) -> list[dict[str, float]]:
  """Scores of prompt-major samples (k per prompt) against their golds; `choices` has one entry per
  prompt (`prompt_choices`), or is None."""
  if choices is None:
    return reward_fn(texts, answers)
  return reward_fn(texts, answers, choices=[c for c in choices for _ in range(k)])


def _sum_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Hosts' `SkipStats.as_dict()` summed (+ "skipped_total")."""
  out = {
    "rows_read": sum(p["rows_read"] for p in parts),
    "prompts": sum(p["prompts"] for p in parts),
    "skipped": {},
  }
  for p in parts:
    for r, n in p["skipped"].items():
      out["skipped"][r] = out["skipped"].get(r, 0) + n
  out["skipped_total"] = sum(out["skipped"].values())
  return out


def average_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The unweighted mean over benchmarks of the rate columns; counts and times are summed."""
  rows = [r for r in rows if r["benchmark"] != "average"]
  out: dict[str, Any] = {"benchmark": "average"}
  for col in (
    "accuracy",
    "pass_at_k",
    "format",
    "mean_response_tokens",
    "truncated",
    "accuracy_std_over_k",
  ):
    vals = [r[col] for r in rows if r.get(col) is not None and not math.isnan(r[col])]
    out[col] = float(np.mean(vals)) if vals else float("nan")
  for col in ("num_prompts", "num_skipped", "seconds"):
    out[col] = sum(r.get(col, 0) for r in rows)
  out["k"] = rows[0]["k"] if rows else None
  return out


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A fixed-width text table; rates in percent."""
  heads = (
    "benchmark",
    "acc %",
    "pass@k %",
    "format %",
    "prompts",
    "k",
    "skipped",
    "tokens",
    "trunc %",
  )
  notes = any(r.get("note") for r in rows)
  if notes:
    heads += ("note",)
  lines = []
  for r in rows:
    pct = lambda v: (
      "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"
    )  # noqa: E731
    lines.append(
      (
        str(r["benchmark"]),
        pct(r["accuracy"]),
        pct(r["pass_at_k"]),
        pct(r["format"]),
        str(r["num_prompts"]),
        str(r["k"]),
        str(r["num_skipped"]),
        "-" if math.isnan(r["mean_response_tokens"]) else f"{r['mean_response_tokens']:.0f}",
        pct(r["truncated"]),
      )
      + ((str(r.get("note") or ""),) if notes else ())
    )
  widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(heads)]
  fmt = lambda cells: "  ".join(
    c.ljust(w) if i == 0 or heads[i] == "note" else c.rjust(w)  # noqa: E731
    for i, (c, w) in enumerate(zip(cells, widths))
  )
  sep = "  ".join("-" * w for w in widths)
  body = [fmt(l) for l in lines]
  if len(body) > 1:
    body.insert(len(body) - 1, sep)  # above the average row
  return "\n".join([fmt(heads), sep, *body])


def format_paper_row(rows: Sequence[Mapping[str, Any]]) -> str:
  """The accuracies as the paper's table has them: one column per benchmark (in the order of the
  rows: `paper_benchmarks` gives `PAPER_BENCHMARKS` order), then `Avg`, in percent."""
  cells = [(str(r["benchmark"]), r["accuracy"]) for r in rows if r["benchmark"] != "average"]
  avg = next((r["accuracy"] for r in rows if r["benchmark"] == "average"), float("nan"))
  cells.append(("Avg", avg))
  pct = lambda v: "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"
  widths = [max(len(n), len(pct(v))) for n, v in cells]
  head = "  ".join(n.rjust(w) for (n, _), w in zip(cells, widths))
  return head + "\n" + "  ".join(pct(v).rjust(w) for (_, v), w in zip(cells, widths))


def json_safe(x):
  """A copy of `x` (nested dicts/lists) with non-finite floats as None, for strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  return x


def write_results(result: EvalResult, out_dir: str | os.PathLike) -> dict[str, str]:
  """Writes results.json (table + info), results.csv (table) and generations.jsonl (per sample)."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths = {
    k: os.path.join(out_dir, f)
    for k, f in (
      ("json", "results.json"),
      ("csv", "results.csv"),
      ("generations", "generations.jsonl"),
    )
  }
  with open(paths["json"], "w") as f:
    json.dump(json_safe({"table": result.table, **result.info}), f, indent=2)
  cols = list(TABLE_COLUMNS) + sorted({k for r in result.table for k in r} - set(TABLE_COLUMNS))
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in result.table:
      w.writerow({k: r.get(k, "") for k in cols})
  with open(paths["generations"], "w", encoding="utf-8") as f:
    for s in result.samples:
      f.write(json.dumps(s, ensure_ascii=False) + "\n")
  return paths


def default_out_dir(ref: CheckpointRef, cfg: EvalConfig) -> str:
  """WORKDIR/eval/step<N>_<protocol> for trainer checkpoints, else eval/<folder name>_<protocol>."""
  if ref.workdir is not None:
    return os.path.join(ref.workdir, "eval", f"step{ref.step}_{cfg.tag}")
  name = os.path.basename(os.path.normpath(ref.path)) or "model"
  return os.path.join("eval", f"{name}_{cfg.tag}")


def read_generations(path: str | os.PathLike) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def iter_prompts(
  samples: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str, int], list[Mapping[str, Any]]]:
  """Groups per-sample records by (benchmark, source, row)."""
  out: dict[tuple[str, str, int], list[Mapping[str, Any]]] = {}
  for s in samples:
    out.setdefault((s["benchmark"], s["source"], s["row_index"]), []).append(s)
  return out
