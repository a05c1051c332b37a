"""The trainer end to end on a tiny config: one iteration, resume equivalence, SIGKILL, configs."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pgpo_jax import config as config_lib
from pgpo_jax import rewards, trainer
from tests.tiny_run import ROOT, every_other_group, length_parity, tiny_config
from tests.tiny_run import load_config as _load_config


@pytest.fixture(autouse=True)
def _test_reward(monkeypatch):
  monkeypatch.setitem(rewards.BATCH_REWARD_FNS, "test_length_parity", length_parity)
  monkeypatch.setitem(rewards.BATCH_REWARD_FNS, "test_every_other_group", every_other_group(2))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("demo_data")
  trainer.ensure_demo_data(tiny_config(d))
  return d


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_iteration_checkpoint_and_resume_equal_uninterrupted(data_dir, tmp_path):
  c = tiny_config(data_dir)
  straight = tmp_path / "straight"
  last = trainer.train(c, str(straight))
  rows = _metrics(straight)
  assert [r["step"] for r in rows] == [1, 2, 3]
  for r in rows:  # a full iteration: rollout, rewards, scoring, advantages, updates
    for k in (
      "reward/overall",
      "reward/accuracy",
      "reward/format",
      "train/loss",
      "train/grad_norm",
      "dependency/mean",
      "pgpo/max_weight",
      "time/rollout",
      "time/scoring",
      "time/update",
      "dynamic_sampling/kept_share",
      "entropy/scoring",
    ):
      assert k in r, k
  assert any(r["train/update_norm"] > 0 for r in rows)
  assert sorted(
    int(os.path.basename(p)) for p in glob.glob(str(straight / "checkpoints" / "[0-9]*"))
  ) == [2, 3]
  assert glob.glob(str(straight / "tb" / "events.out.tfevents.*"))
  assert last["reward/overall"] == rows[-1]["reward/overall"]

  # Stop after 2 steps, then resume to 3: same data position, same RNG, same next-step loss.
  resumed = tmp_path / "resumed"
  c2 = tiny_config(data_dir)
  c2.train.num_steps = 2
  trainer.train(c2, str(resumed))
  t = trainer.Trainer(tiny_config(data_dir), str(resumed))
  assert t.reference is None and "train/kl" not in rows[0]  # kl_coef = 0: no reference model at all
  assert t.maybe_restore() and t.step == 2
  m3 = t.train_one_step()
  t.checkpointer.close()
  ref = rows[2]
  for k in (
    "reward/overall",
    "train/loss",
    "train/grad_norm",
    "dependency/mean",
    "response/length_mean",
  ):
    np.testing.assert_allclose(m3[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path, caplog):
  """A truncated array file in checkpoints/N/state or checkpoints/N/params: resume from N-1, warn, redo N."""
  import shutil

  from tests.test_checkpoint import truncate_largest

  c = tiny_config(data_dir)
  c.train.num_steps, c.checkpoint.every, c.warmup.sft_steps = 2, 1, 0
  good = tmp_path / "good"
  trainer.train(c, str(good))
  for item in ("state", "params"):
    workdir = tmp_path / item
    shutil.copytree(good, workdir)
    truncate_largest(workdir / "checkpoints" / "2" / item)
    caplog.clear()
    if item == "state":  # a full restart: resumes at 1, trains step 2 again and saves it afresh
      trainer.train(c, str(workdir))
      assert [r["step"] for r in _metrics(workdir)] == [1, 2]
      assert (
        0.0 <= _metrics(workdir)[-1]["pgpo/degenerate_frac"] <= 1.0
      )  # the fallback share is logged
      assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "2.damaged"]
    else:
      t = trainer.Trainer(c, str(workdir))
      assert t.maybe_restore() and t.step == 1
      t.checkpointer.close()
    assert "checkpoints/2 does not read back" in caplog.text, item
    assert f"moved to {workdir}/checkpoints/2.damaged" in caplog.text, item


def _spy_reference(t: trainer.Trainer):
  """Records the batch type π_ref's program gets and, per update batch, the sorted valid log π_ref."""
  seen, refs = [], []
  program, step = t.reference.program, t.train_step

  def reference(params, seq):
    seen.append(type(seq).__name__)
    return program(params, seq)

  def train_step(state, batch):
    ref = np.asarray(batch["ref_logp"])
    mask = np.asarray(batch["packed"].mask if "packed" in batch else batch["seq"].response_mask)
    refs.append(np.sort(ref[mask.reshape(ref.shape)]))
    return step(state, batch)

  t.reference.program, t.train_step = reference, train_step
  return seen, refs


