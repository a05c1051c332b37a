"""Random-access reader for local parquet, JSON-lines and JSON-array datasets.

A dataset is one or more files holding a question column, an answer column, (optionally) image
columns and (optionally) an options column; `data/layouts.py` lists the layouts of the paper's data
(EasyR1 / ViRL39K, MMMU-Pro, sharegpt / VPPO-Eval) and the row conventions they need (`<image k>`
placeholders, option lines, chat-message answers). The files are read with pyarrow when the reader
is built, so every file-level problem (missing file, unreadable file, missing column) raises before
training starts, with the file and the column in the message. Row-level problems (empty question, null answer, a NaN or
infinite number as the answer, missing or corrupt image, a JSON-lines line that is not a JSON
object, ...) never raise: `DatasetReader.load` returns a `SkippedRow` naming the reason, and the
pipeline counts it in a `SkipStats` and logs file and row.

Rows are numbered from 0 within each file, in every format: in JSON lines, row k is the k-th
non-blank line (blank lines are not rows); skip messages of JSON lines also give the 1-based line. A
`.json` file whose first character is `[` is one JSON array of row objects (LLaMA-Factory's format,
VPPO-Eval); an element that is not an object is a malformed row.

Supported image encodings, per row, in every format (a single value or a list of them):
- raw bytes (parquet `binary`);
- `{"bytes": ..., "path": ...}` dicts (HF `datasets.Image` layout; `bytes` wins when both are set;
  in JSON, `bytes` is base64 text);
- a path string, absolute or relative (`./` allowed) to the first of the `DatasetSpec.image_dir`
  folders holding it (default: the data file's folder);
- a `data:image/...;base64,` URI.

Tables are held in memory (only the columns the spec needs); for ViRL39K-sized sets that is a few
GB of host RAM per process.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from PIL import Image

from pgpo_jax.data import layouts

log = logging.getLogger(__name__)

# Question columns tried, in order, when `DatasetSpec.question_key` is None.
DEFAULT_QUESTION_KEYS = ("problem", "prompt", "question")

# Reasons a row is skipped. The pipeline reports a count for each (zero included).
EMPTY_QUESTION = "empty_question"
MISSING_ANSWER = "missing_answer"
MISSING_IMAGE = "missing_image"  # the row has no image although the spec requires one
MISSING_IMAGE_FILE = "missing_image_file"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_PLACEHOLDER_MISMATCH = "image_placeholder_mismatch"  # `<image>` count != image count
PROMPT_TOO_LONG = "prompt_too_long"
PROCESSOR_ERROR = "processor_error"
MALFORMED_ROW = "malformed_row"  # a JSON-lines line that does not parse as one JSON object
# A numeric answer cell holding NaN or ±inf (a float column's missing-value marker, an overflow):
# as text ('nan', 'inf') it would be a gold answer that `\boxed{nan}` matches.
NONFINITE_ANSWER = "nonfinite_answer"
SKIP_REASONS = (
  EMPTY_QUESTION,
  MISSING_ANSWER,
  NONFINITE_ANSWER,
  MISSING_IMAGE,
  MISSING_IMAGE_FILE,
  CORRUPT_IMAGE,
  IMAGE_PLACEHOLDER_MISMATCH,
  PROMPT_TOO_LONG,
  PROCESSOR_ERROR,
  MALFORMED_ROW,
)

_PARQUET_SUFFIXES = (".parquet", ".pq")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where the data is and which columns hold what.

  Attributes:
    paths: data files (`.parquet`, `.jsonl`/`.json`/`.ndjson`) or glob patterns; read in order.
    question_key: question column; None picks the first of `DEFAULT_QUESTION_KEYS` present in each
      file. A verl-style `prompt` column holding chat messages is accepted (its user turns are used).
    answer_key: answer column; a dotted key (`reward_model.ground_truth`) reaches into a struct. A
      chat-message column (sharegpt `messages`) gives its last assistant turn.
    image_key: image column; a tuple of columns for one image per column (MMMU's `image_1` ...
      `image_7`: image k of a row is column k, for `<image k>` placeholders); None: text-only.
    image_dir: base folder(s) for relative image paths, tried in order (the first holding the file
      wins); default: the folder of the data file.
    options_key: answer options column (a list, or a string holding one); its options are appended
      to the question as `A. ...` lines (`layouts.with_options`). None: no options.
    require_images: skip rows without any image (`missing_image`); PGPO's blind pass needs one.
  """

  paths: Sequence[str] | str
  question_key: str | None = None
  answer_key: str = "answer"
  image_key: str | tuple[str, ...] | None = "images"
  image_dir: str | tuple[str, ...] | None = None
  require_images: bool = True
  options_key: str | None = None

  def __post_init__(self):
    paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else self.paths
    object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
    if not self.paths:
      raise ValueError("DatasetSpec.paths is empty")
    if isinstance(self.image_key, (list, tuple)):
      if not self.image_key:
        raise ValueError("DatasetSpec.image_key is an empty tuple; use None for text-only data")
      object.__setattr__(self, "image_key", tuple(self.image_key))
    if isinstance(self.image_dir, (list, tuple)):
      object.__setattr__(self, "image_dir", tuple(os.fspath(d) for d in self.image_dir))

  @property
  def image_keys(self) -> tuple[str, ...]:
    """The image columns, as a tuple (empty for text-only data)."""
    if self.image_key is None:
      return ()
    return (self.image_key,) if isinstance(self.image_key, str) else self.image_key


