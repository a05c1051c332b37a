"""The generic NNX train step on a tiny model with a `visual` submodule and the PGPO loss."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from pgpo_jax.keypaths import path_str
from pgpo_jax.programs import make_train_step
from pgpo_jax.rl.losses import loss_normalizers, policy_loss
from pgpo_jax.train_step import (
  init_train_state,
  make_optimizer,
  make_schedule,
  reduce_microbatch_metrics,
  scaled_global_norm,
  split_microbatches,
)
from tests.multidevice import run_on_8_devices

B, T, D_IN, D_HID, V = 8, 5, 6, 16, 11


class TinyPolicy(nnx.Module):
  """features [B, T, D_IN] -> logits [B, T, V]; `visual` stands in for the vision tower."""

  def __init__(self, rngs: nnx.Rngs):
    self.visual = nnx.Linear(D_IN, D_HID, rngs=rngs)
    self.head = nnx.Linear(D_HID, V, rngs=rngs)

  def __call__(self, x_BxTxD):
    return self.head(jnp.tanh(self.visual(x_BxTxD)))


def token_logp(model, x, targets):
  logits = model(x).astype(jnp.float32)
  return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


def pg_loss_fn(model, mb):
  logp = token_logp(model, mb["x"], mb["targets"])
  return policy_loss(
    logp, mb["old_logp"], mb["adv"], mb["mask"], token_normalizer=mb["token_normalizer"]
  )


def make_batch(seed, model, b=B):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, T, D_IN)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (b, T)))
  mask = jnp.asarray(rng.random((b, T)) < 0.8).at[:, 0].set(True)
  # the old policy is the current one, perturbed, so some ratios fall outside the clip range
  old = token_logp(model, x, targets) + jnp.asarray(rng.normal(0, 0.3, (b, T)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=(b, 1)) * rng.uniform(0.2, 2.0, (b, T)), jnp.float32)
  return {
    "x": x,
    "targets": targets,
    "old_logp": old,
    "adv": adv,
    "mask": mask,
    **loss_normalizers(mask),
  }


def copy_tree(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def flat_params(state):
  return {
    path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
  }


@pytest.fixture
def setup():
  # function-scoped: the donating step deletes the buffers the state shares with `model`
  model = TinyPolicy(nnx.Rngs(0))
  return model, make_batch(1, model)


# ----------------------------------------------------------------------------- basics


def test_step_updates_trainable_and_freezes_visual(setup):
  model, batch = setup
  opt = make_optimizer(1e-2, frozen_regex="^visual/")
  graphdef, state = init_train_state(model, opt)
  before = flat_params(state)
  assert set(before) == {"visual/kernel", "visual/bias", "head/kernel", "head/bias"}
  step = make_train_step(graphdef, pg_loss_fn, opt, frozen_regex="^visual/")
  state, metrics = step(state, batch)
  after = flat_params(state)
  assert np.isfinite(metrics["loss"]) and float(metrics["skipped"]) == 0
  for name in ("visual/kernel", "visual/bias"):
    assert after[name].tobytes() == before[name].tobytes(), name  # bitwise unchanged
  for name in ("head/kernel", "head/bias"):
    assert not np.allclose(after[name], before[name]), name
  assert int(state.step) == 1 and int(state.num_skipped) == 0
  for key in (
    "loss",
    "grad_norm",
    "update_norm",
    "param_norm",
    "learning_rate",
    "skipped",
    "num_skipped",
    "clip_frac",
    "approx_kl",
    "ratio_max",
    "pg_loss",
  ):
    assert key in metrics, key
  assert float(metrics["learning_rate"]) == pytest.approx(1e-2)
  assert float(metrics["update_norm"]) > 0


def test_step_level_freeze_holds_even_with_a_plain_optimizer(setup):
  model, batch = setup
  opt = make_optimizer(1e-2, weight_decay=0.5)  # no frozen_regex: decay would move `visual`
  graphdef, state = init_train_state(model, opt)
  before = flat_params(state)
  state, _ = make_train_step(graphdef, pg_loss_fn, opt, frozen_regex="^visual/")(state, batch)
  after = flat_params(state)
  assert after["visual/kernel"].tobytes() == before["visual/kernel"].tobytes()
  assert not np.allclose(after["head/kernel"], before["head/kernel"])


def test_frozen_grads_do_not_count_toward_grad_norm(setup):
  model, batch = setup
  norms = {}
  for regex in (None, "^visual/"):
    opt = make_optimizer(1e-2, frozen_regex=regex)
    graphdef, state = init_train_state(TinyPolicy(nnx.Rngs(0)), opt)
    _, metrics = make_train_step(graphdef, pg_loss_fn, opt, frozen_regex=regex)(state, batch)
    norms[regex] = float(metrics["grad_norm"])
  # head-only grad norm, computed directly
  graphdef, params = nnx.split(model, nnx.Param)
  grads = jax.jit(jax.grad(lambda p: pg_loss_fn(nnx.merge(graphdef, p), batch)[0]))(params)
  head_norm = float(optax.global_norm(grads["head"]))
  assert norms["^visual/"] == pytest.approx(head_norm, rel=1e-5)
  assert norms[None] > norms["^visual/"] * (1 + 1e-4)


def test_frozen_regex_matching_nothing_raises(setup):
  model, _ = setup
  opt = make_optimizer(1e-2, frozen_regex="^vision_tower/")
  with pytest.raises(ValueError, match="matches no parameter"):
    init_train_state(model, opt)


def test_non_finite_batch_is_skipped(setup):
  model, batch = setup
  opt = make_optimizer(1e-2)
  graphdef, state = init_train_state(model, opt)
  step = make_train_step(graphdef, pg_loss_fn, opt)
  state, _ = step(state, batch)  # one good step so the Adam moments are non-trivial
  params_before, opt_before = copy_tree(state.params), copy_tree(state.opt_state)
  bad = dict(batch, x=batch["x"].at[0, 0, 0].set(jnp.nan))
  state, metrics = step(state, bad)
  assert (
    int(metrics["skipped"]) == 1
    and int(state.num_skipped) == 1
    and int(metrics["num_skipped"]) == 1
  )
  assert not np.isfinite(float(metrics["loss"]))
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a, b), copy_tree(state.params), params_before
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a, b), copy_tree(state.opt_state), opt_before
  )
  state, metrics = step(state, batch)  # recovers
  assert int(metrics["skipped"]) == 0 and int(state.num_skipped) == 1 and int(state.step) == 3


@pytest.mark.parametrize("num_microbatches", [2, 4])
def test_microbatch_accumulation_equals_full_batch(setup, num_microbatches):
  model, batch = setup
  opt = optax.sgd(0.5)  # linear in the gradient, so equal params <=> equal gradients
  results = {}
  for n in (1, num_microbatches):
    graphdef, state = init_train_state(TinyPolicy(nnx.Rngs(0)), opt)
    state, metrics = make_train_step(graphdef, pg_loss_fn, opt, n)(state, batch)
    results[n] = (flat_params(state), metrics)
  (p1, m1), (pn, mn) = results[1], results[num_microbatches]
  for name in p1:
    np.testing.assert_allclose(pn[name], p1[name], rtol=1e-6, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(mn["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(mn["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert float(m1["grad_norm"]) > 0


def test_token_weighted_metrics_ignore_empty_microbatches(setup):
  """With `metric_weight` (valid tokens), token-level aux metrics over micro-batches equal the
  full-batch ones even when a micro-batch is all padding (filler groups of the trainer)."""
  model, batch = setup
  batch = dict(
    batch, mask=batch["mask"].at[1::2].set(False)
  )  # micro-batch 1 of 2 (odd rows) is empty
  batch.update(loss_normalizers(batch["mask"]))

  def weighted(model, mb):
    loss, aux = pg_loss_fn(model, mb)
    return loss, {**aux, "metric_weight": mb["mask"].sum()}

  opt = optax.sgd(0.1)
  out = {}
  for n, fn in ((1, pg_loss_fn), (2, weighted), (2, pg_loss_fn)):
    graphdef, state = init_train_state(TinyPolicy(nnx.Rngs(0)), opt)
    out[n, fn] = make_train_step(graphdef, fn, opt, n)(state, batch)[1]
  full, w, plain = out[1, pg_loss_fn], out[2, weighted], out[2, pg_loss_fn]
  assert "metric_weight" not in w
  for k in ("clip_frac", "ratio_mean", "approx_kl", "ratio_max", "ratio_min"):
    np.testing.assert_allclose(w[k], full[k], rtol=1e-5, err_msg=k)
  # The plain mean halves token means (the empty micro-batch reports 0): what the weights fix.
  np.testing.assert_allclose(plain["ratio_mean"], full["ratio_mean"] / 2, rtol=1e-5)


@pytest.mark.parametrize("num_microbatches", [2, 4])
def test_summed_loss_metrics_equal_the_single_batch_loss(setup, num_microbatches):
  """A micro-batch's pg_loss is its partial sum over the full batch's token count: summed over
  micro-batches it is the batch's loss (NumPy, in one piece); averaged it would be 1/n of it."""
  model, batch = setup
  logp = np.asarray(token_logp(model, batch["x"], batch["targets"]), np.float64)
  mask, adv = np.asarray(batch["mask"]), np.asarray(batch["adv"], np.float64)
  ratio = np.exp(logp - np.asarray(batch["old_logp"], np.float64))
  tok = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.28))
  want = tok[mask].sum() / mask.sum()
  opt = optax.sgd(0.0)
  got = {}
  for summed in (("pg_loss",), ()):
    graphdef, state = init_train_state(TinyPolicy(nnx.Rngs(0)), opt)
    step = make_train_step(graphdef, pg_loss_fn, opt, num_microbatches, summed_metrics=summed)
    got[summed] = step(state, batch)[1]
  np.testing.assert_allclose(got[("pg_loss",)]["pg_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(got[("pg_loss",)]["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(
    got[()]["pg_loss"], want / num_microbatches, rtol=1e-5
  )  # the old average


def test_reduce_microbatch_metrics_rules():
  got = reduce_microbatch_metrics(
    {
      "metric_weight": jnp.array([3.0, 0.0, 1.0]),
      "x": jnp.array([1.0, 5.0, 3.0]),
      "r_max": jnp.array([2.0, 9.0, 4.0]),
      "r_min": jnp.array([0.5, -1.0, 0.7]),
    }
  )
  assert (
    float(got["x"]) == pytest.approx(1.5)
    and float(got["r_max"]) == 4.0
    and float(got["r_min"]) == 0.5
  )
  assert float(reduce_microbatch_metrics({"x": jnp.array([1.0, 5.0])})["x"]) == 3.0
  both = reduce_microbatch_metrics(
    {
      "metric_weight": jnp.array([3.0, 1.0]),
      "s": jnp.array([1.0, 5.0]),
      "x": jnp.array([1.0, 5.0]),
    },
    summed=("s",),
  )
  assert float(both["s"]) == 6.0 and float(both["x"]) == 2.0


def test_state_sharding_alone_is_accepted(setup):
  model, batch = setup
  opt = make_optimizer(1e-2)
  graphdef, state = init_train_state(model, opt)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  step = make_train_step(
    graphdef, pg_loss_fn, opt, state_sharding=jax.tree.map(lambda _: device, state)
  )
  state, metrics = step(state, batch)  # batch_sharding=None: JAX chooses
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


def test_split_microbatches_is_strided_and_broadcasts_scalars():
  batch = {"a": jnp.arange(8), "n": jnp.float32(3.0)}
  micro = split_microbatches(batch, 4)
  np.testing.assert_array_equal(micro["a"], [[0, 4], [1, 5], [2, 6], [3, 7]])
  np.testing.assert_array_equal(micro["n"], [3.0] * 4)
  with pytest.raises(ValueError, match="not divisible"):
    split_microbatches({"a": jnp.arange(6)}, 4)


def test_no_retrace_on_second_call(setup):
  model, batch = setup
  traces = []

  def counting_loss(model, mb):
    traces.append(1)
    return pg_loss_fn(model, mb)

  other_batch = make_batch(2, model)  # new values, same shapes
  opt = make_optimizer(1e-3)
  graphdef, state = init_train_state(model, opt)
  step = make_train_step(graphdef, counting_loss, opt, 2)
  state, _ = step(state, batch)
  n_first = len(traces)
  assert n_first >= 1
  state, _ = step(state, other_batch)
  state, _ = step(state, batch)
  assert len(traces) == n_first, "the step retraced"


def test_schedules_and_learning_rate_metric(setup):
  model, batch = setup
  sched = make_schedule("linear", 1e-2, warmup_steps=2, total_steps=6)
  opt = make_optimizer(sched)
  graphdef, state = init_train_state(model, opt)
  step = make_train_step(graphdef, pg_loss_fn, opt)
  lrs = []
  for _ in range(4):
    state, metrics = step(state, batch)
    lrs.append(float(metrics["learning_rate"]))
  np.testing.assert_allclose(lrs, [float(sched(i)) for i in range(4)], rtol=1e-6)
  assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-2)
  cos = make_schedule("warmup_cosine", 1.0, warmup_steps=2, total_steps=10)
  assert float(cos(2)) == pytest.approx(1.0) and float(cos(10)) == pytest.approx(0.0, abs=1e-7)
  assert float(make_schedule("constant", 3e-4)(100)) == pytest.approx(3e-4)
  with pytest.raises(ValueError, match="valid"):
    make_schedule("cosine", 1.0)
  with pytest.raises(ValueError, match="total_steps"):
    make_schedule("linear", 1.0)


# ----------------------------------------------------------------------------- 8 devices


def test_data_parallel_on_8_devices_matches_single_device():
  body = f"""
    import json, sys
    sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
    import numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tests.test_train_step import TinyPolicy, make_batch, pg_loss_fn
    from pgpo_jax.programs import make_train_step
    from pgpo_jax.train_step import init_train_state, make_optimizer

    model = TinyPolicy(nnx.Rngs(0))
    batch = make_batch(3, model, b=16)
    opt = make_optimizer(1e-2, frozen_regex="^visual/")
    initial = [np.array(x) for x in jax.tree.leaves(nnx.split(model, nnx.Param)[1])]

    graphdef, state = init_train_state(TinyPolicy(nnx.Rngs(0)), opt)
    step = make_train_step(graphdef, pg_loss_fn, opt, 2, frozen_regex="^visual/")
    single, m_single = step(state, batch)
    single = jax.tree.map(np.asarray, single.params)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    graphdef, state = init_train_state(TinyPolicy(nnx.Rngs(0)), opt)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    batch_sharding = jax.tree.map(lambda x: NamedSharding(mesh, P("data") if x.ndim else P()), batch)
    sharded_batch = jax.device_put(batch, batch_sharding)
    state = jax.device_put(state, state_sharding)
    step = make_train_step(graphdef, pg_loss_fn, opt, 2, frozen_regex="^visual/",
                           state_sharding=state_sharding, batch_sharding=batch_sharding)
    multi, m_multi = step(state, sharded_batch)
    n_shards = len(sharded_batch["x"].sharding.device_set)
    multi = jax.tree.map(np.asarray, multi.params)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)))
    print(json.dumps({{"diff": diff, "n_shards": n_shards, "loss_single": float(m_single["loss"]),
                      "loss_multi": float(m_multi["loss"]),
                      "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(single), initial))}}))
    """
  out = run_on_8_devices(body)
  assert out["n_shards"] == 8
  assert out["moved"] > 1e-4  # the step did something
  assert out["diff"] < 1e-5, out
  assert out["loss_multi"] == pytest.approx(out["loss_single"], rel=1e-5)


# ----------------------------------------------------------------------------- param_norm


def _norm64(tree):
  return float(np.sqrt(sum((np.asarray(x, np.float64) ** 2).sum() for x in jax.tree.leaves(tree))))


@given(
  st.lists(
    st.tuples(st.integers(1, 40), st.floats(-37, 36), st.integers(0, 2**31)), min_size=1, max_size=4
  )
)
@settings(max_examples=60, deadline=None)
def test_scaled_global_norm_is_the_float64_norm_at_any_magnitude(leaves):
  """Values of 1e-37 .. 1e37 (float32's normal range; XLA flushes subnormals to zero): the norm
  neither overflows nor underflows."""

  def leaf(n, e, seed):
    rng = np.random.default_rng(seed)
    return (rng.uniform(1, 10, n) * rng.choice([-1.0, 1.0], n) * 10.0**e).astype(np.float32)

  tree = {f"l{i}": leaf(*x) for i, x in enumerate(leaves)}
  want = _norm64(tree)
  got = float(scaled_global_norm(tree))
  assert np.isfinite(got) and got == pytest.approx(want, rel=1e-5), (got, want)


def test_scaled_global_norm_keeps_non_finite_values_non_finite():
  assert np.isinf(float(scaled_global_norm({"a": np.array([1.0, np.inf], np.float32)})))
  assert np.isnan(float(scaled_global_norm({"a": np.array([1.0, np.nan], np.float32)})))
  assert float(scaled_global_norm({"a": np.zeros(3, np.float32)})) == 0.0


def test_param_norm_of_large_weights_is_logged_as_a_number(setup, tmp_path):
  """Weights of 1e20 (a diverged run): `optax.global_norm` overflowed to inf, which metrics.jsonl
  logged as null; the scaled norm gives the value."""
  import json

  import ml_collections

  from pgpo_jax import train_metrics

  model, batch = setup
  opt = make_optimizer(1e-2)
  graphdef, state = init_train_state(model, opt)
  state = dataclasses.replace(state, params=jax.tree.map(lambda p: p * 1e20, state.params))
  state, metrics = make_train_step(graphdef, pg_loss_fn, opt)(state, batch)
  assert not np.isfinite(float(optax.global_norm(state.params)))  # what was logged before
  want = _norm64(state.params)
  assert float(metrics["param_norm"]) == pytest.approx(want, rel=1e-5) and want > 1e20
  log = train_metrics.MetricsLog(
    ml_collections.ConfigDict({"logging": {"tensorboard": False, "wandb": False}}),
    str(tmp_path),
    is_host0=True,
  )
  log.log(1, {"train/param_norm": float(metrics["param_norm"])})
  row = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert row["train/param_norm"] == pytest.approx(want, rel=1e-5)
