"""Hugging Face safetensors <-> our Orbax checkpoints, streamed tensor by tensor.

    hf_to_orbax("Qwen2.5-VL-7B-Instruct", "ckpt/qwen7b", dtype="bfloat16")
    orbax_to_hf("ckpt/qwen7b", "export/qwen7b")                        # converted folder
    orbax_to_hf("workdir/checkpoints/300/params", "export/step300",      # trainer checkpoint
                config="workdir/config.json", dtype="bfloat16")

Both directions use the one key table of `models/qwen2_5_vl/weights.py` (`RULES`).

Memory (host):
- HF -> Orbax: `weights.load_hf_params` converts each HF tensor into the target dtype as it is read
  (stacked layers fill one preallocated buffer per parameter), so the host holds the output model
  (in the target dtype) plus one stacked parameter, never a float32 copy of a bf16 model.
- Orbax -> HF: the writer plans every shard from shapes alone, then restores ONE rule's
  parameters at a time (Orbax partial restore, cast to the output dtype on read) and streams each
  HF tensor into its safetensors file. Peak: the largest stacked parameter (all layers) plus one
  tensor, far below the size of the output.

Output folder of `orbax_to_hf`: `model.safetensors` (one shard) or `model-0000k-of-0000n.safetensors`
+ `model.safetensors.index.json` (as `save_pretrained` writes them, ≤ `max_shard_bytes` each; a
single tensor larger than the limit gets a shard of its own), `config.json` (the source config with
its dtype entry updated) and every tokenizer/processor file found next to the source config.
Tied models (3B) have no `lm_head.weight`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import time
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from pgpo_jax import checkpoint as ckpt_lib
from pgpo_jax.models.qwen2_5_vl import loading, weights
from pgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig

Path = tuple[str, ...]

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's "5GB"
# Files copied alongside the weights (whatever of these exists next to the source config.json).
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "vocab.json",
  "merges.txt",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.json",
  "chat_template.jinja",
  "preprocessor_config.json",
  "processor_config.json",
  "video_preprocessor_config.json",
  "generation_config.json",
)
_ST_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}


def _np_dtype(dtype) -> np.dtype:
  import jax.numpy as jnp

  try:
    return np.dtype(jnp.dtype(dtype))
  except TypeError:
    raise ValueError(f"unsupported dtype {dtype!r}; use bfloat16, float32 or float16") from None


def _st_dtype(dtype: np.dtype) -> str:
  if dtype.name == "bfloat16":
    return "BF16"
  if dtype not in _ST_DTYPES:
    raise ValueError(f"cannot write dtype {dtype} to safetensors; use bfloat16, float32 or float16")
  return _ST_DTYPES[dtype]


@dataclasses.dataclass
class ConvertSummary:
  """What a conversion wrote. `num_params` counts scalars, `bytes` the tensor payload."""

  direction: str
  out_dir: str
  dtype: str
  num_params: int
  num_tensors: int
  bytes: int
  seconds: float
  files: list[str]

  def __str__(self) -> str:
    return (
      f"{self.direction}: {self.num_params:,} parameters ({self.num_params / 1e9:.2f}B) in "
      f"{self.num_tensors} tensors, {self.bytes / 2**30:.3f} GiB of {self.dtype}, "
      f"{len(self.files)} file(s), {self.seconds:.1f} s -> {self.out_dir}"
    )


def _progress(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(
    total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled
  )


def ensure_writable_dir(path: str | os.PathLike) -> str:
  """Creates `path` if needed and checks that files can be created in it (clear error if not)."""
  path = os.path.abspath(os.fspath(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise PermissionError(f"cannot create output directory {path}: {e.strerror or e}") from None
  if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f"output directory {path} is not writable")
  return path


def copy_side_files(
  src_dir: str, out_dir: str, *, dtype: np.dtype | None = None, config_path: str | None = None
) -> list[str]:
  """Copies config.json (dtype entry updated) and the tokenizer/processor files present in `src_dir`."""
  written = []
  config_path = config_path or os.path.join(src_dir, "config.json")
  with open(config_path) as f:
    cfg = json.load(f)
  if dtype is not None:
    for d in (cfg, cfg.get("text_config") or {}, cfg.get("vision_config") or {}):
      for key in ("torch_dtype", "dtype"):
        if key in d:
          d[key] = dtype.name
    if "torch_dtype" not in cfg and "dtype" not in cfg:
      cfg["dtype"] = dtype.name
  dst = os.path.join(out_dir, "config.json")
  with open(dst, "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
    f.write("\n")
  written.append(dst)
  for name in TOKENIZER_FILES:
    src = os.path.join(src_dir, name)
    if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
      shutil.copyfile(src, os.path.join(out_dir, name))
      written.append(os.path.join(out_dir, name))
  return written


# ------------------------------------------------------------------------------------------------
# HF -> Orbax
# ------------------------------------------------------------------------------------------------
_FROM_ST = {
  "F32": "float32",
  "F16": "float16",
  "F64": "float64",
  "I64": "int64",
  "I32": "int32",
  "I16": "int16",
  "I8": "int8",
  "U8": "uint8",
  "BOOL": "bool",
}


def read_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) of one safetensors file, each read with a plain `readinto` (no mmap).

  `safe_open` memory-maps the file, and every page it touches stays resident (and counted in the
  process's RSS) until the file is closed: up to a whole 5 GB shard on top of the converted model.
  Reading tensor by tensor keeps the host footprint at the output plus one tensor.
  """
  import ml_dtypes

  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    base = 8 + n
    entries = sorted(
      ((k, v) for k, v in header.items() if k != "__metadata__"),
      key=lambda kv: kv[1]["data_offsets"][0],
    )
    for name, info in entries:
      st = info["dtype"]
      dtype = np.dtype(ml_dtypes.bfloat16) if st == "BF16" else np.dtype(_FROM_ST[st])
      begin, end = info["data_offsets"]
      out = np.empty(info["shape"], dtype)
      if out.nbytes != end - begin:
        raise ValueError(
          f"{path}: tensor {name} has {end - begin} bytes for shape {info['shape']} {st}"
        )
      f.seek(base + begin)
      if out.nbytes and f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
        raise ValueError(f"{path}: file ends inside tensor {name}")
      yield name, out


