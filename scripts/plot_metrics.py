"""Training curves of one or more runs as PNGs, runs overlaid and labelled.

    python scripts/plot_metrics.py runs/dapo runs/pgpo_7b --out plots/
    python scripts/plot_metrics.py dapo=runs/a pgpo=runs/b/metrics.jsonl --smooth 5

Each argument is a WORKDIR (or its metrics.jsonl), optionally LABEL=PATH (default label: the folder
name). Writes overview.png, reward.png, eval_accuracy.png, entropy.png, grad_norm.png, loss.png,
dependency.png, pgpo_weights.png, response_length.png, dynamic_sampling.png and time.png, each when
some run has its metrics (--out default: plots/). Details: pgpo_jax/plotting.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", help="WORKDIR, metrics.jsonl or LABEL=PATH")
  p.add_argument("--out", default="plots")
  p.add_argument("--smooth", type=int, default=1, help="trailing-mean window in steps (1 = raw)")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from pgpo_jax.tools import plotting
  try:
    runs = plotting.parse_runs(a.runs)
  except FileNotFoundError as e:
    print(f"plot_metrics: error: {e}", file=sys.stderr)
    return 2
  written = plotting.plot_runs(runs, a.out, smooth=a.smooth)
  for path in written:
    print(path)
  return 0 if written else 1


if __name__ == "__main__":
  sys.exit(main())
