"""A generic, model-agnostic optimizer step for Flax NNX models.

    graphdef, state = init_train_state(model, optimizer)
    step = programs.make_train_step(graphdef, loss_fn, optimizer, num_microbatches=4)
    state, metrics = step(state, batch)     # jitted (in `programs.py`), `state` is donated

This module defines the step (`train_step_fn`); `programs.make_train_step` jits it with its
shardings and donation.

`loss_fn(model, microbatch) -> (loss, aux_metrics)` sees a merged NNX model. The step
splits every batch leaf with a leading batch axis into `num_microbatches` micro-batches
(strided: micro-batch k holds rows k, k+n, k+2n, ..., so a data-sharded batch splits
without communication), runs them through a `lax.scan`, and SUMS their losses and
gradients. For the sum to equal the full-batch gradient, the loss must be normalised by
full-batch quantities: scalar (0-d) batch leaves are handed unchanged to every
micro-batch, so put e.g. `losses.loss_normalizers(mask)` into the batch. Aux metrics
are averaged over micro-batches, weighted by the aux entry `metric_weight` when the loss
returns one (see `reduce_microbatch_metrics`), except those named in `summed_metrics`:
micro-batch partial sums over the full-batch normaliser (e.g. `pg_loss`), which add up to
the full batch's value.

Choices:
- Frozen parameters (`frozen_regex`, matched with `re.search` against the '/'-joined
  path, e.g. "^visual/") get exactly zero updates and no optimizer state, and do NOT
  count toward the clipping norm (as in PyTorch, where frozen parameters have no grad).
  Pass the same regex to `train_step_fn` and it also skips their gradients (less
  memory and compute) and reports `grad_norm` over trainable parameters only.
- Non-finite guard: if the loss or the gradient norm is not finite, params and
  opt_state are kept bitwise, `num_skipped` is incremented and `skipped` = 1.
  `step` counts every call (batches consumed); the optimizer's own count (and so the
  learning-rate schedule) only advances on applied updates.
- Weight decay applies to every trainable parameter (torch AdamW / verl default).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pgpo_jax.keypaths import path_str

Array = jax.Array
LossFn = Callable[[nnx.Module, Any], tuple[Array, dict[str, Array]]]


# ----------------------------------------------------------------------------- paths and freezing


def frozen_filter(frozen_regex: str) -> Callable[[tuple[Any, ...], Any], bool]:
  """An nnx filter `(path, value) -> bool` selecting the parameters matched by the regex."""
  pattern = re.compile(frozen_regex)
  return lambda path, _: pattern.search(path_str(path)) is not None


def _frozen_labels(params: Any, frozen_regex: str) -> Any:
  pattern = re.compile(frozen_regex)
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: "frozen" if pattern.search(path_str(path)) else "trainable", params
  )
  if "frozen" not in jax.tree_util.tree_leaves(labels):
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ValueError(
      f"frozen_regex {frozen_regex!r} matches no parameter; paths look like {paths[:5]}"
    )
  return labels


# ----------------------------------------------------------------------------- optimizer


def _constant(learning_rate, warmup_steps, total_steps, end_learning_rate):
  del total_steps, end_learning_rate
  if warmup_steps:
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.constant_schedule(learning_rate)


def _warmup_cosine(learning_rate, warmup_steps, total_steps, end_learning_rate):
  if total_steps is None:
    raise ValueError("schedule 'warmup_cosine' needs total_steps")
  return optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup_steps, total_steps, end_value=end_learning_rate
  )


def _linear(learning_rate, warmup_steps, total_steps, end_learning_rate):
  if total_steps is None:
    raise ValueError("schedule 'linear' needs total_steps")
  decay = optax.linear_schedule(
    learning_rate, end_learning_rate, max(total_steps - warmup_steps, 1)
  )
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
  "constant": _constant,
  "warmup_cosine": _warmup_cosine,
  "linear": _linear,
}


def make_schedule(
  name: str,
  learning_rate: float,
  *,
  warmup_steps: int = 0,
  total_steps: int | None = None,
  end_learning_rate: float = 0.0,
) -> optax.Schedule:
  """Learning-rate schedule by name: constant | warmup_cosine | linear (linear warm-up from 0)."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; valid: {sorted(SCHEDULES)}")
  return SCHEDULES[name](learning_rate, warmup_steps, total_steps, end_learning_rate)


