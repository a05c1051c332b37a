"""Config validation: every bad value fails before any compute, naming its key (pgpo_jax/config.py)."""

import os

import pytest

from pgpo_jax import config as config_lib
from pgpo_jax.models.qwen2_5_vl import Qwen25VLConfig
from tests.tiny_run import tiny_config

ALL_RULES = {**config_lib.VALUE_RULES, **config_lib.WARMUP_RULES, **config_lib.EVAL_RULES}


def _set(c, key, value):
  *path, name = key.split(".")
  for part in path:
    c = c[part]
  c[name] = value


def _get(c, key):
  for part in key.split("."):
    c = c[part]
  return c


def _config(tmp_path):
  c = tiny_config(tmp_path)
  c.train.eval_every = 1  # the evaluation keys are checked only when evaluation is on
  c.reward.name = "pgpo_math"
  config_lib.validate(c, 1)  # the baseline is valid
  return c


@pytest.mark.parametrize(
  "key,value",
  [
    ("optim.learning_rate", -1e-6),  # was accepted and used
    ("rollout.top_k", -5),  # failed 29 s in, after the warm-up
    ("warmup.prompts_per_step", 0),  # failed without naming the key
    ("optim.schedule", "cosin"),  # failed without naming the key
    ("checkpoint.keep", 0),  # named checkpoint.every
    ("loss.dual_clip", 0.5),
    ("data.max_pixels", 0),
    ("pgpo.degenerate_rtol", 1.0),
  ],
)
def test_issue_examples_name_their_key(tmp_path, key, value):
  c = _config(tmp_path)
  _set(c, key, value)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, 1)
  assert str(e.value).startswith(f"config.{key}: must be "), str(e.value)
  assert repr(value) in str(e.value)


def _bad_value(key, value):
  """A value of the key's type that its rule rejects."""
  if isinstance(value, str):
    return "(" if key == "optim.frozen_regex" else "not-a-valid-choice"
  if isinstance(value, int) or key in ("data.min_pixels", "data.max_pixels"):
    return -1
  return float("nan")


@pytest.mark.parametrize("key", sorted(ALL_RULES))
def test_every_rule_rejects_a_bad_value_with_its_key(tmp_path, key):
  c = _config(tmp_path)
  _set(c, key, _bad_value(key, _get(c, key)))
  with pytest.raises(config_lib.ConfigError, match=f"^config\\.{key.replace('.', '[.]')}: must be"):
    config_lib.validate(c, 1)


# Leaves with no per-key value rule: free text (paths, column names), booleans, and keys checked by
# `validate` as relations or against a registry. A new numeric or enumerated key needs a rule instead.
NO_VALUE_RULE = {
  "seed",
  "workdir",
  "model.init_from",
  "data.train_files",
  "data.eval_files",
  "data.processor_dir",
  "data.question_key",
  "data.answer_key",
  "data.image_key",
  "data.demo_dir",
  "reward.name",
  "logging.wandb_project",
  "warmup.target_key",  # a column name, checked against the file when read (warmup.py)
  "warmup.cache_dir",  # a folder
  "warmup.labels_key",  # a column name, checked against the file when read (warmup.py)
}


def _leaves(c, prefix=""):
  for k, v in c.items():
    key = f"{prefix}{k}"
    if hasattr(v, "items"):
      yield from _leaves(v, key + ".")
    else:
      yield key, v


def test_every_numeric_or_enumerated_key_has_a_rule():
  c = config_lib.base_config()
  skipped_subtrees = (
    "mesh.",
    "model.tiny.",
  )  # checked against the device count / only for random_init
  missing = [
    k
    for k, v in _leaves(c)
    if not isinstance(v, bool)
    and k not in ALL_RULES
    and k not in NO_VALUE_RULE
    and not k.startswith(skipped_subtrees)
  ]
  assert not missing, f"add a rule to config.VALUE_RULES for {missing}"
  assert not [k for k in ALL_RULES if k not in dict(_leaves(c))], (
    "a rule names a key base_config lacks"
  )


def test_enumerations_match_the_registries():
  from pgpo_jax import train_step
  from pgpo_jax.models.qwen2_5_vl import layers
  from pgpo_jax.rl import advantages, losses, scoring

  choices = lambda key: {
    v
    for v in [
      "constant",
      "warmup_cosine",
      "linear",
      "token-mean",
      "seq-mean-token-mean",  # noqa: E731
      "seq-mean-token-sum",
      "seq-mean-token-sum-norm",
      "k3",
      "full_kl",
      "absolute",
      "quantile",
      "none",
      "full",
      "dots",
      "dots_no_batch",
      "float32",
      "bfloat16",
    ]
    if ALL_RULES[key][0](v)
  }
  assert choices("optim.schedule") == set(train_step.SCHEDULES)
  assert choices("pgpo.dependency_estimator") == set(scoring.DEPENDENCY_ESTIMATORS)
  assert choices("pgpo.threshold_mode") == set(advantages.THRESHOLD_MODES)
  assert choices("model.remat_policy") == set(layers._REMAT_POLICIES) | {"none"}  # "none": no remat
  # The trainer's loss offers verl's modes except the unnormalised seq-mean-token-sum.
  assert choices("loss.agg") == set(losses.LOSS_AGGREGATIONS) - {"seq-mean-token-sum"}


def test_feature_keys_are_only_checked_when_on(tmp_path):
  c = _config(tmp_path)
  c.warmup.sft_steps, c.warmup.prompts_per_step = 0, 0
  c.train.eval_every, c.train.eval_prompts = 0, 0
  config_lib.validate(c, 1)


