"""Train a Qwen2.5-VL policy with PGPO (or GRPO/DAPO) from an ml_collections config.

    python scripts/train.py --config=configs/demo.py [--config.train.num_steps=10] [--workdir=runs/demo]

Thin wrapper of `pgpo-train` (pgpo_jax/cli/train.py): same flags; `--help` lists them.
"""

import sys

from pgpo_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
