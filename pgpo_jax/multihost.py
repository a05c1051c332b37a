"""Host-local rows <-> global arrays, and the few cross-host reductions the host loop needs.

In a multi-process run (a TPU pod slice: one process per host) every host reads its own shard of
the prompts, samples its own groups and computes rewards for them: the host loop keeps a
*host-local view* of the batch (numpy, this host's rows only). Device programs take *global*
arrays that span every host's devices. The two meet here:

    local rows ──to_global──► jax.Array over the mesh (this host's rows on this host's devices)
    jax.Array ──to_local──► this host's rows again (numpy)

A leaf is described by its logical axes (`sharding.py` names); the dimension named "batch" is the
row dimension: the global array holds the hosts' rows in the order of their devices on the mesh,
so each host must own one contiguous block of it (the 'batch' mesh axes split across hosts;
`check_host_split` fails early otherwise). With one process every function here reduces to
`jax.device_put` / `np.asarray`, so single-host code runs the same lines.

Cross-host reductions (`allgather`, `max_over_hosts`, `allgather_json`, `reduce_metrics`) are
collectives: every process must call them in the same order.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from pgpo_jax import sharding as sharding_lib

log = logging.getLogger(__name__)

Axes = tuple  # logical axis names of one leaf, e.g. ("batch", None)
BATCH = "batch"


def is_multihost() -> bool:
  return jax.process_count() > 1


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """`jax.distributed.initialize`, explicit or auto-detected (TPU pods, SLURM, ...).

  CPU processes get gloo collectives (jax has none on CPU by default), which lets a multi-process
  run be tested on one machine: N processes with `--xla_force_host_platform_device_count`.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {}
  if coordinator_address:
    kw = dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  jax.distributed.initialize(**kw)
  log.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def barrier(name: str) -> None:
  """All processes wait here (e.g. until host 0 has written shared files)."""
  if is_multihost():
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
def _batch_dim(axes: Axes) -> int | None:
  return axes.index(BATCH) if BATCH in axes else None


def global_shape(
  local_shape: Sequence[int], axes: Axes, num_processes: int | None = None
) -> tuple[int, ...]:
  """The shape of the global array whose host blocks have `local_shape` (rows × processes)."""
  shape = list(local_shape)
  d = _batch_dim(axes)
  if d is not None:
    shape[d] *= jax.process_count() if num_processes is None else num_processes
  return tuple(shape)


