"""Token visual dependency S and PGPO weights of a checkpoint's responses: HTML pages, plots, JSON.

    python scripts/inspect_dependency.py --ckpt=runs/demo --data=demo_data/test.parquet --config.n=20

Thin wrapper of `pgpo-inspect` (pgpo_jax/cli/inspect_dependency.py): same flags; `--help` lists them.
"""

import sys

from pgpo_jax.cli.inspect_dependency import main

if __name__ == "__main__":
  sys.exit(main())
