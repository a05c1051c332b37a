"""Train a Qwen2.5-VL policy with PGPO (or GRPO/DAPO) from an ml_collections config.

    python scripts/train.py --config=configs/demo.py [--config.train.num_steps=10] [--workdir=runs/demo]

Resumes automatically from the workdir's latest checkpoint. Exit status: 0 when the run finished
(`train.num_steps`, or the end of the data after `data.num_epochs` passes); 75 (EX_TEMPFAIL) when
SIGTERM or SIGINT stopped it early after saving a checkpoint (rerun the same command to resume; it
prints no `done.`); 1 on an error.

On multi-host TPU, run the same command on every worker (see tpu/README.md); `--distributed`
(default: auto) calls jax.distributed.initialize().
Elsewhere name the coordinator, e.g. two processes on one CPU machine (tests/test_multihost.py):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python scripts/train.py --config=... \
        --coordinator_address=localhost:12345 --num_processes=2 --process_id=0   # and =1
"""
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics). Default: config.workdir "
                               "or runs/<config name>.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                                 "Call jax.distributed.initialize() (auto: on multi-host TPU environments, or "
                                 "when --coordinator_address is given).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters that JAX "
                                   "does not detect (GPU hosts, N processes on one CPU machine).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def main(argv):
  del argv
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/grain INFO chatter
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  ours = logging.getLogger("pgpo_jax")
  ours.setLevel(logging.INFO)
  ours.addHandler(handler)
  ours.propagate = False
  import jax
  from pgpo_jax import multihost
  multi = _DISTRIBUTED.value == "yes" or (_DISTRIBUTED.value == "auto" and (
      bool(_COORDINATOR.value) or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")))
  if multi:
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from pgpo_jax import trainer
  c = _CONFIG.value
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or c.workdir or os.path.join("runs", name)
  try:
    last, preempted = trainer.train(c, workdir), None
  except trainer.Preempted as e:
    last, preempted = e.metrics, e
  if jax.process_index() == 0:
    keys = ("reward/overall", "reward/accuracy", "reward/format", "eval/accuracy")
    print(f"stopped early: {preempted}" if preempted else "done.", "workdir:", os.path.abspath(workdir))
    print("last step:", {k: round(last[k], 4) for k in keys if k in last})
    skipped = {k.rsplit("/", 1)[1]: int(v) for k, v in last.items() if k.startswith("count/data_skipped_rows/") and v}
    print(f"training data: {int(last.get('count/data_rows_read', 0))} rows read, "
          f"{int(last.get('count/data_skipped_rows', 0))} skipped", skipped or "")
    print("metrics:", os.path.join(os.path.abspath(workdir), "metrics.jsonl"),
          "| TensorBoard:", os.path.join(os.path.abspath(workdir), "tb"))
  if preempted:
    sys.exit(trainer.EXIT_PREEMPTED)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
