"""HF safetensors <-> Orbax conversion: logits, bit-exact round trips, sharded export, clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pgpo_jax import checkpoint as ckpt_lib
from pgpo_jax.cli import convert as cli
from pgpo_jax.convert import hf as convert
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import loading, weights
from tests.hf_utils import hf_logits, make_ids, random_pixels

GRIDS = [(1, 8, 12)]


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return np.array([make_ids(rng, GRIDS)]), random_pixels(rng, GRIDS), np.asarray(GRIDS)


def _all_tensors(folder) -> dict[str, np.ndarray]:
  out = {}
  for f in weights.safetensors_files(str(folder)):
    out.update(load_file(f))
  return out


def _logits(model, ids, pixels, grids):
  return np.asarray(qwen.forward(model, ids, None, pixels, grids))


@pytest.fixture(scope="module")
def converted(tiny_hf, tmp_path_factory):
  """tiny_hf converted to Orbax in float32."""
  out = tmp_path_factory.mktemp("ckpt")
  summary = convert.hf_to_orbax(tiny_hf[1], out, dtype="float32", progress=False)
  assert summary.num_tensors == len(
    loading.flat_params(qwen.abstract_model(qwen.Qwen25VLConfig.from_json(tiny_hf[1])))
  )
  return out


def test_hf_to_orbax_loads_with_same_logits(tiny_hf, converted):
  assert os.path.isdir(converted / "params") and os.path.isfile(converted / "config.json")
  assert os.path.isfile(converted / "generation_config.json")  # side files are copied
  ids, pixels, grids = _inputs()
  from_hf = qwen.from_pretrained(tiny_hf[1])
  from_ckpt = qwen.from_pretrained(converted)
  a, b = loading.flat_params(from_hf), loading.flat_params(from_ckpt)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))
  np.testing.assert_array_equal(
    _logits(from_ckpt, ids, pixels, grids), _logits(from_hf, ids, pixels, grids)
  )
  # The params item directly (config found one level up), cast to bf16 on restore.
  bf = qwen.from_pretrained(converted / "params", "bfloat16")
  assert loading.flat_params(bf)[("lm_head",)].dtype == np.dtype("bfloat16")


@pytest.mark.parametrize("max_shard_bytes", [convert.DEFAULT_MAX_SHARD_BYTES, 150_000])
def test_round_trip_is_bit_exact_and_transformers_loads_it(
  tiny_hf, converted, tmp_path, max_shard_bytes
):
  from transformers import Qwen2_5_VLForConditionalGeneration

  out = tmp_path / "hf"
  summary = convert.orbax_to_hf(converted, out, max_shard_bytes=max_shard_bytes, progress=False)
  files = sorted(os.listdir(out))
  if max_shard_bytes == convert.DEFAULT_MAX_SHARD_BYTES:
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
  else:
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    for f in shards:  # each shard within the limit (no single tiny tensor exceeds it)
      assert os.path.getsize(out / f) <= max_shard_bytes + 16 * 1024, f
    index = json.load(open(out / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == summary.bytes
  original, exported = _all_tensors(tiny_hf[1]), _all_tensors(out)
  assert set(original) == set(exported)
  for name, w in original.items():
    assert exported[name].dtype == w.dtype == np.float32, name
    np.testing.assert_array_equal(exported[name], w, err_msg=name)
  assert summary.num_tensors == len(original)
  assert summary.num_params == sum(w.size for w in original.values())

  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
    str(out), dtype=torch.float32
  ).eval()
  ids, pixels, grids = _inputs(1)
  np.testing.assert_array_equal(
    hf_logits(reloaded, ids, None, pixels, grids), hf_logits(tiny_hf[0], ids, None, pixels, grids)
  )


def test_tied_model_export_omits_lm_head(tiny_hf_tied, tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration

  hf_model, folder = tiny_hf_tied
  convert.hf_to_orbax(folder, tmp_path / "ck", dtype="float32", progress=False)
  assert ("lm_head",) not in ckpt_lib.orbax_param_metadata(tmp_path / "ck" / "params")
  convert.orbax_to_hf(tmp_path / "ck", tmp_path / "hf", max_shard_bytes=100_000, progress=False)
  exported = _all_tensors(tmp_path / "hf")
  assert "lm_head.weight" not in exported
  assert json.load(open(tmp_path / "hf" / "config.json"))["tie_word_embeddings"] is True
  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
    str(tmp_path / "hf"), dtype=torch.float32
  ).eval()
  ids, pixels, grids = _inputs(2)
  np.testing.assert_array_equal(
    hf_logits(reloaded, ids, None, pixels, grids), hf_logits(hf_model, ids, None, pixels, grids)
  )


def test_trainer_layout_and_dtype_cast_via_cli(tiny_hf, tmp_path):
  """WORKDIR/config.json + WORKDIR/checkpoints/<step>/params, exported in bf16 by the script.

  The trainer saves its `TrainState.params` (an nnx.State: leaves stored as {'value': ...})."""
  import orbax.checkpoint as ocp
  from flax import nnx

  model = qwen.from_pretrained(tiny_hf[1])
  work = tmp_path / "workdir"
  params_dir = work / "checkpoints" / "7" / "params"
  os.makedirs(params_dir.parent)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(params_dir), nnx.state(model, nnx.Param))
    ckptr.wait_until_finished()
  assert ("language_model", "norm", "value") in ckpt_lib.orbax_param_metadata(params_dir)
  shutil.copy(tiny_hf[1] / "config.json", work / "config.json")
  # Config found three levels up from the params item, or given explicitly.
  assert ckpt_lib.find_config(params_dir) == str(work / "config.json")
  rc = cli.main(
    [
      "--to_hf",
      "--ckpt",
      str(params_dir),
      "--model_config",
      str(work / "config.json"),
      "--out_dir",
      str(tmp_path / "out"),
      "--dtype",
      "bfloat16",
      "--max_shard_size",
      "200KB",
      "--no_progress",
    ]
  )
  assert rc == 0
  exported, original = _all_tensors(tmp_path / "out"), _all_tensors(tiny_hf[1])
  assert set(exported) == set(original)
  for name, w in original.items():
    assert exported[name].dtype == np.dtype("bfloat16"), name
    np.testing.assert_array_equal(exported[name], w.astype("bfloat16"), err_msg=name)
  cfg = json.load(open(tmp_path / "out" / "config.json"))
  assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_trainer_state_item_gets_a_clear_error_and_the_step_folder_exports(
  tiny_hf, tmp_path, capsys
):
  """`--ckpt WORKDIR/checkpoints/<step>/state` (params + optimizer state) names the params item to use."""
  import jax
  import optax
  from flax import nnx

  from pgpo_jax import checkpoint as ckpt_lib

  model = qwen.from_pretrained(tiny_hf[1])
  params = nnx.state(model, nnx.Param)
  work = tmp_path / "workdir"
  c = ckpt_lib.Checkpointer(work / "checkpoints", save_every=1, async_save=False)
  state = {
    "train": {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": np.int32(7)},
    "rng": np.zeros(2, np.uint32),
  }
  c.save(7, state, params, {"step": 7}, {})
  c.close()
  shutil.copy(tiny_hf[1] / "config.json", work / "config.json")
  step = work / "checkpoints" / "7"
  rc = cli.main(
    ["--to_hf", "--ckpt", str(step / "state"), "--out_dir", str(tmp_path / "out"), "--no_progress"]
  )
  err = capsys.readouterr().err
  assert rc == 2 and "'state' item" in err and f"{step / 'params'}" in err, err
  assert not os.path.exists(tmp_path / "out" / "model.safetensors")
  # The step folder itself exports (its params item; config.json two levels up).
  assert (
    cli.main(["--to_hf", "--ckpt", str(step), "--out_dir", str(tmp_path / "out"), "--no_progress"])
    == 0
  )
  exported, original = _all_tensors(tmp_path / "out"), _all_tensors(tiny_hf[1])
  assert set(exported) == set(original)
  np.testing.assert_array_equal(exported["model.norm.weight"], original["model.norm.weight"])
  # Any other tree of non-arrays: named, not an AttributeError.
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "opt"), {"opt": optax.adam(1e-3).init({"w": jax.numpy.zeros(3)})})
  with pytest.raises(ValueError, match="not a parameters checkpoint: opt is a list, not an array"):
    ckpt_lib.orbax_param_metadata(tmp_path / "opt")


@pytest.mark.parametrize("shard_bytes", ["5GB", "200KB"])  # one file; shards + index
def test_a_failed_export_leaves_no_partial_weights_and_the_previous_export_whole(
  converted, tmp_path, capsys, shard_bytes
):
  """`--to_hf` of truncated params failed half-way and left a partial model.safetensors (after
  deleting the previous export's). Now files are written under a temporary name and renamed at the
  end: the failure leaves the folder as it was."""
  from tests.test_checkpoint import truncate_largest

  out = tmp_path / "out"
  args = ["--out_dir", str(out), "--max_shard_size", shard_bytes, "--no_progress"]
  assert cli.main(["--to_hf", "--ckpt", str(converted), *args]) == 0
  before = {f: (out / f).read_bytes() for f in os.listdir(out)}
  shards = [f for f in before if f.endswith(".safetensors")]
  assert len(shards) == 1 if shard_bytes == "5GB" else len(shards) > 1
  damaged = tmp_path / "damaged"
  shutil.copytree(converted, damaged)
  truncate_largest(damaged / "params")
  capsys.readouterr()
  assert cli.main(["--to_hf", "--ckpt", str(damaged), *args]) == 2
  assert "pgpo-convert: error:" in capsys.readouterr().err
  assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # nothing added or changed
  fresh = tmp_path / "fresh"
  assert (
    cli.main(["--to_hf", "--ckpt", str(damaged), "--out_dir", str(fresh), "--no_progress"]) == 2
  )
  assert os.listdir(fresh) == []


def test_params_to_hf_from_memory(tiny_hf, tmp_path):
  model = qwen.from_pretrained(tiny_hf[1])
  convert.params_to_hf(
    loading.flat_params(model), model.cfg, tmp_path, config_src=tiny_hf[1], progress=False
  )
  exported, original = _all_tensors(tmp_path), _all_tensors(tiny_hf[1])
  for name, w in original.items():
    np.testing.assert_array_equal(exported[name], w, err_msg=name)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def _copy_hf(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_not_a_qwen_config(tiny_hf, tmp_path):
  d = _copy_hf(tiny_hf[1], tmp_path / "llama")
  cfg = json.load(open(d / "config.json"))
  cfg["model_type"] = "llama"
  json.dump(cfg, open(d / "config.json", "w"))
  with pytest.raises(ValueError, match="not a Qwen2.5-VL config: model_type='llama'"):
    convert.hf_to_orbax(d, tmp_path / "out", progress=False)


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_hf, tmp_path):
  from safetensors.numpy import save_file

  d = _copy_hf(tiny_hf[1], tmp_path / "broken")
  tensors = _all_tensors(d)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
  tensors["model.norm.weight"] = np.zeros(7, np.float32)
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError) as e:
    convert.hf_to_orbax(d, tmp_path / "out", progress=False)
  msg = str(e.value)
  assert "1 missing key(s): model.layers.1.mlp.up_proj.weight" in msg
  assert "1 unexpected key(s): model.layers.0.mlp.extra.weight" in msg
  assert "mis-shaped" in msg and "model.norm.weight" in msg


def test_orbax_checkpoint_of_another_config_is_rejected(converted, tmp_path):
  other = qwen.tiny_config(num_hidden_layers=3)
  cfg_file = tmp_path / "config.json"
  json.dump(other.to_hf_dict(), open(cfg_file, "w"))
  with pytest.raises(ValueError, match=r"mis-shaped parameter\(s\): language_model/layers/"):
    convert.orbax_to_hf(converted, tmp_path / "out", config=cfg_file, progress=False)
  with pytest.raises(ValueError, match="mis-shaped"):
    qwen.from_pretrained(converted, config=other)
  assert not os.path.exists(tmp_path / "out" / "model.safetensors")  # checked before writing


def test_unwritable_output_dir_and_cli_errors(tiny_hf, converted, tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match="cannot create output directory"):
    convert.orbax_to_hf(converted, blocker / "sub", progress=False)
  with pytest.raises(FileNotFoundError, match="not a Qwen2.5-VL checkpoint"):
    qwen.from_pretrained(tmp_path)
  with pytest.raises(FileExistsError, match="already exists"):
    convert.hf_to_orbax(tiny_hf[1], converted, progress=False)
  assert (
    cli.main(["--hf_dir", str(tiny_hf[1]), "--out_dir", str(blocker / "x"), "--no_progress"]) == 2
  )
  assert "cannot create output directory" in capsys.readouterr().err
  assert cli.parse_size("5GB") == 5 * 10**9 and cli.parse_size("2MiB") == 2 * 2**20
