"""The compile check predicts the trainer: it lowers the trainer's programs with the trainer's shardings.

A tiny training step with a KL term runs on an 8-device CPU mesh (data=2, fsdp=2, tensor=2) with every
program call recorded (arguments as shape / dtype / sharding); `compile_check.Context` is built for the
same config on the same devices. For each program the compile check compiles (rollout start, rollout
decode, score, π_ref, train step) the test asserts that
- the compile check's abstract arguments, at the trainer's bucket shapes, have the trainer's tree
  structure, shapes, dtypes and shardings;
- lowering the compile check's program on them gives the same StableHLO text as lowering the trainer's
  program on what the trainer passed (same function, same in/out shardings, same donation);
- the shapes the compile check derives from the config alone (rollout batch, scoring slice, update
  batch, group size, response length) are the trainer's, and its prompt/patch buckets bound them.
Before `programs.py` the check compiled an unsliced score program and a train step with shardings the
trainer did not use; both show up here as a shape or HLO mismatch.
"""

import pytest

from pgpo_jax import trainer
from tests.multidevice import run_on_8_devices
from tests.tiny_run import tiny_config

_BODY = """
import json
import jax
import numpy as np
from pgpo_jax import programs, rewards, rollout, sharding, trainer
from pgpo_jax.tools import compile_check as cc
from tests.tiny_run import length_parity, tiny_config

rewards.BATCH_REWARD_FNS["test_length_parity"] = length_parity
c = tiny_config({data!r})
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
c.rollout.prompts_per_step, c.rollout.group_size, c.rollout.max_new_tokens = 8, 2, 8
c.updates.prompts_per_update, c.updates.micro_batch_prompts = 4, 4
c.warmup.sft_steps, c.train.num_steps, c.train.eval_every = 0, 1, 0
c.data.max_pixels = 112 * 112
c.dynamic_sampling.enabled = False  # a full batch whatever the rewards
c.loss.kl_coef = 1e-2  # the π_ref program runs too

def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)

seen = {{}}
def spy(name, fn):
  def call(*args):
    seen.setdefault(name, (fn, abstract(args)))
    return fn(*args)
  return call

statics = []
real_rollout_programs = programs.rollout_programs
def spy_rollout_programs(graphdef, static):
  statics.append(static)
  p = real_rollout_programs(graphdef, static)
  return rollout.Programs(spy("rollout_start", p.start), spy("rollout_decode", p.decode), p.finish, p.cast)
programs.rollout_programs = spy_rollout_programs

t = trainer.Trainer(c, {workdir!r})
t.score_fn = spy("score", t.score_fn)
t.train_step = spy("train", t.train_step)
t.reference.program = spy("reference", t.reference.program)
with sharding.use_rules(t.mesh, sharding.TRAIN_RULES):  # as Trainer.run
  t.train_one_step()
programs.rollout_programs = real_rollout_programs
t.checkpointer.close()

ctx = cc.Context(c, jax.devices(), model_cfg=t.cfg)
out = {{"static_equal": all(s == ctx.rollout_static for s in statics) and len(statics) > 0}}
start_args, decode_args = seen["rollout_start"][1], seen["rollout_decode"][1]
score_args, train_args = seen["score"][1], seen["train"][1]
B, T = start_args[1].input_ids.shape
seq_s, seq_t = score_args[1], train_args[1]["seq"]
got = dict(rollout_prompts=B, group_size=seq_s.response.shape[1], response_len=seq_s.response.shape[2],
           score_prompts=seq_s.prompt_ids.shape[0], update_prompts=seq_t.prompt_ids.shape[0])
out["config_shapes"] = {{k: [getattr(ctx.shapes, k), v] for k, v in got.items()}}
out["bounds"] = [ctx.shapes.prompt_len >= max(T, seq_s.prompt_ids.shape[1], seq_t.prompt_ids.shape[1]),
                 ctx.shapes.patches >= start_args[1].vision.pixel_values.shape[1]]
shape = lambda prompts, prompt_len, patches: cc.Shapes(
    rollout_prompts=B, group_size=got["group_size"], prompt_len=prompt_len, response_len=got["response_len"],
    patches=patches, score_prompts=prompts, update_prompts=prompts, micro_prompts=c.updates.micro_batch_prompts)
rollout_steps = cc.rollout_steps(ctx, shape(B, T, start_args[1].vision.pixel_values.shape[1]))
steps = {{"rollout_start": rollout_steps[0], "rollout_decode": rollout_steps[1],
         "score": cc.score_step(ctx, shape(seq_s.prompt_ids.shape[0], seq_s.prompt_ids.shape[1],
                                           seq_s.vision.pixel_values.shape[1])),
         "reference": cc.reference_step(ctx, shape(seq_s.prompt_ids.shape[0], seq_s.prompt_ids.shape[1],
                                                   seq_s.vision.pixel_values.shape[1])),
         "train": cc.train_step_step(ctx, shape(seq_t.prompt_ids.shape[0], seq_t.prompt_ids.shape[1],
                                                seq_t.vision.pixel_values.shape[1]))}}

def signature(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return str(treedef), [(tuple(x.shape), str(x.dtype), x.sharding) for x in leaves]

for name, step in steps.items():
  fn, args = seen[name]
  with sharding.use_rules(t.mesh, sharding.TRAIN_RULES):
    trainer_hlo = fn.lower(*args).as_text()
  with sharding.use_rules(ctx.mesh, sharding.RULES[step.rules]):
    lowered = step.lower()
  check_hlo = lowered.as_text()
  (tree_a, leaves_a), (tree_b, leaves_b) = signature(args), signature(step.args)
  mismatch = [f"{{i}}: trainer {{a[:2]}} {{a[2]}} vs check {{b[:2]}} {{b[2]}}"
              for i, (a, b) in enumerate(zip(leaves_a, leaves_b))
              if a[:2] != b[:2] or not a[2].is_equivalent_to(b[2], len(a[0]))]
  out[name] = {{"tree": tree_a == tree_b, "leaves": len(leaves_a) == len(leaves_b), "mismatch": mismatch[:5],
               "hlo": trainer_hlo == check_hlo, "donated": "jax.buffer_donor" in check_hlo
               or "tf.aliasing_output" in check_hlo,
               "sharded_io": "sdy.sharding" in check_hlo or "mhlo.sharding" in check_hlo}}
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("programs_data")
  trainer.ensure_demo_data(tiny_config(d))
  return d


def test_compile_check_lowers_the_trainers_programs(data_dir, tmp_path):
  out = run_on_8_devices(
    _BODY.format(data=str(data_dir), workdir=str(tmp_path / "w")), timeout=1200
  )
  assert out["static_equal"], "the rollout programs' static config differs"
  for key, (check, trainer_value) in out["config_shapes"].items():
    assert check == trainer_value, (key, check, trainer_value)
  assert all(out["bounds"]), out["bounds"]
  for name in ("rollout_start", "rollout_decode", "score", "reference", "train"):
    r = out[name]
    assert r["tree"] and r["leaves"] and not r["mismatch"], (name, r)
    assert r["hlo"], f"{name}: the compile check lowers another program than the trainer runs"
    assert r["sharded_io"], name
  assert out["rollout_decode"]["donated"] and out["train"]["donated"]


_REFERENCE = """
import json
import jax
import numpy as np
from flax import nnx
from pgpo_jax import programs
from pgpo_jax import sharding as sh
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.rl import packing, sequences
from tests.hf_utils import left_pad, make_ids, random_pixels

