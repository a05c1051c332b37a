"""The demo tasks by name (`data.demo_task`, `pgpo-make-demo-data --task`) and their parquet splits."""

from __future__ import annotations

import os
from types import ModuleType

from pgpo_jax.demo_task import chain, synthetic

TASKS: dict[str, ModuleType] = {"answer": synthetic, "chain": chain}  # tiny_tokenizer.TASKS


def write_splits(
  out_dir: str, task: str, *, n_train: int, n_test: int, seed: int, image_size: int
) -> None:
  """OUT_DIR/train.parquet and OUT_DIR/test.parquet of `task`: disjoint random streams (0 and 1)
  of one seed, each file a pure function of the arguments."""
  if task not in TASKS:
    raise ValueError(f"unknown demo task {task!r}; expected one of {sorted(TASKS)}")
  module = TASKS[task]
  os.makedirs(out_dir, exist_ok=True)
  for name, n, stream in (("train", n_train, 0), ("test", n_test, 1)):
    rows = module.make_split(n, seed, image_size, stream=stream)
    path = os.path.join(out_dir, f"{name}.parquet")
    synthetic.write_parquet(rows, path, schema=module.PARQUET_SCHEMA)
