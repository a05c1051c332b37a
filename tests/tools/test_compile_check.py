"""Ahead-of-time compilation of the trainer's programs for a TPU topology on this CPU host."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pgpo_jax import sharding
from pgpo_jax.rl import packing
from pgpo_jax.tools import compile_check as cc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_topology_names():
  t = cc.parse_topology("v5p-64")
  assert (t.desc, t.num_chips, t.chip.hbm_bytes) == ("v5:2x4x4", 32, 95 * 2**30)
  assert cc.parse_topology("v5e-256").desc == "v5e:16x16"
  assert cc.parse_topology("v4-128").desc == "v4:4x4x4"
  assert cc.parse_topology("v4-8").desc == "v4:2x2x1"
  assert cc.parse_topology("v6e-16").desc == "v6e:4x4"
  assert cc.parse_topology("v5e:2x2").num_chips == 4
  with pytest.raises(ValueError, match="counts TensorCores"):
    cc.parse_topology("v5p-3")
  with pytest.raises(ValueError, match="unknown topology"):
    cc.parse_topology("tpu-9000")


@pytest.mark.parametrize(
  "name,match",
  [
    ("v5p-0", "v5p-0: a slice has at least one chip"),  # was: an unexplained JAX error
    ("v5e-0", "v5e-0: a slice has at least one chip"),
    ("v5e-3", "v5e-3: 3 chips: only power-of-two slices"),
    ("v5e:0x2", "v5e:0x2: every dimension of a slice is at least 1"),
    ("v9-8", "unknown topology 'v9-8'"),
  ],
)
def test_a_topology_that_names_no_slice_is_a_usage_error(name, match, capsys):
  """A clear message and the commands' usage-error status (2), not 1, which means 'does not fit'."""
  from pgpo_jax.cli import common
  from pgpo_jax.cli import compile_check as cli

  with pytest.raises(cc.TopologyError, match=match):
    cc.parse_topology(name)
  code = cli.main([f"--config={ROOT}/configs/demo.py", f"--topology={name}"])
  assert code == common.USAGE_ERROR != cc.EXIT_DOES_NOT_FIT
  err = capsys.readouterr().err
  assert f"pgpo-compile-check: error: --topology={name}: " in err and "Traceback" not in err


def test_a_slice_libtpu_cannot_lay_out_is_a_usage_error(libtpu, capsys):
  """v5p-2 parses (one chip) but libtpu has no such slice: its reason, as a usage error."""
  from pgpo_jax.cli import common
  from pgpo_jax.cli import compile_check as cli

  with pytest.raises(cc.TopologyError, match=r"v5p-2 \(v5:1x1x1\): libtpu cannot build this slice"):
    cc.topology_devices(cc.parse_topology("v5p-2"))
  assert cli.main([f"--config={ROOT}/configs/demo.py", "--topology=v5p-2"]) == common.USAGE_ERROR
  assert "libtpu cannot build this slice" in capsys.readouterr().err


def test_unknown_steps_and_compile_errors_have_their_own_exit_status(capsys):
  import types

  from pgpo_jax.cli import common
  from pgpo_jax.cli import compile_check as cli

  assert cli.main([f"--config={ROOT}/configs/demo.py", "--steps=score,trian"]) == 2
  assert "--steps: unknown ['trian']" in capsys.readouterr().err
  codes = {
    v: cc.exit_code([types.SimpleNamespace(verdict=v)])
    for v in ("fits", "does not fit", "crashed", "error")
  }
  assert codes == {"fits": 0, "does not fit": 1, "crashed": 1, "error": 3}
  assert common.USAGE_ERROR not in codes.values()


