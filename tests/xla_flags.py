"""The XLA flags of every test process (pytest's and the subprocesses tests start).

The suite is bound by compile time (tiny models, hundreds of programs), so LLVM runs at -O0:
measured on this project's tests, ~20% less wall time; the programs compute the same values (XLA's
HLO passes and fusions are unchanged; only the CPU code generation is optimised less).
"""

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def with_devices(n: int) -> str:
  """XLA_FLAGS for a process on `n` forced host-platform (CPU) devices."""
  return f"--xla_force_host_platform_device_count={n} {TEST_XLA_FLAGS}"
