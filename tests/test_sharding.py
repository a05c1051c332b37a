"""Mesh construction, logical->mesh rules, and sharded == unsharded on an 8-device CPU mesh."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from pgpo_jax import sharding as sh
from pgpo_jax.models import qwen2_5_vl as qwen
from tests.multidevice import run_on_8_devices


def _mesh(data, fsdp, tensor):
  return AbstractMesh((data, fsdp, tensor), sh.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# ------------------------------------------------------------------------------------------------
# Pure rule logic (no devices needed)
# ------------------------------------------------------------------------------------------------
def test_mesh_shape_fill_and_errors():
  assert sh.mesh_shape(32, data=-1, fsdp=8, tensor=4) == (1, 8, 4)
  assert sh.mesh_shape(256, data=1, fsdp=-1, tensor=2) == (1, 128, 2)
  assert sh.mesh_shape(8, data=2, fsdp=2, tensor=2) == (2, 2, 2)
  with pytest.raises(ValueError, match="do not divide the 12 devices"):
    sh.mesh_shape(12, data=-1, fsdp=8)
  with pytest.raises(ValueError, match="has 16 devices, but 8 are available"):
    sh.mesh_shape(8, data=2, fsdp=2, tensor=4)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sh.mesh_shape(8, data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="do not divide the 1 devices"):
    sh.make_mesh(data=-1, fsdp=2)  # one CPU device in this process


def test_train_and_sample_specs():
  mesh = _mesh(2, 2, 2)
  spec = lambda axes, rules, shape=None: sh.logical_to_spec(axes, rules, mesh, shape)  # noqa: E731
  wq = ("layers", "embed", "heads", "head_dim")
  assert spec(wq, sh.TRAIN_RULES) == P(None, "fsdp", "tensor")
  assert spec(wq, sh.SAMPLE_RULES) == P(None, None, "tensor")
  assert spec(("vocab", "embed"), sh.TRAIN_RULES) == P("tensor", "fsdp")
  assert spec(("vocab", "embed"), sh.SAMPLE_RULES) == P("tensor")
  assert spec(("batch", "length", "act_embed"), sh.TRAIN_RULES) == P(("data", "fsdp"))
  assert spec(("batch", "length", "act_embed"), sh.SAMPLE_RULES) == P(("data", "fsdp"))
  assert spec(("vision_merge", "vision_merge_out"), sh.TRAIN_RULES) == P("fsdp", "tensor")
  with pytest.raises(KeyError, match="logical axis 'embedding' has no sharding rule"):
    spec(("embedding",), sh.TRAIN_RULES)


def test_indivisible_dims_fall_back():
  mesh = _mesh(2, 2, 4)
  # kv_heads=2 on tensor=4: replicated; heads=4 still split.
  assert sh.logical_to_spec(
    ("layers", "embed", "kv_heads", "head_dim"), sh.TRAIN_RULES, mesh, (2, 64, 2, 16)
  ) == P(None, "fsdp")
  # batch 2 over (data=2, fsdp=2): longest dividing prefix = data.
  assert sh.logical_to_spec(("batch", "length"), sh.TRAIN_RULES, mesh, (2, 7)) == P("data")
  assert sh.logical_to_spec(("batch", "length"), sh.TRAIN_RULES, mesh, (3, 7)) == P()
  # Size-1 mesh axes are dropped; a mesh axis is used once per array.
  assert sh.logical_to_spec(("embed", "mlp"), sh.TRAIN_RULES, _mesh(8, 1, 1), (64, 128)) == P()
  rules = {**sh.TRAIN_RULES, "mlp": "fsdp"}
  assert sh.logical_to_spec(("embed", "mlp"), rules, mesh, (64, 128)) == P("fsdp")


def test_param_shardings_cover_every_param_of_the_real_7b():
  model = qwen.abstract_model(qwen.PRESETS["7b"], "bfloat16")
  mesh = _mesh(1, 8, 4)
  shardings = sh.flat_shardings(sh.param_shardings(model, mesh, sh.TRAIN_RULES))
  from pgpo_jax.models.qwen2_5_vl.loading import flat_params

  params = flat_params(model)
  assert shardings.keys() == params.keys()
  assert shardings[("language_model", "layers", "w_gate")].spec == P(None, "fsdp", "tensor")
  assert shardings[("language_model", "layers", "wk")].spec == P(
    None, "fsdp", "tensor"
  )  # 4 kv heads
  assert shardings[("visual", "patch_embed")].spec == P(None, "fsdp")
  # Per-device bytes: everything but the norms/biases is split 32 ways.
  per_dev = sum(
    np.prod(v.shape) * 2 / np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(s.spec))])
    for v, s in ((params[k], shardings[k]) for k in params)
  )
  total = sum(np.prod(v.shape) * 2 for v in params.values())
  assert per_dev < total / 31
  notes = sh.sharding_fallbacks(model, _mesh(1, 8, 8), sh.TRAIN_RULES)
  assert any("kv_heads" in n for n in notes) and any("vision_mlp" in n for n in notes)


def test_constrain_is_identity_without_rules():
  x = np.ones((4, 3), np.float32)
  assert sh.constrain(x, ("batch", "act_embed")) is x


# ------------------------------------------------------------------------------------------------
# 8 CPU devices
# ------------------------------------------------------------------------------------------------
_FORWARD = """
import json, numpy as np, jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from pgpo_jax import sharding as sh
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import loading
from tests.hf_utils import make_ids, left_pad, random_pixels