def make_optimizer(
  learning_rate: float | optax.Schedule = 1e-6,
  *,
  schedule: str = "constant",
  warmup_steps: int = 0,
  total_steps: int | None = None,
  end_learning_rate: float = 0.0,
  weight_decay: float = 1e-2,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  grad_clip_norm: float | None = 1.0,
  frozen_regex: str | None = None,
) -> optax.GradientTransformation:
  """chain(clip_by_global_norm, adamw(schedule)); frozen parameters get zero updates.

  Defaults are docs/method.md §5 (AdamW, lr 1e-6 constant, wd 1e-2, clip 1.0).

  Args:
    learning_rate: peak learning rate, or an optax schedule (then `schedule` and its
      arguments are ignored).
    schedule, warmup_steps, total_steps, end_learning_rate: see `make_schedule`.
    weight_decay, b1, b2, eps: AdamW.
    grad_clip_norm: global-norm clip over trainable parameters; None disables it.
    frozen_regex: parameters whose '/'-joined path matches (re.search) are frozen.
  Returns:
    An optax transformation whose state records the current `learning_rate`
    (via `optax.inject_hyperparams`), which the train step reports.
  """
  lr_fn = (
    learning_rate
    if callable(learning_rate)
    else make_schedule(
      schedule,
      learning_rate,
      warmup_steps=warmup_steps,
      total_steps=total_steps,
      end_learning_rate=end_learning_rate,
    )
  )
  # Hyperparameters and the first moment stay float32 whatever the parameter dtype: by default
  # inject_hyperparams casts b2 = 0.999 to a bfloat16 parameter's dtype, where it rounds to 1.0, so
  # nu stays 0 and the bias correction 1 - b2^t is 0 (NaN weights after one step).
  adamw = optax.inject_hyperparams(
    optax.adamw, static_args=("mu_dtype",), hyperparam_dtype=jnp.float32
  )(learning_rate=lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=jnp.float32)
  trainable = (
    optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw) if grad_clip_norm else adamw
  )
  if frozen_regex is None:
    return trainable
  return optax.multi_transform(
    {"trainable": trainable, "frozen": optax.set_to_zero()},
    lambda params: _frozen_labels(params, frozen_regex),
  )