def hf_to_orbax(
  hf_dir: str | os.PathLike,
  out_dir: str | os.PathLike,
  dtype="bfloat16",
  *,
  overwrite: bool = False,
  progress: bool = True,
) -> ConvertSummary:
  """Converts an HF Qwen2.5-VL folder into `out_dir/params` (Orbax) + config/tokenizer files.

  The result loads with `qwen2_5_vl.from_pretrained(out_dir)` (any dtype: cast on restore).
  Raises ValueError (not a Qwen2.5-VL config; missing/unexpected/mis-shaped keys),
  FileNotFoundError, PermissionError (output not writable) or FileExistsError.
  """
  import jax

  t0 = time.time()
  hf_dir = os.path.abspath(os.fspath(hf_dir))
  dt = _np_dtype(dtype)
  cfg = Qwen25VLConfig.from_json(hf_dir)
  files = weights.safetensors_files(hf_dir)  # fails early if there are no weights
  out_dir = ensure_writable_dir(out_dir)
  params_dir = os.path.join(out_dir, ckpt_lib.PARAMS_ITEM)
  if os.path.exists(params_dir):
    if not overwrite:
      raise FileExistsError(f"{params_dir} already exists (pass overwrite=True / --overwrite)")
    shutil.rmtree(params_dir)

  shapes = {
    p: (tuple(v.shape), dt) for p, v in loading.flat_params(loading.abstract_model(cfg, dt)).items()
  }
  cpu = jax.local_devices(backend="cpu")[0]
  total = sum(os.path.getsize(f) for f in files)
  bar = _progress(total, "read safetensors", progress)

  def tensors() -> Iterator[tuple[str, np.ndarray]]:
    for f in files:
      for name, w in read_safetensors(f):
        bar.update(w.nbytes)
        yield name, w

  try:
    params = weights.load_hf_params(tensors(), cfg, shapes, put=lambda p, a: jax.device_put(a, cpu))
  except ValueError as e:
    raise ValueError(f"{hf_dir}: {e}") from None
  finally:
    bar.close()
  ckpt_lib.save_orbax_params(params_dir, params)
  written = copy_side_files(hf_dir, out_dir)
  n = sum(int(np.prod(s)) for s, _ in shapes.values())
  return ConvertSummary(
    "hf->orbax",
    out_dir,
    dt.name,
    n,
    len(shapes),
    n * dt.itemsize,
    time.time() - t0,
    [params_dir] + written,
  )