cfg = qwen.tiny_config()
model = qwen.init_model(cfg, seed=3)
rng = np.random.default_rng(0)
grids = [(1, 4, 8), (1, 8, 4), (1, 4, 4), (1, 8, 8)]
ids, am = left_pad([make_ids(rng, [g], pre=3 + i) for i, g in enumerate(grids)])
ids = np.pad(ids, ((0, 0), (0, 64 - ids.shape[1]))); am = np.pad(am, ((0, 0), (0, 64 - am.shape[1])))
pos, _ = qwen.get_rope_index(ids, am, np.asarray(grids), image_token_id=cfg.image_token_id, spatial_merge_size=2)
vin = qwen.prepare_vision(random_pixels(rng, grids), np.asarray(grids), cfg.vision)
ids, pos, km = jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(am, bool)

def logits_fn(graphdef):
  def f(state, ids, pos, km, vin):
    m = nnx.merge(graphdef, state)
    h = sh.constrain(qwen.hidden_states(m, ids, pos, km, vin), ("batch", "length", "act_embed"))
    return qwen.logits_from_hidden(m, h)
  return f

def rollout_fn(graphdef):
  def f(state, ids, pos, km, vin, cache):
    m = nnx.merge(graphdef, state)
    logits0, cache = qwen.prefill(m, ids, pos, km, cache, vin)
    tok = jnp.argmax(logits0, -1).astype(jnp.int32)
    logits1, cache = qwen.decode_step(m, tok, pos.max(axis=(0, 2)) + 1, cache)
    return logits0, logits1
  return f

graphdef, state = nnx.split(model)
ref = jax.jit(logits_fn(graphdef))(state, ids, pos, km, vin)
cache = qwen.init_cache(cfg.text, 4, 80, jnp.float32)
ref0, ref1 = jax.jit(rollout_fn(graphdef))(state, ids, pos, km, vin, cache)

out = {}
# TRAIN layout: full forward; SAMPLE layout: prefill + one cached decode step (the rollout path).
for name, rules, shape, kind in (("train", sh.TRAIN_RULES, (2, 2, 2), "forward"),
                                 ("sample", sh.SAMPLE_RULES, (2, 2, 2), "rollout"),
                                 ("train_t4", sh.TRAIN_RULES, (1, 2, 4), "forward")):
  mesh = sh.make_mesh(*shape)
  shardings = sh.param_shardings(state, mesh, rules)
  sstate = jax.device_put(state, shardings)
  want = sh.flat_shardings(shardings)
  got = {tuple(sh.path_str(p).split("/")): v.sharding for p, v in jax.tree_util.tree_flatten_with_path(sstate)[0]}
  assert got.keys() == want.keys()
  assert all(got[k] == want[k] for k in want)
  r = {"specs": {"/".join(k): str(tuple(v.spec)) for k, v in want.items()}}
  with sh.use_rules(mesh, rules):
    bsh = lambda axes, x: jax.device_put(x, sh.logical_sharding(axes, mesh, rules, x.shape))
    args = (bsh(("batch", "length"), ids), bsh((None, "batch", "length"), pos), bsh(("batch", "length"), km))
    if kind == "forward":
      logits = jax.jit(logits_fn(graphdef))(sstate, *args, vin)
      r.update(forward=float(jnp.abs(logits - ref).max()), batch_spec=str(tuple(logits.sharding.spec)))
    else:
      c = qwen.init_cache(cfg.text, 4, 80, jnp.float32)
      cache_axes = ("layers", "batch", "cache_length", "act_kv_heads", "act_head_dim")
      c = qwen.KVCache(k=bsh(cache_axes, c.k), v=bsh(cache_axes, c.v),
                    key_mask=bsh(("batch", "cache_length"), c.key_mask), index=c.index)
      l0, l1 = jax.jit(rollout_fn(graphdef))(sstate, *args, vin, c)
      r.update(prefill=float(jnp.abs(l0 - ref0).max()), decode=float(jnp.abs(l1 - ref1).max()))
  out[name] = r
