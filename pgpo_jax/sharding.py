"""Device mesh and the one table that maps logical axis names to mesh axes.

Every model parameter carries logical axis names (`nnx.Param(..., axes=("embed", "mlp"))`, see
`models/qwen2_5_vl/layers.py`); activations are named at `constrain(x, ("batch", "length",
"act_embed"))` call sites. A *rules* table maps each logical name to a mesh axis, a tuple of mesh
axes, or None (replicated). Two tables serve the two phases of RL:

  logical name       TRAIN_RULES (FSDP + tensor)   SAMPLE_RULES (tensor only)
  ----------------   ---------------------------   --------------------------
  embed              fsdp                          -
  vision_embed       fsdp                          -
  vision_merge       fsdp                          -
  vocab              tensor                        tensor
  heads, kv_heads    tensor                        tensor
  mlp                tensor                        tensor
  vision_heads       tensor                        tensor
  vision_mlp         tensor                        tensor
  vision_merge_out   tensor                        tensor
  layers, vision_layers, head_dim, vision_head_dim, vision_patch: always replicated
  batch              (data, fsdp)                  (data, fsdp)
  act_heads, act_kv_heads, act_mlp, act_vocab      tensor in both
  length, act_embed, cache_length, vision_tokens   replicated in both

Why these choices:
- TRAIN: ZeRO-3 style FSDP. Parameters, gradients and optimizer state are split over `fsdp` on
  their model dimension and over `tensor` on heads/MLP/vocab; the batch is split over
  `data` x `fsdp`, so XLA all-gathers each layer's weights inside the layer scan and
  reduce-scatters its gradients. The stacked `layers` axis is never sharded (the scan slices it).
- SAMPLE: decoding runs one token per step; an FSDP layout would all-gather every weight for every
  token. Weights are split over `tensor` only and replicated elsewhere (one all-gather per rollout
  when the trainer reshards TRAIN -> SAMPLE). The batch goes over `data` AND `fsdp`: on the
  training mesh the `fsdp` devices then act as extra data parallelism instead of decoding the same
  sequences twice; on a mesh with fsdp=1 this is exactly "batch over data".
- A dimension that its mesh axes do not divide (e.g. kv_heads=2 on tensor=4, vision_mlp=3420 on
  tensor=8) falls back to fewer axes: the longest prefix of the rule's axes whose size product
  divides the dimension, else replication. `sharding_fallbacks` lists those cases (compile_check
  prints them), because a replicated weight costs memory on every device.
- A mesh axis is used at most once per array (a later dim that asks for an axis already taken is
  not split over it) and size-1 mesh axes are dropped from specs (`P()` == fully replicated).

The name -> spec resolution and the `use_rules` / `constrain` context live in `logical_axes.py`
(the model code uses them and must not import this module); they are re-exported here.

The mesh is built with `AxisType.Auto` on all axes: shardings are decided by XLA's propagation,
guided by the parameter/input shardings and `constrain` calls. `Explicit` axes would make sharding
part of every array's type, which the model code (plain `jnp` einsums written for unsharded
arrays) does not annotate; Auto keeps one model code path for 1 device, a CPU test mesh and a pod.
"""

from __future__ import annotations

import math
import types
from typing import Any, Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pgpo_jax.keypaths import path_str

# The resolution rule and the activation-constraint context live below this module (the model code
# uses them too); they are part of this module's API.
from pgpo_jax.logical_axes import (  # noqa: F401
  AxisRule,
  Rules,
  constrain,
  current_rules,
  is_logical_axes,
  logical_sharding,
  logical_to_spec,
  use_rules,
)

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES: tuple[str, str, str] = (DATA, FSDP, TENSOR)


# Logical names shared by both tables: where TRAIN and SAMPLE agree.
_COMMON: dict[str, AxisRule] = {
  # parameters
  "vocab": TENSOR,
  "heads": TENSOR,
  "kv_heads": TENSOR,
  "mlp": TENSOR,
  "head_dim": None,
  "layers": None,
  "vision_layers": None,
  "vision_heads": TENSOR,
  "vision_head_dim": None,
  "vision_mlp": TENSOR,
  "vision_patch": None,
  "vision_merge_out": TENSOR,
  # activations
  "batch": (DATA, FSDP),
  "length": None,
  "cache_length": None,
  "act_embed": None,
  "act_heads": TENSOR,
  "act_kv_heads": TENSOR,
  "act_head_dim": None,
  "act_mlp": TENSOR,
  "act_vocab": TENSOR,
  "vision_tokens": None,
}