def test_packed_iteration_equals_padded(data_dir, tmp_path):
  """train.packing=True: the same step (rollout, scores, π_ref of the KL term, advantages, updates)
  on padding-free rows; π_ref's program scores the packed slices, as the score program does."""
  import jax

  out = {}
  for packed in (False, True):
    c = tiny_config(data_dir)
    c.train.packing = packed
    c.train.packed_row_length = c.data.max_prompt_length + c.rollout.max_new_tokens
    c.logging.tensorboard = False
    c.loss.kl_coef = 0.05
    c.dynamic_sampling.enabled = False  # all 4 groups kept: 2 update batches
    c.reward.name = "test_every_other_group"  # groups 0 and 2 have advantages, whatever is sampled
    t = trainer.Trainer(c, str(tmp_path / f"packed{packed}"))
    seen, refs = _spy_reference(t)
    m = t.train_one_step()
    t.checkpointer.close()
    out[packed] = (m, jax.tree.map(np.asarray, t.state.params))
    assert seen and set(seen) == {"PackedBatch" if packed else "SequenceBatch"}, seen
    out[packed, "ref"] = refs
  # The same log π_ref reaches every update batch (token order aside: packing reorders them).
  assert len(out[True, "ref"]) == len(out[False, "ref"]) == 2
  for a, b in zip(out[True, "ref"], out[False, "ref"]):
    assert a.shape == b.shape and a.size > 0
    np.testing.assert_allclose(a, b, atol=1e-5)
  (m0, p0), (m1, p1) = out[False], out[True]
  assert m0["train/kl"] > 0  # the second update's policy has moved off π_ref
  for k in (
    "train/kl",
    "reward/overall",
    "dependency/mean",
    "dependency/max",
    "entropy/scoring",
    "pgpo/max_weight",
    "train/loss",
    "train/grad_norm",
    "train/clip_frac",
    "train/entropy",
  ):
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # AdamW moves every weight by about lr·g/(|g|+eps): where a gradient is ~eps, float rounding of g
  # changes that step visibly, so allow rare small differences (a wrong packing moves most weights).
  lr = tiny_config(data_dir).optim.learning_rate
  diff = np.concatenate(
    [np.abs(a - b).reshape(-1) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0))]
  )
  assert diff.max() < lr and np.mean(diff > 1e-2 * lr) < 1e-3, (
    diff.max(),
    np.mean(diff > 1e-2 * lr),
  )


