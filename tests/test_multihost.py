"""Multi-host runs for real: N jax.distributed processes on this CPU (gloo collectives), each with its
own CPU devices, exactly as on a TPU pod where each host is one process.

- the host-local <-> global array helpers, reductions and checks of `pgpo_jax/multihost.py`;
- the trainer: a 2-process run equals a 1-process run over the same 4 devices (same prompts, same
  samples, same losses, same parameters), and a 2-process run resumes from its checkpoint (each
  host's data iterator, the RNG) and continues exactly like the uninterrupted run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from pgpo_jax import config as config_lib
from pgpo_jax import multihost, trainer
from tests.tiny_run import ROOT, tiny_config
from tests.xla_flags import with_devices

pytestmark = pytest.mark.serial  # jax.distributed processes: not beside another worker's compiles


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_processes(argv_of, n: int):
  """Starts `argv_of(process_id, port)` for every process, output to temporary files."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  env.pop("XLA_FLAGS", None)
  logs = [tempfile.TemporaryFile("w+") for _ in range(2 * n)]
  procs = [
    subprocess.Popen(
      argv_of(i, port), env=env, stdout=logs[2 * i], stderr=logs[2 * i + 1], text=True
    )
    for i in range(n)
  ]
  return procs, logs


def _wait_processes(
  procs, logs, timeout: float = 600, returncode: int = 0
) -> list[subprocess.CompletedProcess]:
  """Waits for all; every process must exit with `returncode` (none is left running)."""
  deadline = time.time() + timeout
  try:
    # A process that fails leaves the others waiting in a collective: stop them all at once.
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if any(p.poll() not in (None, returncode) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = []
  for i, p in enumerate(procs):
    text = []
    for f in logs[2 * i : 2 * i + 2]:
      f.seek(0)
      text.append(f.read())
      f.close()
    outs.append(subprocess.CompletedProcess(p.args, p.returncode, *text))
  for i, o in enumerate(outs):
    assert o.returncode == returncode, (
      f"process {i} exited {o.returncode}:\n{o.stdout[-3000:]}\n{o.stderr[-6000:]}"
    )
  return outs


def _run_processes(argv_of, n: int, timeout: float = 600) -> list[subprocess.CompletedProcess]:
  return _wait_processes(*_start_processes(argv_of, n), timeout=timeout)


_HELPERS = """
import json, os, sys
os.environ["XLA_FLAGS"] = {xla_flags!r}
sys.path.insert(0, {root!r})
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from pgpo_jax import multihost, sharding
pid = int(sys.argv[1])
multihost.initialize("localhost:" + sys.argv[2], 2, pid)
mesh = sharding.make_mesh(1, 4, 1)
rules = sharding.TRAIN_RULES
out = {{}}

# Rows on dim 1 (like M-RoPE positions [3, B, T]) and dim 0; host h's rows are h*100 + ...
pos = (np.arange(3 * 2 * 5).reshape(3, 2, 5) + 100 * pid).astype(np.int32)
ids = (np.arange(2 * 5).reshape(2, 5) + 100 * pid).astype(np.int32)
axes = {{"pos": (None, "batch", "length"), "ids": ("batch", "length"), "scalar": ()}}
g = multihost.to_global({{"pos": pos, "ids": ids, "scalar": np.float32(7)}}, axes, mesh, rules)
out["global_shapes"] = [list(g["pos"].shape), list(g["ids"].shape), list(g["scalar"].shape)]
full = np.asarray(jax.device_put(g["pos"], NamedSharding(mesh, P())))
out["global_is_hosts_in_order"] = bool((full == np.concatenate([np.arange(30).reshape(3, 2, 5),
                                                                 np.arange(30).reshape(3, 2, 5) + 100], 1)).all())
back = multihost.to_local(g, axes, mesh, rules)
out["roundtrip"] = bool((back["pos"] == pos).all() and (back["ids"] == ids).all() and back["scalar"] == 7)
# A program whose output layout differs from the canonical one (replicated): still this host's rows.
y = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P()))(g["ids"])
out["local_of_replicated"] = bool((multihost.to_local(y, ("batch", "length"), mesh, rules) == 2 * ids).all())

out["allgather_f64_exact"] = multihost.allgather(np.float64(1 / 3 + pid)).tolist() == [1 / 3, 1 / 3 + 1]
out["allgather_i64"] = multihost.allgather(np.int64(2**40 + pid)).tolist() == [2**40, 2**40 + 1]
out["json"] = multihost.allgather_json({{"host": pid, "pad": "x" * (10 * pid)}})
out["metrics"] = multihost.reduce_metrics({{"time/rollout": pid + 1.0, "reward/overall": float(pid),
                                           "pgpo/max_weight": 2.0 * pid, "pgpo/min_weight": 2.0 * pid,
                                           "throughput/generated_tokens_per_s": 10.0}})
key = jax.random.key(3)
rk = multihost.replicated(key, mesh)
out["key_replicated"] = bool(rk.sharding.is_fully_replicated and
                             (jax.random.key_data(rk) == jax.random.key_data(key)).all())
try:  # the batch replicated over hosts (tensor spans them): no host owns its own rows
  multihost.check_host_split(sharding.make_mesh(1, 1, 4), rules, 8, "updates.prompts_per_update")
  out["tensor_over_hosts"] = "accepted"
except ValueError as e:
  out["tensor_over_hosts"] = str(e)
multihost.check_host_split(mesh, rules, 8)
# Update mini-batches of a short step: host 0 kept 3 groups, host 1 none; both run 2 (of 2 prompts
# per host), the number the host with the most groups needs, so none is all padding.
from pgpo_jax import trainer
out["update_batches"] = trainer.num_update_batches([3, 0][pid], 2)
print(json.dumps(out))
"""


def test_multihost_helpers_on_two_processes():
  code = _HELPERS.format(root=ROOT, xla_flags=with_devices(2))
  outs = _run_processes(
    lambda i, port: [sys.executable, "-c", code, str(i), str(port)], n=2, timeout=300
  )
  for pid, o in enumerate(outs):
    r = json.loads(o.stdout.strip().splitlines()[-1])
    assert r["global_shapes"] == [[3, 4, 5], [4, 5], []]
    assert r["global_is_hosts_in_order"] and r["roundtrip"] and r["local_of_replicated"], r
    assert r["allgather_f64_exact"] and r["allgather_i64"] and r["key_replicated"], r
    assert r["json"] == [{"host": 0, "pad": ""}, {"host": 1, "pad": "x" * 10}]
    assert r["metrics"] == {
      "time/rollout": 2.0,
      "reward/overall": 0.5,
      "pgpo/max_weight": 2.0,
      "pgpo/min_weight": 0.0,
      "throughput/generated_tokens_per_s": 20.0,
    }
    assert (
      "updates.prompts_per_update" in r["tensor_over_hosts"] and "hosts" in r["tensor_over_hosts"]
    ), r
    assert r["update_batches"] == 2, r


def test_single_process_helpers_are_plain_device_put():
  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  mesh = trainer.sharding.make_mesh(1, 1, 1)
  g = multihost.to_global({"x": x}, None, mesh, trainer.sharding.TRAIN_RULES)
  np.testing.assert_array_equal(np.asarray(g["x"]), x)
  np.testing.assert_array_equal(
    multihost.to_local(g, None, mesh, trainer.sharding.TRAIN_RULES)["x"], x
  )
  assert multihost.allgather_json({"a": 1}) == [{"a": 1}]
  assert multihost.reduce_metrics({"a": 1.5}) == {"a": 1.5}
  assert [
    multihost.metric_reduction(k)
    for k in (
      "time/step",
      "train/grad_norm_max",
      "pgpo/min_weight",
      "throughput/generated_tokens_per_s",
      "reward/overall",
    )
  ] == ["max", "max", "min", "sum", "mean"]


def test_global_batches_must_split_over_hosts(tmp_path):
  c = tiny_config(tmp_path)
  c.reward.name = "pgpo_math"
  config_lib.validate(c, 4, num_processes=2)
  c.rollout.prompts_per_step = 6
  c.updates.prompts_per_update = 3
  c.updates.micro_batch_prompts = 1
  with pytest.raises(config_lib.ConfigError, match="updates.prompts_per_update.*2 hosts"):
    config_lib.validate(c, 4, num_processes=2)
  c.rollout.prompts_per_step = 3
  with pytest.raises(config_lib.ConfigError, match="rollout.prompts_per_step.*2 hosts"):
    config_lib.validate(c, 4, num_processes=2)
  c.rollout.prompts_per_step = 6
  config_lib.validate(c, 4, num_processes=1)
  c.rollout.prompts_per_step, c.updates.prompts_per_update = 4, 2
  c.pgpo.scoring_prompts = 0  # the default slice (micro-batch of 1) becomes one prompt per host
  config_lib.validate(c, 4, num_processes=2)
  c.pgpo.scoring_prompts = 3
  with pytest.raises(config_lib.ConfigError, match="pgpo.scoring_prompts"):
    config_lib.validate(c, 4, num_processes=2)


# ------------------------------------------------------------------------------------------------
# The trainer on 2 processes vs 1
# ------------------------------------------------------------------------------------------------
# fsdp=4: the parameters are sharded across the two hosts too. One update per step (the update batch
# is the whole rollout batch), so the update sees the same groups however the hosts split them. A KL
# term: π_ref (the weights after the warm-up) is sharded over both hosts, saved once and restored on
# resume.
_OVERRIDES = [
  "mesh.data=1",
  "mesh.fsdp=4",
  "rollout.prompts_per_step=8",
  "updates.prompts_per_update=8",
  "updates.micro_batch_prompts=4",
  "pgpo.scoring_prompts=4",
  "dynamic_sampling.max_rounds=1",
  "train.eval_every=3",
  "checkpoint.every=2",
  "loss.kl_coef=0.05",
]


def _driver(workdir, data_dir, steps, n, i=0, port=0):
  argv = [
    sys.executable,
    os.path.join(ROOT, "tests", "multihost_run.py"),
    f"--workdir={workdir}",
    f"--data_dir={data_dir}",
    f"--steps={steps}",
    "--devices=4",
  ]
  argv += [f"--override={o}" for o in _OVERRIDES]
  if n > 1:
    argv += [f"--coordinator=localhost:{port}", f"--num_processes={n}", f"--process_id={i}"]
  return argv


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, filter(str.strip, f))}


