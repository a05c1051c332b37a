"""The demo tasks by name (`data.demo_task`, `pgpo-make-demo-data --task`) and their parquet splits."""

from __future__ import annotations

import os
from types import ModuleType

from pgpo_jax.demo_task import chain, synthetic

TASKS: dict[str, ModuleType] = {"answer": synthetic, "chain": chain}  # tiny_tokenizer.TASKS


def write_splits(
  out_dir: str,
  task: str,
  *,
  n_train: int,
  n_test: int,
  seed: int,
  image_size: int,
  describe_fraction: float = 0.0,
) -> None:
  """OUT_DIR/train.parquet and OUT_DIR/test.parquet of `task`: disjoint random streams (0 and 1)
  of one seed, each file a pure function of the arguments. `describe_fraction` (chain only): the
  share of training rows whose worked solution states every image fact (`chain.make_split`); the
  test split never is."""
  if task not in TASKS:
    raise ValueError(f"unknown demo task {task!r}; expected one of {sorted(TASKS)}")
  if describe_fraction and task != "chain":
    raise ValueError(f"describe_fraction is a chain-task option; task {task!r} has no description")
  module = TASKS[task]
  os.makedirs(out_dir, exist_ok=True)
  for name, n, stream in (("train", n_train, 0), ("test", n_test, 1)):
    extra = (
      {"describe_fraction": describe_fraction} if name == "train" and describe_fraction else {}
    )
    rows = module.make_split(n, seed, image_size, stream=stream, **extra)
    path = os.path.join(out_dir, f"{name}.parquet")
    synthetic.write_parquet(rows, path, schema=module.PARQUET_SCHEMA)