def _tiny(recipe="pgpo_7b", **overrides):
  """configs/<recipe>.py (default pgpo_7b) shrunk to the tiny model and a few prompts (all trainer
  code paths)."""
  import importlib

  sys.path.insert(0, ROOT)
  c = importlib.import_module(f"configs.{recipe}").get_config()
  c.model.preset = "tiny"
  c.model.attention_chunk_size = 0
  c.mesh.tensor = 2
  c.rollout.prompts_per_step = 8
  c.rollout.max_new_tokens = 16
  c.data.max_prompt_length = 64
  c.data.min_pixels, c.data.max_pixels = 16 * 14 * 14, 64 * 14 * 14
  c.updates.prompts_per_update = 8
  c.updates.micro_batch_prompts = 4
  c.pgpo.scoring_chunk = 16
  c.loss.logprob_chunk = 16
  c.train.packed_row_length = 160  # two longest sequences a row
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="module")
def libtpu():
  pytest.importorskip(
    "libtpu", reason="libtpu not installed: pip install 'jax[tpu]==0.10.2' (the `tpu` extra)"
  )


@pytest.mark.parametrize("packing", [True, False])
def test_tiny_config_compiles_and_fits_on_v5e_2x2(libtpu, packing):
  ctx, reports = cc.run(
    _tiny(**{"train.packing": packing}), "v5e:2x2", cc.ALL_STEPS, log=lambda m: None
  )
  assert dict(ctx.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
  assert [r.name for r in reports] == ["rollout_start", "rollout_decode", "score", "train"]
  for r in reports:
    assert r.verdict == "fits", (r.name, r.note)
    assert r.argument > 0 and r.total < r.hbm_bytes and r.flops_per_device > 0, r
  by = {r.name: r for r in reports}
  assert by["train"].alias > 0  # the train state is donated
  assert by["rollout_decode"].alias > 0  # the decode state is donated
  assert by["rollout_start"].resident == ctx.state_bytes and by["train"].resident == 0
  assert cc.exit_code(reports) == 0
  table = cc.format_report(ctx, reports)
  assert "rollout_decode" in table and "/ 16" in table


def test_kl_term_compiles_the_reference_program_on_the_packed_slice(libtpu):
  """configs/grpo_7b.py (KL 1e-2 to π_ref, train.packing on) shrunk: π_ref's own program compiles
  as the "reference" step, on the packed scoring slice the score program gets, with its memory in the
  report; π_ref's copy of the weights counts as resident in the scoring and train steps, the train
  state in π_ref's. Without a KL term there is no such step."""
  c = _tiny("grpo_7b", **{"rollout.temperature": 0.7})
  assert c.loss.kl_coef == 1e-2 and c.train.packing and not c.pgpo.enabled
  ctx, reports = cc.run(c, "v5e:2x2", ("score", "reference", "train"), log=lambda m: None)
  by = {r.name: r for r in reports}
  assert list(by) == ["score", "reference", "train"]
  assert all(r.verdict == "fits" for r in reports), [(r.name, r.note) for r in reports]
  ref = by["reference"]
  assert ref.argument > ctx.param_bytes and ref.temp > 0 and ref.output > 0, ref
  assert ref.resident == ctx.state_bytes and ref.total > ctx.state_bytes + ctx.param_bytes
  assert 0 < ref.flops_per_device < by["score"].flops_per_device * 1.01
  assert ref.calls == by["score"].calls > 0
  assert by["train"].resident == ctx.param_bytes
  assert by["score"].resident == ctx.state_bytes
  # π_ref runs on the very slice the score program gets: the packed batch, same abstract leaves.
  score, reference = cc.build_steps(ctx, ("score", "reference"))
  assert isinstance(reference.args[1], packing.PackedBatch)
  assert jax.tree.structure(reference.args) == jax.tree.structure(score.args)
  assert jax.tree.leaves(reference.args) == jax.tree.leaves(score.args)
  table = cc.format_report(ctx, reports)
  assert "\nreference " in table
  assert table.splitlines()[-1].endswith("(without rollout_start, rollout_decode: not compiled)")
  # No KL term: no π_ref program, and the RL step misses nothing without it.
  plain = cc.Context(_tiny(), cc.topology_devices(cc.parse_topology("v5e:2x2")))
  assert plain.programs.reference is None and "reference" not in cc.config_steps(plain.c)
  assert [st.name for st in cc.build_steps(plain, ("score", "reference"))] == ["score"]
  assert "without" not in cc.rl_step_line([by["score"]], ("score",))


def test_oversized_config_does_not_fit_and_exits_1(libtpu, tmp_path):
  """~86 GiB of KV cache per device (20480 rows x 8256 slots) on 16 GiB chips: exit code 1."""
  ctx, reports = cc.run(
    _tiny(**{"rollout.prompts_per_step": 4096, "rollout.max_new_tokens": 8192}),
    "v5e:2x2",
    ["rollout_decode"],
    log=lambda m: None,
  )
  assert reports[0].verdict == "does not fit", reports[0]
  assert cc.exit_code(reports) == 1
  # The script: same verdict, table on stdout, exit status 1.
  cmd = [
    sys.executable,
    os.path.join(ROOT, "scripts", "compile_check.py"),
    "--config=configs/pgpo_7b.py",
    "--topology=v5e:2x2",
    "--steps=rollout_decode",
    "--config.model.preset=tiny",
    "--config.model.attention_chunk_size=0",
    "--config.mesh.tensor=2",
    "--config.rollout.prompts_per_step=4096",
    "--config.rollout.max_new_tokens=8192",
    "--config.data.max_prompt_length=64",
    f"--config.data.max_pixels={64 * 14 * 14}",
    f"--config.data.min_pixels={16 * 14 * 14}",
    "--config.updates.prompts_per_update=8",
    "--config.updates.micro_batch_prompts=4",
  ]
  proc = subprocess.run(
    cmd,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "DOES NOT FIT" in proc.stdout


def test_batch_that_does_not_split_over_the_mesh_is_a_clear_error(libtpu):
  with pytest.raises(ValueError, match=r"micro_batch_prompts=3 does not split over the 2 shards"):
    cc.run(
      _tiny(**{"updates.micro_batch_prompts": 3, "updates.prompts_per_update": 6}),
      "v5e:2x2",
      ["train"],
      log=lambda m: None,
    )


def test_a_compiler_crash_is_that_steps_failure_not_the_checks(libtpu, monkeypatch):
  """Each step compiles in its own child process: a child that aborts (as the TPU compiler does on a
  failed check) is reported as "crashed (signal 6: SIGABRT)" for its step, the other steps still
  compile, and the exit code is 1 with a line naming the step and the knob to turn."""
  monkeypatch.setenv(cc.ABORT_ENV, "score")
  ctx, reports = cc.run(_tiny(), "v5e:2x2", ("score", "train"), log=lambda m: None, isolate=True)
  by = {r.name: r for r in reports}
  assert by["score"].verdict == "crashed", by["score"]
  assert "signal 6: SIGABRT" in by["score"].note
  assert by["score"].flops_per_device > 0  # the analytic columns are still reported
  assert by["train"].verdict == "fits" and by["train"].argument > 0, by["train"]
  assert cc.exit_code(reports) == 1
  (line,) = cc.failures(reports)
  assert line.startswith("score crashed (signal 6") and "pgpo.scoring_prompts" in line
  assert "CRASHED" in cc.format_report(ctx, reports)


def _weights(params, pattern: str) -> int:
  """Elements of the parameters whose dotted path matches `pattern`."""
  import re

  import jax
  import numpy as np

  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = ".".join(re.findall(r"\['(\w+)'\]", jax.tree_util.keystr(path)))
    if re.fullmatch(pattern, name):
      total += int(np.prod(x.shape))
  return total


def test_model_flops_are_two_per_weight_per_token(libtpu):
  """`model_flops` == 2 x (weight-matrix elements counted from the tiny model's own parameter tree)
  x the tokens each matrix sees: decoder layers on every token, lm head on the logit tokens, the
  vision blocks and patch embedding on every patch, the merger on every 4 patches."""
  from flax import nnx

  from pgpo_jax.models import qwen2_5_vl as qwen

  cfg = cc.model_config(_tiny())
  _, params = nnx.split(qwen.abstract_model(cfg, "float32"))
  body = _weights(params, r"language_model\.layers\.w\w+")  # wq wk wv wo w_gate w_up w_down
  head = _weights(params, r"lm_head")
  vis = _weights(params, r"visual\.(blocks\.w\w+|patch_embed)")
  merger = _weights(params, r"visual\.merger_w\d")
  assert body and head and vis and merger
  tokens, logits, images, patches = 1000, 300, 3, 64
  want = 2 * (body * tokens + head * logits + images * (vis * patches + merger * patches // 4))
  got = cc.model_flops(cfg, tokens=tokens, logits_tokens=logits, images=images, patches=patches)
  assert got == want


def _dot_flops(jaxpr) -> int:
  """2 x the multiply-adds of every dot_general in `jaxpr`, into calls and checkpoints, scan bodies
  x their length; a cond counts its costliest branch."""
  from jax.extend import core as jcore

  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += (
        2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
      )
    elif eqn.primitive.name == "scan":
      total += eqn.params["length"] * _dot_flops(eqn.params["jaxpr"].jaxpr)
    elif eqn.primitive.name == "cond":
      total += max(_dot_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
          if isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr)):
            total += _dot_flops(getattr(x, "jaxpr", x))
  return total


def _recomputed_in_program(loss, *args) -> int:
  """The matmul FLOPs the gradient program of `loss` runs beyond forward + 2x forward."""
  import jax

  fwd = _dot_flops(jax.make_jaxpr(loss)(*args).jaxpr)
  grad = jax.grad(loss, argnums=tuple(range(len(args))))
  return _dot_flops(jax.make_jaxpr(grad)(*args).jaxpr) - 3 * fwd


@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("policy", ["none", "full", "dots", "dots_no_batch"])
def test_remat_recompute_is_what_the_gradient_program_runs_again(policy, chunk):
  """`remat_recompute_flops` against the matmuls counted in the gradient's program, on the tiny
  decoder (bfloat16 compute, float32 masters; 16 tokens, query chunks of 4 or none) and the tiny
  vision tower (every block full attention, so the cond's costliest branch is the one taken)."""
  import jax.numpy as jnp
  from flax import nnx

  from pgpo_jax.models import qwen2_5_vl as qwen

  cfg = qwen.tiny_config(
    remat_policy=policy,
    attention_impl="xla",
    attention_chunk_size=chunk,
    vision_fullatt_block_indexes=(0, 1),
  )
  kw = dict(remat_policy=policy, attention_chunk_size=chunk, attention_impl="xla")
  model = qwen.Qwen25VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  graphdef, state = nnx.split(model)
  B, T = 2, 16
  x = jnp.ones((B, T, cfg.text.hidden_size), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(T), (3, B, T))

  def text_loss(state, x):
    h, _ = nnx.merge(graphdef, state).language_model(x, pos, jnp.ones((B, T), bool), None, **kw)
    return jnp.sum(h.astype(jnp.float32))

  grids = np.asarray([(1, 8, 8)])
  vin = qwen.prepare_vision(np.ones((64, cfg.vision.patch_dim), np.float32), grids, cfg.vision)
  patches = vin.pixel_values.shape[0]

  def vision_loss(state, pixels):
    tower = nnx.merge(graphdef, state).visual
    return jnp.sum(tower(dataclasses.replace(vin, pixel_values=pixels), **kw).astype(jnp.float32))

  got = _recomputed_in_program(text_loss, state, x)
  got += _recomputed_in_program(vision_loss, state, jnp.asarray(vin.pixel_values))
  assert got == cc.remat_recompute_flops(cfg, B * T, T, images=1, patches=patches)
  assert (got == 0) == (policy in ("none", "dots") and not chunk)


def test_minimum_ratio_and_rl_step_sum(libtpu):
  """Per step: minimum = max(model FLOPs / (devices x bf16 peak), HBM bytes / bandwidth), ratio =
  t@peak / minimum; the RL step sums each step x its runs per step (1 rollout, scoring slices up
  to the last prompt an update reads, prompts_per_step // prompts_per_update x passes updates)."""
  chip = cc.CHIPS["v5e"]
  assert cc.minimum_seconds(chip, 4, 4 * 197e12, 0) == pytest.approx(1.0)
  assert cc.minimum_seconds(chip, 4, 4 * 197e12, 3 * 0.819e12) == pytest.approx(3.0)

  c = _tiny(**{"rollout.prompts_per_step": 16, "updates.prompts_per_update": 8})
  c.updates.passes = 2
  ctx = cc.Context(
    c, cc.topology_devices(cc.parse_topology("v5e:2x2")), topo=cc.parse_topology("v5e:2x2")
  )
  calls = cc.calls_per_rl_step(c, ctx.shapes)
  # 16 prompts: 2 updates of 8 x 2 passes; scored in slices of micro_batch_prompts = 4.
  assert calls == {"rollout_start": 1, "rollout_decode": 1, "score": 4, "train": 4}
  reports = [cc._base_report(st, ctx) for st in cc.build_steps(ctx, cc.ALL_STEPS)]
  by = {r.name: r for r in reports}
  cfg, s = ctx.cfg, ctx.shapes
  rows, T = s.update_prompts * s.group_size, s.prompt_len + s.response_len
  train_min = 3 * cc.model_flops(
    cfg,
    tokens=rows * T,
    logits_tokens=rows * s.response_len,
    images=s.update_prompts,
    patches=s.patches,
  )
  assert by["train"].min_seconds == pytest.approx(
    max(train_min / (4 * chip.peak_flops), 2 * ctx.state_bytes / chip.hbm_bandwidth)
  )
  for r in reports:
    assert r.min_seconds > 0 and r.ratio == pytest.approx(r.seconds_at_peak / r.min_seconds)
    assert r.ratio >= 1.0, r  # as implemented can never beat the physical minimum
  est, low = cc.rl_step_seconds(reports)
  assert est == pytest.approx(sum(calls[r.name] * r.seconds_at_peak for r in reports))
  assert low == pytest.approx(sum(calls[r.name] * r.min_seconds for r in reports))
  line = cc.rl_step_line(reports)
  assert f"4 x {by['score'].seconds_at_peak:.2f} score" in line and f"= {est:.1f} s" in line
  assert "without" in cc.rl_step_line(reports[:2])  # a partial check says what it left out


def test_auto_attention_compiles_the_splash_kernel_for_tpu(libtpu):
  """`attention_impl=auto` resolves by the mesh's platform (TPU here, though the host is a CPU): the
  score and train programs carry the Pallas kernel (a TPU custom call) and compile, with `xla` they
  do not."""
  seen = {}
  for impl in ("auto", "xla"):
    ctx = cc.Context(
      _tiny(**{"model.attention_impl": impl}),
      cc.topology_devices(cc.parse_topology("v5e:2x2")),
      topo=cc.parse_topology("v5e:2x2"),
    )
    for step in cc.build_steps(ctx, ("score", "train")):
      with sharding.use_rules(ctx.mesh, sharding.RULES[step.rules]):
        text = step.lower().as_text()
      seen[impl, step.name] = "tpu_custom_call" in text
      if impl == "auto":
        report = cc.compile_step(step, ctx)
        assert report.verdict == "fits", (step.name, report.note, report.traceback)
    assert ("splash" in cc.format_report(ctx, [])) == (impl == "auto")
  assert seen == {
    ("auto", "score"): True,
    ("auto", "train"): True,
    ("xla", "score"): False,
    ("xla", "train"): False,
  }