def test_sigkill_between_checkpoints_loses_nothing_saved(data_dir, tmp_path):
  workdir = tmp_path / "killed"
  cmd = [
    sys.executable,
    os.path.join(ROOT, "scripts", "train.py"),
    f"--config={ROOT}/configs/demo.py",
    f"--workdir={workdir}",
    f"--config.data.demo_dir={data_dir}",
    f"--config.data.train_files={data_dir}/train.parquet",
    f"--config.data.eval_files={data_dir}/test.parquet",
    f"--config.data.processor_dir={data_dir}/model",
    "--config.rollout.prompts_per_step=4",
    "--config.rollout.group_size=2",
    "--config.rollout.max_new_tokens=8",
    "--config.updates.prompts_per_update=2",
    "--config.updates.micro_batch_prompts=1",
    "--config.warmup.sft_steps=0",
    "--config.train.eval_every=0",
    "--config.checkpoint.every=1",
    "--config.model.tiny.hidden_size=64",
    "--config.model.tiny.num_hidden_layers=2",
    "--config.model.tiny.vision_hidden_size=32",
  ]
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache")
  )
  proc = subprocess.Popen(
    cmd + ["--config.train.num_steps=50"],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  deadline = time.time() + 300
  ckpt = workdir / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    done = [p for p in glob.glob(str(ckpt / "[0-9]*")) if os.path.basename(p).isdigit()]
    if len(done) >= 2:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = max(
    int(os.path.basename(p))
    for p in glob.glob(str(ckpt / "[0-9]*"))
    if os.path.basename(p).isdigit()
  )
  target = saved + 2
  out = subprocess.run(
    cmd + [f"--config.train.num_steps={target}"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  steps = [r["step"] for r in _metrics(workdir)]
  assert steps == list(range(1, target + 1)), steps  # nothing lost, nothing repeated in the log
  assert os.path.isdir(ckpt / str(target))


def test_sigint_saves_and_exits_with_the_preempted_status(data_dir, tmp_path):
  """Ctrl-C (SIGINT) during a run: the step finishes, is checkpointed, and the script exits with
  trainer.EXIT_PREEMPTED (75), not 0, without printing `done.`; the rerun resumes after it."""
  workdir = tmp_path / "interrupted"
  cmd = [
    sys.executable,
    os.path.join(ROOT, "scripts", "train.py"),
    f"--config={ROOT}/configs/demo.py",
    f"--workdir={workdir}",
    f"--config.data.demo_dir={data_dir}",
    f"--config.data.train_files={data_dir}/train.parquet",
    f"--config.data.eval_files={data_dir}/test.parquet",
    f"--config.data.processor_dir={data_dir}/model",
    "--config.rollout.prompts_per_step=4",
    "--config.rollout.group_size=2",
    "--config.rollout.max_new_tokens=8",
    "--config.updates.prompts_per_update=2",
    "--config.updates.micro_batch_prompts=1",
    "--config.warmup.sft_steps=0",
    "--config.train.eval_every=0",
    "--config.checkpoint.every=1000",
    "--config.model.tiny.hidden_size=64",
    "--config.model.tiny.num_hidden_layers=2",
    "--config.model.tiny.vision_hidden_size=32",
    "--config.train.num_steps=50",
  ]
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache")
  )
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (workdir / "metrics.jsonl").exists():
    time.sleep(0.2)
  assert proc.poll() is None, proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == trainer.EXIT_PREEMPTED == 75, err[-3000:]
  assert "done." not in out and "stopped early" in out and "training data:" in out, out
  steps = [r["step"] for r in _metrics(workdir)]
  saved = [int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()]
  assert saved == [steps[-1]] and 1 <= steps[-1] < 50, (saved, steps)


@pytest.fixture
def sigterm_on_warmup_batch(monkeypatch):
  """SIGTERM to this process when the warm-up builds batch k (`arm(k)`), deterministically inside a
  warm-up step. A handler of the test's own catches any signal the trainer does not (so that a
  broken guard fails the test instead of killing pytest); it records them in `stray`."""
  stray = []

  def ours(*_):
    stray.append("SIGTERM")

  previous = signal.signal(signal.SIGTERM, ours)
  calls = []
  original = trainer.Trainer._sft_batch

  def arm(k):
    def batch(self, groups, weight=None):
      calls.append(len(groups))
      if len(calls) == k:
        os.kill(os.getpid(), signal.SIGTERM)
      return original(self, groups, weight)

    monkeypatch.setattr(trainer.Trainer, "_sft_batch", batch)
    return calls

  yield arm, stray, ours
  signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_the_warmup_stops_before_the_next_warmup_step(
  data_dir, tmp_path, sigterm_on_warmup_batch
):
  """Was: exit 143, no message, nothing saved. Now `Preempted` (exit 75) before the next warm-up
  step, saying that nothing is saved and that the rerun restarts the warm-up; the workdir holds no
  checkpoint and no metrics, and is free."""
  from pgpo_jax.workdir_lock import WorkdirLock

  arm, stray, ours = sigterm_on_warmup_batch
  calls = arm(2)
  c = tiny_config(data_dir)
  c.warmup.sft_steps, c.train.eval_every = 5, 1
  workdir = tmp_path / "w"
  with pytest.raises(trainer.Preempted) as e:
    trainer.train(c, str(workdir))
  assert str(e.value) == (
    "stopped by SIGTERM during the warm-up, before warm-up step 3 of 5: no RL step had run; "
    "nothing is saved; rerun the same command to start again (the warm-up restarts; "
    "warmup.cache_dir with warmup.save_every keeps its progress)"
  )
  assert len(calls) == 2 and not stray  # the trainer's guard caught it; no step after the signal
  assert os.listdir(workdir / "checkpoints") == [] and not (workdir / "metrics.jsonl").exists()
  assert "count/data_rows_read" in e.value.metrics
  WorkdirLock(str(workdir)).release()
  assert signal.getsignal(signal.SIGTERM) is ours  # the guard put the previous handler back


def test_a_stopped_warmup_with_save_every_resumes_to_the_same_weights(
  data_dir, tmp_path, sigterm_on_warmup_batch
):
  """warmup.save_every: SIGTERM in warm-up step 3 of 4 saves the progress after step 2 (state and
  data position); the rerun resumes at step 3 and ends with the weights of an uninterrupted warm-up."""
  from pgpo_jax import checkpoint as ckpt_lib
  from pgpo_jax.workdir_lock import WorkdirLock

  def config(cache):
    c = tiny_config(data_dir)
    c.warmup.sft_steps, c.warmup.save_every, c.warmup.cache_dir = 4, 3, str(cache)
    c.warmup.blind_fraction = 0.5
    c.train.num_steps, c.train.eval_every = 1, 0
    return c

  # The uninterrupted warm-up alone (no RL step to compile): the params it caches are the reference.
  like = trainer.Trainer(config(tmp_path / "whole"), str(tmp_path / "a"))
  init = np.asarray(jax.tree.leaves(like.state.params)[0]).copy()
  try:
    like.sft_warmup()
  finally:
    like.close()
  arm, stray, _ = sigterm_on_warmup_batch
  arm(3)
  with pytest.raises(trainer.Preempted, match="progress is in .*resumes it"):
    trainer.train(config(tmp_path / "split"), str(tmp_path / "b"))
  WorkdirLock(str(tmp_path / "b")).release()
  assert (tmp_path / "split" / "progress").is_dir() and not (tmp_path / "split" / "params").exists()
  arm(10**9)  # no more signals
  rerun = trainer.Trainer(config(tmp_path / "split"), str(tmp_path / "b"))
  try:  # the warm-up alone again: resuming is the warm-up's own (no RL step to compile)
    rerun.sft_warmup()
  finally:
    rerun.close()
  assert not stray and not (tmp_path / "split" / "progress").exists()
  whole = ckpt_lib.restore_params(tmp_path / "whole" / "params", like.state.params)
  split = ckpt_lib.restore_params(tmp_path / "split" / "params", like.state.params)
  leaves = zip(jax.tree.leaves(whole), jax.tree.leaves(split))
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)
  assert not np.array_equal(init, np.asarray(jax.tree.leaves(whole)[0]))


def test_sigterm_after_the_warmup_saves_step_0_and_the_rerun_resumes_there(
  data_dir, tmp_path, sigterm_on_warmup_batch
):
  """A signal during the warm-up's last step (or the eval before RL): the warmed-up weights are
  checkpoint 0; the rerun resumes from it without warming up again and trains step 1."""
  arm, stray, _ = sigterm_on_warmup_batch
  calls = arm(2)
  c = tiny_config(data_dir)
  c.warmup.sft_steps, c.train.num_steps = 2, 1
  workdir = tmp_path / "w"
  with pytest.raises(trainer.Preempted, match="before the first RL step of this run: step 0 is"):
    trainer.train(c, str(workdir))
  assert len(calls) == 2 and not stray
  assert os.listdir(workdir / "checkpoints") == ["0"]
  trainer.train(c, str(workdir))
  assert len(calls) == 2  # no warm-up batch in the rerun
  assert [r["step"] for r in _metrics(workdir)] == [1]


@pytest.mark.parametrize(
  "path",
  sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))),
  ids=lambda p: os.path.basename(p),
)
def test_every_config_builds_and_validates(path):
  c = _load_config(path)
  if not c.model.random_init:  # real-model configs take the checkpoint on the command line
    c.model.init_from = c.model.init_from or "/ckpt/qwen2_5_vl"
    c.data.train_files = c.data.train_files or "/data/virl39k/*.parquet"
  sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
  fixed = int(np.prod([s for s in sizes if s > 0]))
  config_lib.validate(c, fixed * (2 if -1 in sizes else 1))
  doc = open(path).read().split('"""')[1]
  assert "scripts/train.py" in doc or "scripts/compile_check.py" in doc  # the command that runs it


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("updates.prompts_per_update", 3, "updates.prompts_per_update"),
    ("updates.micro_batch_prompts", 3, "updates.micro_batch_prompts"),
    ("rollout.group_size", 1, "rollout.group_size"),
    ("pgpo.tau", 1.5, "pgpo.tau"),
    ("pgpo.dependency_estimator", "kl", "pgpo.dependency_estimator"),
    ("reward.name", "nope", "reward.name"),
  ],
)
def test_bad_config_names_the_key(data_dir, key, value, match):
  c = tiny_config(data_dir)
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, 1)