def _host_box(s: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The bounding box of this process's shards of an array of `shape` under `s`."""
  idx = list(s.addressable_devices_indices_map(shape).values())
  box = []
  for d, n in enumerate(shape):
    starts = [sl[d].indices(n)[0] for sl in idx]
    stops = [sl[d].indices(n)[1] for sl in idx]
    box.append(slice(min(starts), max(stops)))
  return tuple(box)


def _check_block(s: NamedSharding, shape: tuple[int, ...], d: int, what: str) -> slice:
  rows = _host_box(s, shape)[d]
  want = shape[d] // jax.process_count()
  if shape[d] % jax.process_count() or rows.stop - rows.start != want:
    raise ValueError(
      f"{what}: the {shape[d]} rows of dimension {d} do not split into one block per host under {s.spec} "
      f"on mesh {dict(s.mesh.shape)} (this host's devices hold rows {rows.start}:{rows.stop}, not "
      f"{want}); the mesh axes of the 'batch' axis must split the rows across the {jax.process_count()} "
      "hosts, and the global batch must be a multiple of the batch shards"
    )
  return rows


def check_host_split(
  mesh: Mesh, rules: sharding_lib.Rules, num_rows: int, what: str = "batch"
) -> None:
  """Fails unless a batch of `num_rows` global rows gives every host its own contiguous block."""
  if not is_multihost():
    return
  s = sharding_lib.logical_sharding((BATCH,), mesh, rules, (num_rows,))
  _check_block(s, (num_rows,), 0, what)


def row_axes(tree: Any) -> Any:
  """Logical axes of a row-aligned pytree: "batch" on dim 0 of every array, scalars replicated."""
  return jax.tree.map(lambda x: (BATCH,) + (None,) * (np.ndim(x) - 1) if np.ndim(x) else (), tree)


def to_global(
  tree: Any, axes: Any, mesh: Mesh, rules: sharding_lib.Rules, *, what: str = "batch"
) -> Any:
  """Host-local numpy leaves -> global jax Arrays sharded by their logical `axes`.

  Leaves named with "batch" hold this host's rows (every host passes the same number); leaves
  without it are the same on every host (replicated). `axes` is a pytree prefix-matching `tree`
  whose leaves are tuples of logical names, or None for `row_axes(tree)`.
  """
  axes = row_axes(tree) if axes is None else axes

  def one(ax, x):
    x = np.asarray(x)
    shape = global_shape(x.shape, ax)
    s = sharding_lib.logical_sharding(ax, mesh, rules, shape)
    if not is_multihost():
      return jax.device_put(x, s)
    d = _batch_dim(ax)
    if d is not None:
      _check_block(s, shape, d, what)
    return jax.make_array_from_process_local_data(s, x, shape)

  return jax.tree.map(one, axes, tree, is_leaf=sharding_lib.is_logical_axes)


def to_local(tree: Any, axes: Any, mesh: Mesh, rules: sharding_lib.Rules) -> Any:
  """Global jax Arrays -> this host's rows (numpy), the inverse of `to_global` for the same axes.

  Arrays whose sharding differs from the canonical one of their axes are resharded first (a no-op
  when the program already produced that layout).
  """
  axes = row_axes(tree) if axes is None else axes

  def one(ax, x):
    if not is_multihost():
      return np.asarray(x)
    shape = tuple(x.shape)
    s = sharding_lib.logical_sharding(ax, mesh, rules, shape)
    d = _batch_dim(ax)
    if d is not None:
      _check_block(s, shape, d, "output")
    if x.sharding != s:
      x = jax.device_put(x, s)
    box = _host_box(s, shape)
    out = np.empty([b.stop - b.start for b in box], x.dtype)
    for shard in x.addressable_shards:
      dst = tuple(
        slice(sl.indices(n)[0] - b.start, sl.indices(n)[1] - b.start)
        for sl, b, n in zip(shard.index, box, shape)
      )
      out[dst] = np.asarray(shard.data)
    return out

  return jax.tree.map(one, axes, tree, is_leaf=sharding_lib.is_logical_axes)


def replicated(x: Any, mesh: Mesh) -> jax.Array:
  """A value that is the same on every host (e.g. the PRNG key) as a replicated global array."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = replicated(np.asarray(jax.random.key_data(x)), mesh)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  x = np.asarray(x)
  s = NamedSharding(mesh, jax.sharding.PartitionSpec())
  if not is_multihost():
    return jax.device_put(x, s)
  return jax.make_array_from_process_local_data(s, x, x.shape)


# ------------------------------------------------------------------------------------------------
# Reductions over hosts (collectives: call them on every process, in the same order)
# ------------------------------------------------------------------------------------------------
def allgather(x: Any) -> np.ndarray:
  """[num_processes, *x.shape] numpy: every host's `x` (same shape and dtype on every host)."""
  x = np.asarray(x)
  if not is_multihost():
    return x[None]
  if (
    x.dtype.itemsize == 8
  ):  # jax (without x64) would narrow 64-bit values: move their bits as uint32
    bits = np.asarray(
      multihost_utils.process_allgather(
        np.ascontiguousarray(x).reshape(-1).view(np.uint32), tiled=False
      )
    )
    return bits.view(x.dtype).reshape((-1,) + x.shape)
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def max_over_hosts(x):
  return allgather(x).max(axis=0)


def min_over_hosts(x):
  return allgather(x).min(axis=0)


def sum_over_hosts(x):
  return allgather(x).sum(axis=0)


def allgather_json(obj: Any) -> list[Any]:
  """Every host's JSON-able `obj`, in process order (e.g. the per-host data iterator states)."""
  if not is_multihost():
    return [obj]
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  n = int(max_over_hosts(np.int64(raw.size)))
  buf = np.zeros(n, np.uint8)
  buf[: raw.size] = raw
  sizes = allgather(np.int64(raw.size))
  return [json.loads(bytes(row[:k]).decode()) for row, k in zip(allgather(buf), sizes)]


def metric_reduction(key: str) -> str:
  """How a host-local metric combines over hosts: 'max', 'min', 'sum' or 'mean' (by its name)."""
  if key.startswith("time/") or key.endswith("max") or "/max" in key or key.startswith("max_"):
    return "max"
  if key.endswith("min") or "/min" in key:
    return "min"
  if key.startswith("throughput/") and key.endswith("_per_s") or key.startswith("count/"):
    return "sum"
  return "mean"


def reduce_metrics(m: dict[str, float]) -> dict[str, float]:
  """Host-local scalar metrics -> run-wide ones (every host gets the result).

  Hosts carry equally many prompts, so means of per-prompt/per-response quantities are exact;
  token-level means are the mean of the hosts' means. NaN stays NaN.
  """
  if not is_multihost():
    return dict(m)
  keys = sorted(m)
  gathered = allgather_json(keys)
  if any(g != keys for g in gathered):
    raise RuntimeError(
      f"hosts logged different metric keys: {[sorted(set(g) ^ set(keys)) for g in gathered]}"
    )
  vals = allgather(np.array([float(m[k]) for k in keys], np.float64))
  out = {}
  for i, k in enumerate(keys):
    v = vals[:, i]
    how = metric_reduction(k)
    out[k] = float({"max": np.max, "min": np.min, "sum": np.sum, "mean": np.mean}[how](v))
  return out
