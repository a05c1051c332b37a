"""A whole demo training step, PGPO vs DAPO (`pgpo.enabled=False`), side by side: the blind view's share.

    .venv/bin/python benchmarks/demo_step.py [--warmup 2 --steps 3 --packing]

Two trainers on `configs/demo.py` (no SFT warm-up, dynamic sampling off so that every step scores and
updates), stepped alternately after `--warmup` steps each (which compile most shapes; a later
step that meets a new bucket still compiles inside its time). DAPO scores the image view only, so
the difference of the two steps is what PGPO's blind view (and its token weights) costs. Writes
benchmarks/results/demo_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgpo_jax import trainer  # noqa: E402
from tests.tiny_run import load_config  # noqa: E402

KEYS = ("time/step", "time/rollout", "time/scoring", "time/advantages", "time/update")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--packing", action="store_true", help="train.packing=True for both")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_step.json"))
  a = ap.parse_args()
  work = tempfile.mkdtemp(prefix="demo_step_")
  trainers = {}
  for name, enabled in (("pgpo", True), ("dapo", False)):
    c = load_config(str(ROOT / "configs" / "demo.py"))
    c.data.demo_dir = os.path.join(work, "data")
    c.data.train_files = os.path.join(work, "data", "train.parquet")
    c.data.eval_files = ""
    c.data.processor_dir = os.path.join(work, "data", "model")
    c.pgpo.enabled = enabled
    c.warmup.sft_steps = 0
    c.dynamic_sampling.enabled = False  # a random model's rewards are all 0: keep every group
    c.train.eval_every = 0
    c.train.packing = a.packing
    c.train.packed_row_length = c.data.max_prompt_length + c.rollout.max_new_tokens
    c.logging.tensorboard = False
    trainers[name] = trainer.Trainer(c, os.path.join(work, name))
  for _ in range(a.warmup):
    for t in trainers.values():
      t.train_one_step()  # compiles
  rows = {name: [] for name in trainers}
  for _ in range(a.steps):
    for name, t in trainers.items():
      rows[name].append(t.train_one_step())
  for t in trainers.values():
    t.checkpointer.close()
  mean = {name: {k: float(np.mean([m[k] for m in ms])) for k in KEYS} for name, ms in rows.items()}
  p, d = mean["pgpo"], mean["dapo"]
  res = dict(
    warmup=a.warmup,
    steps=a.steps,
    packing=a.packing,
    mean_s=mean,
    blind_share_of_step=(p["time/step"] - d["time/step"]) / p["time/step"],
    scoring_share_pgpo=p["time/scoring"] / p["time/step"],
    scoring_share_dapo=d["time/scoring"] / d["time/step"],
  )
  print(f"{'mean seconds':<14}" + "".join(f"{k[5:]:>12}" for k in KEYS))
  for name in ("pgpo", "dapo"):
    print(f"{name:<14}" + "".join(f"{mean[name][k]:>12.2f}" for k in KEYS))
  print(
    f"blind view's share of a PGPO step: {100 * res['blind_share_of_step']:.1f}% "
    f"(scoring: {100 * res['scoring_share_pgpo']:.1f}% of the PGPO step, {100 * res['scoring_share_dapo']:.1f}% "
    f"of the DAPO step; packing={a.packing})"
  )
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
