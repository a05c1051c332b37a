"""Training curves of one or more runs as PNGs, runs overlaid and labelled.

    pgpo-plot runs/dapo runs/pgpo_7b --out=plots/
    pgpo-plot dapo=runs/a pgpo=runs/b/metrics.jsonl --smooth=5

Each argument is a WORKDIR (or its metrics.jsonl), optionally LABEL=PATH (default label: the folder
name). Writes overview.png, reward.png, eval_accuracy.png, entropy.png, grad_norm.png, loss.png,
dependency.png, pgpo_weights.png, response_length.png, dynamic_sampling.png and time.png, each when
some run has its metrics (--out default: plots/). Needs the `plot` extra.
(`python scripts/plot_metrics.py ...` is the same command.) Details: pgpo_jax/tools/plotting.py.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from absl import flags

from pgpo_jax.cli import common


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("out", "plots", "Output folder.", flag_values=fv)
  flags.DEFINE_integer("smooth", 1, "Trailing-mean window in steps (1 = raw).", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  fv, runs_args = common.parse("pgpo-plot", __doc__, _define, argv)
  if not runs_args:
    print(
      "pgpo-plot: error: give at least one run (WORKDIR, metrics.jsonl or LABEL=PATH)",
      file=sys.stderr,
    )
    return common.USAGE_ERROR
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from pgpo_jax.tools import plotting

  try:
    runs = plotting.parse_runs(runs_args)
  except FileNotFoundError as e:
    print(f"pgpo-plot: error: {e}", file=sys.stderr)
    return 2
  written = plotting.plot_runs(runs, fv.out, smooth=fv.smooth)
  for path in written:
    print(path)
  return 0 if written else 1


if __name__ == "__main__":
  sys.exit(main())
