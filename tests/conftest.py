"""Shared test setup: float32-exact matmuls and a persistent compilation cache.

Multi-device tests run in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (see `tests/multidevice.py`),
because the flag must be set before jax is first imported.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tests.xla_flags import TEST_XLA_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
  """(hf_model, folder) of an untied GQA tiny Qwen2.5-VL saved with save_pretrained."""
  from tests.hf_utils import make_hf_model

  path = tmp_path_factory.mktemp("tiny_hf")
  return make_hf_model(path, seed=0), path


@pytest.fixture(scope="session")
def tiny_hf_tied(tmp_path_factory):
  from tests.hf_utils import make_hf_model

  path = tmp_path_factory.mktemp("tiny_hf_tied")
  return make_hf_model(path, seed=1, tie=True, num_kv_heads=4), path
