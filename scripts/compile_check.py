"""Ahead-of-time compile of the trainer's programs for a TPU slice on this (CPU) host.

    python scripts/compile_check.py --config=configs/pgpo_7b.py --topology=v5p-64

Thin wrapper of `pgpo-compile-check` (pgpo_jax/cli/compile_check.py): same flags; `--help` lists them.
"""

import sys

from pgpo_jax.cli.compile_check import main

if __name__ == "__main__":
  sys.exit(main())
