"""Every key of `base_config()` is read by the code, and the keys that once were not now act.

How "read" is established: the config is wrapped in `Recorder`, a read-through view of a
`ConfigDict` that records the dotted path of every field the code looks up (attribute or item
access, `dict(...)`, `.items()`, `.get`) and hands out Recorders for nested dicts. Dumping the whole
config (`to_dict()`, what checkpoints and W&B store) goes to the real ConfigDict and records nothing,
so storing a key does not count as reading it. The recorded paths are the union over:
  1. `config.validate` of every file in `configs/` (the 7B recipes read `model.init_from`, ...);
  2. `ensure_demo_data` on an empty folder (the `data.demo_*` keys);
  3. a tiny training run that takes every optional branch the keys control: supervised warm-up, KL to
     a reference policy, PGPO weights, evaluation, `train.profile`, checkpoints, TensorBoard, and
     `data.num_epochs` ending the run.
A leaf of `base_config()` outside that union fails the test, unless it is in `READ_ELSEWHERE`: keys
read only where a test cannot go cheaply (a script's flag handling, an optional dependency); each
of those must still appear in the named source file, and must still be a leaf (no stale entries).
The rest of the file checks what the run's keys did: the end of the data stops the run, the profile
trace exists, π_ref is the warmed-up weights and survives a restart, and the skipped-row counts are in
metrics.jsonl, TensorBoard and the returned summary.
"""

import glob
import json
import os
import struct

import jax
import ml_collections
import numpy as np
import pytest

from pgpo_jax import config as config_lib
from pgpo_jax import reference as reference_lib
from pgpo_jax import rewards, trainer, warmup
from tests.tiny_run import ROOT, length_parity, load_config, tiny_config

rewards.BATCH_REWARD_FNS.setdefault("test_length_parity", length_parity)

# key -> (file that reads it, why the recorded calls do not reach it)
READ_ELSEWHERE = {
  "workdir": ("pgpo_jax/cli/train.py", "resolved by the command (--workdir wins)"),
  "logging.wandb_project": (
    "pgpo_jax/train_metrics.py",
    "read only with logging.wandb=True and wandb installed",
  ),
}


class Recorder:
  """A read-through view of a ConfigDict recording every field read (see the module docstring)."""

  def __init__(self, cd: ml_collections.ConfigDict, seen: set, prefix: str = ""):
    object.__setattr__(self, "_cd", cd)
    object.__setattr__(self, "_seen", seen)
    object.__setattr__(self, "_prefix", prefix)

  def __getitem__(self, name):
    value = self._cd[name]
    path = self._prefix + name
    self._seen.add(path)
    return (
      Recorder(value, self._seen, path + ".")
      if isinstance(value, ml_collections.ConfigDict)
      else value
    )

  def __getattr__(self, name):
    if not name.startswith("_") and name in self._cd:
      return self[name]
    return getattr(self._cd, name)  # methods (to_dict, ...): not a read of a field

  def __setattr__(self, name, value):
    setattr(self._cd, name, value)

  def __contains__(self, name):
    return name in self._cd

  def __iter__(self):
    return iter(self._cd.keys())

  def __len__(self):
    return len(self._cd)

  def keys(self):
    return self._cd.keys()

  def items(self):
    return [(k, self[k]) for k in self._cd.keys()]

  def values(self):
    return [self[k] for k in self._cd.keys()]

  def get(self, name, default=None):
    return self[name] if name in self._cd else default