@dataclasses.dataclass(frozen=True)
class RawRow:
  """One readable row: the question, its answer and the decoded RGB images, in order."""

  question: str
  answer: str
  images: tuple[Image.Image, ...]
  source: str  # data file
  row_index: int  # row within `source`


@dataclasses.dataclass(frozen=True)
class SkippedRow:
  """A row that cannot be used, and why. Flows through the pipeline in place of an example."""

  reason: str  # one of SKIP_REASONS
  source: str
  row_index: int
  detail: str = ""


class EmptyDatasetError(ValueError):
  """Every file of a dataset has no rows (the message names them)."""


class RowError(Exception):
  """Raised inside row processing; turned into a `SkippedRow` with `reason`."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


class SkipStats:
  """Counts of skipped rows by reason, plus rows read and prompts emitted.

  Lives in the (single-threaded) batching iterator, so counts are exact for what was consumed and
  are saved in the iterator state.
  """

  # Log the first few skips of each reason at WARNING, the rest at DEBUG.
  _WARN_PER_REASON = 20

  def __init__(self, counts: Mapping[str, int] | None = None, rows_read: int = 0, prompts: int = 0):
    self.counts: dict[str, int] = {r: 0 for r in SKIP_REASONS}
    self.counts.update(counts or {})
    self.rows_read = rows_read
    self.prompts = prompts

  def add_skip(self, row: SkippedRow) -> None:
    self.rows_read += 1
    n = self.counts.get(row.reason, 0) + 1
    self.counts[row.reason] = n
    level = logging.WARNING if n <= self._WARN_PER_REASON else logging.DEBUG
    log.log(
      level,
      "skipping row %d of %s: %s%s",
      row.row_index,
      row.source,
      row.reason,
      f" ({row.detail})" if row.detail else "",
    )
    if n == self._WARN_PER_REASON:
      log.warning("further %r skips are logged at DEBUG level", row.reason)

  def add_prompt(self) -> None:
    self.rows_read += 1
    self.prompts += 1

  @property
  def skipped(self) -> int:
    return sum(self.counts.values())

  def as_dict(self) -> dict[str, Any]:
    return {"rows_read": self.rows_read, "prompts": self.prompts, "skipped": dict(self.counts)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SkipStats":
    return cls(d["skipped"], rows_read=int(d["rows_read"]), prompts=int(d["prompts"]))

  def __repr__(self) -> str:
    nonzero = {k: v for k, v in self.counts.items() if v}
    return f"SkipStats(rows_read={self.rows_read}, prompts={self.prompts}, skipped={nonzero})"


# ------------------------------------------------------------------------------------------------
# File level
# ------------------------------------------------------------------------------------------------
def expand_paths(paths: Sequence[str]) -> list[str]:
  """Expands glob patterns (sorted); a pattern matching nothing or a missing file raises."""
  out = []
  for p in paths:
    if glob.has_magic(p):
      matches = sorted(glob.glob(p))
      if not matches:
        raise FileNotFoundError(f"dataset pattern {p!r} matches no file")
      out.extend(matches)
    elif not os.path.isfile(p):
      raise FileNotFoundError(f"dataset file {p!r} does not exist")
    else:
      out.append(p)
  return out


# Bytes read from each end of a data file for its fingerprint: a parquet file's footer (schema, row
# group offsets and statistics) sits in its last bytes, so files that differ anywhere almost surely
# differ there; a JSON-lines file's first and last rows.
_FINGERPRINT_BYTES = 1 << 20


def file_fingerprint(path: str) -> bytes:
  """16-byte identity of a data file's content, not of its name or folder: BLAKE2b of its size and
  its first and last MiB. A copy of the file anywhere has the same fingerprint; another file with
  the same name (e.g. shard `train-00000-of-00010.parquet` of another data set) has another one.
  Computed once per process per file (while its size and mtime stay the same)."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise FileNotFoundError(f"data file {path!r}: cannot fingerprint it ({e})") from e
  return _fingerprint(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _fingerprint(path: str, size: int, mtime_ns: int) -> bytes:
  del mtime_ns  # part of the cache key only: a rewritten file is read again
  h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
  with open(path, "rb") as f:
    h.update(f.read(_FINGERPRINT_BYTES))
    if size > _FINGERPRINT_BYTES:
      f.seek(max(size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
      h.update(f.read())
  return h.digest()


def row_stream_ids(sources: Sequence[str], rows: Sequence[int]) -> np.ndarray:
  """[B] int64 RNG stream id in [0, 2^32) of each data row (file `sources[b]`, row `rows[b]`): a
  32-bit BLAKE2b of the file's `file_fingerprint` and the row. The one scheme of the trainer, the
  evaluator and the inspector (`rollout.row_keys` folds it into the call's key): a prompt's samples
  depend on the key and its data only, not on its batch position, host, the folder the data sits in
  or the file's name. Distinct rows share a stream only by a 32-bit hash collision (about n²/2³³
  pairs among n rows)."""
  out = np.empty(len(sources), np.int64)
  for b, (src, row) in enumerate(zip(sources, rows)):
    h = hashlib.blake2b(file_fingerprint(str(src)), digest_size=4)
    h.update(int(row).to_bytes(8, "little", signed=True))
    out[b] = int.from_bytes(h.digest(), "little")
  return out


def _reject_constant(name: str) -> None:
  raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
  """A JSON number as a float; one beyond the float range (`1e999`, which pyarrow cannot store and
  Python would read as inf) makes its line malformed."""
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(f"the number {text[:40]} does not fit a 64-bit float")
  return value


def _read_jsonl_skipping_malformed(path: str, read_options) -> tuple[pa.Table, dict[int, str]]:
  """A JSON-lines table whose malformed lines are empty rows, and {row: why} for those rows.

  The slow path, taken only when pyarrow rejects the file: every line is parsed with `json`, and a
  line that is not one JSON object is replaced by `{}` (a row of nulls), so that row numbers stay
  those of the file.
  """
  with open(path, "rb") as fh:
    lines = fh.read().split(b"\n")
  kept, bad, row = [], {}, 0
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue  # blank lines are not rows (as in pyarrow)
    try:
      obj = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
      if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      bad[row] = f"line {lineno}: {e}"[:300]
      line = b"{}"
    kept.append(line)
    row += 1
  if bad and len(bad) == row:
    raise ValueError(
      f"dataset file {path!r}: none of its {row} lines is a JSON object (first: "
      f"{bad[0]}); expected one JSON object per line"
    )
  try:
    table = pa_json.read_json(io.BytesIO(b"\n".join(kept)), read_options=read_options)
  except pa.ArrowException as e:
    # A schema conflict between well-formed rows (a column that is text in one row and a number in
    # another): pyarrow counts rows from 0; add the line for the reader of the file.
    m = re.search(r"in row (\d+)", str(e))
    where = ""
    if m:
      nonblank = [i for i, line in enumerate(lines, start=1) if line.strip()]
      k = int(m.group(1))
      where = f" (row {k} is line {nonblank[k]})" if k < len(nonblank) else ""
    raise ValueError(f"cannot read dataset file {path!r}: {e}{where}") from e
  if table.num_rows != row:
    raise ValueError(
      f"cannot read dataset file {path!r}: {row} JSON lines gave {table.num_rows} rows"
    )
  return table, bad


def _read_json_array(path: str) -> tuple[pa.Table, dict[int, str]]:
  """A `.json` file holding one JSON array of row objects (LLaMA-Factory / VPPO-Eval) as a table, and
  {row: why} of its elements that are not objects (they become rows of nulls)."""
  try:
    with open(path, encoding="utf-8") as fh:
      items = json.load(fh, parse_constant=_reject_constant, parse_float=_finite_float)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise ValueError(f"cannot read dataset file {path!r} as a JSON array: {e}") from e
  if not isinstance(items, list):
    raise ValueError(f"dataset file {path!r}: a JSON {type(items).__name__}, not an array of rows")
  bad = {
    k: f"element {k} is a JSON {type(x).__name__}, not an object"
    for k, x in enumerate(items)
    if not isinstance(x, dict)
  }
  if bad and len(bad) == len(items):
    raise ValueError(f"dataset file {path!r}: no element of its array is a JSON object")
  try:
    table = pa.Table.from_pylist([x if isinstance(x, dict) else {} for x in items])
  except pa.ArrowException as e:  # a column whose type differs between rows
    raise ValueError(f"cannot read dataset file {path!r}: {e}") from e
  return table, bad


def _starts_with_array(path: str) -> bool:
  with open(path, "rb") as fh:
    head = fh.read(4096).lstrip()
  return head.startswith(b"\xef\xbb\xbf[") or head.startswith(b"[")


def _open_table(
  path: str,
) -> tuple[list[str], Callable[[list[str]], pa.Table], dict[int, str]] | None:
  """(column names, a reader of some columns, {row: why} of malformed rows) of a data file; None for
  an empty JSON-lines file.

  Parquet reads only the requested columns (image-heavy files often carry extra columns); JSON
  lines is parsed whole, since its schema is only known after parsing. A JSON-lines line that is not
  a JSON object becomes a malformed row (skipped and counted, like a bad parquet row).
  """
  lower = path.lower()
  try:
    if lower.endswith(_PARQUET_SUFFIXES):
      names = pq.read_schema(path).names
      return names, lambda cols: pq.read_table(path, columns=cols, memory_map=True), {}
    if lower.endswith(_JSONL_SUFFIXES):
      with open(path, "rb") as fh:
        if not fh.read(4096).strip():
          return None
      if lower.endswith(".json") and _starts_with_array(path):
        table, bad = _read_json_array(path)
        if bad:
          log.warning("dataset file %s: %d array element(s) will be skipped", path, len(bad))
        return table.column_names, table.select, bad
      # Larger blocks than the 1 MiB default: rows with base64 images can exceed it.
      options = pa_json.ReadOptions(block_size=64 << 20)
      try:
        table, bad = pa_json.read_json(path, read_options=options), {}
      except pa.ArrowInvalid:
        table, bad = _read_jsonl_skipping_malformed(path, options)
        if bad:
          log.warning(
            "dataset file %s: %d malformed line(s) will be skipped (first: row %d, %s)",
            path,
            len(bad),
            min(bad),
            bad[min(bad)],
          )
      return table.column_names, table.select, bad
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"cannot read dataset file {path!r}: {e}") from e
  raise ValueError(
    f"dataset file {path!r}: unknown format (expected one of {_PARQUET_SUFFIXES + _JSONL_SUFFIXES})"
  )


def _top(key: str) -> str:
  return key.split(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class _File:
  path: str
  question_key: str
  columns: Mapping[str, pa.ChunkedArray]  # top-level column name -> values
  num_rows: int
  malformed: Mapping[int, str] = dataclasses.field(default_factory=dict)  # row -> why (JSON lines)


class DatasetReader:
  """Random access over all rows of all files of a `DatasetSpec` (thread-safe for reads).

  Row `i` is a global index over the files in order. `load(i)` returns a `RawRow` or a
  `SkippedRow`; it never raises for row-level problems.
  """

  def __init__(self, spec: DatasetSpec):
    self.spec = spec
    self._files: list[_File] = []
    for path in expand_paths(spec.paths):
      self._files.append(self._open(path))
    sizes = np.array([f.num_rows for f in self._files], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(sizes)])
    if self._starts[-1] == 0:
      raise EmptyDatasetError(f"dataset {list(spec.paths)} has no rows")

  def _open(self, path: str) -> _File:
    opened = _open_table(path)
    if opened is None:  # Empty JSON lines: no rows and no schema to check.
      log.warning("dataset file %s has no rows", path)
      return _File(path, self.spec.question_key or "", {}, 0)
    names, read_columns, malformed = opened
    question_key = self.spec.question_key
    if question_key is None:
      question_key = next((k for k in DEFAULT_QUESTION_KEYS if k in names), None)
      if question_key is None:
        raise ValueError(
          f"dataset file {path!r} has none of the question columns "
          f"{DEFAULT_QUESTION_KEYS}; columns are {sorted(names)}. "
          "Set DatasetSpec.question_key."
        )
    wanted = {"question_key": question_key, "answer_key": self.spec.answer_key}
    for k, key in enumerate(self.spec.image_keys):
      wanted["image_key" if isinstance(self.spec.image_key, str) else f"image_key[{k}]"] = key
    if self.spec.options_key is not None:
      wanted["options_key"] = self.spec.options_key
    for field, key in wanted.items():
      if _top(key) not in names:
        raise ValueError(
          f"dataset file {path!r} has no column {_top(key)!r} "
          f"(DatasetSpec.{field}={key!r}); columns are {sorted(names)}"
        )
    top = list(dict.fromkeys(_top(k) for k in wanted.values()))
    try:
      table = read_columns(top)
    except (pa.ArrowException, OSError) as e:
      raise ValueError(f"cannot read columns {top} of dataset file {path!r}: {e}") from e
    if table.num_rows == 0:
      log.warning("dataset file %s has no rows", path)
    return _File(path, question_key, {c: table.column(c) for c in top}, table.num_rows, malformed)

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def files(self) -> list[str]:
    return [f.path for f in self._files]

  def _find(self, index: int) -> tuple[_File, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range [0, {len(self)})")
    k = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._files[k], int(index - self._starts[k])

  def locate(self, index: int) -> tuple[str, int]:
    """(file, row within the file) of global row `index`."""
    f, row = self._find(index)
    return f.path, row

  def load(self, index: int) -> RawRow | SkippedRow:
    """Reads and decodes row `index`; row-level problems become a `SkippedRow`."""
    f, row = self._find(index)
    if row in f.malformed:
      return SkippedRow(MALFORMED_ROW, f.path, row, f.malformed[row])
    try:
      return self._load(f, row)
    except RowError as e:
      return SkippedRow(e.reason, f.path, row, e.detail)

  def _value(self, f: _File, key: str, row: int) -> Any:
    value = f.columns[_top(key)][row].as_py()
    for part in key.split(".")[1:]:
      value = value.get(part) if isinstance(value, Mapping) else None
    return value

  def _load(self, f: _File, row: int) -> RawRow:
    question = layouts.strip_format_instruction(_question_text(self._value(f, f.question_key, row)))
    if not question.strip():
      raise RowError(EMPTY_QUESTION)
    answer = self._value(f, self.spec.answer_key, row)
    if layouts.is_chat(answer):
      answer = layouts.chat_answer(answer)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
      raise RowError(MISSING_ANSWER)
    if isinstance(answer, float) and not math.isfinite(answer):
      raise RowError(
        NONFINITE_ANSWER, f"column {self.spec.answer_key!r} holds {answer!r}, not a finite number"
      )
    try:
      if self.spec.options_key is not None:
        options = layouts.parse_options(
          self._value(f, self.spec.options_key, row), self.spec.options_key
        )
        question = layouts.with_options(question, options)
      cells, names = self._image_cells(f, row)
      question, cells = layouts.place_images(question, cells, names)
    except layouts.LayoutError as e:
      raise RowError(e.reason, e.detail) from None
    base_dirs = self.spec.image_dir or os.path.dirname(os.path.abspath(f.path))
    images = tuple(decode_image(v, base_dirs) for v in cells)
    if self.spec.require_images and not images:
      raise RowError(MISSING_IMAGE)
    return RawRow(question, str(answer), images, f.path, row)

  def _image_cells(self, f: _File, row: int) -> tuple[list[Any], list[str]]:
    """The row's image cells in image-number order (None where empty) and their names."""
    if isinstance(self.spec.image_key, str):
      value = self._value(f, self.spec.image_key, row)
      cells = list(value) if isinstance(value, (list, tuple)) else [value]
      if value is None:
        cells = []
      return cells, [f"{self.spec.image_key}[{k}]" for k in range(len(cells))]
    keys = self.spec.image_keys
    return [self._value(f, k, row) for k in keys], list(keys)


def _question_text(value: Any) -> str:
  """A question cell as text; verl chat-message lists give their user turns joined by newlines."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) for m in value):
    turns = [m.get("content") for m in value if m.get("role", "user") == "user"]
    return "\n".join(t for t in turns if isinstance(t, str))
  return str(value)


def resolve_path(path: str, base_dirs: str | Sequence[str]) -> str:
  """An image path as a file to open: absolute as is; relative (a leading `./` allowed) joined to the
  first of `base_dirs` where the file exists (to the first one when none has it)."""
  if os.path.isabs(path):
    return path
  dirs = (base_dirs,) if isinstance(base_dirs, (str, os.PathLike)) else tuple(base_dirs)
  rel = path[2:] if path.startswith("./") else path
  candidates = [os.path.join(d, rel) for d in dirs]
  return next((c for c in candidates if os.path.isfile(c)), candidates[0])


def decode_image(value: Any, base_dir: str | Sequence[str]) -> Image.Image:
  """One image cell (bytes, {"bytes","path"} dict, path, data URI) as a loaded RGB PIL image;
  relative paths are resolved against `base_dir` (one folder, or several tried in order).

  Raises:
    RowError(MISSING_IMAGE_FILE) for a path that does not exist, RowError(CORRUPT_IMAGE) for
    bytes PIL cannot decode (or an unrecognised cell).
  """
  data: bytes | None = None
  path: str | None = None
  if isinstance(value, Mapping):
    raw = value.get("bytes")
    if raw is not None:
      data = _b64(raw) if isinstance(raw, str) else bytes(raw)
    elif value.get("path"):
      path = value["path"]
    else:
      raise RowError(CORRUPT_IMAGE, "image dict has neither 'bytes' nor 'path'")
  elif isinstance(value, (bytes, bytearray, memoryview)):
    data = bytes(value)
  elif isinstance(value, str):
    if value.startswith("data:image"):
      data = _b64(value.split(",", 1)[-1])
    else:
      path = value
  else:
    raise RowError(CORRUPT_IMAGE, f"unsupported image cell of type {type(value).__name__}")

  if path is not None:
    full = resolve_path(path, base_dir)
    try:
      with open(full, "rb") as fh:
        data = fh.read()
    except OSError as e:
      tried = (
        ""
        if isinstance(base_dir, (str, os.PathLike)) or len(base_dir) < 2
        else (f" (looked in {list(base_dir)})")
      )
      raise RowError(MISSING_IMAGE_FILE, f"{full}: {e.strerror or e}{tried}") from e
  try:
    img = Image.open(io.BytesIO(data))
    img.load()  # Decode now: truncated or corrupt data must fail here, not in the processor.
    return img.convert("RGB")
  except Image.UnidentifiedImageError as e:
    raise RowError(
      CORRUPT_IMAGE, f"not a recognised image format{f' ({path})' if path else ''}"
    ) from e
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...).
    raise RowError(CORRUPT_IMAGE, f"cannot decode image{f' ({path})' if path else ''}: {e}") from e


def _b64(text: str) -> bytes:
  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as e:
    raise RowError(CORRUPT_IMAGE, f"invalid base64 image: {e}") from e


def column_names(path: str) -> list[str]:
  """Top-level column names of one data file ([] for an empty JSON-lines file); errors name the file."""
  opened = _open_table(os.fspath(path))
  return [] if opened is None else list(opened[0])


def read_column(path: str, key: str, *, what: str = "column") -> list[Any]:
  """Every value of column `key` of one data file, in row order (a side column a pipeline does not
  carry, e.g. the demo task's worked `solution`). `what` names the setting in the error message."""
  opened = _open_table(os.fspath(path))
  if opened is None:
    return []
  names, read_columns, _ = opened
  if key not in names:
    raise ValueError(
      f"{what}: dataset file {path!r} has no column {key!r}; columns are {sorted(names)}"
    )
  return read_columns([key]).column(key).to_pylist()
