"""Warm up once and measure what the warmed-up policy perceives (issue items 1-2: the set-up).

    python experiments/chain_pgpo/warmup.py --config=experiments/chain_pgpo/config.py:pgpo \
      --config.warmup.cache_dir=experiments/chain_pgpo/runs/warmup_s0 --n=256 --out=probe.json

Runs the config's supervised warm-up through the trainer (`Trainer.sft_warmup`: the cached params are
read back when `warmup.cache_dir` already holds them), then scores `--n` held-out prompts with
`measure` and writes the JSON to `--out` (default `<cache_dir>/probe.json`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from typing import Sequence

from absl import flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file(
    "config", None, "experiment config", flag_values=fv, sys_argv=argv
  )
  flags.DEFINE_integer("n", 256, "held-out prompts", flag_values=fv)
  flags.DEFINE_bool("signals", False, "also score the candidate signals", flag_values=fv)
  flags.DEFINE_string("out", "", "JSON path (default <cache_dir>/probe.json)", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  from pgpo_jax.cli import common

  fv, _ = common.parse("warmup", __doc__, _define, argv)
  logging.basicConfig(
    level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
  )
  logging.getLogger("pgpo_jax").setLevel(logging.INFO)
  import measure

  from pgpo_jax import trainer as trainer_lib

  c = fv.config
  cache = c.warmup.cache_dir
  if not cache:
    raise SystemExit("--config.warmup.cache_dir is required (the warm-up is saved there)")
  t0 = time.time()
  cached = os.path.isdir(os.path.join(cache, "params"))
  t = trainer_lib.Trainer(c, os.path.join(cache, "run"))
  t.sft_warmup()
  seconds = time.time() - t0
  shutil.copy(os.path.join(cache, "run", "config.json"), os.path.join(cache, "config.json"))
  out = measure.measure(cache, c, n=fv.n, signals=fv.signals)
  out["warmup"] = {k: v for k, v in c.warmup.to_dict().items()}
  out["warmup_seconds"] = None if cached else seconds
  path = fv.out or os.path.join(cache, "probe.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(measure.headline(out), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