def leaves(cd: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  out = set()
  for k, v in cd.items():
    if isinstance(v, ml_collections.ConfigDict):
      out |= leaves(v, f"{prefix}{k}.")
    else:
      out.add(prefix + k)
  return out


def run_config(data_dir) -> ml_collections.ConfigDict:
  """Every optional branch on; 8 training rows, 4 prompts per step, one pass: the data ends the run
  after step 2 of 5."""
  c = tiny_config(data_dir)
  c.data.demo_train_rows, c.data.demo_eval_rows = 8, 4
  c.data.num_epochs = 1
  c.dynamic_sampling.enabled = False  # one rollout round (4 prompts) per step
  c.loss.kl_coef, c.loss.kl_estimator = 0.05, "k2"
  # AdamW's decoupled decay moves the policy off π_ref at every update, also at a step whose
  # sampled groups all got zero advantage (a tiny random policy often scores every sample 0): so
  # train/kl at step 2 is > 0 whatever the samples, and the test checks the KL wiring, not luck.
  c.optim.weight_decay = 0.5
  c.pgpo.mask_vision_markers = True
  c.train.num_steps, c.train.eval_every, c.train.eval_prompts, c.train.eval_max_new_tokens = (
    5,
    1,
    4,
    4,
  )
  c.train.profile = True
  c.checkpoint.every = 1
  return c


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
  seen: set[str] = set()
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    c = load_config(path)
    c.model.init_from = c.model.init_from or "/ckpt/qwen2_5_vl"
    c.data.train_files = c.data.train_files or "/data/virl39k/*.parquet"
    sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    fixed = int(np.prod([s for s in sizes if s > 0]))
    config_lib.validate(Recorder(c, seen), fixed * (2 if -1 in sizes else 1))
  data_dir = tmp_path_factory.mktemp("keys_data")
  c = run_config(data_dir)
  trainer.ensure_demo_data(Recorder(c, seen))
  workdir = str(tmp_path_factory.mktemp("keys_run"))
  # The warm-up's result, copied as it is returned (the train step later donates those buffers).
  warmed = []
  sft_warmup = warmup.sft_warmup

  def recording_warmup(*args, **kwargs):
    params = sft_warmup(*args, **kwargs)
    warmed.append(jax.tree.map(np.array, params))
    return params

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(warmup, "sft_warmup", recording_warmup)
    t = trainer.Trainer(Recorder(c, seen), workdir)
    initial = jax.tree.map(np.asarray, t.state.params)
    last = t.run()
  return seen, t, last, workdir, initial, data_dir, warmed


def test_recorder_records_reads_not_dumps():
  c = ml_collections.ConfigDict({"a": 1, "b": {"x": 2, "y": 3}, "t": {"p": 1, "q": 2}, "unused": 0})
  seen: set[str] = set()
  r = Recorder(c, seen)
  r.to_dict()  # a dump (checkpoint metadata) reads nothing
  assert seen == set()
  assert r.a == 1 and r.b["x"] == 2 and dict(r.t) == {"p": 1, "q": 2} and "unused" in r
  assert seen == {"a", "b", "b.x", "t", "t.p", "t.q"}
  assert leaves(c) - seen == {"b.y", "unused"}


def test_every_config_key_is_read(recorded_run):
  seen = recorded_run[0]
  base = leaves(config_lib.base_config())
  for key, (path, _) in READ_ELSEWHERE.items():
    assert key in base, f"READ_ELSEWHERE names {key!r}, which base_config() no longer has"
    name = key.rsplit(".", 1)[-1]
    assert f".{name}" in open(os.path.join(ROOT, path)).read(), f"{path} no longer reads {key}"
  never = sorted(base - seen - set(READ_ELSEWHERE))
  assert not never, f"config keys that no code reads: {never}"


def test_the_end_of_the_data_ends_the_run(recorded_run):
  _, t, last, workdir, _, _, _ = recorded_run
  assert t.stop_reason == "end of data" and t.step == 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  assert [r["step"] for r in rows] == [0, 1, 2]  # eval before RL, then two steps
  assert (
    sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())[-1] == 2
  )
  assert last["count/data_rows_read"] == 8  # exactly one pass


def test_profile_trace_of_one_step(recorded_run):
  workdir = recorded_run[3]
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1, traces


def test_reference_is_the_warmed_up_policy_and_survives_a_restart(recorded_run):
  """π_ref after two RL steps is exactly the warm-up's result (recorded as `warmup.sft_warmup`
  returned it), which differs from the initial weights, and a restart restores the same."""
  seen, t, last, workdir, initial, data_dir, warmed = recorded_run
  assert last["train/kl"] > 0
  saved = os.path.join(workdir, reference_lib.DIRNAME)
  assert os.path.isdir(saved)
  ref = jax.tree.map(np.asarray, t.reference.params)
  assert len(warmed) == 1  # one warm-up, before RL
  jax.tree.map(np.testing.assert_array_equal, ref, warmed[0])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref, initial))
  assert max(moved) > 0  # the warm-up moved the weights, so equal to them is not equal to initial
  policy = jax.tree.map(np.asarray, t.state.params)
  drift = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref, policy))
  assert max(drift) > 0  # RL moved the policy on; π_ref stayed at the warm-up
  again = trainer.Trainer(run_config(data_dir), workdir)
  assert again.maybe_restore()
  reference_lib.start_rl(again.reference, again.state.params, workdir, resumed=True, warmed_up=True)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again.reference.params), ref)
  again.checkpointer.close()


def _tensorboard_tags(workdir) -> set[str]:
  """Scalar tags of the TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
  from tensorboardX.proto import event_pb2

  tags = set()
  for path in glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      tags |= {v.tag for v in ev.summary.value}
      i += 12 + n + 4
  return tags


def test_skipped_row_counts_are_logged(recorded_run):
  _, _, last, workdir, _, _, _ = recorded_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  keys = {
    "count/data_rows_read",
    "count/data_skipped_rows",
    "count/data_skipped_rows/prompt_too_long",
  }
  assert keys <= set(rows[-1]) and keys <= set(last)
  assert keys <= _tensorboard_tags(workdir)