cfg = qwen.tiny_config()
model = qwen.init_model(cfg, seed=3)
rng = np.random.default_rng(0)
grids = [(1, 4, 8), (1, 8, 4), (1, 4, 4), (1, 8, 8)]
ids, am = left_pad([make_ids(rng, [g], pre=3 + i) for i, g in enumerate(grids)])
P, G, L = len(grids), 2, 6
response = rng.integers(10, 400, (P * G, L)).astype(np.int32)
rmask = np.arange(L)[None] < rng.integers(1, L + 1, (P * G, 1))
batch = sequences.make_sequence_batch(cfg, ids, am, random_pixels(rng, grids), np.asarray(grids),
                                      response, rmask)
m = np.asarray(batch.flat_response_mask)
graphdef, state = nnx.split(model)
kw = dict(temperature=0.7, chunk_size=4)
want = np.asarray(programs.make_reference_program(graphdef, **kw)(state, batch))  # one device

mesh = sh.make_mesh(data=1, fsdp=4, tensor=2)
rules = sh.TRAIN_RULES
params_sh = sh.param_shardings(state, mesh, rules)
sstate = jax.device_put(state, params_sh)
rows = programs.rows_sharding(mesh, rules, P)
prog = programs.make_reference_program(graphdef, mesh=mesh, rules=rules, params_sharding=params_sh,
                                       num_rows=P, **kw)
got = prog(sstate, jax.device_put(batch, rows))
# train.packing: one packing unit per batch shard (4 = fsdp), as the trainer packs a scoring slice.
host = jax.tree.map(np.asarray, batch)
pb, slot = packing.pack_sequences(host, cfg.image_token_id, 4, ids.shape[1] + L)
got_packed = prog(sstate, jax.device_put(pb, rows))
print(json.dumps(dict(
  spread=float(np.ptp(want[m])),
  padded=float(np.abs(np.asarray(got) - want)[m].max()),
  packed=float(np.abs(packing.unpack(got_packed, slot) - want)[m].max()),
  spec=str(tuple(got.sharding.spec)),
  packed_spec=str(tuple(got_packed.sharding.spec)),
  weight_spec=str(tuple(sstate["language_model"]["layers"]["wq"][...].sharding.spec)),
)))
"""


def test_reference_program_on_a_mesh_equals_one_device():
  """π_ref's program on an fsdp=4 x tensor=2 mesh (TRAIN layout of its weights, the slice's rows over
  `batch`), on the padded slice and on its packing (one unit per batch shard), gives the one-device
  padded log π_ref, and returns it laid out like its rows."""
  out = run_on_8_devices(_REFERENCE, timeout=1800)
  assert out["spread"] > 1e-3, out  # the numbers differ from token to token: the check can fail
  assert out["padded"] < 1e-5 and out["packed"] < 1e-5, out
  assert out["spec"] == out["packed_spec"] == "('fsdp',)", out  # rows over `batch` (data=1)
  assert out["weight_spec"] == "(None, 'fsdp', 'tensor')", out
