"""Logical axis names -> mesh axes: the resolution rule and the activation-constraint context.

The bottom of the sharding stack, imported by the model code and by `sharding.py` alike (it imports
neither). An array names each of its dims with a logical axis (`("batch", "length", "act_embed")`);
a *rules* table (`sharding.TRAIN_RULES`, `sharding.SAMPLE_RULES`) maps each name to a mesh axis, a
tuple of mesh axes or None (replicated), and `logical_to_spec` turns names into a `PartitionSpec` for
a given mesh and shape. Model code marks activations with `constrain(x, names)`, which is the
identity unless a caller made `(mesh, rules)` current with `use_rules`: the model needs no mesh,
and one code path serves one device, a CPU test mesh and a pod.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AxisRule = str | tuple[str, ...] | None
Rules = Mapping[str, AxisRule]


# ------------------------------------------------------------------------------------------------
# Logical -> physical
# ------------------------------------------------------------------------------------------------
def _as_tuple(rule: AxisRule) -> tuple[str, ...]:
  if rule is None:
    return ()
  return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(
  axes: Sequence[str | None], rules: Rules, mesh: Mesh, shape: Sequence[int] | None = None
) -> P:
  """PartitionSpec for an array whose dims have logical names `axes`.

  Args:
    axes: one logical name (or None = replicated) per dim.
    rules: logical name -> mesh axis / tuple of mesh axes / None (e.g. TRAIN_RULES).
    mesh: the mesh (only its axis names and sizes are used).
    shape: the array's shape; when given, a dim that its mesh axes do not divide falls back to
      the longest dividing prefix of those axes, else to replication.
  Raises:
    KeyError: a logical name that `rules` does not know (typos fail loudly).
  """
  if shape is not None and len(shape) != len(axes):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec: list[Any] = []
  for d, name in enumerate(axes):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    unknown = [a for a in _as_tuple(rules[name]) if a not in mesh.shape]
    if unknown:
      raise ValueError(
        f"rule {name!r} -> {rules[name]!r} names mesh axes {unknown} not in mesh {dict(mesh.shape)}"
      )
    want = [a for a in _as_tuple(rules[name]) if a not in used and mesh.shape[a] > 1]
    if shape is not None:
      while want and shape[d] % math.prod(mesh.shape[a] for a in want):
        want.pop()
    used.update(want)
    spec.append(None if not want else want[0] if len(want) == 1 else tuple(want))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def logical_sharding(
  logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules, shape: Sequence[int] | None = None
) -> NamedSharding:
  """NamedSharding for an input array (batch, cache, ...) named by logical axes."""
  return NamedSharding(mesh, logical_to_spec(tuple(logical_axes), rules, mesh, shape))


def is_logical_axes(x) -> bool:
  """A tuple of logical axis names (None = unnamed): the leaf type of axes pytrees."""
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


# ------------------------------------------------------------------------------------------------
# Activation constraints
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Context:
  mesh: Mesh
  rules: Rules


_CONTEXT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar(
  "pgpo_sharding_rules", default=None
)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
  """Makes `(mesh, rules)` current for `constrain` and sets `mesh` as JAX's current mesh.

  `constrain` reads the context when a function is TRACED: trace (first call / `.lower`) jitted
  functions inside this block; a cached trace does not see later changes of rules.
  """
  token = _CONTEXT.set(_Context(mesh, rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _CONTEXT.reset(token)


def current_rules() -> tuple[Mesh, Rules] | None:
  ctx = _CONTEXT.get()
  return None if ctx is None else (ctx.mesh, ctx.rules)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under `use_rules`; the identity outside it.

  Example: `h_BxTxD = constrain(h_BxTxD, ("batch", "length", "act_embed"))`.
  """
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  spec = logical_to_spec(tuple(logical_axes), ctx.rules, ctx.mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


@contextlib.contextmanager
def rules_in_effect(mesh: Mesh | None, rules: Rules | None):
  """Makes `(mesh, rules)` current for `constrain` only (None: `constrain` is the identity).

  Unlike `use_rules` it sets no JAX mesh context, so it can run while a program is traced:
  `programs.py` wraps every program in it, which makes a program's constraints part of the program
  rather than of whatever context its caller traced it in.
  """
  token = _CONTEXT.set(None if mesh is None or rules is None else _Context(mesh, rules))
  try:
    yield
  finally:
    _CONTEXT.reset(token)
