"""The device programs of the training system, jitted here and only here, with shardings and donation.

  program         body                                     layout                       donated  builder
  --------------  ---------------------------------------  ---------------------------  -------  -------------------------
  rollout cast    `rollout.program_bodies(...).cast`       the parameters' layout       -        `rollout_programs`
  rollout start   `rollout.program_bodies(...).start`      SAMPLE, pinned inside        -        `rollout_programs`
  rollout decode  `rollout.program_bodies(...).decode`     SAMPLE, pinned inside        state    `rollout_programs`
  rollout finish  `rollout.program_bodies(...).finish`     SAMPLE, pinned inside        -        `rollout_programs`
  score           `sequences.score_rollout`, no grad       TRAIN, in/out shardings      -        `make_score_program`
  reference       `sequences.response_logprobs`, no grad   TRAIN, in/out shardings      -        `make_reference_program`
  advantages      `advantages.get_estimator(...)`          host-local rows, one device  -        `make_advantage_program`
  token weights   `advantages.pgpo_token_weights`          unsharded (the inspector)    -        `make_token_weights_program`
  train step      `train_step.train_step_fn(loss)`         TRAIN, in/out shardings      state    `make_train_step`

`trainer_programs(c, ...)` builds the trainer's score, π_ref (`loss.kl_coef > 0`), advantage and
update programs from its config and `training_rollout_static(c, ...)` names its rollout programs; the
trainer runs them and `tools/compile_check.py` compiles them, so the check predicts what the trainer
runs (`tests/test_programs.py` compares the two lowerings). The sampler (hence the trainer's rollouts and
the evaluator) takes its programs from `rollout_programs`, the inspector its score and weight programs
from here. The model's own host convenience `qwen2_5_vl.forward` keeps its jit: the model package
depends on nothing above it.

Shardings. Programs whose argument shapes the config fixes (a scoring slice, an update batch, the train
state) take explicit in/out shardings, so an argument laid out otherwise is an error rather than a
silent copy. The rollout programs compile once per bucket (batch, prompt length, patches) and whether
a dimension splits over its mesh axes depends on those shapes, so their bodies pin the layout of their
inputs and outputs by logical axes (`rollout.logical_axes`) instead. The advantage estimator runs on
each host's own rows (numpy in, numpy out), on one local device. Every program traces with its rules
in effect for the model's activation constraints (`logical_axes.rules_in_effect`): the constraints are
part of the program, whatever context its caller is in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pgpo_jax import config as config_lib
from pgpo_jax import rollout, sharding
from pgpo_jax import train_step as train_step_lib
from pgpo_jax.logical_axes import rules_in_effect
from pgpo_jax.rl import advantages as adv_lib
from pgpo_jax.rl import losses as losses_lib
from pgpo_jax.rl import packed_passes, packing, sequences


def _with_rules(fn: Callable, mesh: Mesh | None, rules: sharding.Rules | None) -> Callable:
  """`fn` traced with (mesh, rules) in effect for `constrain`; none on one device (as unsharded code)."""
  if mesh is not None and mesh.size == 1:
    mesh = None

  @functools.wraps(fn)
  def traced(*args):
    with rules_in_effect(mesh, rules):
      return fn(*args)

  return traced


def rows_sharding(mesh: Mesh, rules: sharding.Rules, num_rows: int) -> NamedSharding:
  """The layout of a row-aligned batch of `num_rows` global rows: rows over the logical `batch` axis,
  everything else replicated (a prefix for every leaf of the batch, as `multihost.to_global` places it)."""
  return sharding.logical_sharding(("batch",), mesh, rules, (num_rows,))


# ------------------------------------------------------------------------------------------------
# Rollout
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def rollout_programs(graphdef, static: rollout.RolloutStatic) -> rollout.Programs:
  """cast (with a compute dtype) / start / decode (decode state donated) / finish of one (model graph,
  static config); each compiles once per input shapes. Cached: the same static gives the same jitted
  functions."""
  body = rollout.program_bodies(graphdef, static)
  rules = dict(static.rules) if static.mesh is not None else None
  traced = lambda fn: _with_rules(fn, static.mesh, rules)  # noqa: E731
  # The cast copy keeps each parameter's layout (elementwise), so it needs no pinning.
  return rollout.Programs(
    start=jax.jit(traced(body.start)),
    decode=jax.jit(traced(body.decode), donate_argnums=(1,)),
    finish=jax.jit(traced(body.finish)),
    cast=None if body.cast is None else jax.jit(body.cast),
  )


def training_rollout_static(
  c: ml_collections.ConfigDict, pad_token_id: int, mesh: Mesh
) -> rollout.RolloutStatic:
  """The static config of the trainer's rollouts (`rollout.*` keys; rows over SAMPLE_RULES' batch)."""
  r = c.rollout
  return rollout.RolloutStatic.make(
    rollout.SamplingConfig(r.temperature, r.top_p, r.top_k),
    r.max_new_tokens,
    r.group_size,
    pad_token_id,
    mesh if mesh.size > 1 else None,
    sharding.SAMPLE_RULES,
    decode_rows=r.decode_rows,
    compute_dtype=r.dtype,
  )


# ------------------------------------------------------------------------------------------------
# Scoring, advantages, token weights
# ------------------------------------------------------------------------------------------------
def make_score_program(
  graphdef,
  *,
  estimator: str = "k3",
  chunk_size: int = 256,
  clamp_log_ratio: float | None = None,
  temperature: float = 1.0,
  blind: bool = True,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.TRAIN_RULES,
  params_sharding: Any = None,
  num_rows: int | None = None,
) -> Callable:
  """jit `score(params, seq) -> DependencyScores` of PGPO's two-view pass: `sequences.score_rollout`
  on a SequenceBatch, `packing.score_rollout` on a PackedBatch (train.packing; [U, M] outputs).
  `blind=False` (GRPO/DAPO, `pgpo.enabled=False`) runs the image view only.

  With a mesh: `params_sharding` is the parameters' layout (a tree of shardings), `seq` has `num_rows`
  leading rows (prompts, or packing units when packed) laid out by `rows_sharding`, and the scores
  come back the same way.
  """

  def score(params, seq):
    model = nnx.merge(graphdef, params)
    lib = packing if isinstance(seq, packing.PackedBatch) else sequences
    return lib.score_rollout(
      model,
      seq,
      estimator=estimator,
      chunk_size=chunk_size,
      clamp_log_ratio=clamp_log_ratio,
      temperature=temperature,
      blind=blind,
    )

  fn = _with_rules(score, mesh, rules)
  if mesh is None:
    return jax.jit(fn)
  rows = rows_sharding(mesh, rules, num_rows)
  return jax.jit(fn, in_shardings=(params_sharding, rows), out_shardings=rows)


def make_reference_program(
  graphdef,
  *,
  temperature: float,
  chunk_size: int,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.TRAIN_RULES,
  params_sharding: Any = None,
  num_rows: int | None = None,
) -> Callable:
  """jit `logprobs(params, seq) -> log π_ref(x_t)`, float32 at `temperature`, no gradient: the KL
  term's reference log-probs (`reference.py`) of one scoring slice. A SequenceBatch gives [P*G, L]
  (`sequences.response_logprobs`); a PackedBatch (train.packing: the scoring pass's own packed
  slice, its blind view unused) gives [U, M] (`packing.response_logprobs`; `packing.unpack` them).

  With a mesh, as `make_score_program`: `params_sharding` is π_ref's layout (the policy's), `seq` has
  `num_rows` leading rows laid out by `rows_sharding`, and the log-probs come back the same way.
  """

  def logprobs(params, seq) -> jax.Array:
    model = nnx.merge(graphdef, params)
    lib = packing if isinstance(seq, packing.PackedBatch) else sequences
    return jax.lax.stop_gradient(
      lib.response_logprobs(model, seq, chunk_size=chunk_size, temperature=temperature)
    )

  fn = _with_rules(logprobs, mesh, rules)
  if mesh is None:
    return jax.jit(fn)
  rows = rows_sharding(mesh, rules, num_rows)
  return jax.jit(fn, in_shardings=(params_sharding, rows), out_shardings=rows)


def make_partial_view_program(
  graphdef, *, chunk_size: int = 256, temperature: float = 1.0
) -> Callable:
  """jit `logp(params, seq, hidden_PxTp) -> [P*G, L]`: `sequences.partial_view_logprobs`, the
  response log-probs when the prompt tokens in `hidden_PxTp` are hidden (a partial blind view; the
  inspector's diagnostic, one host)."""

  def logp(params, seq, hidden_PxTp):
    model = nnx.merge(graphdef, params)
    return sequences.partial_view_logprobs(
      model, seq, hidden_PxTp, chunk_size=chunk_size, temperature=temperature
    )

  return jax.jit(logp)


def estimator_options(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `pgpo.*` options of the advantage estimator (none for GRPO/DAPO)."""
  p = c.pgpo
  if not p.enabled:
    return {}
  return dict(
    tau=p.tau,
    beta=p.beta,
    renormalize=p.renormalize,
    threshold_mode=p.threshold_mode,
    min_weight=p.min_weight,
    max_weight=p.max_weight,
    degenerate_rtol=p.degenerate_rtol,
  )


def make_advantage_program(name: str, group_size: int, **options: Any) -> Callable:
  """jit `(rewards_B, dependency_BxT, mask_BxT) -> (adv_BxT, diagnostics)` of a registered estimator.

  One program rather than op-by-op dispatch (the capped renormalisation's bisection loop is slow
  eagerly). Each host runs it on its own rows: numpy in, on one local device.
  """
  return jax.jit(functools.partial(adv_lib.get_estimator(name), group_size=group_size, **options))


def make_token_weights_program(**options: Any) -> Callable:
  """jit `(dependency_BxT, mask_BxT, tau, beta) -> weights_BxT` (`advantages.pgpo_token_weights`; τ, β traced)."""

  def token_weights(dependency_BxT, mask_BxT, tau, beta):
    return adv_lib.pgpo_token_weights(dependency_BxT, mask_BxT, tau, beta, **options)

  return jax.jit(token_weights)


# ------------------------------------------------------------------------------------------------
# The update step
# ------------------------------------------------------------------------------------------------
def make_train_step(
  graphdef: nnx.GraphDef,
  loss_fn: train_step_lib.LossFn,
  optimizer,
  num_microbatches: int = 1,
  *,
  frozen_regex: str | None = None,
  summed_metrics: Sequence[str] = (),
  state_sharding: Any = None,
  batch_sharding: Any = None,
  donate: bool = True,
  mesh: Mesh | None = None,
  rules: sharding.Rules | None = None,
) -> Callable:
  """jit `step(state, batch) -> (state, metrics)` of `train_step.train_step_fn`.

  Args:
    graphdef, loss_fn, optimizer, num_microbatches, frozen_regex, summed_metrics: see
      `train_step.train_step_fn`.
    state_sharding, batch_sharding: in/out shardings of the TrainState and the batch (pytrees of
      shardings, prefixes allowed); None leaves the choice to JAX.
    donate: donate the input state's buffers (do not reuse `state` after the call).
    mesh, rules: the rules in effect for the model's activation constraints while tracing.
  """
  step = train_step_lib.train_step_fn(
    graphdef,
    loss_fn,
    optimizer,
    num_microbatches,
    frozen_regex=frozen_regex,
    summed_metrics=summed_metrics,
  )
  kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if state_sharding is not None or batch_sharding is not None:
    kwargs["in_shardings"] = (state_sharding, batch_sharding)
    kwargs["out_shardings"] = (state_sharding, None)
  return jax.jit(_with_rules(step, mesh, rules) if mesh is not None else step, **kwargs)


def make_optimizer(
  c: ml_collections.ConfigDict, total_steps: int, learning_rate: float | None = None
):
  """The `optim.*` optimizer (`train_step.make_optimizer`); `learning_rate` overrides the config's."""
  o = c.optim
  return train_step_lib.make_optimizer(
    o.learning_rate if learning_rate is None else learning_rate,
    schedule=o.schedule,
    warmup_steps=o.warmup_steps,
    total_steps=total_steps,
    end_learning_rate=o.end_learning_rate,
    weight_decay=o.weight_decay,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    grad_clip_norm=o.grad_clip_norm or None,
    frozen_regex=o.frozen_regex or None,
  )


def scoring_temperature(sampling_temperature: float) -> float:
  """The temperature at which responses sampled at `sampling_temperature` are scored.

  Tokens are sampled from softmax(logits / T), so their log-probs, the dependency S and any KL are
  taken under that same distribution (as verl and EasyR1 divide logits by the rollout temperature).
  T = 0 (greedy sampling) has no sampling distribution; its responses are scored at T = 1.
  """
  t = float(sampling_temperature)
  return t if t > 0 else 1.0


def logprob_temperature(c: ml_collections.ConfigDict) -> float:
  """The temperature of every log-prob of the update: old (scoring), blind, π_θ (loss) and π_ref:
  `scoring_temperature(rollout.temperature)`."""
  return scoring_temperature(c.rollout.temperature)


# Micro-batch values of these loss metrics are partial sums over the mini-batch's normaliser: summed.
SUMMED_LOSS_METRICS = ("pg_loss", "kl")


def rl_loss_fn(c: ml_collections.ConfigDict):
  """`loss_fn(model, batch)` for the train step: clipped surrogate on row-aligned [P, G, L] data, or
  on a packed update batch (key "packed", `packed_passes.update_batch`; [U, M] per-token arrays).

  With `loss.kl_coef > 0` the batch carries `ref_logp` [P, G, L] (log π_ref, `reference.py`) and the
  loss adds kl_coef · agg(KL estimate); its value is the metric `kl`.
  """
  l = c.loss
  temperature = logprob_temperature(c)

  def loss_fn(model, b):
    if "packed" in b:  # train.packing: padding-free rows (`packed_passes.update_batch`)
      loss, metrics = packed_passes.policy_loss(model, b, l, temperature=temperature)
      if "kl_loss" in metrics:
        metrics["kl"] = metrics.pop("kl_loss")
      return loss, metrics
    seq: sequences.SequenceBatch = b["seq"]
    logp, entropy = sequences.response_logprobs(
      model, seq, chunk_size=l.logprob_chunk, temperature=temperature, return_entropy=True
    )
    flat = lambda x: x.reshape(-1, x.shape[-1])
    kl = (
      dict(ref_logp_BxT=flat(b["ref_logp"]), kl_coef=l.kl_coef, kl_estimator=l.kl_estimator)
      if l.kl_coef
      else {}
    )
    loss, metrics = losses_lib.policy_loss(
      logp,
      flat(b["old_logp"]),
      flat(b["adv"]),
      seq.flat_response_mask,
      l.clip_low,
      l.clip_high,
      l.agg,
      dual_clip=l.dual_clip or None,
      entropy_BxT=entropy if l.entropy_coef else None,
      entropy_coef=l.entropy_coef,
      loss_horizon=float(seq.response.shape[-1]),
      token_normalizer=b["token_normalizer"],
      seq_normalizer=b["seq_normalizer"],
      **kl,
    )
    if "kl_loss" in metrics:
      metrics["kl"] = metrics.pop("kl_loss")
    m = seq.flat_response_mask
    metrics["entropy"] = jnp.sum(jnp.where(m, entropy, 0.0)) / jnp.maximum(m.sum(), 1)
    metrics[train_step_lib.METRIC_WEIGHT] = m.sum()  # token-weighted means over micro-batches
    return loss, metrics

  return loss_fn


def sft_loss_fn(c: ml_collections.ConfigDict):
  """Token-mean negative log-likelihood of target responses (the demo's supervised warm-up).

  The batch holds `seq` (rows seen with their images) and/or `seq_blind` (rows trained under the
  blind view, `sequences.blind_response_logprobs`: `warmup.blind_fraction`); `token_normalizer`
  counts the target tokens of both. With `seq_weight` / `seq_blind_weight` ([P, G, L] token weights,
  `warmup.perception_weight`) the loss is the weighted sum over the normaliser (then the weights'
  sum). Metrics, unweighted: `nll` over all target tokens, `nll_image` / `nll_blind` over each part's
  (0 for a part the batch lacks), `nll_upweighted` over the tokens whose weight is not 1 (0: none).
  """

  def loss_fn(model, b):
    sums, counts, weighted = {}, {}, jnp.float32(0.0)
    up_sum, up_count = jnp.float32(0.0), jnp.float32(0.0)
    for key, view in (("seq", "image"), ("seq_blind", "blind")):
      if key not in b:
        sums[view], counts[view] = jnp.float32(0.0), jnp.float32(0.0)
        continue
      seq = b[key]
      fn = sequences.response_logprobs if view == "image" else sequences.blind_response_logprobs
      logp = fn(model, seq, chunk_size=c.loss.logprob_chunk)
      m = seq.flat_response_mask
      nll = jnp.where(m, -logp, 0.0)
      sums[view] = jnp.sum(nll)
      counts[view] = m.sum().astype(jnp.float32)
      if key + "_weight" in b:
        w = b[key + "_weight"].reshape(m.shape).astype(jnp.float32)
        weighted = weighted + jnp.sum(w * nll)
        up = m & (w != 1.0)
        up_sum = up_sum + jnp.sum(jnp.where(up, nll, 0.0))
        up_count = up_count + up.sum().astype(jnp.float32)
      else:
        weighted = weighted + sums[view]
    total = sums["image"] + sums["blind"]
    loss = weighted / jnp.maximum(b["token_normalizer"], 1e-6)
    return loss, {
      "nll": total / jnp.maximum(counts["image"] + counts["blind"], 1.0),
      "nll_image": sums["image"] / jnp.maximum(counts["image"], 1.0),
      "nll_blind": sums["blind"] / jnp.maximum(counts["blind"], 1.0),
      "nll_upweighted": up_sum / jnp.maximum(up_count, 1.0),
    }

  return loss_fn


def train_state_shardings(
  state: train_step_lib.TrainState, param_shardings: Any, mesh: Mesh
) -> train_step_lib.TrainState:
  """Shardings of a TrainState (arrays or shapes): the parameters' layout for the parameters and for
  every optimizer leaf that mirrors one (Adam's moments), counters replicated."""
  opt = sharding.shardings_like_params(state.opt_state, state.params, param_shardings, mesh)
  rep = NamedSharding(mesh, P())
  return train_step_lib.TrainState(step=rep, params=param_shardings, opt_state=opt, num_skipped=rep)


def update_batch_sharding(
  mesh: Mesh, rules: sharding.Rules, num_rows: int, *, kl: bool = False, packed: bool = False
) -> dict[str, Any]:
  """Layout of the RL update batch: `seq`, `adv`, `old_logp` (+ `ref_logp` with a KL term) rows over
  `batch`, normalisers replicated. `packed` (train.packing, `packed_passes.update_batch`): `packed`
  and the per-token arrays have `num_rows` packing units over `batch`, + a replicated `loss_horizon`."""
  rows = rows_sharding(mesh, rules, num_rows)
  rep = NamedSharding(mesh, P())
  out = {
    "packed" if packed else "seq": rows,
    "adv": rows,
    "old_logp": rows,
    "token_normalizer": rep,
    "seq_normalizer": rep,
  }
  if packed:
    out["loss_horizon"] = rep
  if kl:
    out["ref_logp"] = rows
  return out


def packing_units(
  c: ml_collections.ConfigDict, mesh: Mesh, num_processes: int = 1
) -> tuple[int, int]:
  """train.packing's (units per scoring slice, units per update batch) per host: one packing unit per
  batch shard of the TRAIN layout (and per micro-batch in updates), so no gather leaves a shard."""
  shards = max(rollout.batch_shards(mesh, sharding.TRAIN_RULES) // num_processes, 1)
  u = c.updates
  return shards, shards * (u.prompts_per_update // u.micro_batch_prompts)


# ------------------------------------------------------------------------------------------------
# The trainer's set
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainerPrograms:
  """The programs of one training run besides its rollouts (`training_rollout_static`).

  score:      (params, SequenceBatch of `score_rows` prompts) -> DependencyScores [score_rows*G, L]
  reference:  (π_ref params, the same slice as score) -> log π_ref [score_rows*G, L]; None when
              loss.kl_coef == 0 (no KL term: no program, no copy of the weights)
  advantages: (rewards_B, dependency_BxT, mask_BxT) -> (adv_BxT, diagnostics), host-local rows
  train_step: (TrainState, update batch of `update_rows` prompts) -> (TrainState, metrics); state donated
  With train.packing, score, reference and train_step take packed batches and `score_rows`/`update_rows`
  count packing units (`packing_units`), the scores and log π_ref come back as [score_rows, M]
  (`packing.unpack` them).
  """

  score: Callable
  advantages: Callable
  train_step: Callable
  score_rows: int
  update_rows: int
  reference: Callable | None = None


def trainer_programs(
  c: ml_collections.ConfigDict,
  *,
  model_graphdef,
  train_graphdef,
  optimizer,
  mesh: Mesh,
  state_sharding: train_step_lib.TrainState,
  num_processes: int = 1,
) -> TrainerPrograms:
  """The trainer's programs from its config (also what `compile_check` compiles).

  Args:
    model_graphdef: `nnx.split(model)[0]` (scoring); train_graphdef: `init_train_state`'s (the step).
    optimizer: `make_optimizer(c, total_updates)`.
    mesh: the training mesh; state_sharding: `train_state_shardings(...)` of the train state on it.
    num_processes: hosts of the run (the scoring slice is split over them, `config.scoring_prompts_per_host`).
  """
  rules = sharding.TRAIN_RULES
  p, u = c.pgpo, c.updates
  score_rows = config_lib.scoring_prompts_per_host(c, num_processes) * num_processes
  update_rows = u.prompts_per_update
  if c.train.packing:  # leading axes are packing units (`packing_units`), not prompts
    score_units, update_units = packing_units(c, mesh, num_processes)
    score_rows, update_rows = score_units * num_processes, update_units * num_processes
  score = make_score_program(
    model_graphdef,
    estimator=p.dependency_estimator,
    chunk_size=p.scoring_chunk,
    clamp_log_ratio=p.clamp_log_ratio,
    temperature=logprob_temperature(c),
    blind=p.enabled,  # GRPO/DAPO: the image view only
    mesh=mesh,
    rules=rules,
    params_sharding=state_sharding.params,
    num_rows=score_rows,
  )
  reference = None
  if c.loss.kl_coef:  # π_ref scores each scoring slice, packed as the score program gets it
    reference = make_reference_program(
      model_graphdef,
      temperature=logprob_temperature(c),
      chunk_size=c.loss.logprob_chunk,
      mesh=mesh,
      rules=rules,
      params_sharding=state_sharding.params,
      num_rows=score_rows,
    )
  advantages = make_advantage_program(
    "pgpo" if p.enabled else "grpo", c.rollout.group_size, **estimator_options(c)
  )
  step = make_train_step(
    train_graphdef,
    rl_loss_fn(c),
    optimizer,
    u.prompts_per_update // u.micro_batch_prompts,
    frozen_regex=c.optim.frozen_regex or None,
    summed_metrics=SUMMED_LOSS_METRICS,
    state_sharding=state_sharding,
    batch_sharding=update_batch_sharding(
      mesh, rules, update_rows, kl=bool(c.loss.kl_coef), packed=bool(c.train.packing)
    ),
    mesh=mesh,
    rules=rules,
  )
  return TrainerPrograms(score, advantages, step, score_rows, update_rows, reference)