# ----------------------------------------------------------------------------- train state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything the step updates. A pytree; donate it to the step.

  step: int32 scalar, calls so far. params: nnx.State of the model's nnx.Param
  variables. opt_state: optax state. num_skipped: int32 scalar, non-finite updates skipped.
  """

  step: Array
  params: nnx.State
  opt_state: optax.OptState
  num_skipped: Array


def init_train_state(
  model: nnx.Module, optimizer: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits an NNX model into (graphdef, TrainState). The model must hold only nnx.Param state.

  The state shares its arrays with `model`: once a donating step has run, the model's
  own arrays are deleted, so keep using `nnx.merge(graphdef, state.params)` instead.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree_util.tree_leaves(rest):
    raise ValueError(
      "init_train_state: the model has non-Param state "
      f"{[path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(rest)[0]][:5]}; "
      "only nnx.Param state is supported by the train step"
    )
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    num_skipped=jnp.zeros((), jnp.int32),
  )
  return graphdef, state


# ----------------------------------------------------------------------------- step


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
  """[B, ...] leaves -> [n, B/n, ...] (strided rows); 0-d leaves -> broadcast to [n]."""

  def split(path, x):
    x = jnp.asarray(x)
    if x.ndim == 0:
      return jnp.broadcast_to(x, (num_microbatches,))
    if x.shape[0] % num_microbatches:
      raise ValueError(
        f"batch leaf {path_str(path)!r} has leading dim {x.shape[0]}, "
        f"not divisible by num_microbatches={num_microbatches}"
      )
    return jnp.swapaxes(
      x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]), 0, 1
    )

  return jax.tree_util.tree_map_with_path(split, batch)


def _learning_rate(opt_state: Any) -> Array:
  """The `learning_rate` recorded by inject_hyperparams in opt_state, NaN if absent."""
  found = []

  def visit(path, leaf):
    if (
      path and path_str(path[-1:]) == "learning_rate" and "hyperparams_states" not in path_str(path)
    ):
      found.append(leaf)

  jax.tree_util.tree_map_with_path(visit, opt_state)
  return jnp.asarray(found[0], jnp.float32) if found else jnp.asarray(jnp.nan, jnp.float32)


def scaled_global_norm(tree: Any) -> Array:
  """sqrt(sum of x²) over every leaf, in float32, scaled by the largest |x| first.

  `optax.global_norm` squares the values as they are: its float32 sum overflows to inf once the norm
  passes ~1.8e19 (and underflows to 0 below ~1e-19) although the norm itself fits. Scaled, the result
  is finite whenever every value is finite and the norm is below float32's largest (~3.4e38); a
  non-finite value gives a non-finite norm.
  """
  leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(tree)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in leaves]))
  safe = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)
  return safe * jnp.sqrt(sum(jnp.sum(jnp.square(x / safe)) for x in leaves))


def _where_tree(pred: Array, on_true: Any, on_false: Any) -> Any:
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


METRIC_WEIGHT = "metric_weight"


def reduce_microbatch_metrics(
  aux_stack: dict[str, Array], summed: Sequence[str] = ()
) -> dict[str, Array]:
  """[n] per-micro-batch aux metrics -> scalars.

  Keys in `summed` are summed (partial sums of a full-batch quantity: a micro-batch's share of a
  loss normalised by full-batch counts). Otherwise, without a `metric_weight` entry: the plain
  mean. With one (e.g. the micro-batch's valid-token count): the weighted mean, and max/min over
  the micro-batches of positive weight for keys ending in `_max`/`_min`; a micro-batch with
  nothing in it (all padding) then does not drag token-level means towards 0.
  """
  sums = {k: jnp.sum(v, axis=0) for k, v in aux_stack.items() if k in summed}
  aux_stack = {k: v for k, v in aux_stack.items() if k not in summed}
  if METRIC_WEIGHT not in aux_stack:
    return {**{k: jnp.mean(v, axis=0) for k, v in aux_stack.items()}, **sums}
  w = aux_stack[METRIC_WEIGHT].astype(jnp.float32)
  has = w > 0
  out = sums
  for k, v in aux_stack.items():
    if k.endswith("_max"):
      out[k] = jnp.where(has.any(), jnp.max(jnp.where(has, v, -jnp.inf)), jnp.mean(v))
    elif k.endswith("_min"):
      out[k] = jnp.where(has.any(), jnp.min(jnp.where(has, v, jnp.inf)), jnp.mean(v))
    else:
      out[k] = jnp.sum(w * v) / jnp.maximum(jnp.sum(w), 1e-30)
  return out


def train_step_fn(
  graphdef: nnx.GraphDef,
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  num_microbatches: int = 1,
  *,
  frozen_regex: str | None = None,
  summed_metrics: Sequence[str] = (),
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Array]]]:
  """Builds `step(state, batch) -> (state, metrics)`, a pure function (jit it with `programs.make_train_step`).

  Args:
    graphdef: from `init_train_state` / `nnx.split`.
    loss_fn: `(model, microbatch) -> (scalar loss, dict of scalar aux metrics)`; the
      micro-batch losses are summed (see module docstring).
    optimizer: e.g. `make_optimizer(...)`.
    num_microbatches: gradient-accumulation steps; batch leaves' leading dim must divide.
    frozen_regex: the optimizer's frozen_regex, to skip frozen gradients (optional).
    summed_metrics: aux keys summed over micro-batches instead of averaged (e.g. "pg_loss",
      whose micro-batch values are partial sums over the full batch's normaliser).
  Returns:
    step function. metrics: loss (summed over micro-batches), grad_norm (before
    clipping), update_norm, param_norm, learning_rate, skipped (0/1), num_skipped, and
    the mean over micro-batches of each aux metric (the sum for `summed_metrics`; aux
    keys that collide with these are shadowed).
  """
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
  is_frozen = frozen_filter(frozen_regex) if frozen_regex else None

  def step_fn(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Array]]:
    params = state.params
    if is_frozen is not None:
      frozen, trainable = nnx.split_state(params, is_frozen, ...)
    else:
      frozen, trainable = None, params

    def micro_loss(trainable_params, microbatch):
      parts = (trainable_params,) if frozen is None else (trainable_params, frozen)
      model = nnx.merge(graphdef, *parts)
      loss, aux = loss_fn(model, microbatch)
      return loss.astype(jnp.float32), aux

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if num_microbatches == 1:
      (loss, aux), grads = grad_fn(trainable, batch)
    else:
      micro = split_microbatches(batch, num_microbatches)

      def accumulate(carry, microbatch):
        grads_acc, loss_acc = carry
        (loss_k, aux_k), grads_k = grad_fn(trainable, microbatch)
        grads_acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads_k)
        return (grads_acc, loss_acc + loss_k), aux_k

      zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
      (grads, loss), aux_stack = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32)), micro
      )
      aux = reduce_microbatch_metrics(aux_stack, tuple(summed_metrics))
    aux = dict(aux)
    aux.pop(METRIC_WEIGHT, None)

    grad_norm = optax.global_norm(grads)
    if frozen is not None:  # the optimizer wants a full tree; frozen entries are zeroed by it
      grads = nnx.merge_state(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))
    updates, new_opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if frozen is not None:  # bitwise freeze even if the optimizer was built without the regex
      new_params = nnx.merge_state(nnx.split_state(new_params, is_frozen, ...)[1], frozen)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    skipped = (~finite).astype(jnp.int32)
    new_state = TrainState(
      step=state.step + 1,
      params=_where_tree(finite, new_params, params),
      opt_state=_where_tree(finite, new_opt_state, state.opt_state),
      num_skipped=state.num_skipped + skipped,
    )
    # The step's own keys win over same-named aux keys (e.g. a micro-batch "loss").
    metrics = {
      **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()},
      "loss": loss,
      "grad_norm": grad_norm,
      "update_norm": jnp.where(finite, optax.global_norm(updates), 0.0),
      "param_norm": scaled_global_norm(new_state.params),  # finite for large finite weights
      "learning_rate": _learning_rate(new_opt_state),
      "skipped": skipped,
      "num_skipped": new_state.num_skipped,
    }
    return new_state, metrics

  return step_fn
