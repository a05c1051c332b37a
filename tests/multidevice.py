"""Run a snippet of Python on a forced 8-device CPU platform, in a subprocess.

`XLA_FLAGS=--xla_force_host_platform_device_count=8` only takes effect if it is
set before jax is imported, so multi-device tests execute their body in a fresh
interpreter and read back a JSON result printed on the last line of stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.xla_flags import with_devices

_PRELUDE = f"""
import os
os.environ["XLA_FLAGS"] = {with_devices(8)!r}
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()
"""


def run_on_8_devices(body: str, timeout: float = 600) -> dict:
  """Executes `body` on 8 CPU devices; `body` must print one JSON line last."""
  code = _PRELUDE + textwrap.dedent(body)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
  )
  if proc.returncode != 0:
    raise AssertionError(
      f"8-device subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
  return json.loads(proc.stdout.strip().splitlines()[-1])
