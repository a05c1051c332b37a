"""Writes the CPU demo data: DIR/train.parquet, DIR/test.parquet and the tiny tokenizer+processor DIR/model/.

    pgpo-make-demo-data --out_dir=/tmp/pgpo_demo [--task=answer|chain --n_train=2000 --n_test=200 --seed=0
        --describe_fraction=0]

Idempotent: every output is a pure function of the flags and is rewritten atomically, so a rerun produces
byte-identical files. Train and test use disjoint random streams of the same seed. Prints the special token
ids (and vocab size) that the model config needs. (`python scripts/make_demo_data.py ...` is the same
command; `make demo` makes the data on first use without it.)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import flags

from pgpo_jax.cli import common


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("out_dir", None, "Output folder.", flag_values=fv)
  flags.mark_flag_as_required("out_dir", flag_values=fv)
  flags.DEFINE_enum(
    "task",
    "answer",
    ["answer", "chain"],
    "answer: short answers; chain: reasoning chains.",
    flag_values=fv,
  )
  flags.DEFINE_integer("n_train", 2000, "Training rows.", flag_values=fv)
  flags.DEFINE_integer("n_test", 200, "Test rows.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the rows and of the tokenizer.", flag_values=fv)
  flags.DEFINE_integer(
    "image_size", 84, "Image side in px (multiples of 28 avoid resizing).", flag_values=fv
  )
  flags.DEFINE_integer(
    "vocab_size", 1024, "Tokenizer size incl. the 22 Qwen added tokens.", flag_values=fv
  )
  flags.DEFINE_float(
    "describe_fraction",
    0.0,
    "chain only: the share of training rows whose worked solution first describes every image "
    "fact (dense perception supervision for a warm-up); test rows never do.",
    flag_values=fv,
  )
  flags.DEFINE_integer("min_pixels", 56 * 56, "Image processor lower bound.", flag_values=fv)
  flags.DEFINE_integer("max_pixels", 112 * 112, "Image processor upper bound.", flag_values=fv)


def run(argv: Sequence[str] | None = None) -> dict[str, int]:
  """Writes the data; returns the special token ids and vocab size of the tokenizer."""
  fv, _ = common.parse("pgpo-make-demo-data", __doc__, _define, argv)
  from pgpo_jax.demo_task import tasks, tiny_tokenizer

  tasks.write_splits(
    fv.out_dir,
    fv.task,
    n_train=fv.n_train,
    n_test=fv.n_test,
    seed=fv.seed,
    image_size=fv.image_size,
    describe_fraction=fv.describe_fraction,
  )
  return tiny_tokenizer.build_tiny_model_folder(
    os.path.join(fv.out_dir, "model"),
    vocab_size=fv.vocab_size,
    min_pixels=fv.min_pixels,
    max_pixels=fv.max_pixels,
    seed=fv.seed,
    task=fv.task,
  )


def main(argv: Sequence[str] | None = None) -> int:
  print(json.dumps(run(argv), sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