TRAIN_RULES: Rules = types.MappingProxyType(
  {**_COMMON, "embed": FSDP, "vision_embed": FSDP, "vision_merge": FSDP}
)
SAMPLE_RULES: Rules = types.MappingProxyType(
  {**_COMMON, "embed": None, "vision_embed": None, "vision_merge": None}
)
RULES: dict[str, Rules] = {"train": TRAIN_RULES, "sample": SAMPLE_RULES}


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------
def mesh_shape(
  num_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1
) -> tuple[int, int, int]:
  """Resolves one `-1` ("fill") entry of (data, fsdp, tensor) so the product is `num_devices`."""
  sizes = [int(data), int(fsdp), int(tensor)]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(
      f"at most one mesh axis may be -1 (fill), got data={data} fsdp={fsdp} tensor={tensor}"
    )
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
      f"mesh axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}"
    )
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
        f"mesh data={data} fsdp={fsdp} tensor={tensor}: the fixed axes (product {known}) "
        f"do not divide the {num_devices} devices"
      )
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
      f"mesh data={data} fsdp={fsdp} tensor={tensor} has {known} devices, "
      f"but {num_devices} are available (use -1 on one axis to fill)"
    )
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(
  data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), Auto axis types.

  One axis may be -1 to take the remaining devices. `tensor` is the innermost (fastest varying)
  axis so tensor-parallel groups land on neighbouring chips (ICI); on TPU `jax.make_mesh` orders
  devices by physical topology. Works with the abstract devices of
  `jax.experimental.topologies.get_topology_desc` for ahead-of-time compilation.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(len(devices), data, fsdp, tensor)
  types_ = (AxisType.Auto,) * 3
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=types_, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Shapes that do not map onto the physical torus without splitting an axis (e.g. 2x4x4 chips
    # as fsdp=32): allow splitting, as maxtext does.
    from jax.experimental import mesh_utils

    arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(arr, MESH_AXES, axis_types=types_)


# ------------------------------------------------------------------------------------------------
# Logical -> physical
# ------------------------------------------------------------------------------------------------
def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _param_state(model_or_state) -> nnx.State:
  if isinstance(model_or_state, nnx.State):
    return model_or_state
  return nnx.state(model_or_state, nnx.Param)


def _axes_of(var: nnx.Variable, where: str) -> tuple[str | None, ...]:
  axes = var.get_metadata().get("axes")
  if axes is None:
    raise ValueError(
      f"parameter {where} has no logical `axes` metadata; every nnx.Param must carry one"
    )
  return tuple(axes)


def param_shardings(abstract_model_or_state, mesh: Mesh, rules: Rules) -> nnx.State:
  """NamedSharding per parameter: a pytree with the structure of `nnx.state(model, nnx.Param)`.

  Each `nnx.Param` is replaced by its `NamedSharding`, so the result is a valid pytree *prefix* of
  the state (usable as jit `in_shardings`/`out_shardings` and in `jax.device_put`). Works on an
  abstract model (`nnx.eval_shape`) as well as a concrete one.
  """
  state = _param_state(abstract_model_or_state)

  def one(path, var):
    axes = _axes_of(var, "/".join(str(k) for k in path))
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, var.value.shape))

  return nnx.map_state(one, state)


def sharding_fallbacks(abstract_model_or_state, mesh: Mesh, rules: Rules) -> list[str]:
  """Human-readable list of parameters whose rule could not be applied in full (divisibility)."""
  notes = []
  for path, var in _flat_vars(_param_state(abstract_model_or_state)):
    axes = _axes_of(var, path)
    got = logical_to_spec(axes, rules, mesh, var.value.shape)
    full = logical_to_spec(axes, rules, mesh, None)
    if got != full:
      notes.append(f"{path} {tuple(var.value.shape)} axes={axes}: wanted {full}, using {got}")
  return notes


def _flat_vars(state: nnx.State) -> Iterator[tuple[str, nnx.Variable]]:
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]
  for path, var in leaves:
    yield path_str(path), var


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
  """Moves every parameter of a concrete model into its sharding (in place; returns the model)."""
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
  return model


def shardings_like_params(
  tree: Any, abstract_params: nnx.State, shardings: nnx.State, mesh: Mesh
) -> Any:
  """Shardings for a pytree that embeds copies of the parameter tree (optimizer state, TrainState).

  A leaf whose key path ENDS with a parameter's path and has that parameter's shape gets the
  parameter's sharding (Adam's mu/nu, the params themselves); every other leaf (step counters,
  learning rate, ...) is replicated.
  """
  by_path = {}
  sh_leaves = dict(_flat_shardings(shardings))
  for p, var in _flat_vars(abstract_params):
    by_path[p] = (tuple(var.value.shape), sh_leaves[p])
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    parts = path_str(path).split("/")
    shape = tuple(getattr(leaf, "shape", ()))
    for i in range(len(parts)):
      hit = by_path.get("/".join(parts[i:]))
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


def _flat_shardings(shardings: nnx.State) -> Iterator[tuple[str, NamedSharding]]:
  leaves = jax.tree_util.tree_flatten_with_path(
    shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
  )[0]
  for path, s in leaves:
    yield path_str(path), s


def flat_shardings(shardings: nnx.State) -> dict[tuple[str, ...], NamedSharding]:
  """{('language_model', 'layers', 'wq'): NamedSharding, ...}, keyed like `loading.flat_params`."""
  return {tuple(p.split("/")): s for p, s in _flat_shardings(shardings)}