def test_bad_mesh_and_missing_init_from(data_dir):
  c = tiny_config(data_dir)
  c.mesh.data, c.mesh.fsdp = 3, 1
  with pytest.raises(config_lib.ConfigError, match="mesh"):
    config_lib.validate(c, 8)
  c = tiny_config(data_dir)
  c.model.random_init = False
  with pytest.raises(config_lib.ConfigError, match="model.init_from"):
    config_lib.validate(c, 1)


def test_trained_checkpoint_loads_as_a_model(data_dir, tmp_path):
  """WORKDIR/checkpoints/<step>/params + WORKDIR/config.json + processor = a loadable model."""
  from pgpo_jax.data.hf_processor import load_processor
  from pgpo_jax.models import qwen2_5_vl as qwen

  c = tiny_config(data_dir)
  c.train.num_steps, c.train.eval_every = 1, 1
  t = trainer.Trainer(c, str(tmp_path / "w"))
  last = t.run()
  assert last["eval/num_prompts"] == c.train.eval_prompts  # the held-out greedy eval ran
  assert 0.0 <= last["eval/accuracy"] <= 1.0
  model = qwen.from_pretrained(tmp_path / "w" / "checkpoints" / "1" / "params")
  import jax

  got = jax.tree.leaves(jax.tree.map(np.asarray, qwen.loading.flat_params(model)))
  want = jax.tree.leaves(jax.tree.map(np.asarray, t.state.params))
  assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
  proc = load_processor(str(tmp_path / "w"))
  assert proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.cfg.image_token_id


