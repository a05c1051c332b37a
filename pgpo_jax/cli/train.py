"""Train a Qwen2.5-VL policy with PGPO (or GRPO/DAPO) from an ml_collections config.

    pgpo-train --config=configs/demo.py [--config.train.num_steps=10] [--workdir=runs/demo]
    python scripts/train.py --config=configs/demo.py ...        # the same

Resumes automatically from the workdir's latest checkpoint. On multi-host TPU, run the same command
on every worker (see tpu/README.md); `--distributed` (default: auto) calls jax.distributed.initialize().
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
  config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.mark_flag_as_required("config", flag_values=fv)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics). Default: config.workdir or "
                      "runs/<config name>.", flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"], "Call jax.distributed.initialize() (auto: on "
                    "multi-host TPU environments, or when --coordinator_address is given).", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters that JAX does not "
                      "detect (GPU hosts, N processes on one CPU machine).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).", flag_values=fv)


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
  from pgpo_jax import multihost
  multi = fv.distributed == "yes" or (fv.distributed == "auto" and (
      bool(fv.coordinator_address) or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")))
  if multi:
    multihost.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  from pgpo_jax import trainer
  c = fv.config
  name = os.path.splitext(os.path.basename(fv["config"].config_filename))[0]
  workdir = fv.workdir or c.workdir or os.path.join("runs", name)
  last = trainer.train(c, workdir)
  if jax.process_index() == 0:
    keys = ("reward/overall", "reward/accuracy", "reward/format", "eval/accuracy")
    print("done. workdir:", os.path.abspath(workdir))
    print("last step:", {k: round(last[k], 4) for k in keys if k in last})
    print("metrics:", os.path.join(os.path.abspath(workdir), "metrics.jsonl"),
          "| TensorBoard:", os.path.join(os.path.abspath(workdir), "tb"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
