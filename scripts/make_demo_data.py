"""Writes the CPU demo data: DIR/train.parquet, DIR/test.parquet and the tiny tokenizer folder DIR/model/.

    python scripts/make_demo_data.py --out_dir=/tmp/pgpo_demo [--n_train=2000 --n_test=200]

Thin wrapper of `pgpo-make-demo-data` (pgpo_jax/cli/make_demo_data.py): same flags; `--help` lists them.
"""

import sys

from pgpo_jax.cli.make_demo_data import main

if __name__ == "__main__":
  sys.exit(main())