def _complete_steps(workdir) -> list[int]:
  """Steps of the metrics lines written so far (a line still being written is left out)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split("\n")[:-1]  # after the last newline: unfinished
  return [json.loads(line)["step"] for line in lines if line.strip()]


def _params(workdir, step):
  from flax import nnx

  from pgpo_jax.models import qwen2_5_vl as qwen

  model = qwen.from_pretrained(os.path.join(workdir, "checkpoints", str(step), "params"))
  return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("mh_data")
  trainer.ensure_demo_data(tiny_config(d))
  return d


def test_two_hosts_stop_together_on_sigterm_and_resume_like_one(data_dir, tmp_path):
  """Preemption notices reach hosts at different times: SIGTERM to host 1 alone; the hosts agree to
  stop after the same step s, all save it and exit with the preempted status 75 (a host that left
  alone would hang the others; 0 would tell a scheduler that the run finished). The rerun on two
  hosts resumes there (each host restores its own iterator state) and ends at step s + 1 with the
  metrics and weights of one uninterrupted process on the same 4 devices."""
  one, two = tmp_path / "one", tmp_path / "two"
  every = [
    "--override=checkpoint.every=1000",
    "--override=train.eval_every=1",
    # Some groups have a reward spread and the others none, chosen by their answers whatever is
    # sampled (`tiny_run.answer_selected_groups`): fillers are needed at every step, not only when
    # today's samples happen to need them.
    "--override=reward.name='test_answer_groups'",
  ]
  procs, logs = _start_processes(
    lambda i, port: _driver(two, data_dir, 50, 2, i, port) + every, n=2
  )
  deadline = time.time() + 600  # SIGTERM once step 1 is logged (step 0 is the eval before RL)
  while time.time() < deadline and max(_complete_steps(two), default=0) < 1:
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # host 1 only (without the agreement host 0 waits forever)
  _wait_processes(procs, logs, timeout=600, returncode=trainer.EXIT_PREEMPTED)
  stopped = sorted(_metrics(two))  # host 0 logs each step once
  s = stopped[-1]
  saved = [int(p) for p in os.listdir(two / "checkpoints") if p.isdigit()]
  assert saved == [s] and 1 <= s < 50 and stopped == list(range(s + 1)), (saved, stopped)
  with open(os.path.join(two, "checkpoints", str(s), "data", "metadata")) as f:
    assert len(json.load(f)["iterators"]) == 2
  n = s + 1
  _run_processes(lambda i, port: _driver(one, data_dir, n, 1) + every, n=1)
  _run_processes(lambda i, port: _driver(two, data_dir, n, 2, i, port) + every, n=2)
  ref, got = _metrics(one), _metrics(two)
  assert sorted(got) == list(range(n + 1))
  for step in range(1, n + 1):
    # Same prompts and samples: the same texts (`reward/format` is their fingerprint, `tiny_run`),
    # so rewards and lengths are identical; a sampling difference is named as such, not as a loss one.
    # (A mean of fingerprints in another order: equal to float32 rounding; one changed text moves it
    # by ~1/number of responses.)
    assert got[step]["reward/format"] == pytest.approx(ref[step]["reward/format"], rel=1e-6), (
      step,
      "sampled texts differ",
    )
    for k in (
      "reward/overall",
      "reward/accuracy",
      "dynamic_sampling/kept_share",
      "response/length_mean",
    ):
      assert got[step][k] == pytest.approx(ref[step][k], rel=1e-6, abs=1e-7), (step, k)
    # Float sums in another order (other shard shapes, collectives): equal to float32 rounding.
    for k in ("train/loss", "train/grad_norm", "train/entropy"):
      assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4, abs=1e-6), (
        step,
        k,
        got[step][k],
        ref[step][k],
      )
    # Least exact: weights from S ~ 1e-4 (a k3 of nearly equal log-probs), and Adam's update, where
    # near-zero gradients of either sign move a weight by ±lr.
    for k in ("pgpo/max_weight", "train/update_norm"):
      assert got[step][k] == pytest.approx(ref[step][k], rel=1e-3), (
        step,
        k,
        got[step][k],
        ref[step][k],
      )
    # KL to π_ref: ~0 at step 1 (π_θ = π_ref up to float rounding), then the policy's drift.
    assert got[step]["train/kl"] == pytest.approx(ref[step]["train/kl"], rel=1e-3, abs=1e-8), (
      step,
      got[step],
    )
  assert ref[n]["train/kl"] > 1e-6
  assert 0 < ref[1]["dynamic_sampling/kept_share"] < 1  # set by the data: filler groups were used
  for step in range(n + 1):
    assert got[step]["eval/accuracy"] == ref[step]["eval/accuracy"], step
    assert got[step]["eval/num_prompts"] == 4
  p1, p2 = _params(one, n), _params(two, n)
  assert p1.keys() == p2.keys()
  # Adam turns float-rounding differences of near-zero gradients into visible ones for a handful of
  # weights (measured: 60 of 289k differ by > 1e-6, the largest by 1e-4, at lr 1e-3 / 2e-4); the
  # parameters as a whole agree to float32 precision.
  diff = np.sqrt(sum(((p1[k] - p2[k]) ** 2).sum() for k in p1)) / np.sqrt(
    sum((p1[k] ** 2).sum() for k in p1)
  )
  moved = sum(int((np.abs(p1[k] - p2[k]) > 1e-6).sum()) for k in p1) / sum(
    v.size for v in p1.values()
  )
  assert diff < 5e-5 and moved < 1e-3, (diff, moved)

  # One process cannot take over two hosts' data shards: a clear error, not a silent reshuffle.
  c = tiny_config(data_dir)
  c.reward.name = "pgpo_math"
  c.rollout.prompts_per_step, c.updates.prompts_per_update, c.updates.micro_batch_prompts = 8, 8, 4
  t = trainer.Trainer(c, str(two))
  with pytest.raises(ValueError, match="saved by 2 host"):
    t.maybe_restore()
  t.checkpointer.close()


def test_train_script_on_two_processes(data_dir, tmp_path):
  """What users run: `scripts/train.py` on every process, joined by --coordinator_address."""
  workdir = tmp_path / "script"
  flags = [
    f"--config={ROOT}/configs/demo.py",
    f"--workdir={workdir}",
    f"--config.data.demo_dir={data_dir}",
    f"--config.data.train_files={data_dir}/train.parquet",
    f"--config.data.eval_files={data_dir}/test.parquet",
    f"--config.data.processor_dir={data_dir}/model",
    "--config.rollout.prompts_per_step=4",
    "--config.rollout.group_size=2",
    "--config.rollout.max_new_tokens=4",
    "--config.mesh.data=4",
    "--config.updates.prompts_per_update=4",
    "--config.updates.micro_batch_prompts=4",
    "--config.warmup.sft_steps=0",
    "--config.train.num_steps=1",
    "--config.train.eval_every=1",
    "--config.train.eval_prompts=4",
    "--config.model.tiny.hidden_size=64",
    "--config.model.tiny.num_hidden_layers=1",
    "--config.model.tiny.vision_hidden_size=32",
  ]

  def argv(i, port):
    code = (
      f"import os, sys, runpy; os.environ['XLA_FLAGS'] = {with_devices(2)!r}; "
      "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [
      sys.executable,
      "-c",
      code,
      os.path.join(ROOT, "scripts", "train.py"),
      *flags,
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    ]

  outs = _run_processes(argv, n=2)
  rows = _metrics(workdir)
  assert sorted(rows) == [0, 1]  # eval before RL, then step 1: one line each (host 0 writes)
  assert rows[1]["eval/num_prompts"] == 4 and "reward/overall" in rows[1]
  assert os.path.isdir(workdir / "checkpoints" / "1" / "state")
  assert "done. workdir:" in outs[0].stdout and "done." not in outs[1].stdout


# ------------------------------------------------------------------------------------------------
# Evaluation on 2 processes vs 1
# ------------------------------------------------------------------------------------------------
def test_eval_script_on_two_processes_equals_one(data_dir, tmp_path):
  """`scripts/eval.py` on 2 processes (1 device each) gives the table and the samples of 1 process
  (2 devices): each host samples its rows, the records are gathered, host 0 writes. A 5-row benchmark
  leaves host 1 one batch short (it joins the last generation call with an all-invalid batch)."""
  from pgpo_jax.data.reader import DatasetReader, DatasetSpec
  from tests.test_evaluation import _write_workdir

  ckpt = _write_workdir(tmp_path / "bigram", data_dir, bigram=True)
  rows = DatasetReader(DatasetSpec(str(data_dir / "test.parquet")))
  os.makedirs(tmp_path / "five" / "img")
  with open(tmp_path / "five" / "five.jsonl", "w") as f:
    for i in range(5):
      r = rows.load(i)
      r.images[0].save(tmp_path / "five" / "img" / f"{i}.png")
      f.write(
        json.dumps({"question": r.question, "answer": r.answer, "image": f"img/{i}.png"}) + "\n"
      )
  flags = [
    "--ckpt",
    str(ckpt),
    "--data",
    f"synth={data_dir / 'test.parquet'},{tmp_path / 'five' / 'five.jsonl'}",
    "--config.k=2",
    "--config.max_new_tokens=8",
    "--config.batch_size=4",
    "--config.max_prompt_length=256",
    "--dtype",
    "float32",
    "--no_progress",
  ]

  def argv(devices, out, extra=()):
    code = (
      f"import os, sys, runpy; os.environ['XLA_FLAGS'] = {with_devices(devices)!r}; "
      "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [
      sys.executable,
      "-c",
      code,
      os.path.join(ROOT, "scripts", "eval.py"),
      *flags,
      "--out",
      str(out),
      *extra,
    ]

  _run_processes(lambda i, port: argv(2, tmp_path / "one"), n=1)
  outs = _run_processes(
    lambda i, port: argv(
      1,
      tmp_path / "two",
      [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
    ),
    n=2,
  )
  assert "wrote" in outs[0].stdout and "wrote" not in outs[1].stdout  # host 0 writes
  one, two = (json.load(open(tmp_path / d / "results.json")) for d in ("one", "two"))
  timing = ("seconds", "generated_tokens_per_s")
  strip = lambda table: [{k: v for k, v in r.items() if k not in timing} for r in table]  # noqa: E731
  assert strip(two["table"]) == strip(one["table"])
  assert [r["num_prompts"] for r in one["table"]] == [8, 5, 13]
  assert two["rows"] == one["rows"] and len(two["devices"]) == 2
  gens = [open(tmp_path / d / "generations.jsonl").read() for d in ("one", "two")]
  assert gens[0] == gens[1] and gens[0].count("\n") == 2 * 13
  # The samples are random draws (both answers occur): equal because each is keyed by its row.
  assert {json.loads(l)["response"] for l in gens[0].splitlines()} == {"\\boxed{1}", "\\boxed{2}"}