# ------------------------------------------------------------------------------------------------
# Orbax (or in-memory params) -> HF
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor: produced by `rule` (layer `layer` when stacked)."""

  name: str
  rule: weights.Rule
  layer: int | None
  shape: tuple[int, ...]
  nbytes: int


def plan_hf_tensors(
  cfg: Qwen25VLConfig, shapes: Mapping[Path, tuple[tuple[int, ...], np.dtype]], dtype: np.dtype
) -> list[_Entry]:
  """Every HF tensor of the export, in writing order, with its shape computed from shapes alone.

  `to_hf` runs on zero-stride views (`np.broadcast_to`), so planning a 72B model allocates ~nothing.
  """
  entries = []
  for r in weights.RULES:
    if r.ours[0] == ("lm_head",) and cfg.text.tie_word_embeddings:
      continue
    missing = [p for p in r.ours if p not in shapes]
    if missing:
      raise KeyError(f"parameter {'/'.join(missing[0])} missing for export")
    views = [
      np.broadcast_to(np.zeros((), dtype), shapes[p][0][1:] if r.stacked else shapes[p][0])
      for p in r.ours
    ]
    shape = tuple(r.to_hf(views, cfg).shape)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if r.stacked:
      for i in range(weights.num_layers(r, cfg)):
        entries.append(_Entry(r.hf_template.format(i=i), r, i, shape, nbytes))
    else:
      entries.append(_Entry(r.hf_template, r, None, shape, nbytes))
  return entries


def shard_plan(entries: Sequence[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
  """Greedy, order-preserving split into shards of ≤ max_shard_bytes (an oversized tensor alone)."""
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  shards: list[list[_Entry]] = [[]]
  size = 0
  for e in entries:
    if shards[-1] and size + e.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += e.nbytes
  return shards


def _header(entries: Sequence[_Entry], dtype: np.dtype) -> bytes:
  """safetensors header: u64 length + JSON (8-byte aligned with spaces), offsets in order."""
  meta: dict = {"__metadata__": {"format": "pt"}}
  off = 0
  st = _st_dtype(dtype)
  for e in entries:
    meta[e.name] = {"dtype": st, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
    off += e.nbytes
  js = json.dumps(meta, separators=(",", ":")).encode()
  js += b" " * (-len(js) % 8)
  return struct.pack("<Q", len(js)) + js


ParamSource = Callable[[Sequence[Path]], list[np.ndarray]]


def write_hf(
  source: ParamSource,
  cfg: Qwen25VLConfig,
  shapes: Mapping[Path, tuple[tuple[int, ...], np.dtype]],
  out_dir: str,
  dtype,
  *,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  progress: bool = True,
) -> tuple[list[str], int, int]:
  """Streams HF safetensors shards (+ index) into `out_dir`: each to a `.partial` file, renamed when
  all are written (a failure leaves no partial weights, and a previous export in `out_dir` whole).

  Args:
    source: `source(paths) -> arrays` fetches our parameters (full stacked arrays) by path; it is
      called once per table rule, so only one rule's parameters need to be in memory.
    shapes: {path: (shape, dtype)} of our parameters.
    dtype: output dtype.
  Returns:
    (files written, number of tensors, payload bytes).
  """
  dt = _np_dtype(dtype)
  entries = plan_hf_tensors(cfg, shapes, dt)
  shards = shard_plan(entries, max_shard_bytes)
  n = len(shards)
  names = (
    ["model.safetensors"]
    if n == 1
    else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  )
  total = sum(e.nbytes for e in entries)
  file_of = {e.name: names[k] for k, shard in enumerate(shards) for e in shard}
  _remove_partial_files(out_dir)  # of an export that was killed
  bar = _progress(total, "write safetensors", progress)
  written = []  # final names; every file is written as `name + PARTIAL_SUFFIX` first
  cache: tuple[weights.Rule | None, list[np.ndarray]] = (None, [])
  try:
    for fname, shard in zip(names, shards):
      path = os.path.join(out_dir, fname)
      written.append(path)
      with open(path + PARTIAL_SUFFIX, "wb") as f:
        f.write(_header(shard, dt))
        for e in shard:
          if cache[0] is not e.rule:
            cache = (None, [])  # drop the previous rule's arrays before fetching the next
            cache = (e.rule, source(e.rule.ours))
          arrays = cache[1]
          parts = [a[e.layer] for a in arrays] if e.rule.stacked else arrays
          t = np.ascontiguousarray(e.rule.to_hf(parts, cfg), dtype=dt)
          if t.shape != e.shape:
            raise AssertionError(f"{e.name}: planned {e.shape}, produced {t.shape}")
          f.write(memoryview(t.reshape(-1).view(np.uint8)))
          bar.update(e.nbytes)
    if n > 1:
      index = os.path.join(out_dir, "model.safetensors.index.json")
      written.append(index)  # last: renamed after the shards it names
      with open(index + PARTIAL_SUFFIX, "w") as f:
        json.dump(
          {"metadata": {"total_size": total}, "weight_map": dict(sorted(file_of.items()))},
          f,
          indent=2,
        )
  except BaseException:  # a source that fails to read (a damaged checkpoint), Ctrl-C, a full disk
    _remove_partial_files(out_dir)
    raise
  finally:
    bar.close()
  # Complete: only now replace a previous export's weights with these.
  _remove_stale_weights(out_dir)
  for path in written:
    os.replace(path + PARTIAL_SUFFIX, path)
  return written, len(entries), total


# A weights file being written; renamed to its name once every file of the export is complete, so a
# failed export leaves no partial `model*.safetensors` (and the previous export, if any, untouched).
PARTIAL_SUFFIX = ".partial"


def _remove_partial_files(out_dir: str) -> None:
  for name in os.listdir(out_dir):
    if name.startswith("model") and name.endswith(PARTIAL_SUFFIX):
      os.remove(os.path.join(out_dir, name))


def _remove_stale_weights(out_dir: str) -> None:
  """Old shards of a previous export would be picked up by the index-less loader: remove them."""
  for name in os.listdir(out_dir):
    if name == "model.safetensors.index.json" or (
      name.startswith("model") and name.endswith(".safetensors")
    ):
      os.remove(os.path.join(out_dir, name))


def orbax_to_hf(
  ckpt: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  config: str | os.PathLike | None = None,
  dtype=None,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  progress: bool = True,
) -> ConvertSummary:
  """Exports an Orbax params checkpoint to an HF folder that `transformers` loads.

  Args:
    ckpt: a converted folder (`CKPT` with `CKPT/params`) or an Orbax params item directory
      (e.g. the trainer's `WORKDIR/checkpoints/<step>/params`).
    out_dir: output folder (created).
    config: the `config.json` (file or folder) to use; default: `ckpt_lib.find_config(ckpt)`.
      Tokenizer/processor files next to it are copied too.
    dtype: output dtype; default: the dtype stored in the checkpoint.
    max_shard_bytes: shard size limit (5e9 = HF's default "5GB").
  """
  t0 = time.time()
  ckpt = os.path.abspath(os.fspath(ckpt))
  layout, params_dir = ckpt_lib.checkpoint_layout(ckpt)
  if layout != "orbax":
    raise ValueError(
      f"{ckpt} is already an HF folder; pass an Orbax checkpoint (CKPT or CKPT/params)"
    )
  config_path = ckpt_lib.find_config(config if config is not None else ckpt)
  cfg = Qwen25VLConfig.from_json(config_path)
  stored = ckpt_lib.orbax_param_metadata(params_dir)
  dt = _np_dtype(dtype) if dtype is not None else next(iter(stored.values()))[1]
  shapes = {
    p: (tuple(v.shape), dt) for p, v in loading.flat_params(loading.abstract_model(cfg, dt)).items()
  }
  ckpt_lib.check_orbax_params(params_dir, shapes)  # clear error before anything is written
  out_dir = ensure_writable_dir(out_dir)

  def source(paths: Sequence[Path]) -> list[np.ndarray]:
    got = ckpt_lib.restore_orbax_params(params_dir, shapes, as_numpy=True, paths=list(paths))
    return [got[p] for p in paths]

  files, n_tensors, nbytes = write_hf(
    source, cfg, shapes, out_dir, dt, max_shard_bytes=max_shard_bytes, progress=progress
  )
  files += copy_side_files(os.path.dirname(config_path), out_dir, dtype=dt, config_path=config_path)
  n = sum(int(np.prod(s)) for s, _ in shapes.values())
  return ConvertSummary(
    "orbax->hf", out_dir, dt.name, n, n_tensors, nbytes, time.time() - t0, files
  )


def params_to_hf(
  params: Mapping[Path, object],
  cfg: Qwen25VLConfig,
  out_dir: str | os.PathLike,
  dtype=None,
  *,
  config_src: str | os.PathLike | None = None,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  progress: bool = True,
) -> ConvertSummary:
  """Exports in-memory params ({path: array}, e.g. `loading.flat_params(model)`) to an HF folder.

  `config_src`: a folder or config.json whose config and tokenizer files are copied; default:
  `config.json` generated from `cfg` (no tokenizer files).
  """
  t0 = time.time()
  first = next(iter(params.values()))
  dt = _np_dtype(dtype) if dtype is not None else np.dtype(first.dtype)
  shapes = {p: (tuple(v.shape), dt) for p, v in params.items()}
  out_dir = ensure_writable_dir(out_dir)
  source = lambda paths: [np.asarray(params[p]) for p in paths]  # noqa: E731
  files, n_tensors, nbytes = write_hf(
    source, cfg, shapes, out_dir, dt, max_shard_bytes=max_shard_bytes, progress=progress
  )
  if config_src is not None:
    config_path = ckpt_lib.find_config(config_src)
    files += copy_side_files(
      os.path.dirname(config_path), out_dir, dtype=dt, config_path=config_path
    )
  else:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump({**cfg.to_hf_dict(), "dtype": dt.name}, f, indent=2)
    files.append(os.path.join(out_dir, "config.json"))
  n = sum(int(np.prod(s)) for s, _ in shapes.values())
  return ConvertSummary(
    "params->hf", out_dir, dt.name, n, n_tensors, nbytes, time.time() - t0, files
  )