@pytest.mark.parametrize(
  "impl,dtype,platform,match",
  [
    (
      "splash",
      "bfloat16",
      "cpu",
      "'splash' needs a TPU backend, but this run's JAX backend is 'cpu'",
    ),
    (
      "cudnn",
      "bfloat16",
      "cpu",
      "'cudnn' needs a GPU backend, but this run's JAX backend is 'cpu'",
    ),
    ("splash", "bfloat16", "gpu", "'splash' needs a TPU backend, but .* 'gpu'"),
    ("cudnn", "bfloat16", "tpu", "'cudnn' needs a GPU backend, but .* 'tpu'"),
    ("cudnn", "float32", "gpu", "bfloat16/float16 inputs only, but model.dtype is 'float32'"),
    ("auto", "float32", "gpu", "'auto' runs cuDNN .* model.dtype is 'float32'"),
    ("auto", "float32", "cpu", None),  # resolves to xla
    ("auto", "bfloat16", "tpu", None),
    ("splash", "float32", "tpu", None),
    ("cudnn", "bfloat16", "gpu", None),
    ("xla", "float32", "gpu", None),
    ("splash", "float32", None, None),  # no platform: compile_check builds TPU programs on a CPU
  ],
)
def test_attention_impl_must_run_on_the_platform(tmp_path, impl, dtype, platform, match):
  """Was: splash / cudnn on a CPU failed after the warm-up compile started, in a 548-line traceback."""
  c = _config(tmp_path)
  c.model.attention_impl, c.model.dtype = impl, dtype
  if match is None:
    config_lib.validate(c, 1, platform=platform)
  else:
    with pytest.raises(config_lib.ConfigError, match="config.model.attention_impl: .*" + match):
      config_lib.validate(c, 1, platform=platform)


def test_the_trainer_checks_attention_impl_on_its_own_platform(tmp_path):
  import jax

  from pgpo_jax import trainer

  c = _config(tmp_path / "data")
  c.model.attention_impl = {"cpu": "splash"}.get(jax.default_backend(), "cudnn")
  with pytest.raises(config_lib.ConfigError, match="config.model.attention_impl"):
    trainer.Trainer(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists() and not (tmp_path / "data" / "train.parquet").exists()


def test_init_from_a_random_file_names_key_and_path(tmp_path):
  junk = tmp_path / "weights.bin"
  junk.write_bytes(os.urandom(3000))
  c = _config(tmp_path)
  c.model.random_init, c.model.init_from = False, str(junk)
  with pytest.raises(
    config_lib.ConfigError, match=f"config.model.init_from: '{junk}' is a file; expected an HF"
  ):
    config_lib.validate(c, 1)
  c.model.init_from = str(tmp_path)  # a folder that holds no checkpoint
  with pytest.raises(config_lib.ConfigError, match="neither layout"):
    config_lib.validate(c, 1)
  c.model.init_from = "/not/here/qwen"  # not on this filesystem: left to the loader
  config_lib.validate(c, 1)
  # The config reader itself names the file and says what it expected (it is used by every loader).
  with pytest.raises(ValueError, match=f"{junk}: not a JSON config .*config.json of a Qwen2.5-VL"):
    Qwen25VLConfig.from_json(junk)
  (tmp_path / "list.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="not a JSON config object"):
    Qwen25VLConfig.from_json(tmp_path / "list.json")


@pytest.mark.parametrize("name", ["pgpo_7b", "pgpo_3b", "dapo_7b"])
def test_paper_recipes_follow_vppo_easyr1_or_say_why(name):
  """The values of VPPO's EasyR1 recipe (examples/configs/config.yaml; EasyR1's ActorConfig default
  clip_ratio_dual = 3.0), or a comment in configs/pgpo_7b.py saying why not."""
  from tests.tiny_run import ROOT, load_config

  c = load_config(os.path.join(ROOT, "configs", f"{name}.py"))
  assert (
    (c.data.min_pixels, c.data.max_pixels)
    == (256 * 28 * 28, 1280 * 28 * 28)
    == (200_704, 1_003_520)
  )
  assert c.loss.dual_clip == 3.0
  assert (c.loss.clip_low, c.loss.clip_high, c.rollout.top_p, c.rollout.group_size) == (
    0.2,
    0.28,
    0.99,
    5,
  )
  source = open(os.path.join(ROOT, "configs", "pgpo_7b.py")).read()
  assert (
    c.data.max_prompt_length == 4096 or "VPPO allows 4,096 prompt tokens; we keep 2,048" in source
  )


def test_a_cosine_schedule_needs_steps_after_its_warmup(tmp_path):
  """Was: optax's 'requires positive decay_steps' from inside the warm-up, naming no key."""
  c = _config(tmp_path)
  c.optim.schedule, c.optim.warmup_steps = "warmup_cosine", 0
  c.train.num_steps, c.warmup.sft_steps = 10, 3
  config_lib.validate(c, 1)
  c.optim.warmup_steps = 3
  with pytest.raises(config_lib.ConfigError, match=r"config.optim.warmup_steps: must be < warmup"):
    config_lib.validate(c, 1)
  c.warmup.sft_steps, c.optim.warmup_steps = 0, 10
  with pytest.raises(config_lib.ConfigError, match=r"must be < train.num_steps \(10\)"):
    config_lib.validate(c, 1)
