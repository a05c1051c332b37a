"""Training curves of one or more runs as PNGs, runs overlaid and labelled.

    python scripts/plot_metrics.py runs/dapo pgpo=runs/pgpo_7b --out=plots/

Thin wrapper of `pgpo-plot` (pgpo_jax/cli/plot_metrics.py): same flags; `--help` lists them.
"""

import sys

from pgpo_jax.cli.plot_metrics import main

if __name__ == "__main__":
  sys.exit(main())
