"""Benchmark accuracy of a checkpoint: avg@k or greedy.

    python scripts/eval.py --ckpt=runs/demo --data=demo_data/test.parquet --config.k=8   # or --greedy

Thin wrapper of `pgpo-eval` (pgpo_jax/cli/evaluate.py): same flags; `--help` lists them.
"""

import sys

from pgpo_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
