"""Train a Qwen2.5-VL policy with PGPO (or GRPO/DAPO) from an ml_collections config.

    pgpo-train --config=configs/demo.py [--config.train.num_steps=10] [--workdir=runs/demo]
    python scripts/train.py --config=configs/demo.py ...        # the same

Resumes automatically from the workdir's latest checkpoint. Exit status: 0 when the run finished
(`train.num_steps`, or the end of the data after `data.num_epochs` passes); 75 (EX_TEMPFAIL) when
SIGTERM or SIGINT stopped it early (rerun the same command to resume; it prints no `done.` but what
was saved: the last step, or nothing when the signal came during the warm-up, which the rerun
starts again); 1 on an error, e.g. when another run is using the workdir (one run per
workdir: a flock on WORKDIR/.train-process<i>.lock, freed by the OS however that run ends).

On multi-host TPU, run the same command on every worker (see tpu/README.md); `--distributed` (default:
auto) calls jax.distributed.initialize().
Elsewhere name the coordinator, e.g. two processes on one CPU machine (tests/test_multihost.py):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 pgpo-train --config=... \\
        --coordinator_address=localhost:12345 --num_processes=2 --process_id=0   # and =1
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from pgpo_jax.cli import common


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file in configs/.",
    flag_values=fv,
    lock_config=True,
    sys_argv=argv,
  )
  flags.mark_flag_as_required("config", flag_values=fv)
  flags.DEFINE_string(
    "workdir",
    None,
    "Run directory (checkpoints, metrics). Default: config.workdir or runs/<config name>.",
    flag_values=fv,
  )
  common.define_distributed_flags(fv)


def _log_to_stderr() -> None:
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/grain INFO chatter
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  ours = logging.getLogger("pgpo_jax")
  ours.setLevel(logging.INFO)
  ours.addHandler(handler)
  ours.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
  fv, _ = common.parse("pgpo-train", __doc__, _define, argv)
  _log_to_stderr()
  import jax

  common.maybe_initialize_distributed(fv)
  from pgpo_jax import trainer
  from pgpo_jax.checkpoint import CheckpointError

  c = fv.config
  name = os.path.splitext(os.path.basename(fv["config"].config_filename))[0]
  workdir = fv.workdir or c.workdir or os.path.join("runs", name)
  try:
    last, preempted = trainer.train(c, workdir), None
  except trainer.Preempted as e:
    last, preempted = e.metrics, e
  except (trainer.WorkdirBusy, CheckpointError) as e:  # the message says it all: no traceback
    print(f"pgpo-train: error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    keys = ("reward/overall", "reward/accuracy", "reward/format", "eval/accuracy")
    print(
      f"stopped early: {preempted}" if preempted else "done.", "workdir:", os.path.abspath(workdir)
    )
    print("last step:", {k: round(last[k], 4) for k in keys if k in last})
    skipped = {
      k.rsplit("/", 1)[1]: int(v)
      for k, v in last.items()
      if k.startswith("count/data_skipped_rows/") and v
    }
    print(
      f"training data: {int(last.get('count/data_rows_read', 0))} rows read, "
      f"{int(last.get('count/data_skipped_rows', 0))} skipped",
      skipped or "",
    )
    print(
      "metrics:",
      os.path.join(os.path.abspath(workdir), "metrics.jsonl"),
      "| TensorBoard:",
      os.path.join(os.path.abspath(workdir), "tb"),
    )
  return trainer.EXIT_PREEMPTED if preempted else 0


if __name__ == "__main__":
  sys.exit(main())