def test_prompt_streams_follow_the_file_content_and_row_not_its_name_or_folder(tmp_path):
  """RNG streams (`reader.row_stream_ids`, the trainer's and the evaluator's): the same data under
  another folder or name samples the same streams (tests put data in fresh temporary folders; a run
  on a copy of the data reproduces); two data sets whose shards share a name (the usual
  `train-00000-of-00010.parquet`) do not, nor do other rows of a file."""
  import shutil

  import pyarrow as pa
  import pyarrow.parquet as pq

  from pgpo_jax.data import reader

  name = "train-00000-of-00010.parquet"
  for folder, answers in (("set_a", ["1", "2"]), ("set_b", ["3", "4"])):
    os.makedirs(tmp_path / folder)
    table = pa.table({"problem": ["How many?", "Which colour?"], "answer": answers})
    pq.write_table(table, tmp_path / folder / name)
  os.makedirs(tmp_path / "moved")
  shutil.copy(tmp_path / "set_a" / name, tmp_path / "moved" / name)
  shutil.copy(tmp_path / "set_a" / name, tmp_path / "moved" / "renamed.parquet")

  def ids(path):
    return reader.row_stream_ids([str(path)] * 3, [0, 1, 2])

  a, b = ids(tmp_path / "set_a" / name), ids(tmp_path / "set_b" / name)
  assert len(set(a.tolist())) == 3  # rows of a file: their own streams
  assert not set(a.tolist()) & set(b.tolist())  # same base name, another data set
  np.testing.assert_array_equal(ids(tmp_path / "moved" / name), a)
  np.testing.assert_array_equal(ids(tmp_path / "moved" / "renamed.parquet"), a)
  assert all(0 <= x < 2**32 for x in a.tolist())  # `rollout.row_keys` folds in a uint32


def test_large_data_files_differing_only_at_their_end_get_other_streams(tmp_path):
  """Past 1 MiB a file is fingerprinted by its size, first and last MiB: two files that share the
  first MiB (a parquet header, the first JSON lines) but not the footer are told apart."""
  from pgpo_jax.data import reader

  head = b"x" * (3 << 20)
  (tmp_path / "one.jsonl").write_bytes(head + b"end one\n")
  (tmp_path / "two.jsonl").write_bytes(head + b"end two\n")
  one = reader.row_stream_ids([str(tmp_path / "one.jsonl")], [5])
  two = reader.row_stream_ids([str(tmp_path / "two.jsonl")], [5])
  assert one[0] != two[0]
  with pytest.raises(FileNotFoundError, match="missing.parquet"):
    reader.row_stream_ids([str(tmp_path / "missing.parquet")], [0])