print(json.dumps(out))
"""


def test_sharded_forward_prefill_decode_equal_single_device():
  out = run_on_8_devices(_FORWARD)
  assert out["train"]["forward"] < 1e-5 and out["train_t4"]["forward"] < 1e-5, out
  assert out["sample"]["prefill"] < 1e-5 and out["sample"]["decode"] < 1e-5, out["sample"]
  train, sample, t4 = out["train"]["specs"], out["sample"]["specs"], out["train_t4"]["specs"]
  assert train["language_model/layers/wq"] == "(None, 'fsdp', 'tensor')"
  assert train["language_model/embed_tokens"] == "('tensor', 'fsdp')"
  assert train["lm_head"] == "('fsdp', 'tensor')"
  assert train["visual/blocks/w_up"] == "(None, 'fsdp', 'tensor')"
  assert sample["language_model/layers/wq"] == "(None, None, 'tensor')"
  assert sample["lm_head"] == "(None, 'tensor')"
  assert t4["language_model/layers/wk"] == "(None, 'fsdp')"  # kv_heads=2 on tensor=4: replicated
  assert t4["language_model/layers/wq"] == "(None, 'fsdp', 'tensor')"
  assert out["train"]["batch_spec"].startswith("(('data', 'fsdp')")


_LOAD = """
import json, numpy as np, jax
from pgpo_jax import sharding as sh
from pgpo_jax.convert import hf as convert
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import loading

HF, CKPT = {hf!r}, {ckpt!r}
reference = loading.flat_params(qwen.from_pretrained(HF))
mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
# Spy: no host->device copy may carry a whole sharded parameter (Orbax puts shard-sized pieces).
full_shape = reference[("language_model", "layers", "w_gate")].shape
real_put = jax.device_put
def spy_put(x, *a, **k):
  assert getattr(x, "shape", None) != full_shape, "a whole sharded parameter was device_put"
  return real_put(x, *a, **k)
jax.device_put = spy_put
result = {{}}
for name, path in (("hf", HF), ("orbax", CKPT)):
  cfg = qwen.Qwen25VLConfig.from_json(HF)
  want = sh.flat_shardings(sh.param_shardings(qwen.abstract_model(cfg), mesh, sh.TRAIN_RULES))
  model = qwen.from_pretrained(path, "float32", config=cfg, shardings=want)
  params = loading.flat_params(model)
  ok_sharding = all(params[k].sharding == want[k] for k in want)
  # Each device holds exactly its slice: the per-device bytes of e.g. w_gate are 1/4 of the array.
  w = params[("language_model", "layers", "w_gate")]
  shard_bytes = {{s.data.nbytes for s in w.addressable_shards}}
  equal = all(np.array_equal(np.asarray(params[k]), np.asarray(reference[k])) for k in reference)
  result[name] = dict(ok_sharding=ok_sharding, equal=equal, shard_bytes=sorted(shard_bytes), full=w.nbytes)
jax.device_put = real_put
print(json.dumps(result))
"""


def test_from_pretrained_puts_params_straight_into_their_shardings(tiny_hf, tmp_path):
  from pgpo_jax.convert import hf as convert

  convert.hf_to_orbax(tiny_hf[1], tmp_path / "ck", dtype="float32", progress=False)
  out = run_on_8_devices(_LOAD.format(hf=str(tiny_hf[1]), ckpt=str(tmp_path / "ck")))
  for name in ("hf", "orbax"):
    r = out[name]
    assert r["ok_sharding"] and r["equal"], (name, r)
    assert r["shard_bytes"] == [r["full"] // 4], (name, r)  # fsdp=2 x tensor=2


_EMBED = """
import json, jax, jax.numpy as jnp
from flax import nnx
from pgpo_jax import sharding as sh
from pgpo_jax.logical_axes import rules_in_effect
from pgpo_jax.models import qwen2_5_vl as qwen

model = qwen.Qwen25VL(qwen.tiny_config(), dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
ids = jax.random.randint(jax.random.key(1), (8, 3, 16), 0, model.cfg.text.vocab_size)  # [U, R, T]
ref = model.language_model.embed(ids)
mesh = sh.make_mesh(data=1, fsdp=4, tensor=2)
graphdef, state = nnx.split(model)
state = jax.device_put(state, sh.param_shardings(model, mesh, sh.TRAIN_RULES))
ids = jax.device_put(ids, sh.logical_sharding(("batch", None, None), mesh, sh.TRAIN_RULES, ids.shape))

def embed(state, ids):
  with rules_in_effect(mesh, sh.TRAIN_RULES):  # rows on, batch-split, as the decoder lays them
    return sh.constrain(nnx.merge(graphdef, state).language_model.embed(ids), ("batch", None, None, "act_embed"))

fn = jax.jit(embed)
hlo = fn.lower(state, ids).compile().as_text()
out = fn(state, ids)
print(json.dumps(dict(
  all_to_all="all-to-all" in hlo,
  equal=bool(jnp.array_equal(out, ref)),
  spec=str(tuple(out.sharding.spec)),
)))
"""


def test_train_layout_embedding_lookup_needs_no_all_to_all():
  """TRAIN layouts split the embedding table's D over fsdp; a lookup straight from it returns rows
  split over D and the batch-split model re-lays them with an all-to-all (the one that aborted the
  TPU compiler on v5e-256). `TextModel.embed` gathers the table along D first: no all-to-all, the
  rows come back split like the ids, and the values are the unsharded lookup's, bit for bit."""
  out = run_on_8_devices(_EMBED)
  assert not out["all_to_all"], out
  assert out["equal"], out
  assert out["spec"].startswith("('fsdp',"), out
